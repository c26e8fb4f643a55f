"""Sharded (DCP) checkpoints on real files: manifest, atomic publish, verified load, kills mid-save, export.

The manager is exercised in-process with one rank (DCP without a process group) and, for kills, in a
real subprocess; multi-rank training (torchrun, gloo) with sharded checkpoints is in tests/test_fsdp.py
and at the end of this file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from dist_train.checkpoint.catalog import latest_valid_checkpoint, list_checkpoints
from dist_train.checkpoint.file import verify_checkpoint
from dist_train.checkpoint.layout import BEST_POINTER, MANIFEST_NAME
from dist_train.checkpoint.sharded import (
    COMMON_NAME,
    FAULT_ENV,
    ShardedCheckpointManager,
    consolidate,
    load_sharded_model_and_optimizer,
    read_sharded_state,
    verify_sharded_checkpoint,
)
from dist_train.errors import CheckpointError
from launcher.cli import main as cli_main
from tests.helpers.run import REPO, assert_ok, dtrain, env_for_tests, make_image_h5, records, start_dtrain, write_config

# ------------------------------------------------------------------------------------------ helpers


def trained(seed: int, hidden: int = 8) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and an Adam optimizer after one real step, so optimizer tensors exist."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.01)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(
    manager: ShardedCheckpointManager, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, **kw: Any
) -> Path:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    common = {
        "format_version": 1,
        "epoch": 0,
        "step": step,
        "reason": "epoch",
        "epoch_complete": True,
        "world_size": 1,
        "config": {"run": {"name": "unit"}},
        "trainer": {"step": step},
    }
    rank_state = {"rng": {"torch": torch.get_rng_state()}, "meter": {"loss": float(step)}}
    path = manager.save(
        {"model": model_sd, "optimizer": optim_sd},
        common,
        rank_state,
        epoch=0,
        step=step,
        metrics={"val/loss": 1.0 / step},
        **kw,
    )
    manager.wait()
    assert path is not None
    return path


def manager(directory: Path, **kw: Any) -> ShardedCheckpointManager:
    return ShardedCheckpointManager(directory, rank=0, group=None, **kw)


def pointer(directory: Path, name: str = "latest") -> str:
    return (directory / name).read_text().strip()


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ format


def test_save_writes_shards_rank_state_and_a_manifest_of_every_file(tmp_path: Path) -> None:
    model, optimizer = trained(1)
    path = save(manager(tmp_path), model, optimizer, step=7)

    assert path == tmp_path / "ckpt-e0000-s00000007" and path.is_dir()
    assert pointer(tmp_path) == path.name
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != MANIFEST_NAME)
    assert sorted(manifest["files"]) == on_disk
    assert {".metadata", COMMON_NAME, "rank-00000.pt", "__0_0.distcp"} <= set(on_disk)
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert (manifest["epoch"], manifest["step"], manifest["reason"], manifest["world_size"]) == (0, 7, "epoch", 1)
    assert manifest["config"] == {"run": {"name": "unit"}} and manifest["metrics"] == {"val/loss": 1.0 / 7}
    assert verify_sharded_checkpoint(path) is None
    assert [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_only_tensors_go_through_dcp_and_everything_loads_back_equal(tmp_path: Path) -> None:
    model, optimizer = trained(2)
    path = save(manager(tmp_path), model, optimizer, step=3)
    # param_groups (lr, betas, weight_decay, ...) are not tensors: they travel in common.pt (weights_only).
    common = torch.load(path / COMMON_NAME, weights_only=True)
    assert common["model_and_optimizer_rest"]["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    state = read_sharded_state(path)
    assert state["rank_states"][0]["meter"] == {"loss": 3.0} and state["trainer"] == {"step": 3}

    fresh_model, fresh_optimizer = trained(99)
    load_sharded_model_and_optimizer(path, fresh_model, fresh_optimizer, state["model_and_optimizer_rest"])
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for pid, pstate in optimizer.state_dict()["state"].items():
        for key, value in pstate.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(fresh_optimizer.state_dict()["state"][pid][key]))
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]

    whole = consolidate(path, optimizer=True)
    assert torch.equal(whole["model"]["0.weight"], model.state_dict()["0.weight"])
    assert torch.equal(whole["optimizer"]["state"]["2.bias"]["exp_avg"], optimizer.state_dict()["state"][3]["exp_avg"])


def test_keep_last_best_pointer_and_a_second_save_at_the_same_step(tmp_path: Path) -> None:
    writer = manager(tmp_path, keep_last=2)
    model, optimizer = trained(3)
    best = save(writer, model, optimizer, step=1, is_best=True)
    paths = [save(writer, model, optimizer, step=s) for s in (2, 3, 4)]
    again = save(writer, model, optimizer, step=4)

    assert again.name == "ckpt-e0000-s00000004-1" and paths[-1].is_dir(), "a published directory is never reused"
    assert pointer(tmp_path, BEST_POINTER) == best.name and best.is_dir(), "best outlives pruning"
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == sorted([best.name, paths[-1].name, again.name])
    assert [r.path for r in list_checkpoints(tmp_path)] == [again, paths[-1], best]
    assert latest_valid_checkpoint(tmp_path) == again


def test_stale_temp_directory_is_ignored_then_removed_at_the_next_start(tmp_path: Path) -> None:
    model, optimizer = trained(4)
    good = save(manager(tmp_path), model, optimizer, step=1)
    stale = tmp_path / ".ckpt-e0000-s00000002.abc.tmp"
    shutil.copytree(good, stale)  # a complete-looking save that never got renamed
    assert latest_valid_checkpoint(tmp_path) == good
    manager(tmp_path)
    assert not stale.exists() and good.is_dir()


# ------------------------------------------------------------------------------------ verification


@pytest.mark.parametrize("damage", ["flip_shard", "truncate_shard", "drop_rank_file", "no_manifest"])
def test_damaged_newest_falls_back_to_the_previous_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    writer = manager(tmp_path)
    model, optimizer = trained(5)
    older = save(writer, model, optimizer, step=1)
    newest = save(writer, model, optimizer, step=2)
    shard = newest / "__0_0.distcp"
    if damage == "flip_shard":
        flip_byte(shard)
    elif damage == "truncate_shard":
        os.truncate(shard, shard.stat().st_size - 10)
    elif damage == "drop_rank_file":
        (newest / "rank-00000.pt").unlink()
    else:
        (newest / MANIFEST_NAME).unlink()

    expected = {
        "flip_shard": "sha256 mismatch in __0_0.distcp",
        "truncate_shard": "__0_0.distcp is",
        "drop_rank_file": "rank-00000.pt is missing",
        "no_manifest": "no manifest.json",
    }[damage]
    assert expected in (verify_sharded_checkpoint(newest) or "")
    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert latest_valid_checkpoint(tmp_path) == older
    assert f"checkpoint {newest} is invalid" in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointError, match="failed verification"):
        read_sharded_state(newest)


def test_a_metadata_file_that_would_run_code_is_refused(tmp_path: Path) -> None:
    model, optimizer = trained(6)
    path = save(manager(tmp_path), model, optimizer, step=1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> Any:
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="not DCP metadata: unexpected global"):
        consolidate(path, verify=False)  # even a checkpoint whose manifest was rewritten to match
    assert not marker.exists()


# --------------------------------------------------------------------------------------- async (CPU)


def test_async_save_snapshots_before_returning(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    writer = manager(tmp_path, async_save=True)
    model, optimizer = trained(7)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    common = {"epoch": 0, "step": 1, "world_size": 1, "config": {}}
    path = writer.save({"model": model_sd, "optimizer": optim_sd}, common, {"meter": {}}, epoch=0, step=1)
    with torch.no_grad():
        for p in model.parameters():  # training goes on at once
            p.add_(100.0)
    writer.close()
    assert path is not None and verify_sharded_checkpoint(path) is None
    loaded = consolidate(path)["model"]
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


# ------------------------------------------------------------------------------- kills during a save

_KILLED_SAVER = r"""
import sys
from pathlib import Path
import torch
from tests.test_sharded_checkpoint import manager, save, trained

