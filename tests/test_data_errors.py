"""Bad input gives a DataError naming the file/key; the CLI exits 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dist_train.config import Config
from dist_train.data.preflight import preflight_check
from dist_train.errors import DataError


def cfg_for(path: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.path = str(path)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def write(path: Path, **arrays: np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def good_arrays(n: int = 50) -> dict[str, np.ndarray]:
    return {
        "event_data": np.zeros((n, 2, 3), dtype=np.float32),
        "labels": (np.arange(n) % 3).astype(np.int64),
        "energies": np.ones((n, 1), dtype=np.float32),
    }


def test_good_file_passes(tmp_path: Path) -> None:
    info = preflight_check(cfg_for(write(tmp_path / "ok.h5", **good_arrays()), extra_keys=["energies"]))
    assert info.num_rows == 50 and info.sample_shape == (2, 3) and info.class_counts == [17, 17, 16]
    assert info.fast_path


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.h5.*does not exist"):
        preflight_check(cfg_for(tmp_path / "missing.h5"))


def test_missing_key_lists_existing_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "k.h5", **good_arrays())
    with pytest.raises(DataError) as err:
        preflight_check(cfg_for(path, x_key="events"))
    msg = str(err.value)
    assert "'events'" in msg and "event_data" in msg and "labels" in msg and "k.h5" in msg
    with pytest.raises(DataError, match="'missing_extra'"):
        preflight_check(cfg_for(path, extra_keys=["missing_extra"]))


def test_length_mismatch(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["labels"] = arrays["labels"][:40]
    with pytest.raises(DataError, match="40 labels but 'event_data' has 50"):
        preflight_check(cfg_for(write(tmp_path / "len.h5", **arrays)))


def test_labels_out_of_range(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["labels"][3] = 7
    with pytest.raises(DataError, match=r"'labels'.*0 to 7.*num_classes = 3.*num_classes = 8"):
        preflight_check(cfg_for(write(tmp_path / "range.h5", **arrays)))
    arrays["labels"][3] = -1
    with pytest.raises(DataError, match="negative"):
        preflight_check(cfg_for(write(tmp_path / "neg.h5", **arrays)))


def test_non_numeric_dtype(tmp_path: Path) -> None:
    arrays = good_arrays()
    arrays["event_data"] = np.array([b"abc"] * 50)
    with pytest.raises(DataError, match="'event_data' has dtype .*not numeric"):
        preflight_check(cfg_for(write(tmp_path / "str.h5", **arrays)))


def test_not_an_hdf5_file(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("hello, not hdf5\n" * 100)
    with pytest.raises(DataError, match="text.h5.*cannot be opened as an HDF5 file"):
        preflight_check(cfg_for(path))


def test_truncated_file(tmp_path: Path) -> None:
    path = write(tmp_path / "trunc.h5", **good_arrays(2000))
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(DataError, match="trunc.h5") as err:
        preflight_check(cfg_for(path))
    assert "truncated" in str(err.value) or "corrupt" in str(err.value)


def test_cli_inspect_missing_file_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "data", "inspect", str(tmp_path / "nothere.h5")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "nothere.h5" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_inspect_reports_storage_and_balance(tmp_path: Path) -> None:
    import json

    from click.testing import CliRunner

    from launcher.cli import cli

    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("event_data", data=np.zeros((30, 4), np.float32), chunks=(8, 4), compression="gzip")
        f["labels"] = np.array([0] * 20 + [1] * 10)
    result = CliRunner().invoke(cli, ["data", "inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["datasets"]["event_data"]["storage"] == "chunked"
    assert report["datasets"]["event_data"]["compression"] == "gzip"
    assert report["fast_path"] is False and report["datasets"]["labels"]["fast_path"] is True
    assert report["class_counts"] == {"0": 20, "1": 10}
