"""Models with buffers (BatchNorm) on several ranks: the metrics a run logs are those of the checkpoint it writes.

Each rank updates its BatchNorm running statistics with its own batches. Before the fix every rank
evaluated with its own statistics while the checkpoint held rank 0's (under FSDP: any rank's), so
``val/*`` of metrics.jsonl, best.pt's selection and the test record were not the checkpoint's.
Here every epoch record and the test record must equal ``dtrain eval`` of the checkpoint written at
that moment, to 1e-6, under DDP and FSDP, on 3 and 4 real gloo ranks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.checkpoint.catalog import list_checkpoints
from dist_train.config import config_from_dict
from dist_train.distributed.strategy import use_sync_batchnorm
from dist_train.errors import ConfigError
from dist_train.eval_run import evaluate_checkpoint
from tests.helpers.models import BatchNormCNN, BatchNormMLP
from tests.helpers.run import assert_ok, dtrain, load_final_model, make_image_h5, metric_history, records, write_config
from tests.test_resume import assert_same_state

SHAPE = (2, 6, 6)
MODELS: dict[str, dict[str, Any]] = {
    "bn_mlp": {"name": "tests.helpers.models:BatchNormMLP", "num_classes": 3, "in_features": 72},
    "bn_cnn": {"name": "tests.helpers.models:BatchNormCNN", "num_classes": 3, "in_channels": 2},
    "running_mean": {"name": "tests.helpers.models:RunningMeanMLP", "num_classes": 3, "in_features": 72},
}


def _config(
    tmp_path: Path, name: str, *, model: str, strategy: str, checkpoint: dict[str, Any] | None = None, **train: Any
) -> Path:
    """2 epochs of 10 steps on 3 ranks (8 on 4): 240 training, 30 validation and 30 test samples."""
    data = tmp_path / "d.h5"
    if not data.exists():
        make_image_h5(data, events=300, shape=SHAPE)
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 0, "deterministic": True},
        data={"batch_size": 8, "num_workers": 0},
        model=MODELS[model],
        # fsdp.min_params = 1: the BatchNorm layers sit inside sharded units, not only in the root.
        fsdp={"min_params": 1},
        train={"epochs": 2, "precision": "fp32", "strategy": strategy, **train},
        checkpoint={"keep_last": 10, **(checkpoint or {})},
    )


def _launch(cfg: Path, run_dir: Path, nproc: int, *extra: str) -> Path:
    proc = dtrain(
        "launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), "--run-dir", str(run_dir), *extra, cwd=cfg.parent
    )
    assert_ok(proc)
    return run_dir


def _run(tmp_path: Path, *, model: str, strategy: str, nproc: int, **train: Any) -> Path:
    return _launch(_config(tmp_path, "run", model=model, strategy=strategy, **train), tmp_path / "run", nproc)


def _eval(checkpoint: Path, split: str, cwd: Path) -> dict[str, Any]:
    """``dtrain eval CHECKPOINT --split SPLIT --json``, as a user runs it: one process, the plain model."""
    proc = dtrain("eval", str(checkpoint), "--split", split, "--json", cwd=cwd)
    assert_ok(proc)
    return json.loads(proc.stdout)


def _eval_here(checkpoint: Path, split: str) -> dict[str, Any]:
    """What ``dtrain eval`` runs (``evaluate_checkpoint``), in this process: no interpreter and torch import per call."""
    return evaluate_checkpoint(checkpoint, split=split)


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    """The newest valid checkpoint written at ``step``."""
    found = [r.path for r in list_checkpoints(run_dir / "checkpoints") if r.step == step and r.valid]
    assert found, f"no checkpoint of step {step} in {run_dir}"
    return found[0]


def _assert_same_metrics(logged: dict[str, Any], evaluated: dict[str, Any], split: str) -> None:
    keys = sorted(k for k in logged if k.startswith(f"{split}/"))
    assert f"{split}/loss" in keys and f"{split}/accuracy" in keys
    for key in keys:
        assert evaluated[key] == pytest.approx(logged[key], rel=1e-6, abs=1e-7), (
            f"{key}: logged {logged[key]!r}, dtrain eval of the checkpoint {evaluated[key]!r}"
        )


def assert_logged_metrics_are_the_checkpoints(run_dir: Path) -> None:
    """Every epoch's val metrics and the test record equal ``dtrain eval`` of the checkpoint of that step."""
    epochs = records(run_dir, "epoch")
    assert len(epochs) == 2
    for record in epochs:
        _assert_same_metrics(record, _eval_here(_checkpoint_at(run_dir, record["step"]), "val"), "val")
    (test,) = records(run_dir, "test")
    # The test record evaluates the checkpoint it names (train.test_checkpoint: best by default).
    evaluated = (
        Path(test["checkpoint"]["path"]) if "path" in test["checkpoint"] else _checkpoint_at(run_dir, test["step"])
    )
    _assert_same_metrics(test, _eval(evaluated, "test", run_dir), "test")


