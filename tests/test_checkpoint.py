"""Checkpoint storage on real files: atomic writes, sha256 sidecars, retention, async saves, kills, full disks."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.checkpoint import file as ckpt
from dist_train.checkpoint.catalog import describe_checkpoint, latest_valid_checkpoint, list_checkpoints
from dist_train.checkpoint.file import CheckpointManager, load_checkpoint, verify_checkpoint
from dist_train.checkpoint.layout import BEST_NAME, LATEST_POINTER, sidecar_path
from dist_train.checkpoint.sharded import ShardedCheckpointManager
from dist_train.errors import CheckpointError
from launcher.cli import main as cli_main


class NotPlainData:
    """Anything that is not a tensor or plain container: unpickling it could run code."""

    def __init__(self) -> None:
        self.value = 1


def make_state(step: int, epoch: int = 0, hidden: int = 8) -> dict[str, Any]:
    """A trainer-shaped state: model + Adam state after one real step, so optimizer tensors exist."""
    torch.manual_seed(step)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return {
        "format_version": 1,
        "dtrain_version": "0.1.0",
        "torch_version": torch.__version__,
        "config": {"run": {"name": "unit"}, "optim": {"name": "adam", "lr": 1e-3}, "train": {"epochs": 3}},
        "epoch": epoch,
        "step": step,
        "epoch_complete": True,
        "reason": "epoch",
        "metrics": {"val/loss": 1.0 / (step + 1)},
        "world_size": 2,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {},
        "scaler": {},
        "sampler": {"epoch": epoch, "position": step},
        "trainer": {"best": 0.5},
        "rng": [{"torch": torch.get_rng_state(), "python": [1, 2, 3]}, {"torch": torch.get_rng_state(), "python": [4]}],
    }


def assert_same_tensors(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_tensors(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_tensors(x, y)
    else:
        assert a == b


def temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".*.tmp"))


def pointer(directory: Path) -> str:
    return (directory / LATEST_POINTER).read_text().strip()


# ------------------------------------------------------------------------------------------ synchronous


def test_round_trip_writes_sidecar_hash_of_the_bytes_on_disk(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "checkpoints")
    state = make_state(step=7, epoch=2)
    path = manager.save(state, epoch=2, step=7, metrics={"val/loss": 0.25})

    assert path == tmp_path / "checkpoints" / "ckpt-e0002-s00000007.pt"
    assert pointer(path.parent) == path.name
    sidecar = json.loads(sidecar_path(path).read_text())
    assert sidecar["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sidecar["size"] == path.stat().st_size
    assert sidecar["metrics"] == {"val/loss": 0.25}
    assert_same_tensors(state, load_checkpoint(path))
    assert latest_valid_checkpoint(manager.directory) == path
    assert temp_files(path.parent) == []


def test_keep_last_prunes_old_checkpoints_and_sidecars(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    paths = [manager.save(make_state(step), epoch=step // 2, step=step) for step in range(5)]

    remaining = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert remaining == sorted(p.name for p in paths[-2:])
    assert all(not sidecar_path(p).exists() for p in paths[:-2])
    assert pointer(tmp_path) == paths[-1].name
    assert [r.path for r in list_checkpoints(manager.directory)] == [paths[4], paths[3]]
    assert all(r.valid for r in list_checkpoints(manager.directory))


def test_keep_last_zero_keeps_everything(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=0)
    for step in range(4):
        manager.save(make_state(step), epoch=0, step=step)
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 4


def test_best_is_written_atomically_and_outlives_pruning(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    best_state = make_state(step=1)
    manager.save(best_state, epoch=0, step=1, is_best=True)
    manager.save(make_state(step=2), epoch=0, step=2)
    manager.save(make_state(step=3), epoch=0, step=3)

    best = tmp_path / BEST_NAME
    assert not (tmp_path / "ckpt-e0000-s00000001.pt").exists()  # pruned, yet best.pt still holds it
    assert verify_checkpoint(best) is None
    assert_same_tensors(best_state, load_checkpoint(best))

    newer_best = make_state(step=4)
    manager.save(newer_best, epoch=0, step=4, is_best=True)
    assert_same_tensors(newer_best, load_checkpoint(best))
    assert json.loads(sidecar_path(best).read_text())["source"] == "ckpt-e0000-s00000004.pt"


def test_second_save_at_same_step_never_rewrites_a_published_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    first = manager.save(make_state(5), epoch=1, step=5)
    final_state = {**make_state(5), "reason": "final"}
    second = manager.save(final_state, epoch=1, step=5)

    assert second != first and second.name == "ckpt-e0001-s00000005-1.pt"
    assert load_checkpoint(first)["reason"] == "epoch"
    assert latest_valid_checkpoint(manager.directory) == second
    assert load_checkpoint(second)["reason"] == "final"


def test_a_directory_that_cannot_be_created_is_one_clear_error_in_both_managers(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    expected = r"cannot create checkpoint directory .*a-file/checkpoints: Not a directory\. Pick a writable"
    with pytest.raises(CheckpointError, match=expected):
        CheckpointManager(blocker / "checkpoints").save(make_state(1), epoch=0, step=1)
    with pytest.raises(CheckpointError, match=expected):
        ShardedCheckpointManager(blocker / "checkpoints", rank=0, group=None)


def test_state_that_would_not_load_safely_is_refused_before_writing(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    state = make_state(1)
    state["trainer"] = {"obj": NotPlainData()}
    with pytest.raises(CheckpointError, match=r"state\['trainer'\]\['obj'\]"):
        manager.save(state, epoch=0, step=1)
    assert list(tmp_path.glob("ckpt-*")) == []


# ------------------------------------------------------------------------------------------------ async


def test_async_save_snapshots_tensors_before_returning(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, async_save=True)
    state = make_state(3)
    base = torch.arange(12.0)
    state["trainer"] = {"base": base, "view": base[2:6]}  # two views of one storage
    expected = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state["model"].items()}

    path = manager.save(state, epoch=0, step=3)
    for tensor in state["model"].values():  # training goes on and mutates weights in place at once
        tensor.add_(100.0)
    base.zero_()
    manager.wait()

    loaded = load_checkpoint(path)
    assert_same_tensors(expected, loaded["model"])
    assert torch.equal(loaded["trainer"]["base"], torch.arange(12.0))
    assert (
        loaded["trainer"]["view"].untyped_storage().data_ptr() == loaded["trainer"]["base"].untyped_storage().data_ptr()
    )
    assert pointer(tmp_path) == path.name
    manager.close()


def test_async_reused_buffers_never_leak_into_an_earlier_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, async_save=True, keep_last=0)
    weights = {"w": torch.zeros(1000), "b": torch.zeros(10)}
    first = manager.save({"model": weights}, epoch=0, step=1)
    weights["w"].fill_(1.0)
    second = manager.save({"model": weights}, epoch=0, step=2)  # waits for `first`, then reuses its buffers
    weights["w"].fill_(2.0)
    third = manager.save({"model": {"w": torch.full((7,), 3.0)}}, epoch=0, step=3)  # new shapes
    manager.close()

    assert torch.equal(load_checkpoint(first)["model"]["w"], torch.zeros(1000))
    assert torch.equal(load_checkpoint(second)["model"]["w"], torch.ones(1000))
    assert torch.equal(load_checkpoint(third)["model"]["w"], torch.full((7,), 3.0))


def test_async_background_error_surfaces_on_wait_and_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path, async_save=True)
    good = manager.save(make_state(1), epoch=0, step=1)
    manager.wait()

    def disk_full(self: Any, chunk: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt._HashingWriter, "_write_chunk", disk_full)
    manager.save(make_state(2), epoch=0, step=2)  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match="ckpt-e0000-s00000002.pt"):
        manager.wait()

    manager.save(make_state(3), epoch=0, step=3)
    with pytest.raises(CheckpointError, match="No space left"):
        manager.save(make_state(4), epoch=0, step=4)  # the next save() re-raises the previous failure

    manager.save(make_state(5), epoch=0, step=5)
    with pytest.raises(CheckpointError, match="No space left"):
        manager.close()  # close() waits for the pending save, so its failure is raised here too
    manager.close()  # a failure is raised once; closing again does nothing

    monkeypatch.undo()
    assert latest_valid_checkpoint(manager.directory) == good
    later = manager.save(make_state(6), epoch=0, step=6)  # a save after close() starts a new thread
    manager.close()
    assert latest_valid_checkpoint(manager.directory) == later


# --------------------------------------------------------------------------------------------- corruption


def test_truncated_newest_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    older = manager.save(make_state(1), epoch=0, step=1)
    newest = manager.save(make_state(2), epoch=0, step=2)
    with open(newest, "r+b") as fh:
        fh.truncate(newest.stat().st_size // 2)

    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert latest_valid_checkpoint(manager.directory) == older
    assert newest.name in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="failed verification"):
        load_checkpoint(newest)


def test_flipped_bytes_fail_the_sha256_check(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(tmp_path)
    older = manager.save(make_state(1), epoch=0, step=1)
    newest = manager.save(make_state(2), epoch=0, step=2)
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="dtrain.checkpoint"):
        assert latest_valid_checkpoint(manager.directory) == older
    assert "sha256 mismatch" in caplog.text and newest.name in caplog.text
    assert [r.valid for r in list_checkpoints(manager.directory)] == [False, True]


def test_stale_temp_files_are_ignored_then_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    good = manager.save(make_state(1), epoch=0, step=1)
    stale = tmp_path / ".ckpt-e0000-s00000002.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert latest_valid_checkpoint(manager.directory) == good
    assert [r.path for r in list_checkpoints(manager.directory)] == [good]
    manager.save(make_state(3), epoch=0, step=3)
    assert not stale.exists()


# ------------------------------------------------------------------------------------ failures mid-write


def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manager = CheckpointManager(tmp_path)
    previous_state = make_state(1, hidden=64)
    previous = manager.save(previous_state, epoch=0, step=1)
    written = {"chunks": 0}
    real_write = ckpt._HashingWriter._write_chunk

    def fill_disk_after_a_few_chunks(self: Any, chunk: memoryview) -> None:
        written["chunks"] += 1
        if written["chunks"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, chunk)

    monkeypatch.setattr(ckpt, "WRITE_CHUNK_BYTES", 1024)
    monkeypatch.setattr(ckpt._HashingWriter, "_write_chunk", fill_disk_after_a_few_chunks)
    target = tmp_path / "ckpt-e0000-s00000002.pt"
    with pytest.raises(CheckpointError) as info:
        manager.save(make_state(2, hidden=64), epoch=0, step=2)

    message = str(info.value)
    assert str(target) in message and "No space left on device" in message and "free" in message
    assert written["chunks"] > 3  # the failure really happened mid-file
    assert not target.exists() and temp_files(tmp_path) == []
    assert pointer(tmp_path) == previous.name
    assert_same_tensors(previous_state, load_checkpoint(latest_valid_checkpoint(manager.directory)))


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_exception_injected_mid_write_leaves_old_state_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, interruption: type[BaseException]
) -> None:
    manager = CheckpointManager(tmp_path)
    previous_state = make_state(1, hidden=64)
    previous = manager.save(previous_state, epoch=0, step=1)
    real_write = ckpt._HashingWriter._write_chunk
    calls = {"n": 0}

    def interrupted(self: Any, chunk: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 5:
            raise interruption("second signal during the save")
        real_write(self, chunk)

    monkeypatch.setattr(ckpt, "WRITE_CHUNK_BYTES", 512)
    monkeypatch.setattr(ckpt._HashingWriter, "_write_chunk", interrupted)
    with pytest.raises(interruption):
        manager.save(make_state(2, hidden=64), epoch=0, step=2)

    assert temp_files(tmp_path) == [] and not (tmp_path / "ckpt-e0000-s00000002.pt").exists()
    assert pointer(tmp_path) == previous.name
    assert_same_tensors(previous_state, load_checkpoint(latest_valid_checkpoint(manager.directory)))


_KILLED_WRITER = r"""
import os, sys, time
from pathlib import Path
import torch
from dist_train.checkpoint import file as c

