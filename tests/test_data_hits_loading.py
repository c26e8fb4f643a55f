"""Hit-list files through the whole data layer: config, launch-time checks, every loader, conversion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import Config, config_from_dict
from dist_train.data.hits import HitSpec
from dist_train.data.loader import build_data, make_loader, use_threads
from dist_train.data.preflight import preflight_check
from dist_train.data.writers.convert_hits import convert_hits
from dist_train.errors import ConfigError, DataError
from dist_train.sampler import ResumableDistributedBatchSampler
from tests.helpers.hits import random_events, random_geometry, reference_image, write_geometry, write_hit_file

PPM = 4
MODULES = 9
EXTRA = ["energies", "positions", "angles"]


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, list, dict]:
    rng = np.random.default_rng(3)
    geometry = random_geometry(rng, modules=MODULES, height=4, width=5, pmts_per_module=PPM)
    events = random_events(rng, 150, MODULES * PPM, max_hits=40)
    return (
        write_hit_file(tmp_path / "hits.h5", events),
        write_geometry(tmp_path / "geo.npz", geometry),
        events,
        geometry,
    )


def hits_config(data: Path, geo: Path, **data_keys: object) -> Config:
    raw = {
        "data": {
            "path": str(data),
            "format": "hits",
            "geometry_file": str(geo),
            "pmts_per_module": PPM,
            "extra_keys": EXTRA,
            "batch_size": 16,
            "num_workers": 0,
            **data_keys,
        },
        "model": {"num_classes": 3},
    }
    return config_from_dict(raw, "test")


def epoch(cfg: Config, tmp_path: Path, *, split: str = "train") -> list[dict[str, torch.Tensor]]:
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    part = getattr(bundle, split)
    batch = 16 if split == "train" else 4
    sampler = ResumableDistributedBatchSampler(len(part), num_replicas=1, rank=0, batch_size=batch, seed=5)
    sampler.set_epoch(2)
    return list(make_loader(part, sampler, cfg.data, train=split == "train", device_type="cpu"))


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) and len(a) > 3
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def test_config_keys_are_checked_with_hints() -> None:
    with pytest.raises(ConfigError, match=r"data.hit_keys.pmts .*Did you mean 'pmt'"):
        config_from_dict({"data": {"hit_keys": {"pmts": "x"}}})
    with pytest.raises(ConfigError, match=r"data.channels.*'charges'.*Did you mean 'charge'"):
        config_from_dict({"data": {"channels": ["charges"]}})
    with pytest.raises(ConfigError, match=r"data.channels.*'position'.*mpmt_image"):
        config_from_dict({"data": {"channels": ["position"]}})
    with pytest.raises(ConfigError, match=r"data.geometry_file .*is empty"):
        config_from_dict({"data": {"format": "hits"}})
    with pytest.raises(ConfigError, match=r"data.format = 'hit' .*Did you mean 'hits'"):
        config_from_dict({"data": {"format": "hit"}})
    cfg = config_from_dict({"data": {"format": "hits", "geometry_file": "g.npz", "hit_keys": {"pmt": "tube"}}})
    assert cfg.data.hit_keys == {"index": "event_hits_index", "pmt": "tube", "time": "hit_time", "charge": "hit_charge"}


def test_launch_checks_do_not_import_numba(files: tuple) -> None:
    """The launcher's checks of a hit-list file use the numpy builder's tables: no numba import (~1.3 s) there."""
    data, geo, _, _ = files
    raw = {
        "data": {"path": str(data), "format": "hits", "geometry_file": str(geo), "pmts_per_module": PPM},
        "model": {"num_classes": 3},
    }
    code = (
        "import sys; from dist_train.config import config_from_dict; "
        "from dist_train.data.preflight import preflight_check; "
        f"info = preflight_check(config_from_dict({raw!r}, 'test')); "
        f"assert info.sample_shape == {(2 * PPM, 4, 5)!r}, info.sample_shape; "
        "sys.exit(3 if 'numba' in sys.modules else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr or "numba was imported"


def test_preflight_describes_the_samples(files: tuple, tmp_path: Path) -> None:
    data, geo, events, _ = files
    info = preflight_check(hits_config(data, geo))
    assert info.num_rows == 150 and info.sample_shape == (2 * PPM, 4, 5) and info.num_channels == 2 * PPM
    assert info.fast_path and info.class_counts == [50, 50, 50] and not info.notes
    over = sum(len(e[0]) > 10 for e in events)
    info = preflight_check(
        hits_config(data, geo, representation="point_cloud", n_points=10, channels=["time", "charge"])
    )
    assert info.sample_shape == (2, 10)
    assert info.notes and info.notes[0].startswith(f"{over} of 150 events")


@pytest.mark.parametrize("representation", ["mpmt_image", "point_cloud"])
def test_every_loader_gives_the_same_batches(files: tuple, tmp_path: Path, representation: str) -> None:
    """Inline, reader threads, fork and spawn worker processes: the same batches, in the sampler's order."""
    data, geo, events, geometry = files
    common = {"representation": representation, "n_points": 12, "normalize": "auto", "extra_keys": [*EXTRA, "n_hits"]}
    reference = epoch(hits_config(data, geo, worker_mode="process", **common), tmp_path)
    runs = [("thread", 0, ""), ("thread", 2, ""), ("auto", 2, ""), ("process", 2, "fork")]
    if representation == "mpmt_image":
        runs.append(("process", 2, "spawn"))  # slow to start: once is enough
    for mode, workers, start in runs:
        cfg = hits_config(data, geo, worker_mode=mode, num_workers=workers, start_method=start, **common)
        assert_same_batches(reference, epoch(cfg, tmp_path))
    cfg = hits_config(data, geo, num_workers=2, **common)
    assert use_threads(build_data(cfg, run_dir=None).train, cfg.data), "contiguous hit arrays: reader threads"
    rows = torch.cat([b["index"] for b in reference]).tolist()
    assert rows != sorted(rows)
    for batch in reference:  # n_hits: the hits each sample holds (point clouds: at most n_points)
        limit = 12 if representation == "point_cloud" else 10**9
        assert batch["n_hits"].tolist() == [min(len(events[r][0]), limit) for r in batch["index"].tolist()]
    # The batches hold the events they name (checked on the raw images, before normalisation).
    raw = epoch(hits_config(data, geo, representation=representation, n_points=12), tmp_path)
    for batch in raw[:3]:
        for x, row in zip(batch["x"], batch["index"].tolist(), strict=True):
            if representation == "mpmt_image":
                assert np.array_equal(x.numpy(), reference_image(events[row], geometry["mpmt_image_positions"], PPM))
            assert batch["energies"][list(batch["index"]).index(row)].item() == 2 * row


