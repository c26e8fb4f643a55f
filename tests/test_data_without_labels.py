"""A file without class labels: regression and custom tasks need only their inputs and targets;
fraction splits are stratified only when asked (classification labels, or a named integer key)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_train.config import Config, config_from_dict, load_config
from dist_train.data.loader import build_data
from dist_train.data.preflight import preflight_check, prepare_splits
from dist_train.errors import ConfigError, DataError
from tests.helpers.run import assert_ok, dtrain, only_run_dir, records, write_config

N = 203
STAGE_SHARES = (0.5, 0.3, 0.15, 0.05)


def no_label_file(path: Path) -> Path:
    """event_data, a float target ``progression`` that depends on it, ``energies`` and an integer ``stage``; no labels."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(N, 2, 4, 4)).astype(np.float32)
    progression = (x.mean(axis=(1, 2, 3)) * 4 + 1).astype(np.float32)[:, None]
    stage = rng.choice(len(STAGE_SHARES), size=N, p=STAGE_SHARES).astype(np.int32)
    with h5py.File(path, "w") as f:
        f["event_data"] = x
        f["progression"] = progression
        f["energies"] = (500 + 100 * progression).astype(np.float32)
        f["stage"] = stage
    return path


def cfg_for(path: Path, task: dict | None = None, **data: object) -> Config:
    raw = {
        "data": {"path": str(path), "val_split": 0.2, "test_split": 0.1, "num_workers": 0, "batch_size": 16, **data},
        "task": task if task is not None else {"name": "regression", "targets": ["progression"]},
        "model": {"name": "mlp", "num_classes": 1},
    }
    return config_from_dict(raw, "test.toml")


def test_regression_and_custom_tasks_need_no_labels(tmp_path: Path) -> None:
    data = no_label_file(tmp_path / "d.h5")
    info = preflight_check(cfg_for(data))
    assert info.y_key is None and info.class_counts == [] and info.num_rows == N
    # The second attempt: y_key pointing at the float target (targets default to [y_key]).
    assert preflight_check(cfg_for(data, {"name": "regression"}, y_key="progression")).extra["progression"][
        "shape"
    ] == [1]
    preflight_check(cfg_for(data, {"name": "tests.helpers.tasks:AbsErrorTask", "targets": ["energies"]}))
    # Classification does need its labels, and says which key is missing.
    with pytest.raises(DataError, match=r"key 'labels' \(y_key\) does not exist"):
        preflight_check(cfg_for(data, {"name": "classification"}))


def test_regression_batches_hold_targets_and_no_labels(tmp_path: Path) -> None:
    data = no_label_file(tmp_path / "d.h5")
    bundle = build_data(cfg_for(data), run_dir=None)
    batch = bundle.train[np.arange(5)]
    assert set(batch) == {"x", "index", "progression"}
    with h5py.File(data, "r") as f:
        expected = f["progression"][...][bundle.train.rows[:5]]
    np.testing.assert_array_equal(batch["progression"].numpy(), expected)


def _stage_counts(data: Path, rows: np.ndarray | None) -> np.ndarray:
    with h5py.File(data, "r") as f:
        stage = f["stage"][...]
    assert rows is not None
    return np.bincount(stage[rows], minlength=len(STAGE_SHARES))


