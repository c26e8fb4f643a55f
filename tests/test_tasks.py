"""Tasks beyond classification, end to end with real processes: exact metrics, custom tasks, layouts."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import load_config
from dist_train.data.writers.synth import synth_dataset
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

SHAPE = (2, 8, 8)  # the wch5 demo layout, small: energies (N,1), positions (N,1,3), angles (N,2)
TARGETS = ["energies", "positions", "angles"]


def wch5(path: Path, events: int, *, layout: str = "wch5", shape: tuple[int, ...] = SHAPE) -> Path:
    return synth_dataset(path, layout=layout, events=events, seed=2, shape=shape, progress=False)


def regression_config(tmp_path: Path, data_path: Path, name: str = "reg", **sections: dict[str, Any]) -> Path:
    base: dict[str, dict[str, Any]] = {
        "run": {"name": name, "output_dir": str(tmp_path / "runs"), "seed": 1},
        "task": {"name": "regression", "targets": TARGETS, "target_norm": "auto", "loss": "huber"},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"epochs": 2, "log_every": 3, "precision": "fp32", "stop_check_every": 2},
    }
    for key, values in sections.items():
        if key == "model" and "name" in values:
            base["model"] = dict(values)  # another model: the default's kwargs do not apply
        else:
            base.setdefault(key, {}).update(values)
    return write_config(tmp_path / f"{name}.toml", data_path, **base)


# ----------------------------------------------------------------------------- a naive reference


def naive_regression_metrics(run_dir: Path, data: Path, indices: np.ndarray) -> dict[str, float]:
    """Every metric from a per-sample loop: one forward per event, plain Python arithmetic."""
    from dist_train.models import build_model

    cfg = load_config(run_dir / "config.toml")
    stats = json.loads((run_dir / "target_normalization.json").read_text())
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    width = len(mean)
    model = build_model(type(cfg.model)(name="mlp", num_classes=width, kwargs=cfg.model.kwargs), SHAPE)
    model.load_state_dict(load_final_model(run_dir)["model"])
    model.eval()
    errors: list[np.ndarray] = []
    energy_frac, distances, angles = [], [], []
    with h5py.File(data, "r") as f:
        for i in indices:
            with torch.no_grad():
                out = model(torch.from_numpy(f["event_data"][i][None])).double().numpy()[0]
            pred = out * std + mean
            true = np.concatenate([np.asarray(f[k][i], dtype=np.float64).reshape(-1) for k in TARGETS])
            errors.append(pred - true)
            energy_frac.append((pred[0] - true[0]) / true[0])
            distances.append(math.dist(pred[1:4], true[1:4]))
            angles.append(_angle_deg(pred[4:6], true[4:6]))
    err = np.array(errors)
    out: dict[str, float] = {}
    for name, cols in (("energies", [0]), ("positions", [1, 2, 3]), ("angles", [4, 5])):
        e = err[:, cols]
        out[f"{name}/mae"] = float(np.mean(np.abs(e)))
        out[f"{name}/rmse"] = float(np.sqrt(np.mean(e**2)))
        out[f"{name}/bias"] = float(np.mean(e))
        for j, c in enumerate(cols if len(cols) > 1 else []):
            out[f"{name}/{j}/rmse"] = float(np.sqrt(np.mean(err[:, c] ** 2)))
    out["energies/frac_bias"] = float(np.mean(energy_frac))
    out["energies/frac_resolution"] = float(np.std(energy_frac))
    out["positions/distance_mean"] = float(np.mean(distances))
    out["positions/distance_68"] = float(np.quantile(distances, 0.68))
    out["angles/angle_mean_deg"] = float(np.mean(angles))
    out["angles/angle_68_deg"] = float(np.quantile(angles, 0.68))
    return out


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    def unit(z: np.ndarray) -> np.ndarray:
        v = np.array([math.sin(z[0]) * math.cos(z[1]), math.sin(z[0]) * math.sin(z[1]), math.cos(z[0])])
        return v / np.linalg.norm(v)

    cos = float(np.clip(np.dot(unit(a), unit(b)), -1.0, 1.0))
    return math.degrees(math.acos(cos))


def eval_json(run_dir: Path, split: str, cwd: Path, *extra: str) -> dict[str, Any]:
    out = dtrain("eval", str(run_dir), "--split", split, "--json", *extra, cwd=cwd)
    assert_ok(out)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


# ----------------------------------------------------------------------------- regression


def test_regression_metrics_on_three_ranks_equal_one_process_eval_and_a_per_sample_loop(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 307)
    cfg = regression_config(tmp_path, data)
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "3", str(cfg), cwd=tmp_path, timeout=600))
    run_dir = only_run_dir(tmp_path / "runs")
    last = records(run_dir, "epoch")[-1]
    n_val = int(last["val/samples"])
    assert n_val % 3 != 0, "the split must not divide evenly over the ranks"

    single = eval_json(run_dir, "val", tmp_path, "--predictions", str(tmp_path / "p.npz"))
    preds = np.load(tmp_path / "p.npz")
    assert len(np.unique(preds["indices"])) == n_val
    assert preds["positions_pred"].shape == (n_val, 1, 3) and preds["angles_true"].shape == (n_val, 2)
    with h5py.File(data, "r") as f:
        np.testing.assert_array_equal(preds["energies_true"], f["energies"][np.sort(preds["indices"])])
    naive = naive_regression_metrics(run_dir, data, np.sort(preds["indices"]))
    for key, value in naive.items():
        assert last[f"val/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
        assert single[f"val/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    for key, value in last.items():
        if key.startswith("val/"):
            assert single[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    test_record = records(run_dir, "test")[0]
    single_test = eval_json(run_dir, "test", tmp_path, "--checkpoint", "best")  # what the end-of-run test evaluates
    for key, value in test_record.items():
        if key.startswith("test/"):
            assert single_test[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_energy_regression_learns_better_than_the_mean(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 1200, shape=(4, 16, 16))
    cfg = regression_config(
        tmp_path,
        data,
        task={"targets": ["energies"], "loss": "mse"},
        train={"epochs": 6},
        optim={"lr": 0.003},
        data={"normalize": "auto"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path, timeout=600))
    run_dir = only_run_dir(tmp_path / "runs")
    with h5py.File(data, "r") as f:
        spread = float(np.std(f["energies"][:]))
    last = records(run_dir, "epoch")[-1]
    assert last["val/energies/rmse"] < 0.5 * spread, (last["val/energies/rmse"], spread)
    assert "positions/rmse" not in " ".join(last)


@pytest.mark.slow
def test_regression_kill_and_resume_is_bit_exact(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 400)
    common = {
        "run": {"seed": 1, "deterministic": True},
        "model": {"name": "tests.helpers.models:SlowMLP", "in_features": 128, "delay": 0.01},
        "data": {"batch_size": 8},
    }
    ref = regression_config(tmp_path, data, "ref", **common)
    assert_ok(
        dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(ref), "--run-dir", str(tmp_path / "ref"), cwd=tmp_path)
    )
    cut = regression_config(tmp_path, data, "cut", **common)
    run_dir = tmp_path / "cut"
    args = ("launch", "--gpus", "cpu", "--nproc", "2", str(cut), "--run-dir", str(run_dir))
    proc = start_dtrain(*args, cwd=tmp_path)
    from tests.test_resume import assert_same_state, wait_for_step

    wait_for_step(run_dir, 27, proc)  # 20 steps an epoch: into the second one
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert not load_final_model(run_dir)["epoch_complete"]
    assert_ok(dtrain(*args, cwd=tmp_path))
    assert_same_state(load_final_model(tmp_path / "ref"), load_final_model(run_dir))
    keys = ("train/loss", "train/energies/rmse", "val/loss", "val/positions/distance_68", "val/angles/angle_mean_deg")
    assert metric_history(tmp_path / "ref", keys) == metric_history(run_dir, keys)


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_double_batch_for_mse(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 300)
    runs = {}
    for name, nproc, batch in (("one", 1, 16), ("two", 2, 8)):
        cfg = regression_config(
            tmp_path,
            data,
            name,
            task={"loss": "mse"},
            data={"batch_size": batch, "normalize": "auto"},
            optim={"name": "sgd", "lr": 0.02, "momentum": 0.9},
            train={"epochs": 1, "max_steps_per_epoch": 6},
        )
        assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), cwd=tmp_path))
        runs[name] = load_final_model(next((tmp_path / "runs" / name).iterdir()))
    assert runs["two"]["step"] == 6
    for key, weights in runs["one"]["model"].items():
        assert torch.isfinite(weights).all()
        torch.testing.assert_close(runs["two"]["model"][key], weights, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- custom tasks


def naive_custom_task_metrics(run_dir: Path, data: Path, rows: np.ndarray, tolerance: float) -> dict[str, Any]:
    """AbsErrorTask's metrics (and every sample's absolute error) from a per-sample loop: one forward per event,
    float64 arithmetic."""
    from dist_train.models import build_model

    cfg = load_config(run_dir / "config.toml")
    model = build_model(type(cfg.model)(name="mlp", num_classes=1, kwargs=cfg.model.kwargs), SHAPE)
    model.load_state_dict(load_final_model(run_dir)["model"])
    model.eval()
    abs_err, losses = [], []
    with h5py.File(data, "r") as f, torch.no_grad():
        for i in rows:
            out = float(model(torch.from_numpy(f["event_data"][i][None]))[0, 0])
            energy = float(f["energies"][i][0])
            abs_err.append(abs(out * 1000.0 - energy))
            losses.append(abs(out - energy / 1000.0))
    n = len(rows)
    return {
        "mae": sum(abs_err) / n,
        "hit_rate": sum(e <= tolerance for e in abs_err) / n,
        "loss": sum(losses) / n,
        "abs_errors": abs_err,
    }


# 2 ranks in the default suite; 3 ranks (reduction-order bugs that 2 ranks hide) with the slow trials.
@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_custom_task_runs_on_several_ranks_and_its_metrics_are_exact(tmp_path: Path, nproc: int) -> None:
    data = wch5(tmp_path / "d.h5", 251)  # val and test: 25 events each, divisible by neither 2 nor 3
    cfg = regression_config(
        tmp_path,
        data,
        "custom",
        task={
            "name": "tests.helpers.tasks:QuantileTask",
            "targets": ["energies"],
            "target_norm": "none",
            "loss": "",
            "kwargs": {"tolerance": 100.0},
        },
        checkpoint={"monitor": "val/mae"},
        train={"test_checkpoint": "last"},  # the naive reference below evaluates the final weights
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", str(nproc), str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    last = records(run_dir, "epoch")[-1]
    assert {
        "train/mae",
        "train/hit_rate",
        "train/loss",
        "val/mae",
        "val/hit_rate",
        "val/loss",
        "val/abs_err_90",
    } <= set(last)
    runs = {"val": last, "test": records(run_dir, "test")[0]}
    for split, record in runs.items():
        single = eval_json(run_dir, split, tmp_path, "--predictions", str(tmp_path / f"{split}.npz"))
        indices = np.load(tmp_path / f"{split}.npz")["indices"]
        rows = np.sort(indices)
        assert len(np.unique(indices)) == len(rows), "every event evaluated once"
        assert len(rows) % nproc != 0, "the split must not divide evenly over the ranks"
        naive = naive_custom_task_metrics(run_dir, data, rows, tolerance=100.0)
        # Exact quantiles across ranks through eval_samples/finalize_samples (tests/helpers/tasks.py).
        abs_err = np.array(naive.pop("abs_errors"))
        naive.update(
            {"abs_err_median": float(np.quantile(abs_err, 0.5)), "abs_err_90": float(np.quantile(abs_err, 0.9))}
        )
        for key, value in naive.items():
            name = f"{split}/{key}"
            # The run and `dtrain eval` compute in float32 per sample, the loop in float64.
            assert record[name] == pytest.approx(value, rel=1e-5, abs=1e-6), (nproc, name)
            assert single[name] == pytest.approx(record[name], rel=1e-6, abs=1e-9), (nproc, name)
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["metrics"]["val/mae"] == min(r["val/mae"] for r in records(run_dir, "epoch"))


@pytest.mark.parametrize(
    ("task", "code", "expected"),
    [
        ("NoCountTask", 2, "without 'count'"),
        ("VectorMetricTask", 2, "'abs_err' = a tensor of shape"),
        ("BrokenLossTask", 1, "BrokenLossTask.loss() raised KeyError"),
    ],
)
def test_custom_task_mistakes_are_named(tmp_path: Path, task: str, code: int, expected: str) -> None:
    data = wch5(tmp_path / "d.h5", 60)
    cfg = regression_config(tmp_path, data, task={"name": f"tests.helpers.tasks:{task}", "targets": ["energies"]})
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text
    assert expected in text and task in text, text


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"name": "no_such_module:Task"}, "cannot import module 'no_such_module'"),
        ({"name": "tests.helpers.tasks:NoMetricsTask"}, "no metrics method"),
        ({"name": "regression", "targets": ["energy"]}, "'energy'"),
        ({"name": "regression", "targets": ["labels"]}, "regression targets must be floats"),
        ({"name": "regression", "loss": "mae"}, "is not a regression loss"),
    ],
)
def test_task_mistakes_stop_the_launch_before_any_worker(tmp_path: Path, task: dict[str, Any], expected: str) -> None:
    data = wch5(tmp_path / "d.h5", 40)
    cfg = regression_config(tmp_path, data, task=task)
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert expected in text, text
    assert "Traceback" not in text and "rank 0" not in text, text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("config.toml")), "no run was started"


def test_unknown_monitor_is_named_with_the_metrics_there_are(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 60)
    cfg = regression_config(tmp_path, data, checkpoint={"monitor": "val/energy/rmse"}, task={"targets": ["energies"]})
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "val/energy/rmse" in proc.stderr and "val/energies/rmse" in proc.stderr, proc.stderr


def test_regression_monitor_picks_best_checkpoint_and_plateau_schedule(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 200)
    cfg = regression_config(
        tmp_path,
        data,
        task={"targets": ["energies"]},
        train={"epochs": 3},
        checkpoint={"monitor": "val/energies/rmse", "mode": "min"},
        sched={"name": "plateau", "monitor": "val/energies/frac_resolution", "patience": 0},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    epochs = records(run_dir, "epoch")
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    assert best["metrics"]["val/energies/rmse"] == min(r["val/energies/rmse"] for r in epochs)


# ----------------------------------------------------------------------------- classification extras


def test_classification_reports_recall_and_confusion_matrices(tmp_path: Path) -> None:
    from tests.test_train_e2e import read_tensorboard_scalars

    data = wch5(tmp_path / "d.h5", 300)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        model={"name": "mlp", "num_classes": 3, "hidden": [16]},
        task={"class_weights": "balanced", "label_smoothing": 0.05},
        train={"epochs": 2, "precision": "fp32"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    last = records(run_dir, "epoch")[-1]
    for split in ("val", "test"):
        report = json.loads((run_dir / f"confusion_{split}.json").read_text())
        matrix = np.array(report["matrix"])
        record = last if split == "val" else records(run_dir, "test")[0]
        assert matrix.sum() == record[f"{split}/samples"]
        assert np.trace(matrix) / matrix.sum() == pytest.approx(record[f"{split}/accuracy"])
        for c in range(3):
            if matrix[c].sum():
                assert record[f"{split}/recall/{c}"] == pytest.approx(matrix[c, c] / matrix[c].sum())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "val/confusion" in acc.Tags()["images"]
    assert "val/recall/0" in read_tensorboard_scalars(run_dir / "tb")


# ----------------------------------------------------------------------------- layouts and inputs


def test_channels_first_cnn_with_38_channels_trains_on_a_channels_last_file(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 120, layout="wch5_channels_last", shape=(4, 5, 38))
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        data={"layout": "channels_last", "normalize": "auto"},
        model={"name": "tests.helpers.tasks:HKResNetLike", "num_input_channels": 38, "num_classes": 3},
        train={"epochs": 1, "precision": "fp32"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path))
    run_dir = only_run_dir(tmp_path / "runs")
    stats = json.loads((run_dir / "normalization.json").read_text())
    with h5py.File(data, "r") as f:
        x = f["event_data"][:].astype(np.float64)
    assert stats["channels"] == 38
    # The statistics are of the training split (80% of the events): close to the whole file's, per last axis.
    np.testing.assert_allclose(stats["mean"], x.mean(axis=(0, 1, 2)), rtol=0.2, atol=0.05)
    assert records(run_dir, "epoch")


def test_channels_last_batches_are_the_files_samples_transposed(tmp_path: Path) -> None:
    from dist_train.data.dataset import H5Split
    from dist_train.data.loader import make_loader
    from dist_train.sampler import ShardedEvalBatchSampler

    data = wch5(tmp_path / "d.h5", 50, layout="wch5_channels_last", shape=(3, 4, 6))
    rows = np.arange(7, 50, 3)
    cfg = load_config(write_config(tmp_path / "c.toml", data, data={"layout": "channels_last"}))
    with h5py.File(data, "r") as f:
        expected = np.transpose(f["event_data"][rows], (0, 3, 1, 2))
    split = H5Split(data, rows, layout="channels_last")
    assert split.sample_shape() == (6, 3, 4)
    for mode, workers in (("thread", 0), ("thread", 1), ("process", 1)):
        cfg.data.worker_mode, cfg.data.num_workers = mode, workers  # type: ignore[assignment]
        sampler = ShardedEvalBatchSampler(len(rows), num_replicas=1, rank=0, batch_size=4)
        got = np.concatenate(
            [b["x"].numpy() for b in make_loader(split, sampler, cfg.data, train=False, device_type="cpu")]
        )
        np.testing.assert_array_equal(got, expected, err_msg=f"{mode} with {workers} workers")


def test_input_keys_reach_the_model(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 80)
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        data={"input_keys": ["energies"]},
        model={"name": "tests.helpers.tasks:EnergyAwareMLP", "num_classes": 3, "in_features": 128},
        train={"epochs": 1, "precision": "fp32"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path))
    assert records(only_run_dir(tmp_path / "runs"), "epoch")
    # Without the input the model cannot run: the start-up dry run says so before training.
    cfg2 = write_config(
        tmp_path / "c2.toml",
        data,
        run={"name": "t2", "output_dir": str(tmp_path / "runs2")},
        model={"name": "tests.helpers.tasks:EnergyAwareMLP", "num_classes": 3, "in_features": 128},
    )
    proc = dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg2), cwd=tmp_path)
    assert proc.returncode == 2 and "energies" in proc.stdout + proc.stderr


def test_find_unused_parameters_lets_a_multi_head_model_train_on_two_ranks(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 80)
    model = {"name": "tests.helpers.tasks:TwoHeadMLP", "num_classes": 3, "in_features": 128}
    cfg = write_config(tmp_path / "c.toml", data, model=model, train={"epochs": 1, "precision": "fp32"})
    without = dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path)
    assert without.returncode == 1, "DDP should refuse parameters that get no gradient"
    assert "unused" in (without.stdout + without.stderr).lower() or "find_unused_parameters" in without.stderr
    assert_ok(
        dtrain(
            "launch",
            "--gpus",
            "cpu",
            "--nproc",
            "2",
            str(cfg),
            "--set",
            "train.find_unused_parameters=true",
            "--resume",
            "never",
            cwd=tmp_path,
        )
    )
