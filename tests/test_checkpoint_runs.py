"""Checkpoints as a user meets them in a run: what the checkpoint code says reaches the run's log
files, and `checkpoint.keep_last = 0` keeps every checkpoint, for single-file and sharded stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from dist_train.config import load_config
from tests.helpers.run import assert_ok, dtrain, make_image_h5, only_run_dir, write_config

# 160 training events / batch 16 = 10 steps an epoch.
EVENTS = 200


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_h5(tmp_path_factory.mktemp("data") / "d.h5", events=EVENTS)


def checkpoint_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-e*-s*") if not p.name.endswith(".sha256.json"))


def test_keep_last_zero_is_accepted_by_the_config(tmp_path: Path, data: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", data, checkpoint={"keep_last": 0})
    assert load_config(cfg).checkpoint.keep_last == 0
    out = dtrain("launch", "--gpus", "cpu", str(cfg), "--set", "checkpoint.keep_last=-1", "--dry-run", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "checkpoint.keep_last" in out.stderr and "0 keeps all" in out.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_keep_last_zero_keeps_every_checkpoint(tmp_path: Path, data: Path, strategy: str) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        train={"epochs": 1, "strategy": strategy, "test_at_end": False},
        checkpoint={"every_steps": 2, "every_epochs": 0, "keep_last": 0},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    names = [n.removesuffix(".pt") for n in checkpoint_names(run_dir)]
    # Every 2 steps of epoch 1, then the end of epoch 1's at the same step: a second save at one
    # (epoch, step) gets a "-1" suffix, never overwriting the first.
    expected = [*(f"ckpt-e0001-s{s:08d}" for s in (2, 4, 6, 8, 10)), "ckpt-e0001-s00000010-1"]
    assert sorted(names) == sorted(expected), names
    if strategy == "fsdp":
        assert all((run_dir / "checkpoints" / n).is_dir() for n in names), "sharded checkpoints are directories"


def test_checkpoint_warnings_and_notes_reach_the_run_logs(tmp_path: Path, data: Path) -> None:
    """A truncated newest checkpoint: the fallback warning is in rank 0's log file (not only on the
    console), and the checkpoint code's INFO lines and Python warnings (the model's) are kept too."""
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "tests.helpers.models:WarningMLP", "num_classes": 3, "in_features": 72},
        train={"epochs": 1, "test_at_end": False},
        checkpoint={"every_steps": 4, "every_epochs": 0, "keep_last": 3},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    checkpoints = run_dir / "checkpoints"
    newest = checkpoints / checkpoint_names(run_dir)[-1]
    assert newest.name == "ckpt-e0001-s00000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk or a killed copy
    (checkpoints / ".ckpt-e0001-s00000009.pt.123.tmp").write_bytes(b"left by a killed save")

    out = dtrain(
        "launch",
        "--gpus",
        "cpu",
        "--nproc",
        "1",
        str(cfg),
        "--run-dir",
        str(run_dir),
        "--set",
        "train.epochs=2",
        cwd=tmp_path,
    )
    assert_ok(out)
    log = (run_dir / "logs" / "rank0.log").read_text()
    fallback = f"checkpoint {newest} is invalid"
    assert fallback in out.stdout + out.stderr, "the console says it"
    warnings = [line for line in log.splitlines() if fallback in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0] and "falling back to an older checkpoint" in warnings[0], (
        log
    )
    assert "removed" in log and ".ckpt-e0001-s00000009.pt.123.tmp" in log, "INFO lines of the checkpoint code"
    assert "UserWarning: WarningMLP: a note the run's logs must keep" in log, "Python warnings too"
