"""Preemption and resume with real processes and real signals: the resumed run is the same run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch

from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import (
    assert_ok,
    dtrain,
    load_final_model,
    make_image_h5,
    metric_history,
    records,
    start_dtrain,
    write_config,
)

EPOCHS = 3


def slow_config(tmp_path: Path, name: str, data: Path, **extra: dict) -> Path:
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
        data={"batch_size": 8, "num_workers": 0},
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.01},
        # Stop requests are agreed every 2 steps here: the stop still lands mid-epoch, and the
        # agreement's step arithmetic (not every step) is what gets exercised.
        train={"epochs": EPOCHS, "log_every": 1, "precision": "fp32", "stop_check_every": 2},
        **extra,
    )


def wait_for_step(run_dir: Path, step: int, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before step {step}:\n{proc.stdout.read()}"
        path = run_dir / "metrics.jsonl"
        if path.exists() and any(r.get("step", 0) >= step for r in records(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def assert_same_state(a: dict, b: dict) -> None:
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"model tensor {name} differs"
    for pid, pstate in a["optimizer"]["state"].items():
        for key, value in pstate.items():
            other = b["optimizer"]["state"][pid][key]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {pid}.{key} differs"
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path: Path, nproc: int) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=600)
    steps_per_epoch = -(-480 // (8 * nproc))

    ref_cfg = slow_config(tmp_path, "ref", data)
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", str(nproc), str(ref_cfg), "--run-dir", str(tmp_path / "ref"), cwd=tmp_path))

    cut_cfg = slow_config(tmp_path, "cut", data)
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cut_cfg), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path)
    wait_for_step(run_dir, steps_per_epoch + steps_per_epoch // 3, proc)  # a third into the second epoch
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert (run_dir / "preempted").exists()
    cut = load_final_model(run_dir)
    assert cut["reason"] == "preempt" and not cut["epoch_complete"]
    assert steps_per_epoch < cut["step"] < 2 * steps_per_epoch, "the stop must land mid-epoch"

    resumed = dtrain(*args, cwd=tmp_path)
    assert_ok(resumed)
    assert "resumed from" in (run_dir / "logs" / "rank0.log").read_text()

    assert_same_state(load_final_model(tmp_path / "ref"), load_final_model(run_dir))
    assert metric_history(tmp_path / "ref") == metric_history(run_dir)
    assert len(metric_history(run_dir)) == EPOCHS
    steps = [r["step"] for r in records(run_dir, "step")]
    assert steps == sorted(set(steps)), "no step is logged twice after the resume"


def test_resume_with_fewer_ranks_finishes_and_counts_every_sample(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=600)
    cfg = slow_config(tmp_path, "ws", data)
    run_dir = tmp_path / "ws"
    proc = start_dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path)
    wait_for_step(run_dir, 10, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    cut_step = load_final_model(run_dir)["step"]
    assert cut_step < 30
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path))
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "written by 2 ranks, this run has 1" in log
    first_epoch = records(run_dir, "epoch")[0]
    # 480 training samples: the first epoch's metrics cover each exactly once across both world sizes.
    assert first_epoch["train/samples"] == 480
    assert len(records(run_dir, "epoch")) == EPOCHS


def test_incompatible_config_change_on_resume_is_refused_and_checkpoint_kept(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=300)
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 1, "precision": "fp32"})
    run_dir = tmp_path / "r"
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), "--run-dir", str(run_dir),
                  "--set", "model.hidden=[32]", "--set", "train.epochs=2", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "model.hidden: [16] -> [32]" in text
    assert "Traceback" not in text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    # A harmless change (more epochs) resumes.
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), "--run-dir", str(run_dir),
                     "--set", "train.epochs=2", cwd=tmp_path))
    assert [r["epoch"] for r in records(run_dir, "epoch")] == [0, 1]


def test_resume_never_into_a_run_dir_with_checkpoints_is_refused(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 1, "precision": "fp32"})
    run_dir = tmp_path / "r"
    assert_ok(dtrain("launch", "--debug", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = dtrain("launch", "--debug", str(cfg), "--run-dir", str(run_dir), "--resume", "never", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