@pytest.mark.parametrize("representation", ["mpmt_image", "point_cloud"])
def test_converted_file_gives_the_same_batches(files: tuple, tmp_path: Path, representation: str) -> None:
    data, geo, _, _ = files
    spec = HitSpec(geometry_file=str(geo), representation=representation, pmts_per_module=PPM, n_points=12)
    summary = convert_hits(data, tmp_path / "images.h5", spec)
    assert sorted(summary["copied"]) == ["angles", "energies", "labels", "positions"]
    with h5py.File(tmp_path / "images.h5", "r") as f:
        assert f["event_data"].chunks is None and f["event_data"].shape[0] == 150
    # Point clouds' "auto" statistics skip the padding of a hit-list file, which a converted file
    # no longer marks (its n_hits dataset does, for the model): compare them unnormalised.
    norm = "auto" if representation == "mpmt_image" else "none"
    converted = config_from_dict(
        {
            "data": {
                "path": str(tmp_path / "images.h5"),
                "extra_keys": [*EXTRA, "n_hits"],
                "batch_size": 16,
                "num_workers": 0,
                "normalize": norm,
            },
            "model": {"num_classes": 3},
        }
    )
    from_hits = hits_config(
        data, geo, representation=representation, n_points=12, normalize=norm, extra_keys=[*EXTRA, "n_hits"]
    )
    for split in ("train", "val"):
        assert_same_batches(
            epoch(from_hits, tmp_path / "a", split=split), epoch(converted, tmp_path / "b", split=split)
        )


