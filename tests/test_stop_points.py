"""A stop request is never lost: signals at chosen points of short runs (issue 20, point 2).

Runs of 3 epochs of a few steps with the default ``train.stop_check_every = 10``: most points lie
where no step check is left before the next epoch's end (or the run's). Rank 0's model
(tests.helpers.models.StopSignalMLP) signals the launcher at the chosen point and waits until the
worker has the request, so each case lands where it says. A stop before training finished must end
with exit 75, a checkpoint, and a relaunch that ends bit-exact with an uninterrupted run; a stop
after it must end 0 with the run marked complete.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import (
    assert_ok,
    dtrain,
    env_for_tests,
    load_final_model,
    make_image_h5,
    metric_history,
    records,
    write_config,
)
from tests.test_logs import _jsonl_metrics, _tensorboard_scalars
from tests.test_resume import assert_same_state, held_out_metrics, step_history

EPOCHS = 3
EVENTS = 100  # 80 training samples: 5 steps per epoch on 2 ranks, 4 on 3 ranks (batch 8)


def steps_per_epoch(nproc: int) -> int:
    return math.ceil(math.ceil(80 / nproc) / 8)


def config(tmp_path: Path, name: str) -> Path:
    data = tmp_path / "d.h5"
    if not data.exists():
        make_image_h5(data, events=EVENTS)
    return write_config(
        tmp_path / f"{name}.toml",
        data,
        run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
        data={"batch_size": 8, "num_workers": 0},
        model={"name": "tests.helpers.models:StopSignalMLP", "num_classes": 3, "in_features": 72},
        train={"epochs": EPOCHS, "log_every": 1, "precision": "fp32", "stop_check_every": 10},
    )


def launch(tmp_path: Path, name: str, nproc: int, stop_at: str = "", signal_name: str = "SIGTERM") -> Any:
    env = env_for_tests({"STOP_SIGNAL_AT": stop_at, "STOP_SIGNAL_NAME": signal_name} if stop_at else None)
    cfg = config(tmp_path, name)
    args = ("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), "--run-dir", str(tmp_path / name))
    return dtrain(*args, cwd=tmp_path, env=env, timeout=240)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Uninterrupted runs, one per world size, made when first needed."""
    made: dict[int, Path] = {}

    def run(nproc: int) -> Path:
        if nproc not in made:
            base = tmp_path_factory.mktemp(f"ref{nproc}")
            assert_ok(launch(base, "ref", nproc))
            made[nproc] = base / "ref"
        return made[nproc]

    return run


def assert_resumes_bit_exact(tmp_path: Path, run_dir: Path, ref: Path, nproc: int, cut_step: int) -> None:
    resumed = launch(tmp_path, run_dir.name, nproc)
    assert_ok(resumed)
    assert "resuming run in" in resumed.stderr
    assert (run_dir / "completed").exists() and not (run_dir / "preempted").exists()
    assert_same_state(load_final_model(ref), load_final_model(run_dir))
    assert metric_history(ref) == metric_history(run_dir)
    assert step_history(ref, cut_step) == step_history(run_dir, cut_step)
    assert held_out_metrics(ref) == held_out_metrics(run_dir) != []
    steps = [r["step"] for r in records(run_dir, "step")]
    assert steps == list(range(1, EPOCHS * steps_per_epoch(nproc) + 1)), "each step once, none missing"
    assert [r["epoch"] for r in records(run_dir, "epoch")] == list(range(1, EPOCHS + 1)), "epochs count from 1"
    # TensorBoard rewound alike: every metric at the steps of metrics.jsonl, once each.
    jsonl, tb = _jsonl_metrics(run_dir), _tensorboard_scalars(run_dir / "tb")
    assert set(tb) == set(jsonl)
    for tag, points in jsonl.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag


