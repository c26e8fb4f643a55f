"""Training on hit-list files end to end: `dtrain data synth --layout hits`, `dtrain launch` with real
torchrun/gloo ranks, `dtrain eval`, a kill and a resume, a bad file."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from dist_train.envvars import PREEMPTED_EXIT_CODE
from tests.helpers.run import (
    assert_ok,
    dtrain,
    load_final_model,
    metric_history,
    only_run_dir,
    records,
    start_dtrain,
    write_config,
)
from tests.test_resume import assert_same_state, wait_for_step

EVENTS = 300


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small demo hit-list file (6x10 module grid: 56 modules, 1064 PMTs) and its geometry, via the CLI."""
    tmp = tmp_path_factory.mktemp("hits")
    proc = dtrain(
        "data",
        "synth",
        str(tmp / "demo.h5"),
        "--layout",
        "hits",
        "--events",
        str(EVENTS),
        "--hits-per-event",
        "40",
        "--shape",
        "6,10",
        cwd=tmp,
    )
    assert_ok(proc)
    assert "demo_geometry.npz" in proc.stdout
    out = dtrain(
        "data",
        "inspect",
        str(tmp / "demo.h5"),
        "--geometry",
        str(tmp / "demo_geometry.npz"),
        "--n-points",
        "32",
        cwd=tmp,
    )
    assert_ok(out)
    assert f"hit-list file: {EVENTS} events" in out.stdout and "mpmt_image: fits: samples of 38x6x10" in out.stdout
    assert "point_cloud: fits: samples of 8x32" in out.stdout
    return tmp / "demo.h5", tmp / "demo_geometry.npz"


def hits_data(geometry: Path, **extra: object) -> dict[str, object]:
    return {
        "format": "hits",
        "geometry_file": str(geometry),
        "extra_keys": ["energies", "positions", "angles"],
        **extra,
    }


@pytest.mark.parametrize(
    ("representation", "nproc"), [("mpmt_image", 2), pytest.param("point_cloud", 3, marks=pytest.mark.slow)]
)
def test_distributed_training_metrics_equal_one_process_evaluation(
    demo: tuple[Path, Path], tmp_path: Path, representation: str, nproc: int
) -> None:
    data, geometry = demo
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        data=hits_data(
            geometry, representation=representation, n_points=32, normalize="auto", val_split=0.15, num_workers=1
        ),
        train={"epochs": 2, "log_every": 5, "precision": "fp32"},
    )
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), cwd=tmp_path)
    assert_ok(proc)
    if representation == "point_cloud":
        assert "have more than data.n_points = 32 hits" in proc.stdout + proc.stderr, "the truncation count is reported"
    run_dir = only_run_dir(tmp_path / "runs")
    last = records(run_dir, "epoch")[-1]
    assert last["val/samples"] == 45  # not divisible by the ranks: no sample padded or dropped
    for split, prefix in (("val", "val"), ("test", "test")):
        # The end-of-run test evaluates best.pt; the last epoch's validation the last weights.
        which = "best" if split == "test" else "latest"
        out = dtrain("eval", str(run_dir), "--split", split, "--checkpoint", which, "--json", cwd=tmp_path)
        assert_ok(out)
        single = json.loads(out.stdout)
        dist = last if split == "val" else records(run_dir, "test")[0]
        assert single[f"{prefix}/loss"] == pytest.approx(dist[f"{prefix}/loss"], abs=1e-6)
        assert single[f"{prefix}/accuracy"] == pytest.approx(dist[f"{prefix}/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_sigterm_then_resume_on_hits_is_bit_exact(demo: tuple[Path, Path], tmp_path: Path) -> None:
    data, geometry = demo
    steps_per_epoch = -(-240 // 16)

    def config(name: str) -> Path:
        return write_config(
            tmp_path / f"{name}.toml",
            data,
            run={"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1, "deterministic": True},
            data=hits_data(
                geometry,
                representation="point_cloud",
                channels=["time", "charge"],
                n_points=36,
                batch_size=8,
                num_workers=2,
            ),
            model={"name": "tests.helpers.models:SlowMLP", "num_classes": 3, "in_features": 72, "delay": 0.01},
            train={"epochs": 3, "log_every": 1, "precision": "fp32", "stop_check_every": 2},
        )

    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "cpu",
            "--nproc",
            "2",
            str(config("ref")),
            "--run-dir",
            str(tmp_path / "ref"),
            cwd=tmp_path,
        )
    )
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(config("cut")), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path)
    wait_for_step(run_dir, steps_per_epoch + steps_per_epoch // 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert steps_per_epoch < load_final_model(run_dir)["step"] < 2 * steps_per_epoch, "the stop must land mid-epoch"
    assert_ok(dtrain(*args, cwd=tmp_path))
    assert_same_state(load_final_model(tmp_path / "ref"), load_final_model(run_dir))
    assert metric_history(tmp_path / "ref") == metric_history(run_dir)


def test_geometry_that_does_not_fit_exits_2_before_training(demo: tuple[Path, Path], tmp_path: Path) -> None:
    data, geometry = demo
    cfg = write_config(tmp_path / "c.toml", data, data=hits_data(geometry, pmts_per_module=10))
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is outside the geometry, which has 560 PMTs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt")), "nothing is trained"


def test_point_cloud_model_gets_the_hit_count_on_two_ranks(demo: tuple[Path, Path], tmp_path: Path) -> None:
    """data.input_keys = ["n_hits"]: each cloud's real hits reach the model (which masks with them)."""
    data, geometry = demo
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        data=hits_data(geometry, representation="point_cloud", n_points=32, normalize="auto", input_keys=["n_hits"]),
        model={"name": "tests.helpers.models:MaskedCloudMean", "num_classes": 3},
        train={"epochs": 1, "log_every": 5, "precision": "fp32"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    assert "val/accuracy" in records(run_dir, "epoch")[-1]
    stats = json.loads((run_dir / "normalization.json").read_text())
    assert len(stats["mean"]) == 8
