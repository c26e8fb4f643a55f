"""The benchmarks read what dtrain prints: a change to the format must not silently empty their reports."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from launcher.cmd_launch import PHASES_LABEL, _PhaseTimer

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def compare():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("compare")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_startup_section_reads_every_launcher_phase(compare) -> None:  # type: ignore[no-untyped-def]
    timer = _PhaseTimer()
    names = ["config", "data check", "devices (NVML query, reservation)", "plan, run dir, config copy"]
    for name in names:
        timer.mark(name)
    stderr = f"dtrain: new run in /x\ndtrain: {PHASES_LABEL} {timer.report()}\nworker output\n"
    phases = compare.launcher_phases(stderr)
    assert list(phases) == [*names, "total since the command was parsed"]
    assert all(seconds >= 0 for seconds in phases.values())
    assert phases["total since the command was parsed"] >= max(phases[name] for name in names) - 1e-3


def test_startup_section_without_the_verbose_line_reports_no_phases(compare) -> None:  # type: ignore[no-untyped-def]
    assert compare.launcher_phases("dtrain: new run in /x\n") == {}


def test_a_failed_peer_reports_its_rank_and_exception_not_torchruns_banner(compare, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real torchrun run of the plain DDP contender on a file that does not exist."""
    missing = tmp_path / "no-such-file.h5"
    settings = compare.Settings("cpu", 0, True, tmp_path, steps={"mlp": 2})
    run = compare.run_peer(compare.Run("mlp", "ddp", "h5", 1), missing, 2, settings)
    lines = run.error.strip().splitlines()
    assert lines[0].startswith("root cause: rank 0"), run.error
    # The runner prints the last line: the exception, naming the file.
    assert lines[-1].startswith("FileNotFoundError") and str(missing) in lines[-1], run.error
    assert "=====" not in run.error


def test_output_without_torchruns_summary_is_kept(compare) -> None:  # type: ignore[no-untyped-def]
    text = "dtrain: error: the run failed\nrank 1 raised ValueError: bad value\n"
    assert compare.failure_report(text) == text.strip()


@pytest.fixture(scope="module")
def overhead():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module("overhead")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_overhead_regression_contenders_train_one_network_on_the_same_targets(overhead, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """dtrain's regression task and the plain MSE loop see the same target columns in the same order,
    and train networks of the same shape: otherwise the ratio compares different work."""
    import torch

    from dist_train.data.writers.synth import synth_dataset
    from dist_train.tasks import RegressionTask

    workload = overhead.WORKLOADS["multitarget"]
    data = synth_dataset(tmp_path / "wch5.h5", events=40, seed=0, shape=workload.shape, progress=False)
    contenders = overhead.make_contenders(workload, data, 8, 2, tmp_path)
    trainer, plain = contenders["dtrain"].trainer, contenders[overhead.BASELINE]
    assert isinstance(trainer.task, RegressionTask)
    assert trainer.task.batch_keys == workload.targets
    assert isinstance(plain.criterion, torch.nn.MSELoss)
    dtrain_shapes = {k: v.shape for k, v in trainer.model.state_dict().items()}
    assert dtrain_shapes == {k: v.shape for k, v in plain.model.state_dict().items()}
    assert trainer.task.width == 6  # energies (1) + positions (1x3) + angles (2)

    batch = next(iter(trainer.train_loader))
    targets = overhead.in_memory_dataset(data, targets=workload.targets).tensors[1]
    assert torch.equal(trainer.task.true_values(batch), targets[batch["index"]])
    assert contenders["dtrain"](2) == 16
    assert plain(2) == 16