@pytest.mark.parametrize(
    ("model", "strategy", "nproc"),
    [
        ("bn_mlp", "ddp", 3),
        ("bn_cnn", "fsdp", 3),
        pytest.param("bn_cnn", "ddp", 4, marks=pytest.mark.slow),
        pytest.param("bn_mlp", "fsdp", 4, marks=pytest.mark.slow),
    ],
)
def test_logged_metrics_equal_dtrain_eval_of_the_checkpoint(
    tmp_path: Path, model: str, strategy: str, nproc: int
) -> None:
    run_dir = _run(tmp_path, model=model, strategy=strategy, nproc=nproc)
    assert_logged_metrics_are_the_checkpoints(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_bf16_logged_metrics_equal_dtrain_eval_of_the_checkpoint(tmp_path: Path, strategy: str) -> None:
    run_dir = _run(tmp_path, model="bn_cnn", strategy=strategy, nproc=3, precision="bf16")
    assert_logged_metrics_are_the_checkpoints(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_saving_and_resuming_leave_a_run_whose_training_reads_its_buffers_unchanged(
    tmp_path: Path, strategy: str
) -> None:
    """Evaluating and saving with rank 0's buffers must not change what the ranks train with, and a resume must
    give every rank back its own buffers (FSDP leaves them per rank): the model's input mean shapes its gradients."""
    nproc = 3
    reference = _launch(_config(tmp_path, "ref", model="running_mean", strategy=strategy), tmp_path / "ref", nproc)
    # The same run with mid-epoch saves (steps 6, 12, 18), which the reference does not make.
    saving_cfg = _config(tmp_path, "saving", model="running_mean", strategy=strategy, checkpoint={"every_steps": 6})
    saving = _launch(saving_cfg, tmp_path / "saving", nproc)
    resumed = _launch(saving_cfg, tmp_path / "resumed", nproc, "--resume", str(_checkpoint_at(saving, 6)))
    assert "resumed from" in (resumed / "logs" / "rank0.log").read_text()
    final = load_final_model(reference)
    assert_same_state(load_final_model(saving), final)  # saves with rank 0's buffers changed nothing
    assert_same_state(load_final_model(resumed), final)  # every rank continued with its own buffers
    for run_dir in (saving, resumed):
        assert metric_history(run_dir) == metric_history(reference)
        assert records(run_dir, "test")[0]["test/loss"] == records(reference, "test")[0]["test/loss"]
    assert_logged_metrics_are_the_checkpoints(resumed)


# ----------------------------------------------------------------------------------- train.sync_batchnorm


def test_sync_batchnorm_on_several_cpu_processes_is_refused_at_launch(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "sync", model="bn_mlp", strategy="ddp", sync_batchnorm=True)
    run_dir = tmp_path / "never-created"
    for extra in ((), ("--dry-run",)):
        proc = dtrain(
            "launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(run_dir), *extra, cwd=tmp_path
        )
        assert proc.returncode == 2, proc.stderr
        assert "train.sync_batchnorm = true needs GPUs" in proc.stderr and "2 processes on the CPU" in proc.stderr
        assert str(cfg) in proc.stderr and "Traceback" not in proc.stderr
        assert not run_dir.exists()


def test_sync_batchnorm_under_fsdp_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.sync_batchnorm = true with train.strategy = 'fsdp' is not supported"):
        config_from_dict({"train": {"sync_batchnorm": True, "strategy": "fsdp"}}, origin="c.toml")
    assert config_from_dict({}).train.sync_batchnorm is False


def test_sync_batchnorm_converts_every_batchnorm_layer_and_keeps_the_checkpoint_layout() -> None:
    cfg = config_from_dict({"train": {"sync_batchnorm": True}}, origin="c.toml")
    model = BatchNormCNN(num_classes=3, in_channels=2)
    params, keys = list(model.parameters()), list(model.state_dict())
    assert use_sync_batchnorm(model, cfg, torch.device("cpu"), 1) is model  # one process: nothing to synchronise
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(ConfigError, match="3 processes on the CPU"):
        use_sync_batchnorm(model, cfg, torch.device("cpu"), 3)
    converted = use_sync_batchnorm(model, cfg, torch.device("cuda"), 3)  # conversion needs no GPU
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == 2
    assert not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    # The optimizer (built afterwards) sees the same tensors; checkpoints load with the setting on or off.
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert list(converted.state_dict()) == keys
    off = config_from_dict({}, origin="c.toml")
    assert (
        use_sync_batchnorm(BatchNormMLP(3, 72), off, torch.device("cuda"), 3).net[2].__class__ is torch.nn.BatchNorm1d
    )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm runs on GPUs only; NCCL needs a GPU per rank")
def test_sync_batchnorm_on_two_gpus_metrics_equal_dtrain_eval(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "sync", model="bn_cnn", strategy="ddp", sync_batchnorm=True)
    proc = dtrain("launch", "--gpus", "2", str(cfg), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert_ok(proc)
    assert (
        "2 BatchNorm layer(s) use the statistics of all 2 ranks"
        in (tmp_path / "run" / "logs" / "rank0.log").read_text()
    )
    assert_logged_metrics_are_the_checkpoints(tmp_path / "run")
