"""The physicist's regression: target normalisation by default, per-target (angular) losses and weights,
binned and named metrics, residual histograms, a bias-proof figure of merit, custom tasks' exact quantiles."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_train.config import config_from_dict
from dist_train.errors import ConfigError
from dist_train.tasks import CustomTask, build_task
from dist_train.tasks.regression import RegressionTask, layout_targets
from tests.helpers.run import assert_ok, dtrain, only_run_dir, records, write_config
from tests.test_tasks import TARGETS, eval_json, wch5

SHAPES = {"energies": (1,), "positions": (1, 3), "angles": (2,)}
MEAN = [500.0, 0.1, -0.2, 0.3, 1.5, 0.2]
STD = [250.0, 0.5, 0.6, 0.7, 0.6, 1.8]


def task(**kwargs: Any) -> RegressionTask:
    return RegressionTask(layout_targets(SHAPES, {}), mean=MEAN, std=STD, **kwargs)


def a_batch(size: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "energies": torch.rand(size, 1, generator=g) * 900 + 100,
        "positions": torch.randn(size, 1, 3, generator=g),
        "angles": torch.stack(
            (torch.rand(size, generator=g) * math.pi, (torch.rand(size, generator=g) * 2 - 1) * math.pi), 1
        ),
    }


def normalised(values: torch.Tensor) -> torch.Tensor:
    return (values - torch.tensor(MEAN)) / torch.tensor(STD)


def joined(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([batch[k].reshape(len(batch["energies"]), -1) for k in TARGETS], 1)


def unit(zenith_azimuth: np.ndarray) -> np.ndarray:
    z, a = zenith_azimuth[:, 0], zenith_azimuth[:, 1]
    return np.stack((np.sin(z) * np.cos(a), np.sin(z) * np.sin(a), np.cos(z)), 1)


def angles_rad(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p, q = unit(pred.astype(np.float64)), unit(true.astype(np.float64))
    return np.arccos(np.clip((p * q).sum(1), -1.0, 1.0))


# ----------------------------------------------------------------------------- losses (in process)


def test_angular_loss_is_the_angle_between_directions_in_file_units_and_blind_to_azimuth_wraparound() -> None:
    batch = a_batch()
    true = joined(batch)
    pred = true.clone()
    pred[:, 5] += 2 * math.pi  # the same directions, the azimuth one turn further
    angular, mse = task(loss={"angles": "angular"}), task()
    angles_only = {"angles": "angular", "energies": "mse", "positions": "mse"}
    outputs = normalised(pred).requires_grad_()
    per_sample = angular.loss(outputs, batch) / len(true)
    # energies and positions are exact, so all that remains is (2/6) * angle, and the angle is ~0.
    assert float(per_sample.detach()) < 1e-5
    assert float(mse.loss(normalised(pred), batch)) / len(true) > 0.1  # MSE sees 2 pi of azimuth error
    per_sample.backward()
    assert outputs.grad is not None and torch.isfinite(outputs.grad).all()  # finite where the angle is 0
    opposite = true.clone()
    opposite[:, 4], opposite[:, 5] = math.pi - true[:, 4], true[:, 5] + math.pi
    outputs = normalised(opposite).requires_grad_()
    (angular.loss(outputs, batch) / len(true)).backward()
    assert outputs.grad is not None and torch.isfinite(outputs.grad).all()  # and where it is 180 degrees

    # Other directions: the loss is (2/6) * the angle between them, computed from un-normalised angles.
    other = a_batch(seed=1)["angles"]
    other[:, 0] = other[:, 0] * 3 - math.pi  # zeniths outside [0, pi] are directions too
    pred = true.clone()
    pred[:, 4:6] = other
    expected = angles_rad(other.numpy(), true[:, 4:6].numpy()).mean() * 2 / 6
    got = task(loss=angles_only).loss(normalised(pred), batch) / len(true)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_angular_loss_of_three_vectors() -> None:
    targets = layout_targets({"directions": (3,)}, {})
    t = RegressionTask(targets, loss="angular", mean=[0.5, 0.0, -0.5], std=[2.0, 3.0, 4.0])
    g = torch.Generator().manual_seed(3)
    true, pred = torch.randn(9, 3, generator=g), torch.randn(9, 3, generator=g) * 5  # lengths do not matter
    outputs = (pred - torch.tensor([0.5, 0.0, -0.5])) / torch.tensor([2.0, 3.0, 4.0])
    p, q = pred.double().numpy(), true.double().numpy()
    cos = (p * q).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(q, axis=1)
    # One term of 3 columns: (3/3) * the angle per sample.
    assert float(t.loss(outputs, {"directions": true})) == pytest.approx(np.arccos(cos).sum(), rel=1e-5)


def test_per_target_losses_and_weights_follow_the_documented_formula() -> None:
    batch = a_batch(11)
    true = joined(batch)
    outputs = normalised(true + torch.randn(true.shape, generator=torch.Generator().manual_seed(5)))
    t = task(
        loss={"energies": "mse", "positions": "l1", "angles": "angular"}, loss_weights={"energies": 3.0, "angles": 0.5}
    )
    target = normalised(true).double()
    out = outputs.double()
    pred_file = (outputs * torch.tensor(STD) + torch.tensor(MEAN)).double()
    # sum_t w_t * (n_t / n) * l_t, l_t the mean over the target's columns (or the angle), n = 6 columns.
    expected = (
        3.0 * (1 / 6) * (out[:, 0] - target[:, 0]).square()
        + (3 / 6) * (out[:, 1:4] - target[:, 1:4]).abs().mean(1)
        + 0.5 * (2 / 6) * torch.from_numpy(angles_rad(pred_file[:, 4:6].numpy(), true[:, 4:6].numpy()))
    ).sum()
    assert float(t.loss(outputs, batch)) == pytest.approx(float(expected), rel=1e-5)
    # The training step gives the same loss sum, divided by the trainer's seed (no host sync of its own).
    step = t.train_step(outputs, batch)
    assert torch.equal(step.loss / step.loss_divisor, t.loss(outputs, batch))
    # One string applies to all targets: the plain loop's F.mse_loss over all columns.
    plain = task(loss="mse").loss(outputs, batch) / len(true)
    assert torch.equal(plain, F.mse_loss(outputs, normalised(true)))


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"loss": {"energies": "angular"}}, "needs a direction: 2 columns"),
        ({"loss": {"energy": "mse"}}, "task.loss.energy names no target"),
        ({"loss_weights": {"angle": 2.0}}, "task.loss_weights.angle names no target"),
        ({"bins": {"positions": [0.0, 1.0]}}, "bins need a one-column target"),
        ({"columns": {"positions": ["x", "y"]}}, "names 2 columns, but 'positions' has 3"),
    ],
)
def test_task_settings_that_do_not_fit_the_targets_are_named(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        task(**kwargs)


def regression_raw(**task_section: Any) -> dict[str, Any]:
    return {"data": {"path": "d.h5"}, "task": {"name": "regression", "targets": TARGETS, **task_section}}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (regression_raw(loss={"angles": "angle"}), "task.loss.angles = 'angle' is not a regression loss"),
        (regression_raw(loss_weights={"energies": -1.0}), "must be a number >= 0"),
        (regression_raw(bins={"energies": [300.0, 100.0]}), "increasing bin edges"),
        (regression_raw(columns={"positions": ["x", "x", "z"]}), "distinct non-empty names"),
        ({"data": {"path": "d.h5"}, "task": {"bins": {"labels": [0, 1]}}}, 'applies to task.name = "regression" only'),
    ],
)
def test_config_mistakes_in_the_task_tables_are_named(raw: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(raw)


def test_target_norm_defaults_to_auto() -> None:
    assert config_from_dict(regression_raw()).task.target_norm == "auto"


# ----------------------------------------------------------------------------- metrics (in process)


def finalized(t: RegressionTask, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    sums = {
        k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
        for k, v in t.eval_metrics(outputs, batch).items()
    }
    sums["loss"] = np.asarray(float(t.loss(outputs, batch)))
    samples = {k: v.double().reshape(-1).numpy() for k, v in t.eval_samples(outputs, batch).items()}
    return {**t.finalize(sums), **t.finalize_samples(samples)}


def test_frac_rms_shows_the_bias_that_frac_resolution_hides() -> None:
    batch = a_batch(50)
    collapsed = joined(batch)
    collapsed[:, 0] *= 0.01  # every energy predicted at 1% of the truth
    m = finalized(task(), normalised(collapsed), batch)
    assert m["energies/frac_resolution"] < 1e-6  # a perfect "resolution"...
    assert m["energies/frac_bias"] == pytest.approx(-0.99, rel=1e-6)
    assert m["energies/frac_rms"] == pytest.approx(0.99, rel=1e-6)  # ...that the bias-proof figure does not give


def test_binned_metrics_are_the_metrics_of_each_bins_samples() -> None:
    batch = a_batch(40)
    true = joined(batch)
    pred = true + torch.randn(true.shape, generator=torch.Generator().manual_seed(2)) * torch.tensor(
        [30.0, 0.1, 0.1, 0.1, 0.2, 0.2]
    )
    edges = [100.0, 400.0, 700.0, 1000.0]
    t = task(bins={"energies": edges}, columns={"positions": ["x", "y", "z"]})
    m = finalized(t, normalised(pred), batch)
    assert "positions/x/rmse" in m and "positions/0/rmse" not in m
    for i in range(3):
        label = f"bin_energies_{edges[i]:g}_{edges[i + 1]:g}"
        chosen = (true[:, 0] >= edges[i]) & (true[:, 0] < edges[i + 1])
        sub = {k: v[chosen] for k, v in batch.items()}
        alone = finalized(task(columns={"positions": ["x", "y", "z"]}), normalised(pred[chosen]), sub)
        assert m[f"{label}/samples"] == int(chosen.sum()) > 0
        for key in (
            "energies/frac_rms",
            "energies/frac_resolution",
            "positions/distance_68",
            "positions/rmse",
            "angles/angle_68_deg",
            "angles/bias",
        ):
            assert m[f"{label}/{key}"] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), (label, key)
    assert all(
        "bin" in k
        for k in set(m) - set(finalized(task(columns={"positions": ["x", "y", "z"]}), normalised(pred), batch))
    )


# ----------------------------------------------------------------------------- warnings (in process)


@pytest.fixture
def dtrain_warnings() -> Iterator[list[str]]:
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                messages.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("dtrain")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("section", "warned"),
    [
        ({"target_norm": "none"}, "scales differ by"),
        ({"target_norm": "none", "targets": ["positions", "angles"]}, None),  # scales within 100x of each other
        ({}, None),  # target_norm = "auto" (the default)
    ],
)
def test_raw_targets_of_very_different_scales_get_one_warning(
    tmp_path: Path, dtrain_warnings: list[str], section: dict[str, Any], warned: str | None
) -> None:
    from dist_train.data.loader import build_data

    data = wch5(tmp_path / "d.h5", 120)
    raw = regression_raw(**section)
    raw["data"] = {"path": str(data)}
    cfg = config_from_dict(raw)
    build_task(cfg, build_data(cfg, run_dir=None))
    if warned is None:
        assert dtrain_warnings == []
    else:
        assert len(dtrain_warnings) == 1 and warned in dtrain_warnings[0] and "'energies'" in dtrain_warnings[0]


# ----------------------------------------------------------------------------- end to end


def tb_histograms(tb_dir: Path) -> dict[str, list[Any]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"histograms": 0})
    acc.Reload()
    return {tag: acc.Histograms(tag) for tag in acc.Tags()["histograms"]}


def test_binned_named_metrics_per_target_losses_and_histograms_on_three_ranks(tmp_path: Path) -> None:
    data = wch5(tmp_path / "d.h5", 307)
    edges = [50.0, 300.0, 600.0, 1000.0]
    cfg = write_config(
        tmp_path / "c.toml",
        data,
        run={"name": "phys", "seed": 1},
        task={  # no target_norm: "auto" is the default
            "name": "regression",
            "targets": TARGETS,
            "loss": {"positions": "l1", "angles": "angular"},
            "loss_weights": {"energies": 2.0},
            "bins": {"energies": edges},
            "columns": {"positions": ["x", "y", "z"]},
        },
        model={"name": "mlp", "hidden": [16]},
        checkpoint={"monitor": "val/energies/frac_resolution"},
    )
    out = dtrain("launch", "--gpus", "cpu", "--nproc", "3", str(cfg), cwd=tmp_path, timeout=600)
    assert_ok(out)
    # One warning for the whole run (not one per rank), naming the bias-proof metric.
    assert out.stdout.count("cannot see a bias") == 1, out.stdout
    assert "val/energies/frac_rms" in out.stdout
    run_dir = only_run_dir(tmp_path / "runs")
    stats = json.loads((run_dir / "target_normalization.json").read_text())  # the default normalised the targets
    epochs = records(run_dir, "epoch")
    last = epochs[-1]
    n_val = int(last["val/samples"])
    assert n_val % 3 != 0
    binned = [k for k in last if k.startswith("val/bin_")]
    assert len(binned) > 3 * 10 and all("bin" in k for k in binned)
    assert {"val/positions/x/rmse", "val/positions/z/bias", "val/energies/frac_rms"} <= set(last)
    assert not any(k.startswith("val/positions/0/") for k in last)
    assert sum(last[f"val/bin_energies_{a:g}_{b:g}/samples"] for a, b in zip(edges, edges[1:], strict=False)) == n_val

    # 3 ranks equal one process's `dtrain eval` of the same weights, binned quantiles included.
    single = eval_json(run_dir, "val", tmp_path, "--predictions", str(tmp_path / "p.npz"))
    for key, value in last.items():
        if key.startswith("val/"):
            assert single[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    # ...and a per-sample computation from the predictions (float32 rows: 1e-5).
    p = np.load(tmp_path / "p.npz")
    e_true, e_pred = (
        p["energies_true"].reshape(-1).astype(np.float64),
        p["energies_pred"].reshape(-1).astype(np.float64),
    )
    dist = np.linalg.norm((p["positions_pred"] - p["positions_true"]).reshape(-1, 3).astype(np.float64), axis=1)
    angle = np.degrees(angles_rad(p["angles_pred"], p["angles_true"]))
    for lo, hi in zip(edges, edges[1:], strict=False):
        chosen = (e_true >= lo) & (e_true < hi)
        assert chosen.sum() > 0
        label = f"val/bin_energies_{lo:g}_{hi:g}"
        frac = (e_pred[chosen] - e_true[chosen]) / e_true[chosen]
        assert last[f"{label}/energies/frac_rms"] == pytest.approx(np.sqrt(np.mean(frac**2)), rel=1e-5)
        assert last[f"{label}/positions/distance_68"] == pytest.approx(np.quantile(dist[chosen], 0.68), rel=1e-5)
        assert last[f"{label}/angles/angle_68_deg"] == pytest.approx(
            np.quantile(angle[chosen], 0.68), rel=1e-4, abs=1e-4
        )

    # The evaluation loss is the documented per-target formula on the normalised outputs.
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    pred = np.concatenate([p[f"{k}_pred"].reshape(n_val, -1) for k in TARGETS], 1).astype(np.float64)
    true = np.concatenate([p[f"{k}_true"].reshape(n_val, -1) for k in TARGETS], 1).astype(np.float64)
    out_n, true_n = (pred - mean) / std, (true - mean) / std
    loss = (
        2.0 * (out_n[:, 0] - true_n[:, 0]) ** 2
        + np.abs(out_n[:, 1:4] - true_n[:, 1:4]).sum(1)
        + 2 * angles_rad(pred[:, 4:6], true[:, 4:6])
    ) / 6
    assert last["val/loss"] == pytest.approx(loss.mean(), rel=1e-4)

    # A residual histogram per target and epoch in TensorBoard, counting every value of the split.
    histograms = tb_histograms(run_dir / "tb")
    for target, width in (("energies", 1), ("positions", 3), ("angles", 2)):
        events = histograms[f"val/{target}/residual"]
        assert [e.step for e in events] == [r["step"] for r in epochs]
        assert all(e.histogram_value.num == width * n_val for e in events)
    # The last one is that of the weights evaluated: the predictions' residuals, binned on 3 ranks as on one.
    residual = pred[:, 0] - true[:, 0]
    last_energy = histograms["val/energies/residual"][-1].histogram_value
    assert last_energy.min == pytest.approx(residual.min(), rel=1e-5)
    assert last_energy.max == pytest.approx(residual.max(), rel=1e-5)
    expected_counts = np.histogram(residual, bins=50)[0]
    assert np.abs(np.array(last_energy.bucket) - expected_counts).sum() <= 2  # float32 rows: a value may cross an edge
    saved = json.loads((run_dir / "residuals_val.json").read_text())
    assert saved["energies"]["counts"] == [int(c) for c in last_energy.bucket]


# A custom task's exact quantiles across ranks: tests/test_tasks.py::test_custom_task_runs_on_several_ranks...


def test_a_custom_task_with_samples_but_no_finalize_is_named() -> None:
    with pytest.raises(ConfigError, match="has eval_samples\\(\\) but no finalize_samples\\(\\)"):
        CustomTask("tests.helpers.tasks:SamplesWithoutFinalizeTask", {}, ["energies"])