directory, phase = Path(sys.argv[1]), sys.argv[2]

def state(step):
    return {"format_version": 1, "step": step, "model": {"w": torch.full((1_000_000,), float(step))}}

def pause(*args, **kwargs):
    print("PAUSED", flush=True)
    time.sleep(600)

manager = c.CheckpointManager(directory, keep_last=2)
manager.save(state(1), epoch=0, step=1)
c.WRITE_CHUNK_BYTES = 32 * 1024
real_write, real_replace = c._HashingWriter._write_chunk, os.replace
def slow_write(self, chunk):
    time.sleep(0.001)
    real_write(self, chunk)
c._HashingWriter._write_chunk = slow_write
if phase == "before_data_rename":
    os.replace = lambda src, dst: pause() if str(dst).endswith(".pt") else real_replace(src, dst)
elif phase == "before_sidecar":
    c._write_sidecar = pause
elif phase == "before_pointer":
    c._move_latest_pointer = pause
elif phase == "before_prune":
    c.CheckpointManager._prune = pause
print("SAVED1", flush=True)
step = 2
while True:
    manager.save(state(step), epoch=0, step=step)
    step += 1
"""


def _run_writer_and_kill(directory: Path, phase: str, delay: float) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(directory), phase], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SAVED1"
        if phase == "timed":
            time.sleep(delay)
        else:
            assert proc.stdout.readline().strip() == "PAUSED"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_directory_recovers(directory: Path) -> Path:
    manager = CheckpointManager(directory, keep_last=2)
    chosen = latest_valid_checkpoint(manager.directory)
    assert chosen is not None
    loaded = load_checkpoint(chosen)
    assert torch.equal(loaded["model"]["w"], torch.full((1_000_000,), float(loaded["step"])))
    named = directory / pointer(directory)
    assert verify_checkpoint(named) is None  # `latest` never names a partial file
    manager.save({"format_version": 1, "step": 999, "model": {}}, epoch=9, step=999)
    assert temp_files(directory) == []
    assert all(sidecar_path(p).exists() for p in directory.glob("ckpt-*.pt"))  # orphans were swept
    return chosen


@pytest.mark.parametrize(
    ("phase", "expected_step"),
    [("before_data_rename", 1), ("before_sidecar", 1), ("before_pointer", 2), ("before_prune", 2)],
)
def test_sigkill_at_each_phase_of_a_save(tmp_path: Path, phase: str, expected_step: int) -> None:
    _run_writer_and_kill(tmp_path, phase, 0.0)
    chosen = latest_valid_checkpoint(tmp_path)
    assert chosen is not None and load_checkpoint(chosen)["step"] == expected_step
    _assert_directory_recovers(tmp_path)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_sigkill_at_random_moments_of_repeated_saves(tmp_path: Path, delay: float) -> None:
    _run_writer_and_kill(tmp_path, "timed", delay)
    _assert_directory_recovers(tmp_path)


# ------------------------------------------------------------------------------------------ safe loading


def test_pickled_python_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "x": NotPlainData()}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*NotPlainData"):
        load_checkpoint(path, verify=False)
    with pytest.raises(CheckpointError, match="failed verification: no checksum file"):
        load_checkpoint(path)


def test_garbage_and_missing_files_raise_checkpoint_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    rng = random.Random(0)
    # Random bytes break torch's unpickler in many different ways (EOFError, IndexError, UnpicklingError, ...);
    # 200 seeded files cover the kinds a single os.urandom draw would only hit now and then.
    for _ in range(200):
        garbage.write_bytes(rng.randbytes(rng.choice([1, 7, 64, 4096])))
        with pytest.raises(CheckpointError, match="not a valid checkpoint"):
            load_checkpoint(garbage, verify=False)
    garbage.write_bytes(b"PK\x03\x04" + rng.randbytes(2000))  # looks like a zip (torch.save's format), is not
    with pytest.raises(CheckpointError, match="not a valid checkpoint"):
        load_checkpoint(garbage, verify=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ------------------------------------------------------------------------------------------------- CLI


def test_describe_reports_progress_sizes_and_config(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    state = make_state(11, epoch=3, hidden=16)
    manager.save(state, epoch=3, step=11)

    info = describe_checkpoint(tmp_path / "run")  # a run directory resolves to its newest valid checkpoint
    assert (info["epoch"], info["step"], info["reason"], info["world_size"]) == (3, 11, "epoch", 2)
    assert info["valid"] is True
    assert info["model_elements"] == sum(t.numel() for t in state["model"].values())
    assert info["tensor_bytes"]["model"] == sum(t.numel() * 4 for t in state["model"].values())
    assert info["config_summary"]["optim.lr"] == 1e-3


def test_cli_inspect_valid_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save(make_state(4, epoch=1), epoch=1, step=4)
    path = manager.save(make_state(9, epoch=2), epoch=2, step=9, metrics={"val/loss": 0.1})

    assert cli_main(["ckpt", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "epoch  2" in out and "step  9" in out and "sha256 matches" in out

    assert cli_main(["ckpt", "inspect", str(tmp_path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert (payload["epoch"], payload["step"], payload["valid"]) == (2, 9, True)
    assert [Path(r["path"]).name for r in payload["checkpoints"]] == [path.name, "ckpt-e0001-s00000004.pt"]


def test_cli_inspect_corrupt_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = CheckpointManager(tmp_path).save(make_state(1), epoch=0, step=1)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    assert cli_main(["ckpt", "inspect", str(path)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_cli_inspect_garbage_file_is_one_paragraph_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 50)
    result = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "ckpt", "inspect", str(garbage)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("dtrain: error: ") and str(garbage) in result.stderr
    assert result.stderr.strip().count("\n") == 0
