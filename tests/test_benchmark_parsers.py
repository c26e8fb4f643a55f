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


def test_compiled_contender_results_name_the_goal_and_never_fake_gpu_busy_on_the_cpu(compare, capsys) -> None:  # type: ignore[no-untyped-def]
    nan = float("nan")
    summary = {
        "mlp/dtrain-compiled-h5/P1": {"samples_per_s": 140.0, "gpu_util_pct": nan},
        "mlp/dtrain-compiled-h5/P2": {"samples_per_s": 120.0, "gpu_util_pct": nan},
        "mlp/ddp-mem/P1": {"samples_per_s": 100.0, "gpu_util_pct": nan},
        "mlp/ddp-mem/P2": {"samples_per_s": 100.0, "gpu_util_pct": nan},
    }
    lines = compare.compiled_results(summary, ["mlp"], [1, 2], "", gpu=False)
    assert lines == ["RESULT compare_mlp_dtrain_compiled_vs_ddp_mem_min_over_P value=1.200 target=>=1.3 missed"]
    assert "GPU busy (target >= 95%) is not measured on the CPU" in capsys.readouterr().out
    for key, busy in (("mlp/dtrain-compiled-h5/P1", 97.0), ("mlp/dtrain-compiled-h5/P2", 96.0)):
        summary[key]["gpu_util_pct"] = busy
    lines = compare.compiled_results(summary, ["mlp"], [1, 2], "cuda_bf16_", gpu=True)
    assert lines[1] == "RESULT cuda_bf16_mlp_dtrain_compiled_gpu_busy_pct_min_over_P value=96.0 target=>=95 met"


def test_the_compiled_contender_runs_beside_dtrain_and_the_in_memory_loop_stays(compare) -> None:  # type: ignore[no-untyped-def]
    assert compare.contender_list(["h5"], ("accelerate", "fabric")) == [
        ("dtrain", "h5"),
        ("dtrain-compiled", "h5"),
        ("ddp", "h5"),
        ("ddp", "mem"),
    ]
    assert ("dtrain-compiled", "h5") not in compare.contender_list(["h5", "mem"], compiled=False)


GOAL = ("resnet18_mpmt", "resnet18_hits", "tutorial_cnn")  # issue 24's workloads, by the names users type


def test_issue_24_goal_workloads_are_known_everywhere_and_run_at_batch_256_on_the_gpu(compare) -> None:  # type: ignore[no-untyped-def]
    assert set(GOAL) <= set(compare.GOAL_WORKLOADS)
    for table in (compare.GLOBAL_BATCH, compare.STEPS, compare.QUICK_STEPS, compare.GPU_STEPS, compare.GPU_QUICK_STEPS):
        assert set(GOAL) <= set(table)
    assert {name: compare.GPU_GLOBAL_BATCH[name] for name in GOAL} == dict.fromkeys(GOAL, 256)
    for name in GOAL:
        assert compare.WORKLOADS[name].shape == (38, 16, 40)  # mPMT images: 19 charges + 19 times, 16 x 40 modules
    assert compare.WORKLOADS["resnet18_hits"].hits and not compare.WORKLOADS["resnet18_mpmt"].hits
    assert compare.parse_args(["--workloads", ",".join(GOAL)]).workloads == ",".join(GOAL)


def test_an_unknown_workload_stops_before_any_run(compare, capsys) -> None:  # type: ignore[no-untyped-def]
    assert compare.main(["--workloads", "resnet18_mpmt,resnet_hits", "--sections", "throughput"]) == 2
    assert "unknown workload(s) resnet_hits" in capsys.readouterr().err


def test_every_goal_workload_gets_its_compiled_and_gpu_busy_result_lines(compare, capsys) -> None:  # type: ignore[no-untyped-def]
    summary = {}
    for name in GOAL:
        summary[f"{name}/dtrain-compiled-h5/P1"] = {"samples_per_s": 140.0, "gpu_util_pct": float("nan")}
        summary[f"{name}/ddp-mem/P1"] = {"samples_per_s": 100.0, "gpu_util_pct": float("nan")}
    lines = compare.compiled_results(summary, list(GOAL), [1], "", gpu=False)
    assert lines == [
        f"RESULT compare_{name}_dtrain_compiled_vs_ddp_mem_min_over_P value=1.400 target=>=1.3 met" for name in GOAL
    ]
    printed = capsys.readouterr().out
    for name in GOAL:
        assert f"{name}: GPU busy (target >= 95%) is not measured on the CPU" in printed
        summary[f"{name}/dtrain-compiled-h5/P1"]["gpu_util_pct"] = 90.0
    lines = compare.compiled_results(summary, list(GOAL), [1], "cuda_bf16_", gpu=True)
    for name in GOAL:
        assert (
            f"RESULT compare_cuda_bf16_{name}_dtrain_compiled_vs_ddp_mem_min_over_P value=1.400 target=>=1.3 met"
            in lines
        )
        assert f"RESULT cuda_bf16_{name}_dtrain_compiled_gpu_busy_pct_min_over_P value=90.0 target=>=95 missed" in lines


def test_the_hit_list_workload_gives_dtrain_the_hits_and_its_peers_the_same_events_as_images(
    compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import h5py
    import numpy as np
    import torch

    from dist_train.config import load_config
    from dist_train.data.hits import HitReader, hit_spec

    monkeypatch.setattr(sys.modules["common"], "BENCH_DIR", tmp_path)  # Workload.data_file's folder
    workload = compare.WORKLOADS["resnet18_hits"]
    hits = compare.ensure_data(workload, 12)
    images = compare.peer_data(workload, 12)
    assert images != hits and compare.peer_data(compare.WORKLOADS["resnet18_mpmt"], 12).name.startswith("wch5-")
    cfg = compare.dtrain_config(
        tmp_path / "hits.toml",
        workload,
        hits,
        batch_size=4,
        steps_per_epoch=3,
        epochs=2,
        num_workers=0,
        output_dir=tmp_path / "runs",
    )
    spec = hit_spec(load_config(cfg).data)
    assert spec is not None and spec.representation == "mpmt_image"
    rows = np.arange(12)
    built = HitReader(hits, spec).read(rows)
    with h5py.File(images, "r") as converted, h5py.File(hits, "r") as original:
        assert converted["event_data"].shape == (12, *workload.shape)
        np.testing.assert_array_equal(converted["event_data"][...], built)
        np.testing.assert_array_equal(converted["labels"][...], original["labels"][...])
    assert compare.build_workload_model(workload)(torch.zeros(2, *workload.shape)).shape == (2, 3)
