"""Splits (fractions, stratified, limit, explicit index files) and normalisation statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_train.config import Config, DataConfig
from dist_train.data.preflight import NORMALIZATION_FILE, ensure_normalization
from dist_train.data.splits import fraction_splits, make_splits
from dist_train.errors import DataError

N = 600


def make_h5(path: Path, labels: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    y = labels if labels is not None else np.repeat(np.arange(3), N // 3).astype(np.int64)
    # Channel c has mean 10*c and std c+1, so the statistics are known.
    x = rng.standard_normal((len(y), 3, 4, 4)).astype(np.float32)
    x = (
        x * np.array([1, 2, 3], dtype=np.float32)[None, :, None, None]
        + np.array([0, 10, 20], dtype=np.float32)[None, :, None, None]
    )
    with h5py.File(path, "w") as f:
        f["event_data"] = x
        f["labels"] = y
    return path


def data_cfg(**kw: object) -> DataConfig:
    d = DataConfig()
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def test_fraction_splits_are_disjoint_and_cover() -> None:
    s = fraction_splits(N, None, data_cfg(val_split=0.2, test_split=0.1, split_seed=5))
    assert s.val is not None and s.test is not None
    everything = np.concatenate([s.train, s.val, s.test])
    assert len(everything) == N and len(np.unique(everything)) == N
    assert (len(s.val), len(s.test)) == (120, 60)
    again = fraction_splits(N, None, data_cfg(val_split=0.2, test_split=0.1, split_seed=5))
    assert np.array_equal(s.val, again.val)
    other = fraction_splits(N, None, data_cfg(val_split=0.2, test_split=0.1, split_seed=6))
    assert not np.array_equal(s.val, other.val)


def test_stratified_splits_keep_class_ratios() -> None:
    labels = np.concatenate([np.zeros(400), np.ones(150), np.full(50, 2)]).astype(np.int64)
    s = fraction_splits(N, labels, data_cfg(val_split=0.2, test_split=0.2, stratify=True))
    assert s.val is not None and s.test is not None
    for rows in (s.train, s.val, s.test):
        share = np.bincount(labels[rows], minlength=3) / len(rows)
        np.testing.assert_allclose(share, [400 / 600, 150 / 600, 50 / 600], atol=0.01)
    assert len(np.unique(np.concatenate([s.train, s.val, s.test]))) == N


def test_limit_draws_without_replacement() -> None:
    s = fraction_splits(N, None, data_cfg(limit=100, val_split=0.1, test_split=0.1))
    assert s.val is not None and s.test is not None
    everything = np.concatenate([s.train, s.val, s.test])
    assert len(everything) == 100 and len(np.unique(everything)) == 100
    assert everything.max() > 100  # a random subset, not the first rows


def test_zero_test_split_means_no_test_set() -> None:
    s = fraction_splits(N, None, data_cfg(val_split=0.1, test_split=0.0))
    assert s.test is None and s.val is not None and len(s.train) + len(s.val) == N


def test_npz_split_file(tmp_path: Path) -> None:
    path = make_h5(tmp_path / "d.h5")
    np.savez(
        tmp_path / "s.npz", train_idxs=np.arange(0, 500), val_idxs=np.arange(500, 550), test_idxs=np.arange(550, 600)
    )
    s = make_splits(N, None, data_cfg(split_file=str(tmp_path / "s.npz")), path)
    assert s.val is not None and s.test is not None
    assert s.train.tolist() == list(range(500)) and s.test.tolist() == list(range(550, 600))


def test_split_group_inside_data_file(tmp_path: Path) -> None:
    path = make_h5(tmp_path / "d.h5")
    with h5py.File(path, "a") as f:
        g = f.create_group("splits")
        g["train_idxs"] = np.arange(100, 600)
        g["val_idxs"] = np.arange(0, 100)
    s = make_splits(N, None, data_cfg(split_file="h5:/splits"), path)
    assert s.test is None and s.val is not None and s.val.tolist() == list(range(100))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"train_idxs": np.array([0, 1, 600]), "val_idxs": np.array([2])}, "out of range"),
        ({"train_idxs": np.array([0, 1, 1, 2]), "val_idxs": np.array([3])}, "duplicate"),
        ({"train_idxs": np.array([0, 1, 2]), "val_idxs": np.array([2, 3])}, "overlap"),
        ({"train_idxs": np.array([-1, 1])}, "out of range"),
        ({"val_idxs": np.array([1])}, "train_idxs"),
        ({"train_idxs": np.array([0.5, 1.0])}, "integer"),
    ],
)
def test_index_file_validation(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = make_h5(tmp_path / "d.h5")
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message) as err:
        make_splits(N, None, data_cfg(split_file=str(tmp_path / "bad.npz")), path)
    assert "bad.npz" in str(err.value)


def test_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.npz"):
        make_splits(N, None, data_cfg(split_file=str(tmp_path / "nope.npz")), tmp_path / "d.h5")


def test_auto_normalization_is_computed_on_train_and_stored(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.path = str(make_h5(tmp_path / "d.h5"))
    cfg.data.normalize = "auto"
    run = tmp_path / "run"
    mean, std = ensure_normalization(cfg, run)  # type: ignore[misc]
    np.testing.assert_allclose(mean, [0, 10, 20], atol=0.1)
    np.testing.assert_allclose(std, [1, 2, 3], rtol=0.05)
    # Exactly the training rows' statistics, not the whole file's.
    s = make_splits(N, None, cfg.data, Path(cfg.data.path))
    with h5py.File(cfg.data.path, "r", locking=False) as f:
        train_x = f["event_data"][()][s.train].astype(np.float64)
    np.testing.assert_allclose(mean, train_x.mean(axis=(0, 2, 3)), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(std, train_x.std(axis=(0, 2, 3)), rtol=1e-9)
    record = json.loads((run / NORMALIZATION_FILE).read_text())
    assert record["mean"] == mean and record["train_rows"] == len(s.train)
    assert ensure_normalization(cfg, run) == (mean, std)  # idempotent: read back
    cfg.data.split_seed = 99  # another training split: the stored stats no longer apply
    with pytest.raises(DataError, match=NORMALIZATION_FILE):
        ensure_normalization(cfg, run)


def test_given_normalization_checks_channel_count(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.path = str(make_h5(tmp_path / "d.h5"))
    cfg.data.normalize = "given"
    cfg.data.mean, cfg.data.std = [0.0, 1.0], [1.0, 1.0]
    with pytest.raises(DataError, match="3 channels"):
        ensure_normalization(cfg, tmp_path / "run")
    cfg.data.mean, cfg.data.std = [0.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    assert ensure_normalization(cfg, tmp_path / "run") == ([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])
    cfg.data.normalize = "none"
    assert ensure_normalization(cfg, tmp_path / "run") is None


def test_torch_free_modules_do_not_import_torch() -> None:
    import subprocess

    code = (
        "import sys, dist_train.data, dist_train.data.preflight, dist_train.data.splits, dist_train.data.transform_spec, "
        "dist_train.data.writers.synth, dist_train.data.writers.synth_hits, dist_train.data.writers.convert, "
        "dist_train.data.writers.convert_hits, launcher.cmd_data; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