def test_splits_are_stratified_only_when_asked(tmp_path: Path) -> None:
    data = no_label_file(tmp_path / "d.h5")
    with pytest.raises(
        ConfigError, match=r"data.stratify = True stratifies by class labels, which a 'regression' task"
    ):
        cfg_for(data, stratify=True)
    # By a named key: every stage keeps its share in each split (rounded per stage).
    _, splits = prepare_splits(cfg_for(data, stratify="stage"))
    total = _stage_counts(data, np.arange(N))
    np.testing.assert_array_equal(_stage_counts(data, splits.val), np.round(total * 0.2).astype(int))
    np.testing.assert_array_equal(_stage_counts(data, splits.test), np.round(total * 0.1).astype(int))
    # Random otherwise: the same rows as a split that never read any key.
    _, random = prepare_splits(cfg_for(data))
    _, custom = prepare_splits(cfg_for(data, {"name": "tests.helpers.tasks:AbsErrorTask", "targets": ["energies"]}))
    np.testing.assert_array_equal(random.val, custom.val)
    assert not np.array_equal(_stage_counts(data, random.val), _stage_counts(data, splits.val))
    with pytest.raises(DataError, match=r"key 'nope' \(data.stratify\) does not exist"):
        prepare_splits(cfg_for(data, stratify="nope"))
    with pytest.raises(DataError, match=r"data.stratify values 'progression' are floats that are not whole numbers"):
        prepare_splits(cfg_for(data, stratify="progression"))


def test_classification_still_stratifies_by_its_labels(tmp_path: Path) -> None:
    data = tmp_path / "c.h5"
    labels = np.repeat(np.arange(3), [120, 60, 20]).astype(np.int64)
    np.random.default_rng(1).shuffle(labels)
    with h5py.File(data, "w") as f:
        f["event_data"] = np.zeros((len(labels), 3), np.float32)
        f["labels"] = labels
    cfg = cfg_for(data, {"name": "classification"}, stratify=True)
    cfg.model.num_classes = 3
    _, splits = prepare_splits(cfg)
    for rows, share in ((splits.val, 0.2), (splits.test, 0.1)):
        assert rows is not None
        np.testing.assert_array_equal(np.bincount(labels[rows], minlength=3), np.round(np.array([120, 60, 20]) * share))


def test_regression_without_labels_on_two_ranks_end_to_end(tmp_path: Path) -> None:
    """Two ranks, a relative split file (stored absolute in the run's config.toml), eval from elsewhere."""
    data = no_label_file(tmp_path / "d.h5")
    rows = np.random.default_rng(0).permutation(N)
    np.savez(tmp_path / "splits.npz", train_idxs=rows[:150], val_idxs=rows[150:180], test_idxs=rows[180:])
    cfg = write_config(
        tmp_path / "reg.toml",
        data,
        data={"split_file": "splits.npz"},
        task={"name": "regression", "targets": ["progression"], "target_norm": "auto"},
        model={"name": "mlp", "hidden": [16]},
        train={"epochs": 2, "log_every": 2, "precision": "fp32", "stop_check_every": 2},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "2", str(cfg), cwd=tmp_path, timeout=600))
    run_dir = only_run_dir(tmp_path / "runs")
    assert load_config(run_dir / "config.toml").data.split_file == str(tmp_path / "splits.npz")
    assert "val/progression/rmse" in records(run_dir, "epoch")[-1]
    test = records(run_dir, "test")[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = dtrain("eval", str(run_dir), "--split", "test", "--json", cwd=elsewhere)
    assert_ok(out)
    assert np.isfinite(json.loads(out.stdout)["test/progression/rmse"]) and np.isfinite(test["test/progression/rmse"])


@pytest.mark.slow  # the batches are the regression's (above); this adds the custom task's own path
def test_custom_task_without_labels_trains(tmp_path: Path) -> None:
    data = no_label_file(tmp_path / "d.h5")
    cfg = write_config(
        tmp_path / "custom.toml",
        data,
        task={"name": "tests.helpers.tasks:AbsErrorTask", "targets": ["energies"]},
        model={"name": "mlp", "hidden": [8]},
        train={"epochs": 1, "log_every": 2, "precision": "fp32", "stop_check_every": 2},
        checkpoint={"monitor": "val/mae"},
    )
    assert_ok(dtrain("launch", "--gpus", "cpu", "--nproc", "1", str(cfg), cwd=tmp_path, timeout=600))
    assert "val/mae" in records(only_run_dir(tmp_path / "runs"), "epoch")[-1]
