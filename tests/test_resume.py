"""Preemption and resume with real processes and real signals: the resumed run is the same run."""

from __future__ import annotations

import json
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


def step_history(run_dir: Path, after: int) -> list[tuple]:
    """The per-step records past step ``after``: running train metrics and learning rate."""
    keys = ("train/loss_running", "train/accuracy_running", "lr")
    return [(r["step"], *(r[k] for k in keys)) for r in records(run_dir, "step") if r["step"] > after]


def held_out_metrics(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("test/")} for r in records(run_dir, "test")]


# From 3 ranks on the all-reduce's summation order can change the last bits (a + b == b + a, but
# (a + b) + c != a + (b + c)), so 3 ranks catch a resumed process that reduces differently from the
# uninterrupted run (issue 12; without the fix 3 and 4 ranks fail here, 2 pass). 1, 2 and 4 ranks run
# with the slow tests, to keep the default suite short.
@pytest.mark.parametrize(
    "nproc",
    [
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(2, marks=pytest.mark.slow),
        3,
        pytest.param(4, marks=pytest.mark.slow),
    ],
)
def test_sigterm_mid_epoch_then_resume_is_bit_exact(tmp_path: Path, nproc: int) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=600)
    steps_per_epoch = -(-480 // (8 * nproc))

    ref_cfg = slow_config(tmp_path, "ref", data)
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

    cut_cfg = slow_config(tmp_path, "cut", data)
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cut_cfg), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path)
    # Early in the second epoch: with 4 ranks an epoch is 15 steps, and the stop must still land inside it.
    wait_for_step(run_dir, steps_per_epoch + 2, proc)
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
    assert step_history(tmp_path / "ref", cut["step"]) == step_history(run_dir, cut["step"])
    assert held_out_metrics(tmp_path / "ref") == held_out_metrics(run_dir) != []
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
    proc = dtrain(
        "launch",
        "--gpus",
        "cpu",
        "--nproc",
        "1",
        str(cfg),
        "--run-dir",
        str(run_dir),
        "--set",
        "model.hidden=[32]",
        "--set",
        "train.epochs=2",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "model.hidden: [16] -> [32]" in text
    assert "Traceback" not in text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    # A harmless change (more epochs) resumes.
    assert_ok(
        dtrain(
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
    )
    assert [r["epoch"] for r in records(run_dir, "epoch")] == [1, 2]


def test_resume_never_into_a_run_dir_with_checkpoints_is_refused(tmp_path: Path) -> None:
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(tmp_path / "c.toml", data, train={"epochs": 1, "precision": "fp32"})
    run_dir = tmp_path / "r"
    assert_ok(dtrain("launch", "--debug", str(cfg), "--run-dir", str(run_dir), cwd=tmp_path))
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    proc = dtrain("launch", "--debug", str(cfg), "--run-dir", str(run_dir), "--resume", "never", cwd=tmp_path)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r.get("step", 0) for r in records(run_dir)), default=0) if path.exists() else 0


def _stop_with_ctrl_c(proc, runs: Path, steps: int = 2, timeout: float = 120) -> Path:
    """Wait until the launch has trained ``steps`` more steps in some run directory (a new one, or one it
    resumed), then SIGINT the launcher as Ctrl-C does; returns that directory."""
    before = {run: _last_step(run) for run in runs.glob("*")}
    deadline = time.monotonic() + timeout
    run_dir = None
    while run_dir is None:
        assert time.monotonic() < deadline, f"no run advanced by {steps} steps"
        assert proc.poll() is None, f"the launch ended early:\n{proc.stdout.read()}"
        for candidate in runs.glob("*"):
            if _last_step(candidate) >= before.get(candidate, 0) + steps:
                run_dir = candidate
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    return run_dir


def _files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.mark.slow
def test_a_debug_run_and_a_normal_run_never_resume_each_other(tmp_path: Path) -> None:
    """Ctrl-C a --debug run, then launch the same config normally: a run of its own, not the debug run's
    five-batch epochs continued (and the reverse). Each kind resumes its own runs; naming the other is refused."""
    data = make_image_h5(tmp_path / "d.h5", events=200)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        run={"name": "mixed", "output_dir": str(tmp_path / "runs"), "seed": 1},
        data={"batch_size": 8, "num_workers": 0},
        model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.2},
        train={"epochs": 8, "log_every": 1, "precision": "fp32", "stop_check_every": 2},
    )
    runs = tmp_path / "runs" / "mixed"
    debug = ("launch", str(cfg), "--debug", "--gpus", "cpu")
    normal = ("launch", str(cfg), "--gpus", "cpu")

    debug_dir = _stop_with_ctrl_c(start_dtrain(*debug, cwd=tmp_path), runs)
    debug_ckpts = _files(debug_dir)
    assert any(name.startswith("ckpt-") for name in debug_ckpts)

    normal_dir = _stop_with_ctrl_c(start_dtrain(*normal, cwd=tmp_path), runs, steps=1)
    assert normal_dir != debug_dir, "the normal launch continued the interrupted debug run"
    assert "resumed from" not in (normal_dir / "logs" / "rank0.log").read_text()
    assert min(r["step"] for r in records(normal_dir, "step")) == 1, "the normal run starts at step 1"
    assert _files(debug_dir) == debug_ckpts
    normal_ckpts = _files(normal_dir)
    # Told apart by name and, whatever the name (--run-dir), by the marker in the directory.
    assert debug_dir.name.endswith("-debug") and (debug_dir / "debug").is_file()
    assert not normal_dir.name.endswith("-debug") and not (normal_dir / "debug").exists()

    # Rerunning either command continues its own run, though the other one is newer or older.
    for command, expected in ((normal, normal_dir), (debug, debug_dir)):
        proc = dtrain(*command, "--dry-run", cwd=tmp_path)
        assert_ok(proc)
        assert json.loads(proc.stdout)["run_dir"] == str(expected)

    refusals = [
        ((*normal, "--run-dir", str(debug_dir)), "holds a --debug run"),
        ((*normal, "--resume", str(debug_dir / "checkpoints" / debug_ckpts[0])), "written by a --debug run"),
        ((*debug, "--run-dir", str(normal_dir)), "holds a normal (non-debug) run"),
    ]
    for command, expected in refusals:
        proc = dtrain(*command, cwd=tmp_path)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr

    # The debug run's own command resumes it (to the end of a shorter run), leaving the normal run alone.
    proc = dtrain(*debug, "--set", "train.epochs=2", cwd=tmp_path)
    assert_ok(proc)
    assert f"resuming run in {debug_dir}" in proc.stderr
    assert "resumed from" in (debug_dir / "logs" / "rank0.log").read_text()
    assert [r["step"] for r in records(debug_dir, "epoch")] == [5, 10]
    assert _files(normal_dir) == normal_ckpts