directory = Path(sys.argv[1])
writer = manager(directory)
model, optimizer = trained(1, hidden=256)
save(writer, model, optimizer, step=1)
print("SAVED1", flush=True)
for step in range(2, 100):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    save(writer, model, optimizer, step=step)
"""


@pytest.mark.parametrize(("phase", "expected_step"), [("after_shards", 1), ("before_publish", 1)])
def test_sigkill_inside_a_save_leaves_the_previous_checkpoint(tmp_path: Path, phase: str, expected_step: int) -> None:
    env = env_for_tests({FAULT_ENV: f"{phase}:0:2"})
    directory = tmp_path / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVER, str(directory)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "SAVED1"
        marker = tmp_path / f"fault-{phase}-rank0"
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the fault point was not reached"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert [p.name for p in directory.glob(".ckpt-*.tmp")], "the kill landed inside the save"
    chosen = latest_valid_checkpoint(directory)
    assert chosen is not None and pointer(directory) == chosen.name
    assert read_sharded_state(chosen)["step"] == expected_step
    manager(directory)  # the next start sweeps the torn save away
    assert list(directory.glob(".ckpt-*.tmp")) == []


# --------------------------------------------------------------------------------------------- CLI


def test_cli_inspect_and_export_of_a_sharded_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, optimizer = trained(8)
    path = save(manager(tmp_path / "run" / "checkpoints"), model, optimizer, step=5)

    assert cli_main(["ckpt", "inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert path.name in out and "step  5" in out and "files match the manifest" in out

    out_file = tmp_path / "export" / "model.pt"
    assert cli_main(["ckpt", "export", str(tmp_path / "run"), str(out_file)]) == 0
    assert verify_checkpoint(out_file) is None
    # The file is the model's state_dict, nothing else; the metadata sits in the sidecar.
    fresh, _ = trained(9)
    fresh.load_state_dict(torch.load(out_file, weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    meta = json.loads(out_file.with_name("model.pt.sha256.json").read_text())
    assert (meta["format"], meta["step"], meta["source"], meta["config"]) == (
        "dtrain-model-export",
        5,
        str(path),
        {"run": {"name": "unit"}},
    )

    flip_byte(path / "__0_0.distcp")
    assert cli_main(["ckpt", "inspect", str(path)]) == 2
    assert "sha256 mismatch in __0_0.distcp" in capsys.readouterr().err


# ---------------------------------------------------------------------------- multi-rank training


def fsdp_config(tmp_path: Path, name: str, data: Path, **train: Any) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 2, "deterministic": True},
        data={"batch_size": 8, "num_workers": 0},
        model={"name": "mlp", "num_classes": 3, "hidden": [32, 32]},
        train={"epochs": 2, "log_every": 1, "precision": "fp32", "strategy": "fsdp", **train},
        fsdp={"min_params": 50},
        checkpoint={"every_steps": 4, "keep_last": 2},
    )


def kill_job(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the launcher, torchrun and every worker: what a node failure looks like."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(family, timeout=60)


@pytest.mark.parametrize(
    ("phase", "rank"),
    [
        pytest.param("before_publish", 0, marks=pytest.mark.slow),
        pytest.param("after_shards", 1, marks=pytest.mark.slow),
    ],
    ids=["rank0-before-rename", "rank1-after-its-shard"],
)
def test_rank_killed_inside_a_sharded_save_resumes_from_the_previous_one(tmp_path: Path, phase: str, rank: int) -> None:
    """2 ranks; the second save stops on one rank at a fault point, that rank is SIGKILLed (torchrun then
    stops the job); the relaunch resumes from the first save, sweeps the torn one and finishes. Then
    `dtrain eval` of the sharded checkpoint and of its export agree."""
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = fsdp_config(tmp_path, "killed", data)
    run_dir = tmp_path / "killed"
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path, env=env_for_tests({FAULT_ENV: f"{phase}:{rank}:2"}))
    marker = run_dir / f"fault-{phase}-rank{rank}"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, (
            f"fault point not reached: {proc.stdout.read() if proc.stdout else ''}"
        )
        time.sleep(0.05)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode not in (0, 75), out
    checkpoints = run_dir / "checkpoints"
    assert pointer(checkpoints) == "ckpt-e0001-s00000004" and list(checkpoints.glob(".ckpt-*.tmp"))

    relaunch = dtrain(*args, cwd=tmp_path)
    assert_ok(relaunch)
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"resumed from {checkpoints / 'ckpt-e0001-s00000004'} (epoch 1, step 4, mid-epoch" in log
    assert (
        list(checkpoints.glob(".ckpt-*.tmp")) == []
        and "interrupted checkpoint save" in relaunch.stderr + relaunch.stdout
    )
    final = latest_valid_checkpoint(checkpoints)
    assert final is not None and final.is_dir() and len(read_sharded_state(final)["rank_states"]) == 2

    exported = tmp_path / "model.pt"
    assert_ok(dtrain("ckpt", "export", str(run_dir), str(exported), cwd=tmp_path))
    from_sharded = dtrain("eval", str(run_dir), "--split", "test", "--json", cwd=tmp_path)
    from_export = dtrain("eval", str(exported), "--split", "test", "--json", cwd=tmp_path)
    assert_ok(from_sharded)
    assert_ok(from_export)
    a, b = json.loads(from_sharded.stdout), json.loads(from_export.stdout)
    assert {k: v for k, v in a.items() if k != "checkpoint"} == {k: v for k, v in b.items() if k != "checkpoint"}
    best = dtrain("eval", str(run_dir), "--split", "test", "--checkpoint", "best", "--json", cwd=tmp_path)
    assert_ok(best)  # what the end-of-run test evaluates
    assert json.loads(best.stdout)["test/loss"] == pytest.approx(
        records(run_dir, "test")[-1]["test/loss"], abs=1e-6
    )  # 1 process vs 2 ranks
    best = dtrain("eval", str(run_dir), "--checkpoint", "best", "--json", cwd=tmp_path)
    assert_ok(best)
    assert Path(json.loads(best.stdout)["checkpoint"]).name == pointer(checkpoints, BEST_POINTER)

    # A config change the checkpoint cannot follow is refused before anything is loaded or written.
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    refused = dtrain(*args, "--set", "train.epochs=3", "--set", "model.hidden=[16, 16]", cwd=tmp_path)
    assert refused.returncode == 2 and "model.hidden: [32, 32] -> [16, 16]" in refused.stdout + refused.stderr
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before and pointer(checkpoints) == final.name


@pytest.mark.slow
def test_async_sharded_saves_on_gloo_then_sigterm_resume_is_bit_exact(tmp_path: Path) -> None:
    """checkpoint.async_save = "on" on the CPU: DCP's async_save over a dedicated gloo group, saves every
    3 steps while training goes on, a SIGTERM, a resume: the same final state as a synchronous run."""
    from tests.test_fsdp import _slow_fsdp_config
    from tests.test_resume import EPOCHS, assert_same_state, wait_for_step

    nproc = 2
    data = make_image_h5(tmp_path / "d.h5", events=600)
    steps_per_epoch = -(-480 // (8 * nproc))
    ref_cfg = _slow_fsdp_config(tmp_path, "ref", data)
    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "cpu",
            "--nproc",
            str(nproc),
            str(ref_cfg),
            "--run-dir",
            str(tmp_path / "ref"),
            cwd=tmp_path,
        )
    )

    cut_cfg = _slow_fsdp_config(tmp_path, "cut", data)
    run_dir = tmp_path / "cut"
    args = (
        "launch",
        "--gpus",
        "cpu",
        "--nproc",
        str(nproc),
        str(cut_cfg),
        "--run-dir",
        str(run_dir),
        "--set",
        "checkpoint.async_save=on",
        "--set",
        "checkpoint.every_steps=3",
    )
    proc = start_dtrain(*args, cwd=tmp_path)
    wait_for_step(run_dir, steps_per_epoch + steps_per_epoch // 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 75, out
    from tests.helpers.run import load_final_model, metric_history

    cut = load_final_model(run_dir)
    assert cut["reason"] == "preempt" and steps_per_epoch < cut["step"] < 2 * steps_per_epoch
    assert_ok(dtrain(*args, cwd=tmp_path))
    assert_same_state(load_final_model(tmp_path / "ref"), load_final_model(run_dir))
    assert metric_history(tmp_path / "ref") == metric_history(run_dir)
    assert len(metric_history(run_dir)) == EPOCHS


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_random_sigkills_of_an_fsdp_job_never_leave_an_unloadable_latest(tmp_path: Path) -> None:
    """The DDP kill trial (tests/test_kill_trials.py) with sharded checkpoints on 3 ranks: after every
    SIGKILL of the whole job, `latest` names a complete checkpoint, the newest valid one consolidates,
    and the finished run equals an uninterrupted one bit for bit."""
    import random

    from tests.helpers.run import load_final_model, metric_history
    from tests.test_kill_trials import last_logged_step, reached_step

    rng = random.Random(4321)
    kills_wanted = 10
    data = make_image_h5(tmp_path / "d.h5", events=600)
    ref = fsdp_config(tmp_path, "ref", data, epochs=3)
    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "cpu",
            "--nproc",
            "3",
            str(ref),
            "--run-dir",
            str(tmp_path / "ref"),
            cwd=tmp_path,
            timeout=600,
        )
    )
    cfg = fsdp_config(tmp_path, "killed", data, epochs=3)
    run_dir = tmp_path / "killed"
    args = (
        "launch",
        "--gpus",
        "cpu",
        "--nproc",
        "3",
        str(cfg),
        "--run-dir",
        str(run_dir),
        "--set",
        "checkpoint.every_steps=2",
    )
    kills = 0
    steps_seen: list[int] = []
    while kills < kills_wanted:
        proc = start_dtrain(*args, cwd=tmp_path)
        target = last_logged_step(run_dir) + rng.randint(1, 3)
        if not reached_step(run_dir, target, proc):
            assert proc.returncode == 0, proc.stdout.read() if proc.stdout else ""
            break
        time.sleep(rng.uniform(0.0, 0.3))
        kill_job(proc)
        kills += 1
        checkpoints = run_dir / "checkpoints"
        if (checkpoints / "latest").exists():
            named = checkpoints / pointer(checkpoints)
            assert verify_sharded_checkpoint(named) is None, f"latest names an incomplete checkpoint {named}"
            newest = latest_valid_checkpoint(checkpoints)
            assert newest is not None
            state = consolidate(newest, optimizer=True)
            assert set(state["model"]) == set(load_final_model(tmp_path / "ref")["model"])
            steps_seen.append(state["step"])
    assert kills == kills_wanted, f"the run finished after {kills} kills; make it longer"
    assert steps_seen == sorted(steps_seen), "a later kill must never move the resume point backwards"
    assert_ok(dtrain(*args, cwd=tmp_path, timeout=600))
    final, expected = load_final_model(run_dir), load_final_model(tmp_path / "ref")
    for name, tensor in expected["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    assert metric_history(run_dir) == metric_history(tmp_path / "ref")


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_full_during_a_sharded_save_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, async_save: bool
) -> None:
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_fs

    writer = manager(tmp_path, async_save=async_save)
    model, optimizer = trained(9)
    previous = save(writer, model, optimizer, step=1)

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", disk_full)
    with pytest.raises(CheckpointError) as info:
        save(writer, model, optimizer, step=2)  # async: the background write's failure, raised by wait()
    writer.close()  # raised once: nothing is left pending
    message = str(info.value)
    assert "could not write sharded checkpoint" in message and "No space left on device" in message
    assert f"The previous checkpoint ({previous.name})" in message
    assert pointer(tmp_path) == previous.name and latest_valid_checkpoint(tmp_path) == previous
    assert list(tmp_path.glob(".ckpt-*.tmp")) == [] and not (tmp_path / "ckpt-e0000-s00000002").exists()


def test_launch_resume_accepts_a_sharded_checkpoint_directory_only_with_a_manifest(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=100)
    cfg = fsdp_config(tmp_path, "r", data)
    model, optimizer = trained(10)
    path = save(manager(tmp_path / "old" / "checkpoints"), model, optimizer, step=3)
    ok = dtrain("launch", str(cfg), "--gpus", "cpu", "--resume", str(path), "--dry-run", cwd=tmp_path)
    assert_ok(ok)
    (path / MANIFEST_NAME).unlink()
    refused = dtrain("launch", str(cfg), "--gpus", "cpu", "--resume", str(path), "--dry-run", cwd=tmp_path)
    assert refused.returncode == 2 and "no such checkpoint" in refused.stderr and "Traceback" not in refused.stderr


def test_async_reused_staging_buffers_never_leak_into_an_earlier_checkpoint(tmp_path: Path) -> None:
    writer = manager(tmp_path, async_save=True, keep_last=0)
    weights = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    common = {"epoch": 0, "world_size": 1, "config": {}}
    first = writer.save({"model": weights}, {**common, "step": 1}, {}, epoch=0, step=1)
    weights["w"].fill_(1.0)
    second = writer.save(
        {"model": weights}, {**common, "step": 2}, {}, epoch=0, step=2
    )  # waits for `first`, reuses its buffers
    weights["w"].fill_(2.0)
    writer.close()
    assert first is not None and second is not None
    assert torch.equal(consolidate(first)["model"]["w"], torch.zeros(1000))
    assert torch.equal(consolidate(second)["model"]["w"], torch.ones(1000))


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_sharded_saves_and_loads_when_the_default_group_has_no_cpu_backend(tmp_path: Path, mode: str) -> None:
    """On a GPU the default group is NCCL only, and ``dcp.async_save`` on it asserts "A CPU backend must be
    enabled for async save" (seen on one H200 with FSDP's one-process group). ``cuda:gloo`` on a CPU-only
    torch has no CPU device type either: the checkpoint store must run DCP on its own gloo group."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.dcp_group_worker", str(tmp_path / "ckpt"), "cuda:gloo", mode],
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RESTORED 0.0" in proc.stdout
    assert verify_sharded_checkpoint(latest_valid_checkpoint(tmp_path / "ckpt") or tmp_path) is None