# (world size, where rank 0 signals, the step the checkpoint must be at, whether it is an epoch's
# end after its evaluation). 2 ranks: epochs end at steps 5, 10, 15; 3 ranks: at 4, 8, 12.
STOPS = {
    # Before the first step check (step 10): the end of epoch 1's steps comes first.
    "early_in_epoch_1": (2, "3", 5, False),
    # The case: just after epoch 1. The check at step 10 acts on it.
    "after_epoch_1": (2, "7", 10, False),
    # During epoch 1's evaluation: at the epoch boundary, with the epoch's checkpoint.
    "in_epoch_1_evaluation": (2, "5:eval:0", 5, True),
    # No step check is left in the run: the end of the last epoch's steps.
    "in_the_last_epoch": (2, "12", 15, False),
    "at_the_last_step": (2, "15", 15, False),
    # During the last epoch's evaluation: the final checkpoint, exit 75; the relaunch runs the test.
    "in_the_last_evaluation": (2, "15:eval:0", 15, True),
    # 3 ranks (the summation order changes the last bits): after epoch 1, the end of epoch 2 comes
    # before the check at step 10; in the last epoch, the check at step 10 (mid-epoch) acts on it.
    "after_epoch_1_3_ranks": (3, "6", 8, False),
    "in_the_last_epoch_3_ranks": (3, "9", 10, False),
}
FAST = ("at_the_last_step",)  # the rest run with the slow tests (CI runs both)


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in STOPS])
def test_a_stop_ends_with_a_checkpoint_and_the_relaunch_is_bit_exact(tmp_path: Path, reference: Any, case: str) -> None:
    nproc, stop_at, step, epoch_end = STOPS[case]
    run_dir = tmp_path / "cut"
    cut = launch(tmp_path, "cut", nproc, stop_at)
    assert cut.returncode == PREEMPTED_EXIT_CODE, cut.stdout + cut.stderr
    assert (run_dir / "preempted").read_text().strip() == f"step {step}"
    assert f"stopped at step {step} with the checkpoint written" in cut.stderr
    checkpoint = load_final_model(run_dir)
    assert checkpoint["step"] == step and checkpoint["epoch_complete"] == epoch_end
    assert checkpoint["reason"] == ("epoch" if epoch_end else "preempt")
    assert "stopped before a checkpoint could be written" not in cut.stderr
    assert_resumes_bit_exact(tmp_path, run_dir, reference(nproc), nproc, step)


@pytest.mark.slow  # the default suite checks rank 0's log in tests/test_console.py
def test_ctrl_c_is_named_in_the_rank_logs(tmp_path: Path) -> None:
    """The workers receive the launcher's SIGTERM; their logs still say the user pressed Ctrl-C."""
    cut = launch(tmp_path, "cut", 2, "4", signal_name="SIGINT")
    assert cut.returncode == PREEMPTED_EXIT_CODE, cut.stdout + cut.stderr
    assert "stop requested (Ctrl-C)" in cut.stderr
    for rank in (0, 1):
        log = (tmp_path / "cut" / "logs" / f"rank{rank}.log").read_text()
        assert "received SIGINT (Ctrl-C)" in log and "received SIGTERM" not in log, log
        assert "stopped on SIGINT (Ctrl-C) at step 5" in log


def test_a_stop_after_training_finished_ends_complete_not_stopped(tmp_path: Path, reference: Any) -> None:
    # At the first test-split forward, after the final checkpoint: nothing is left to stop.
    run_dir = tmp_path / "late"
    late = launch(tmp_path, "late", 2, f"{EPOCHS * steps_per_epoch(2)}:eval:1")
    assert_ok(late)
    assert (run_dir / "completed").exists() and not (run_dir / "preempted").exists()
    assert "completed (step 15) before the stop request could take effect" in late.stderr
    assert "stopped before a checkpoint could be written" not in late.stderr + late.stdout
    assert "after the last epoch's checkpoint: the run completed" in (run_dir / "logs" / "rank0.log").read_text()
    ref = reference(2)
    assert_same_state(load_final_model(ref), load_final_model(run_dir))
    assert metric_history(ref) == metric_history(run_dir)
    assert held_out_metrics(ref) == held_out_metrics(run_dir) != []
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "test"


def test_a_posted_flag_is_never_dropped_by_a_second_post() -> None:
    from dist_train.distributed.comm import AsyncFlags

    flags = AsyncFlags(2)
    flags.post([True, False])  # posted at start-up, not read before the next post
    flags.post([False, True])
    assert flags.result() == [True, True]
    assert flags.result() == [False, False]