def rewrite(path: Path, key: str, value: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        del f[key]
        f[key] = value


def test_bad_hit_files_are_data_errors_naming_the_problem(files: tuple, tmp_path: Path) -> None:
    data, geo, _, geometry = files
    cfg = hits_config(data, geo)
    with h5py.File(data, "r") as f:
        index, pmt = f["event_hits_index"][...], f["hit_pmt"][...]
    bad = index.copy()
    bad[7], bad[8] = bad[8], bad[7]
    if bad[7] == bad[8]:
        bad[8] -= 1
    rewrite(data, "event_hits_index", bad)
    with pytest.raises(DataError, match=r"'event_hits_index' is not increasing: event 8 starts at hit"):
        preflight_check(cfg)
    beyond = index.copy()
    beyond[-3:] += len(pmt)
    rewrite(data, "event_hits_index", beyond)
    with pytest.raises(
        DataError, match=rf"points beyond the hit arrays: event 147 starts at hit \d+ but there are {len(pmt)} hits"
    ):
        preflight_check(cfg)
    rewrite(data, "event_hits_index", index)
    wrong_ids = pmt.copy()
    wrong_ids[len(pmt) // 2] = MODULES * PPM + 5
    rewrite(data, "hit_pmt", wrong_ids)
    with pytest.raises(
        DataError, match=rf"PMT id {MODULES * PPM + 5} is outside the geometry, which has {MODULES * PPM} PMTs"
    ):
        preflight_check(cfg)
    build_data(cfg, run_dir=None)  # ranks skip the full id scan; their reads check each batch (test_data_hits)
    rewrite(data, "hit_pmt", pmt)
    rewrite(data, "hit_time", np.zeros(len(pmt) - 1, np.float32))
    with pytest.raises(DataError, match=r"'hit_time' has \d+ hits but 'hit_pmt' has"):
        preflight_check(cfg)


def test_bad_geometry_files_are_data_errors(files: tuple, tmp_path: Path) -> None:
    data, _, _, geometry = files
    clash = {**geometry, "mpmt_image_positions": geometry["mpmt_image_positions"].copy()}
    clash["mpmt_image_positions"][5] = clash["mpmt_image_positions"][2]
    with pytest.raises(DataError, match=r"modules 2 and 5 are both at pixel"):
        preflight_check(hits_config(data, write_geometry(tmp_path / "clash.npz", clash)))
    no_pixels = {k: v for k, v in geometry.items() if k != "mpmt_image_positions"}
    path = write_geometry(tmp_path / "nopix.npz", no_pixels)
    with pytest.raises(DataError, match=r"nopix.npz' has no 'mpmt_image_positions' array .*it holds position"):
        preflight_check(hits_config(data, path))
    preflight_check(hits_config(data, path, representation="point_cloud"))  # point clouds do not need pixels
    short = {**geometry, "orientation": geometry["orientation"][:-1]}
    with pytest.raises(DataError, match=r"'orientation' has \d+ PMTs but 'position' has"):
        preflight_check(hits_config(data, write_geometry(tmp_path / "short.npz", short), representation="point_cloud"))
    few = {**geometry, "mpmt_image_positions": geometry["mpmt_image_positions"][:-2]}
    with pytest.raises(DataError, match=r"PMT id \d+ is outside the geometry"):
        preflight_check(hits_config(data, write_geometry(tmp_path / "few.npz", few)))
    with pytest.raises(DataError, match=r"missing.npz' does not exist"):
        preflight_check(hits_config(data, tmp_path / "missing.npz"))
    with pytest.raises(DataError, match=r"key 'tube' \(hit_keys.pmt\) does not exist.*hit_pmt"):
        preflight_check(hits_config(data, tmp_path / "missing.npz", hit_keys={"pmt": "tube"}))


def test_cli_convert_and_inspect(files: tuple, tmp_path: Path) -> None:
    import json

    from tests.helpers.run import assert_ok, dtrain

    data, geo, events, geometry = files
    out = dtrain(
        "data",
        "convert",
        str(data),
        str(tmp_path / "img.h5"),
        "--geometry",
        str(geo),
        "--pmts-per-module",
        str(PPM),
        cwd=tmp_path,
    )
    assert_ok(out)
    assert f"150 mpmt_image samples of shape {(2 * PPM, 4, 5)}" in out.stdout
    with h5py.File(tmp_path / "img.h5", "r") as f:
        assert np.array_equal(f["event_data"][7], reference_image(events[7], geometry["mpmt_image_positions"], PPM))
    report = dtrain(
        "data",
        "inspect",
        str(data),
        "--json",
        "--geometry",
        str(geo),
        "--pmts-per-module",
        str(PPM),
        "--n-points",
        "10",
        cwd=tmp_path,
    )
    assert_ok(report)
    hits = json.loads(report.stdout)["hits"]
    counts = [len(e[0]) for e in events]
    assert hits["events"] == 150 and hits["hits"] == sum(counts) and hits["empty_events"] == counts.count(0)
    assert hits["hits_per_event"]["max"] == max(counts) and hits["over_n_points"] == sum(c > 10 for c in counts)
    assert hits["representations"]["mpmt_image"] == f"fits: samples of {2 * PPM}x4x5"
    bad = dtrain(
        "data",
        "convert",
        str(data),
        str(tmp_path / "bad.h5"),
        "--geometry",
        str(geo),
        "--pmts-per-module",
        "2",
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "outside the geometry" in bad.stderr and not (tmp_path / "bad.h5").exists()
