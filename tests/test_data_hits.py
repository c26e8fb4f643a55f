"""Hit-list files: the batched image and point-cloud builders equal a per-hit Python reference exactly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from dist_train.data import hits
from dist_train.data.hits import (
    HitReader,
    HitSpec,
    concat_ranges,
    earliest_hits_mask,
)
from dist_train.errors import DataError
from tests.helpers.hits import (
    random_events,
    random_geometry,
    reference_cloud,
    reference_image,
    write_geometry,
    write_hit_file,
)

PPM = 3  # few PMTs per module: many PMTs are hit twice in one event
MODULES = 11


@pytest.fixture
def hit_setup(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray], list]:
    rng = np.random.default_rng(7)
    geometry = random_geometry(rng, modules=MODULES, height=5, width=4, pmts_per_module=PPM)
    events = random_events(rng, 40, MODULES * PPM, max_hits=60)
    data = write_hit_file(tmp_path / "hits.h5", events)
    geo = write_geometry(tmp_path / "geo.npz", geometry)
    return data, geo, geometry, events


def spec(geo: Path, **kw: object) -> HitSpec:
    return HitSpec(geometry_file=str(geo), pmts_per_module=PPM, **kw)  # type: ignore[arg-type]


def test_concat_ranges_equals_the_loop() -> None:
    starts = np.array([5, 0, 9, 3, 3], dtype=np.int64)
    counts = np.array([2, 0, 3, 1, 0], dtype=np.int64)
    expected = np.concatenate([np.arange(s, s + c) for s, c in zip(starts, counts, strict=True)])
    assert np.array_equal(concat_ranges(starts, counts), expected)
    assert len(concat_ranges(np.zeros(2, np.int64), np.zeros(2, np.int64))) == 0


def test_earliest_hits_mask_keeps_the_earliest_with_file_order_ties() -> None:
    time = np.array([3, 1, 1, 2, -0.0, 0.0, 0.0, 5, 4], dtype=np.float32)
    counts = np.array([4, 2, 3], dtype=np.int64)
    keep = earliest_hits_mask(time, counts, 2)
    # event 0: times 3,1,1,2 -> the two 1s; event 1 fits; event 2: 0.0 (first) and 4 -> 0.0 and 4
    assert keep.tolist() == [False, True, True, False, True, True, True, False, True]


@pytest.fixture(params=["one block", "blocks of 1 event", "blocks of 3 events"])
def block_bytes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are built in cache-sized blocks of events: one block, and many (as real images give)."""
    sample_bytes = {"one block": 1 << 30, "blocks of 1 event": 1, "blocks of 3 events": 3}[request.param]
    if sample_bytes == 3:
        monkeypatch.setattr(hits, "BLOCK_BYTES", 3 * 4 * 2 * PPM * 5 * 4 + 1)  # 3 images of (2 * PPM, 5, 4) float32
    else:
        monkeypatch.setattr(hits, "BLOCK_BYTES", sample_bytes)


@pytest.mark.usefixtures("block_bytes")
@pytest.mark.parametrize("channels", [(), ("time",), ("charge",), ("time", "charge")])
def test_images_equal_the_per_hit_reference(hit_setup: tuple, channels: tuple[str, ...]) -> None:
    data, geo, geometry, events = hit_setup
    reader = HitReader(data, spec(geo, channels=channels))
    chans = channels or ("charge", "time")
    rows = np.array([3, 1, 0, 39, 1, 17, 6, 6, 22], dtype=np.int64)  # unsorted, empty events, duplicates, the last event
    got = reader.read(rows)
    assert got.shape == (len(rows), PPM * len(chans), 5, 4) and got.dtype == np.float32
    for b, row in enumerate(rows):
        expected = reference_image(events[row], geometry["mpmt_image_positions"], PPM, chans)
        assert np.array_equal(got[b], expected), f"event {row}"
    assert not got[1].any(), "an empty event is an all-zero image"
    # events really have a PMT hit twice, so the add / earliest-time rules were exercised
    assert any(len(np.unique(events[r][0])) < len(events[r][0]) for r in rows)


@pytest.mark.usefixtures("block_bytes")
@pytest.mark.parametrize("n_points", [7, 25, 80, 500])  # truncating, full, sparse (the scatter path)
@pytest.mark.parametrize("channels", [(), ("charge", "time"), ("orientation", "charge")])
def test_point_clouds_equal_the_per_hit_reference(hit_setup: tuple, n_points: int, channels: tuple[str, ...]) -> None:
    data, geo, geometry, events = hit_setup
    reader = HitReader(data, spec(geo, representation="point_cloud", n_points=n_points, channels=channels))
    chans = channels or ("position", "orientation", "time", "charge")
    rows = np.arange(40)[::-1].copy()
    got = reader.read(rows)
    for b, row in enumerate(rows):
        assert np.array_equal(got[b], reference_cloud(events[row], geometry, n_points, chans)), f"event {row}"
    over = sum(len(events[r][0]) > n_points for r in rows)
    assert reader.truncated_events == over
    if n_points == 7:
        assert over > 10, "the test must truncate events"


def test_chunked_and_contiguous_hit_arrays_give_the_same_samples(hit_setup: tuple, tmp_path: Path) -> None:
    data, geo, _, events = hit_setup
    chunked = write_hit_file(tmp_path / "chunked.h5", events, chunked=True)
    rows = np.random.default_rng(1).integers(0, 40, 64)
    for s in (spec(geo), spec(geo, representation="point_cloud", n_points=20)):
        fast, slow = HitReader(data, s), HitReader(chunked, s)
        assert fast.uses_memmap and not slow.uses_memmap
        assert np.array_equal(fast.read(rows), slow.read(rows))


def test_reader_pickles_without_handles_and_reads_after(hit_setup: tuple) -> None:
    data, geo, _, _ = hit_setup
    reader = HitReader(data, spec(geo))
    before = reader.read(np.arange(10))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._readers is None
    assert np.array_equal(clone.read(np.arange(10)), before)
    out = np.full((10, *reader.sample_shape()), 7.0, dtype=np.float32)
    assert reader.read(np.arange(10), out=out) is out and np.array_equal(out, before), "out is overwritten entirely"
    reader.close()


def test_ids_beyond_the_geometry_are_a_data_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    geometry = random_geometry(rng, modules=4, height=3, width=3, pmts_per_module=PPM)
    events = random_events(rng, 6, 4 * PPM, max_hits=10)
    events[3] = (np.array([0, 4 * PPM], np.int32), np.zeros(2, np.float32), np.ones(2, np.float32))
    data = write_hit_file(tmp_path / "bad.h5", events)
    reader = HitReader(data, spec(write_geometry(tmp_path / "g.npz", geometry)))
    reader.read(np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"PMT id 12 is outside the geometry, which has 12 PMTs"):
        reader.read(np.array([2, 3]))


def test_reader_threads_share_one_reader_once_it_is_open(hit_setup: tuple) -> None:
    """The loader opens the reader (sample_shape) and then lets reader threads call read() at once."""
    from concurrent.futures import ThreadPoolExecutor

    data, geo, _, _ = hit_setup
    batches = [np.random.default_rng(i).integers(0, 40, 16) for i in range(24)]
    expected = [HitReader(data, spec(geo)).read(rows) for rows in batches]
    for _ in range(3):
        shared = HitReader(data, spec(geo))
        shared.sample_shape()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(shared.read, batches))
        assert all(np.array_equal(a, b) for a, b in zip(expected, got, strict=True))
