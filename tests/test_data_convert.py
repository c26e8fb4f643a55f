"""Demo data (synth) and format conversion round trips (npz, npy, IDX, ImageFolder)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from dist_train.config import Config
from dist_train.data import preflight_check
from dist_train.data.h5io import storage_of
from dist_train.data.writers.convert import convert
from dist_train.data.writers.synth import synth_dataset
from dist_train.errors import DataError
from launcher.cli import cli


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in f}


def test_synth_wch5_layout(tmp_path: Path) -> None:
    path = synth_dataset(tmp_path / "w.h5", events=90, seed=1, shape=(16, 12, 10))
    with h5py.File(path, "r", locking=False) as f:
        x, y, e = f["event_data"], f["labels"], f["energies"]
        assert x.shape == (90, 16, 12, 10) and x.dtype == np.float32 and storage_of(x).fast_path
        assert y.dtype == np.int64 and e.shape == (90, 1) and e.dtype == np.float32
        labels = y[()]
    assert labels.tolist() == sorted(labels.tolist()) and set(labels.tolist()) == {0, 1, 2}  # class blocks
    again = synth_dataset(tmp_path / "w2.h5", events=90, seed=1, shape=(16, 12, 10))
    np.testing.assert_array_equal(read_all(path)["event_data"], read_all(again)["event_data"])
    cfg = Config()
    cfg.data.path = str(path)
    assert preflight_check(cfg).class_counts == [30, 30, 30]


def test_synth_image_has_class_structure(tmp_path: Path) -> None:
    path = synth_dataset(tmp_path / "i.h5", layout="image", events=400, seed=0)
    data = read_all(path)
    x, y = data["event_data"].reshape(400, -1), data["labels"]
    assert data["event_data"].shape == (400, 1, 28, 28) and y.max() < 10
    # Nearest class mean on half the data classifies the other half far above chance (10%).
    means = np.stack([x[:200][y[:200] == k].mean(axis=0) for k in range(10)])
    pred = np.argmin(((x[200:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[200:]).mean() > 0.4


def test_npz_roundtrip_with_extras(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((123, 3, 5)).astype(np.float32)
    y = rng.integers(0, 4, 123).astype(np.int32)
    energies = rng.uniform(size=(123, 1))
    np.savez_compressed(tmp_path / "src.npz", x=x, y=y, energies=energies, meta=np.arange(3))
    convert(tmp_path / "src.npz", tmp_path / "out.h5")
    out = read_all(tmp_path / "out.h5")
    np.testing.assert_array_equal(out["event_data"], x)
    np.testing.assert_array_equal(out["labels"], y)
    assert out["labels"].dtype == np.int64
    np.testing.assert_array_equal(out["energies"], energies)
    assert "meta" not in out


def test_npy_pair_and_compressed_output(tmp_path: Path) -> None:
    x = np.arange(200 * 6, dtype=np.float64).reshape(200, 6)
    y = np.arange(200) % 2
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "labels.npy", y)
    convert(tmp_path / "x.npy", tmp_path / "c.h5", compress=True)
    with h5py.File(tmp_path / "c.h5", "r", locking=False) as f:
        assert f["event_data"].compression == "gzip" and not storage_of(f["event_data"]).fast_path
        np.testing.assert_array_equal(f["event_data"][()], x)
        np.testing.assert_array_equal(f["labels"][()], y)


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 7, 9), dtype=np.uint8)
    labels = rng.integers(0, 10, 50, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    convert(tmp_path / f"train-images-idx3-ubyte{suffix}", tmp_path / "mnist.h5")
    out = read_all(tmp_path / "mnist.h5")
    np.testing.assert_array_equal(out["event_data"], images[:, None])
    np.testing.assert_array_equal(out["labels"], labels.astype(np.int64))


def test_imagefolder_roundtrip(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    expected = {}
    for cls in ("cat", "dog"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "tree" / cls / f"{i}.png")
            expected[(cls, i)] = arr
    convert(tmp_path / "tree", tmp_path / "if.h5")
    out = read_all(tmp_path / "if.h5")
    assert out["event_data"].shape == (6, 3, 6, 5) and out["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(out["event_data"][4], expected[("dog", 1)].transpose(2, 0, 1))
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "tree" / "dog" / "big.png")
    with pytest.raises(DataError, match="big.png.*one size"):
        convert(tmp_path / "tree", tmp_path / "if2.h5")
    assert not (tmp_path / "if2.h5").exists()  # no half-written output


def test_cli_synth_and_convert(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        cli,
        [
            "data",
            "synth",
            str(tmp_path / "s.h5"),
            "--layout",
            "image",
            "--events",
            "40",
            "--shape",
            "3,8,8",
            "--classes",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert read_all(tmp_path / "s.h5")["event_data"].shape == (40, 3, 8, 8)
    res = runner.invoke(cli, ["data", "synth", str(tmp_path / "s.h5"), "--events", "4"])
    assert res.exit_code != 0 and isinstance(res.exception, DataError)  # refuses to overwrite
    np.savez(tmp_path / "a.npz", images=np.ones((5, 2), np.float32), labels=np.zeros(5, np.int64))
    res = runner.invoke(cli, ["data", "convert", str(tmp_path / "a.npz"), str(tmp_path / "a.h5")])
    assert res.exit_code == 0, res.output
    assert read_all(tmp_path / "a.h5")["event_data"].shape == (5, 2)
