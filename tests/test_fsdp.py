"""train.strategy = "fsdp": FSDP2 over real torchrun/gloo processes computes what DDP computes.

Configuration and the torch version check are tested in-process; everything else runs `dtrain
launch` as a user would and compares the checkpoints and metric histories of FSDP and DDP runs.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.config import check_strategy_supported, config_from_dict, dumps_toml, read_toml
from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.errors import ConfigError
from tests.helpers.run import (
    REPO,
    assert_ok,
    dtrain,
    env_for_tests,
    load_final_model,
    make_image_h5,
    metric_history,
    records,
    start_dtrain,
    write_config,
)
from tests.test_resume import EPOCHS, assert_same_state, slow_config, wait_for_step

# Small enough that the MLP's layers become separate FSDP units (the automatic policy), not just the root.
FSDP_SMALL_UNITS = {"min_params": 50}


# ---------------------------------------------------------------------------------------- config
def test_strategy_defaults_to_ddp_and_fsdp_section_has_its_defaults() -> None:
    cfg = config_from_dict({})
    assert cfg.train.strategy == "ddp"
    assert cfg.fsdp.wrap == [] and cfg.fsdp.reshard_after_forward is True
    assert cfg.fsdp.activation_checkpointing is False and cfg.fsdp.cpu_offload is False
    cfg = config_from_dict(
        {"train": {"strategy": "fsdp"}, "fsdp": {"activation_checkpointing": ["Block"], "wrap": ["Block"]}}
    )
    assert cfg.fsdp.activation_checkpointing == ["Block"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"strategy": "fsd"}}, "Did you mean 'fsdp'?"),
        ({"fsdp": {"min_param": 5}}, "Did you mean 'min_params'?"),
        ({"fsdp": {"min_params": 0}}, "fsdp.min_params = 0 must be at least 1"),
        ({"fsdp": {"wrap": ["not a class"]}}, "fsdp.wrap = ['not a class'] must list module class names"),
        ({"fsdp": {"activation_checkpointing": "yes"}}, "fsdp.activation_checkpointing = 'yes' has the wrong type"),
    ],
)
def test_bad_fsdp_settings_name_the_key(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, origin="c.toml")
    assert message in str(info.value)
    assert "c.toml" in str(info.value)


def test_fsdp_with_an_old_torch_is_a_config_error_naming_the_version() -> None:
    cfg = config_from_dict({"train": {"strategy": "fsdp"}}, origin="c.toml")
    with pytest.raises(ConfigError) as info:
        check_strategy_supported(cfg, "2.6.0+cpu")
    text = str(info.value)
    assert "torch >= 2.7" in text and "torch 2.6.0+cpu" in text and "c.toml" in text
    assert info.value.exit_code == 2
    for ok in ("2.7.0", "2.7.1+cu126", "2.14.1+cu130", "3.0.0"):
        check_strategy_supported(cfg, ok)
    check_strategy_supported(config_from_dict({}), "2.1.0")  # DDP runs on the package's whole torch range


# ---------------------------------------------------------------------------------------- training
def _equal_config(tmp_path: Path, name: str, data: Path, strategy: str, fsdp: dict[str, Any]) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 3},
        model={"name": "mlp", "num_classes": 3, "hidden": [16, 16]},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        # Accumulation exercises set_requires_gradient_sync(False); clipping the sharded-gradient norm.
        train={
            "epochs": 2,
            "log_every": 1,
            "precision": "fp32",
            "grad_accum": 2,
            "clip_grad_norm": 0.3,
            "strategy": strategy,
        },
        fsdp=fsdp,
    )


def _launch(cfg: Path, run_dir: Path, nproc: int, *extra: str) -> str:
    proc = dtrain(
        "launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), "--run-dir", str(run_dir), *extra, cwd=cfg.parent
    )
    assert_ok(proc)
    return proc.stdout + proc.stderr


def assert_close_state(a: dict[str, Any], b: dict[str, Any], atol: float = 1e-5) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], atol=atol, rtol=0, msg=f"model tensor {name}")
    # FSDP keys optimizer state by parameter name, DDP by index in model.parameters() order.
    names = list(a["model"])
    for index, name in enumerate(names):
        for key, value in b["optimizer"]["state"][index].items():
            mine = a["optimizer"]["state"][name][key]
            torch.testing.assert_close(
                torch.as_tensor(mine), torch.as_tensor(value), atol=atol, rtol=0, msg=f"{name}.{key}"
            )
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


def assert_close_history(a: Path, b: Path) -> None:
    ha, hb = metric_history(a), metric_history(b)
    assert len(ha) == len(hb) > 0
    for ra, rb in zip(ha, hb, strict=True):
        assert ra[:2] == rb[:2]
        assert ra[2:] == pytest.approx(rb[2:], abs=1e-5)


@pytest.mark.parametrize(
    ("nproc", "fsdp"),
    [
        (2, FSDP_SMALL_UNITS),
        # 3 ranks (uneven shards of every layer, uneven evaluation shards), recomputed activations, offload.
        pytest.param(
            3,
            {**FSDP_SMALL_UNITS, "activation_checkpointing": True, "cpu_offload": True, "reshard_after_forward": False},
            marks=pytest.mark.slow,
        ),
    ],
    ids=["2ranks", "3ranks-ac-offload"],
)
def test_fsdp_trains_the_same_model_as_ddp(tmp_path: Path, nproc: int, fsdp: dict[str, Any]) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=400)
    ddp_dir, fsdp_dir = tmp_path / "ddp", tmp_path / "fsdp"
    _launch(_equal_config(tmp_path, "ddp", data, "ddp", {}), ddp_dir, nproc)
    _launch(_equal_config(tmp_path, "fsdp", data, "fsdp", fsdp), fsdp_dir, nproc)
    log = (fsdp_dir / "logs" / "rank0.log").read_text()
    assert f"over {nproc} rank(s)" in log and "3 sharded unit(s)" in log
    if fsdp.get("activation_checkpointing"):
        assert "activation checkpointing, CPU offload" in log
    assert_close_state(load_final_model(fsdp_dir), load_final_model(ddp_dir))
    assert_close_history(fsdp_dir, ddp_dir)
    assert_state_memory_is_sharded(fsdp_dir, ddp_dir, nproc)
    test_a, test_b = records(fsdp_dir, "test"), records(ddp_dir, "test")
    assert test_a[0]["test/loss"] == pytest.approx(test_b[0]["test/loss"], abs=1e-5)
    if nproc == 2:
        # The FSDP checkpoint holds plain parameter names: `dtrain eval` loads it into the unwrapped model.
        out = dtrain("eval", str(fsdp_dir), "--split", "test", "--checkpoint", "best", "--json", cwd=tmp_path)
        assert_ok(out)
        assert json.loads(out.stdout)["test/loss"] == pytest.approx(test_a[0]["test/loss"], abs=1e-6)


def assert_state_memory_is_sharded(fsdp_dir: Path, ddp_dir: Path, nproc: int) -> None:
    """The epoch records' ``memory/*``: DDP ranks hold every parameter, gradient and momentum buffer;
    the largest FSDP rank holds its dim-0 shard of each (rank 0's, ceil(rows / ranks) rows)."""
    shapes = [tuple(t.shape) for t in load_final_model(ddp_dir)["model"].values()]
    whole = sum(math.prod(shape) * 4 for shape in shapes) / 2**20  # fp32
    shard = sum(-(-shape[0] // nproc) * math.prod(shape[1:]) * 4 for shape in shapes) / 2**20
    for run_dir, expected in ((ddp_dir, whole), (fsdp_dir, shard)):
        for epoch in records(run_dir, "epoch"):
            # SGD with momentum: one buffer per parameter, as large as the parameter.
            for key in ("memory/params_mb", "memory/grads_mb", "memory/optimizer_mb"):
                assert epoch[key] == pytest.approx(expected, rel=1e-12), (run_dir.name, key)
            assert epoch["memory/state_mb"] == pytest.approx(3 * expected, rel=1e-12)
            assert epoch["memory/peak_mb"] >= epoch["peak_memory_mb"] > 0, "the largest rank's peak, rank 0's"
    assert shard < whole


def test_fsdp_wrap_naming_no_module_is_a_clear_error(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=100)
    cfg = _equal_config(tmp_path, "bad", data, "fsdp", {"wrap": ["TransformerBlock"]})
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(tmp_path / "r"), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "fsdp.wrap = ['TransformerBlock'] matches no module of this model" in text
    assert "Linear" in text and "Traceback" not in text


# ---------------------------------------------------------------------------------------- checkpoints
def _slow_fsdp_config(tmp_path: Path, name: str, data: Path) -> Path:
    """test_resume's slow, deterministic run, sharded."""
    path = slow_config(tmp_path, name, data, fsdp=FSDP_SMALL_UNITS)
    cfg = read_toml(path)
    cfg["train"]["strategy"] = "fsdp"
    path.write_text(dumps_toml(cfg))
    return path


def test_fsdp_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path: Path) -> None:
    nproc = 2
    data = make_image_h5(tmp_path / "d.h5", events=600)
    steps_per_epoch = -(-480 // (8 * nproc))
    ref_cfg = _slow_fsdp_config(tmp_path, "ref", data)
    _launch(ref_cfg, tmp_path / "ref", nproc)

    cut_cfg = _slow_fsdp_config(tmp_path, "cut", data)
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cut_cfg), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path)
    wait_for_step(run_dir, steps_per_epoch + steps_per_epoch // 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    cut = load_final_model(run_dir)
    assert cut["reason"] == "preempt" and steps_per_epoch < cut["step"] < 2 * steps_per_epoch

    assert_ok(dtrain(*args, cwd=tmp_path))
    assert "FSDP:" in (run_dir / "logs" / "rank0.log").read_text()
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()
    assert_same_state(load_final_model(tmp_path / "ref"), load_final_model(run_dir))
    assert metric_history(tmp_path / "ref") == metric_history(run_dir)
    assert len(metric_history(run_dir)) == EPOCHS


@pytest.mark.slow
def test_fsdp_checkpoint_of_2_ranks_resumes_on_3_and_1_ranks_like_ddp(tmp_path: Path) -> None:
    """Resharding 2 -> 3 and 2 -> 1 ranks: FSDP continues as DDP continues from its own 2-rank checkpoint.

    Any value lost or misplaced while loading into a different sharding would change the continued
    training, so equal final weights and optimizer state show the load was right.
    """
    data = make_image_h5(tmp_path / "d.h5", events=400)
    finals: dict[tuple[str, int], dict[str, Any]] = {}
    for strategy in ("ddp", "fsdp"):
        cfg = _equal_config(tmp_path, strategy, data, strategy, FSDP_SMALL_UNITS)
        run_dir = tmp_path / strategy
        _launch(cfg, run_dir, 2, "--set", "train.epochs=1")
        first = load_final_model(run_dir)
        shutil.copytree(run_dir, tmp_path / f"{strategy}-1")
        for nproc, directory in ((3, run_dir), (1, tmp_path / f"{strategy}-1")):
            _launch(cfg, directory, nproc, "--set", "train.epochs=2")
            log = (directory / "logs" / "rank0.log").read_text()
            assert f"written by 2 ranks, this run has {nproc}" in log and "resumed from" in log
            final = finals[strategy, nproc] = load_final_model(directory)
            assert final["step"] > first["step"] and final["world_size"] == nproc
    for nproc, suffix in ((3, ""), (1, "-1")):
        assert_close_state(finals["fsdp", nproc], finals["ddp", nproc])
        assert_close_history(tmp_path / f"fsdp{suffix}", tmp_path / f"ddp{suffix}")


def test_fsdp_resume_skips_a_corrupted_newest_checkpoint(tmp_path: Path) -> None:
    """A flipped byte in one rank's shard of the newest sharded checkpoint is caught by the manifest's
    sha256, reported, and the previous complete checkpoint is loaded into the shards."""
    data = make_image_h5(tmp_path / "d.h5", events=300)
    cfg = _equal_config(tmp_path, "fsdp", data, "fsdp", FSDP_SMALL_UNITS)
    run_dir = tmp_path / "fsdp"
    _launch(cfg, run_dir, 2)
    checkpoints = sorted((run_dir / "checkpoints").glob("ckpt-*"))
    assert len(checkpoints) == 2 and all(c.is_dir() for c in checkpoints), "FSDP writes sharded directories"
    assert {"__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"} <= {
        p.name for p in checkpoints[-1].iterdir()
    }
    newest = checkpoints[-1]
    older_step = int(checkpoints[0].name.split("-s")[1])
    shard = newest / "__1_0.distcp"
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[len(data_bytes) // 2] ^= 0xFF  # one flipped byte in the middle of rank 1's tensors
    shard.write_bytes(bytes(data_bytes))
    console = _launch(cfg, run_dir, 2, "--set", "train.epochs=3")
    assert f"checkpoint {newest} is invalid (sha256 mismatch in __1_0.distcp" in console
    assert "falling back to an older checkpoint" in console
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert f"resumed from {checkpoints[0]} (after epoch 1, step {older_step}" in log
    assert [r["epoch"] for r in records(run_dir, "epoch")][-2:] == [2, 3], "epoch 2 is trained again, then 3"


# ---------------------------------------------------------------------------------------- mixed precision
BN_MODEL = {"name": "tests.helpers.models:BNConvNet", "num_classes": 3, "channels": 8}


def _precision_config(
    tmp_path: Path, name: str, data: Path, strategy: str, precision: str, model: dict[str, Any]
) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 5},
        model=model,
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        train={"epochs": 2, "log_every": 1, "precision": precision, "strategy": strategy, "max_steps_per_epoch": 4},
        fsdp=FSDP_SMALL_UNITS,
    )


def test_bf16_batchnorm_cnn_under_fsdp_trains_like_ddp(tmp_path: Path) -> None:
    """bf16 + BatchNorm under FSDP failed at the first forward ("expected scalar type BFloat16 but found
    Float": FSDP cast the norm weights to bf16 beside fp32 running statistics). The norm layers are now
    sharded with an fp32 policy, so they compute as under DDP's autocast and both give close numbers."""
    data = make_image_h5(tmp_path / "d.h5", events=300, shape=(2, 6, 6))
    runs = {}
    for strategy in ("ddp", "fsdp"):
        runs[strategy] = tmp_path / strategy
        _launch(_precision_config(tmp_path, strategy, data, strategy, "bf16", BN_MODEL), runs[strategy], 2)
    assert "3 norm layer(s) with running statistics in fp32" in (runs["fsdp"] / "logs" / "rank0.log").read_text()
    final = {s: load_final_model(d) for s, d in runs.items()}
    assert final["fsdp"]["model"]["features.1.running_var"].dtype == torch.float32
    # Parameters: both strategies round the same fp32 weights to bf16 once per step, compute the same
    # bf16 convolutions with the norm layers in fp32, and reduce fp32 gradients of 2 ranks (a + b is
    # commutative): equal up to kernel noise, far below one bf16 step (2**-8 relative).
    assert_close_state(parameters_only(final["fsdp"]), parameters_only(final["ddp"]), atol=1e-6)
    keys = ("train/loss", "val/loss")
    h_fsdp, h_ddp = metric_history(runs["fsdp"], keys), metric_history(runs["ddp"], keys)
    assert [h[:2] for h in h_fsdp] == [h[:2] for h in h_ddp] and len(h_fsdp) == 2
    for a, b in zip(h_fsdp, h_ddp, strict=True):
        assert a[2] == pytest.approx(b[2], rel=1e-6)  # train mode: batch statistics, same parameters
        # Evaluation uses each rank's running statistics, which DDP overwrites with rank 0's before every
        # forward and FSDP leaves per rank: they differ by a fraction of one step's update. 1% is two
        # bf16 steps of the logits (measured: 5e-4); a norm layer computing in bf16 or a failed step is far more.
        assert a[3] == pytest.approx(b[3], rel=1e-2)


def parameters_only(state: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint without BatchNorm buffers (per-rank running statistics; parameters keep their order)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return {**state, "model": {k: v for k, v in state["model"].items() if not k.endswith(buffers)}}


@pytest.mark.slow
def test_fp16_loss_scaler_skips_the_same_step_on_every_rank_when_one_shard_overflows(tmp_path: Path) -> None:
    """fp16 needs CUDA (on the CPU it maps to bf16, which needs no scaler), but the strategy's scaler runs
    on gloo: an inf in rank 1's shard only must make both ranks skip the step and halve the scale, or
    the shards of one parameter would drift apart."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tests.helpers.fsdp_scaler_worker",
        ],
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("SCALER"))
    assert lines == [f"SCALER rank={r} skipped=True scale=2.0 finite_step=True" for r in (0, 1)], (
        proc.stdout + proc.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize("model", ["batchnorm", "mlp"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_precision_matrix_on_the_cpu_trains_saves_and_evaluates(
    tmp_path: Path, strategy: str, precision: str, model: str
) -> None:
    """README's matrix, CPU half (the CUDA half is in tests/test_gpu.py): every combination trains on 2
    ranks, writes its checkpoint, and `dtrain eval` of the run reproduces the run's own test loss."""
    data = make_image_h5(tmp_path / "d.h5", events=160, shape=(2, 6, 6))
    spec = BN_MODEL if model == "batchnorm" else {"name": "mlp", "num_classes": 3, "hidden": [16, 16]}
    run_dir = tmp_path / "run"
    console = _launch(
        _precision_config(tmp_path, "m", data, strategy, precision, spec), run_dir, 2, "--set", "train.epochs=1"
    )
    if precision == "fp16":
        assert "using bf16 autocast on the CPU instead" in (run_dir / "logs" / "rank0.log").read_text() + console
    (epoch,) = records(run_dir, "epoch")
    assert math.isfinite(epoch["train/loss"]) and math.isfinite(epoch["val/loss"]) and epoch["step"] == 4
    (test,) = records(run_dir, "test")
    out = dtrain("eval", str(run_dir), "--split", "test", "--json", cwd=tmp_path)
    assert_ok(out)
    # The same sums in another grouping: `dtrain eval` runs at the run's precision (fp16 is bf16 on the CPU) and
    # every rank evaluated with rank 0's BatchNorm statistics, the checkpoint's (tests/test_batchnorm_exact.py).
    assert json.loads(out.stdout)["test/loss"] == pytest.approx(test["test/loss"], rel=1e-6)


def test_activation_checkpointing_updates_batchnorm_statistics_once_per_step() -> None:
    """The recomputation in backward runs the unit's forward again in training mode; the running
    statistics must be those of one forward, as without activation checkpointing (and under DDP)."""
    from dist_train.distributed.strategy import _replace_with_checkpoint_wrapper

    torch.manual_seed(0)
    plain = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6)), torch.nn.Linear(6, 2)
    )
    recomputed = copy.deepcopy(plain)
    _replace_with_checkpoint_wrapper(recomputed, "0", recomputed[0])
    x = torch.randn(8, 4)
    for model in (plain, recomputed):
        for _ in range(2):
            model(x).sum().backward()
    assert "CheckpointWrapper" in type(recomputed[0]).__name__
    assert int(recomputed.state_dict()["0.1.num_batches_tracked"]) == 2
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(recomputed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    for a, b in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
