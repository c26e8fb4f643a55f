"""`dtrain data inspect` runs the launch's checks of hit-list files: a corrupt file fails both the
same way (exit 2, the same message), never "fits"."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from launcher.cli import main
from tests.helpers.hits import random_events, random_geometry, write_geometry, write_hit_file
from tests.helpers.run import write_config

PPM = 4
MODULES = 6


def _swap_offsets(f: h5py.File) -> None:
    index = f["event_hits_index"][...]
    index[[3, 4]] = index[[4, 3]]  # event 3 now has a negative hit count
    f["event_hits_index"][...] = index


def _negative_pmt(f: h5py.File) -> None:
    pmt = f["hit_pmt"][...]
    pmt[7] = -1
    f["hit_pmt"][...] = pmt


def _offsets_past_the_end(f: h5py.File) -> None:
    index = f["event_hits_index"][...]
    index[-1] = f["hit_pmt"].shape[0] + 5
    f["event_hits_index"][...] = index


def _short_charge(f: h5py.File) -> None:
    charge = f["hit_charge"][...]
    del f["hit_charge"]
    f["hit_charge"] = charge[:-3]


def _no_time(f: h5py.File) -> None:
    del f["hit_time"]


CORRUPTIONS: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "swapped offsets": (_swap_offsets, "'event_hits_index' is not increasing: event 4 starts at hit"),
    "negative PMT id": (_negative_pmt, "'hit_pmt': PMT id -1 is negative"),
    "offsets past the end": (_offsets_past_the_end, "'event_hits_index' points beyond the hit arrays"),
    "hit arrays of different lengths": (_short_charge, "'hit_charge' has"),
    "missing hit_time": (_no_time, "key 'hit_time' (hit_keys.time) does not exist"),
}


def _error_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "error" in line]
    return code, "\n".join(lines)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_inspect_and_dry_run_reject_a_corrupt_hit_file_alike(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    geometry = write_geometry(
        tmp_path / "geo.npz", random_geometry(rng, modules=MODULES, height=3, width=3, pmts_per_module=PPM)
    )
    data = write_hit_file(tmp_path / "hits.h5", random_events(rng, 30, MODULES * PPM, max_hits=12, empty_every=50))
    cfg = write_config(
        tmp_path / "c.toml", data, data={"format": "hits", "geometry_file": str(geometry), "pmts_per_module": PPM}
    )
    monkeypatch.chdir(tmp_path)
    # The intact file passes both.
    assert main(["data", "inspect", str(data), "--geometry", str(geometry)]) == 0
    assert main(["launch", str(cfg), "--gpus", "cpu", "--dry-run"]) == 0
    capsys.readouterr()
    corrupt, expected = CORRUPTIONS[name]
    with h5py.File(data, "a") as f:
        corrupt(f)
    inspect_code, inspect_error = _error_of(["data", "inspect", str(data)], capsys)
    launch_code, launch_error = _error_of(["launch", str(cfg), "--gpus", "cpu", "--dry-run"], capsys)
    assert (inspect_code, launch_code) == (2, 2), (inspect_error, launch_error)
    assert expected in inspect_error
    assert inspect_error == launch_error
    assert "fits" not in inspect_error
