"""The writers publish atomically: a write that fails or is interrupted mid-way leaves the previous file
as it was and no temporary file; a write that succeeds replaces it.

Each test plants an "old" target, makes the writer fail after it has started writing (its progress bar
raises on the first finished block, or a later step raises), checks the directory, then lets the same
call succeed and checks the file was replaced.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from dist_train.data.hits import HitSpec
from dist_train.data.writers import convert, convert_hits, synth, synth_hits

OLD = b"the previous file, which a failed write must leave as it was"


class FailingBar:
    """A progress bar that raises at the first finished block: the writer is mid-way through its output."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __enter__(self) -> FailingBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        raise self.exc


def fail_mid_write(monkeypatch: pytest.MonkeyPatch, module: Any, exc: BaseException) -> None:
    monkeypatch.setattr(module, "progress_bar", lambda *args, **kwargs: FailingBar(exc))


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def half_written_geometry(path: Path, geo: dict[str, np.ndarray]) -> None:
    path.write_bytes(b"PK\x03\x04")  # the start of an .npz, then the disk is full
    raise OSError(28, "No space left on device")


def assert_published(path: Path) -> None:
    """A complete HDF5 file, readable by others as every dtrain output is."""
    assert h5py.is_hdf5(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize(
    "exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_synth_keeps_the_old_file_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: BaseException
) -> None:
    out = tmp_path / "demo.h5"
    out.write_bytes(OLD)
    fail_mid_write(monkeypatch, synth, exc)
    with pytest.raises(type(exc)):
        synth.synth_dataset(out, layout="image", events=8, progress=False)
    assert out.read_bytes() == OLD
    assert names(tmp_path) == ["demo.h5"]
    monkeypatch.undo()
    synth.synth_dataset(out, layout="image", events=8, progress=False)
    assert_published(out)
    assert names(tmp_path) == ["demo.h5"]


@pytest.mark.parametrize("step", ["hit arrays", "geometry"])
def test_synth_hits_keeps_both_old_files_when_a_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    out, geometry = tmp_path / "demo.h5", tmp_path / "demo_geometry.npz"
    out.write_bytes(OLD)
    geometry.write_bytes(OLD)
    if step == "hit arrays":
        fail_mid_write(monkeypatch, synth_hits, OSError(28, "No space left on device"))
    else:  # the hit-list file is complete (not yet published) when its geometry's write fails
        monkeypatch.setattr(synth_hits, "_write_geometry", half_written_geometry)
    kwargs: dict[str, Any] = {"events": 20, "grid": (4, 6), "hits_per_event": 5, "progress": False}
    with pytest.raises(OSError, match="No space"):
        synth_hits.write_hits_demo(out, **kwargs)
    assert out.read_bytes() == OLD and geometry.read_bytes() == OLD
    assert names(tmp_path) == ["demo.h5", "demo_geometry.npz"]
    monkeypatch.undo()
    assert synth_hits.write_hits_demo(out, **kwargs) == (out, geometry)
    assert_published(out)
    with np.load(geometry) as geo:
        assert geo["mpmt_image_positions"].shape == (20, 2)  # 4 x 6 modules, corners empty
    assert stat.S_IMODE(geometry.stat().st_mode) == 0o644
    assert names(tmp_path) == ["demo.h5", "demo_geometry.npz"]


def test_convert_keeps_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.npz"
    np.savez(src, x=np.ones((12, 1, 4, 4), dtype=np.float32), y=np.arange(12) % 3)
    out = tmp_path / "out.h5"
    out.write_bytes(OLD)
    fail_mid_write(monkeypatch, convert, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        convert.convert(src, out, progress=False)
    assert out.read_bytes() == OLD
    assert names(tmp_path) == ["out.h5", "src.npz"]
    monkeypatch.undo()
    assert convert.convert(src, out, progress=False)["rows"] == 12
    assert_published(out)
    assert names(tmp_path) == ["out.h5", "src.npz"]


def test_convert_hits_keeps_the_old_file_when_a_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, geometry = synth_hits.write_hits_demo(
        tmp_path / "hits.h5", events=20, grid=(4, 6), hits_per_event=5, progress=False
    )
    spec = HitSpec(geometry_file=str(geometry))
    out = tmp_path / "images.h5"
    out.write_bytes(OLD)
    fail_mid_write(monkeypatch, convert_hits, OSError(28, "No space left on device"))
    with pytest.raises(OSError, match="No space"):
        convert_hits.convert_hits(src, out, spec, progress=False)
    assert out.read_bytes() == OLD
    assert names(tmp_path) == ["hits.h5", "hits_geometry.npz", "images.h5"]
    monkeypatch.undo()
    assert convert_hits.convert_hits(src, out, spec, progress=False)["events"] == 20
    assert_published(out)
    assert names(tmp_path) == ["hits.h5", "hits_geometry.npz", "images.h5"]
