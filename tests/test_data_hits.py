"""Hit-list files: the batched image and point-cloud builders equal a per-hit Python reference exactly."""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
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
    same_bits,
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


def needs(kind: str) -> str:
    """The builder ``kind``; skips where numba is missing (the test extra installs it, so CI runs both)."""
    if kind == "numba":
        pytest.importorskip("numba")
    return kind


@pytest.fixture(params=["numpy", "numba"])
def builder(request: pytest.FixtureRequest) -> str:
    return needs(request.param)


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


@pytest.fixture(params=["numpy, one block", "numpy, blocks of 1 event", "numpy, blocks of 3 events", "numba"])
def block_builder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both builders; numpy's builds batches in cache-sized blocks of events: one block, and many (as real images give)."""
    if request.param == "numba":
        return needs("numba")
    sample_bytes = {"one block": 1 << 30, "blocks of 1 event": 1, "blocks of 3 events": 3}[request.param.split(", ")[1]]
    if sample_bytes == 3:
        monkeypatch.setattr(hits, "BLOCK_BYTES", 3 * 4 * 2 * PPM * 5 * 4 + 1)  # 3 images of (2 * PPM, 5, 4) float32
    else:
        monkeypatch.setattr(hits, "BLOCK_BYTES", sample_bytes)
    return "numpy"


@pytest.mark.parametrize("channels", [(), ("time",), ("charge",), ("time", "charge")])
def test_images_equal_the_per_hit_reference(hit_setup: tuple, channels: tuple[str, ...], block_builder: str) -> None:
    data, geo, geometry, events = hit_setup
    reader = HitReader(data, spec(geo, channels=channels, builder=block_builder))
    chans = channels or ("charge", "time")
    rows = np.array(
        [3, 1, 0, 39, 1, 17, 6, 6, 22], dtype=np.int64
    )  # unsorted, empty events, duplicates, the last event
    got = reader.read(rows)
    assert got.shape == (len(rows), PPM * len(chans), 5, 4) and got.dtype == np.float32
    assert (reader._builder.kernels is not None) == (block_builder == "numba")  # type: ignore[union-attr]
    for b, row in enumerate(rows):
        expected = reference_image(events[row], geometry["mpmt_image_positions"], PPM, chans)
        assert same_bits(got[b], expected), f"event {row}"
    assert not got[1].any(), "an empty event is an all-zero image"
    # events really have a PMT hit twice, so the add / earliest-time rules were exercised
    assert any(len(np.unique(events[r][0])) < len(events[r][0]) for r in rows)


@pytest.mark.parametrize("n_points", [7, 25, 80, 500])  # truncating, full, sparse (the scatter path)
@pytest.mark.parametrize("channels", [(), ("charge", "time"), ("orientation", "charge")])
def test_point_clouds_equal_the_per_hit_reference(
    hit_setup: tuple, n_points: int, channels: tuple[str, ...], block_builder: str
) -> None:
    data, geo, geometry, events = hit_setup
    reader = HitReader(
        data, spec(geo, representation="point_cloud", n_points=n_points, channels=channels, builder=block_builder)
    )
    chans = channels or ("position", "orientation", "time", "charge")
    rows = np.arange(40)[::-1].copy()
    got = reader.read(rows)
    for b, row in enumerate(rows):
        assert same_bits(got[b], reference_cloud(events[row], geometry, n_points, chans)), f"event {row}"
    over = sum(len(events[r][0]) > n_points for r in rows)
    assert reader.truncated_events == over
    if n_points == 7:
        assert over > 10, "the test must truncate events"


@pytest.mark.parametrize("n_points", [7, 80])  # truncating, full
@pytest.mark.parametrize(
    "channels", [("time", "position", "charge", "orientation"), ("charge", "orientation", "time", "position")]
)
def test_point_cloud_channels_in_any_order_equal_the_per_hit_reference(
    hit_setup: tuple, n_points: int, channels: tuple[str, ...], builder: str
) -> None:
    """Positions and orientations between other channels (the compiled builder writes each 3-row group in one pass)."""
    data, geo, geometry, events = hit_setup
    reader = HitReader(
        data, spec(geo, representation="point_cloud", n_points=n_points, channels=channels, builder=builder)
    )
    rows = np.arange(40)[::-1].copy()
    got = reader.read(rows)
    for b, row in enumerate(rows):
        assert same_bits(got[b], reference_cloud(events[row], geometry, n_points, channels)), f"event {row}"


def test_chunked_and_contiguous_hit_arrays_give_the_same_samples(
    hit_setup: tuple, tmp_path: Path, builder: str
) -> None:
    data, geo, _, events = hit_setup
    chunked = write_hit_file(tmp_path / "chunked.h5", events, chunked=True)
    rows = np.random.default_rng(1).integers(0, 40, 64)
    for s in (spec(geo, builder=builder), spec(geo, representation="point_cloud", n_points=20, builder=builder)):
        fast, slow = HitReader(data, s), HitReader(chunked, s)
        assert fast.uses_memmap and not slow.uses_memmap
        assert same_bits(fast.read(rows), slow.read(rows))


def test_other_dtypes_give_the_same_samples_with_both_builders(hit_setup: tuple, tmp_path: Path) -> None:
    """int64 / uint16 ids, big-endian and float64 times and charges: cast as the numpy builder reads them.

    The compiled builder reads int32 / float32 memory maps directly and gathers anything else.
    """
    data, geo, geometry, events = hit_setup
    with h5py.File(data, "r") as f:
        arrays = {k: f[k][...] for k in f}
    odd = tmp_path / "odd.h5"
    for pmt_dtype, time_dtype, charge_dtype in (("<i8", ">f4", "<f8"), ("<u2", "<f8", ">f4")):
        with h5py.File(odd, "w") as f:
            for k, v in arrays.items():
                f[k] = v
            del f["hit_pmt"], f["hit_time"], f["hit_charge"]
            f.create_dataset("hit_pmt", data=arrays["hit_pmt"].astype(pmt_dtype))
            f.create_dataset("hit_time", data=arrays["hit_time"].astype(time_dtype))
            f.create_dataset("hit_charge", data=arrays["hit_charge"].astype(charge_dtype))
        rows = np.random.default_rng(2).integers(0, 40, 50)
        for kw in ({}, {"representation": "point_cloud", "n_points": 9}):
            got = {kind: HitReader(odd, spec(geo, builder=needs(kind), **kw)).read(rows) for kind in ("numpy", "numba")}
            assert same_bits(got["numpy"], got["numba"]), (pmt_dtype, time_dtype, charge_dtype, kw)
            if not kw:
                for b in (0, 1, 2):
                    expected = reference_image(events[int(rows[b])], geometry["mpmt_image_positions"], PPM)
                    assert same_bits(got["numba"][b], expected)


def test_special_times_follow_the_documented_rules(tmp_path: Path, builder: str) -> None:
    """NaN, +-inf and -0.0 / +0.0 times on PMTs hit several times, with both builders, to the bit."""
    rng = np.random.default_rng(11)
    geometry = random_geometry(rng, modules=4, height=3, width=3, pmts_per_module=PPM)
    nan, inf = np.float32(np.nan), np.float32(np.inf)
    specials = [
        ([1, 1], [-0.0, 0.0]),
        ([1, 1], [0.0, -0.0]),
        ([2, 2, 2], [3.0, nan, 1.0]),
        ([2, 2], [nan, 1.0]),
        ([3, 3], [inf, 5.0]),
        ([3], [inf]),
        ([4, 4, 5], [-inf, 2.0, inf]),
        ([0, 6, 0, 6, 0], [nan, nan, inf, -0.0, 0.0]),
    ]
    events = [
        (np.array(p, np.int32), np.array(t, np.float32), rng.exponential(1.0, len(p)).astype(np.float32))
        for p, t in specials
    ]
    data = write_hit_file(tmp_path / "special.h5", events)
    geo = write_geometry(tmp_path / "g.npz", geometry)
    rows = np.arange(len(events))
    images = HitReader(data, spec(geo, builder=builder)).read(rows)
    clouds = HitReader(data, spec(geo, representation="point_cloud", n_points=2, builder=builder)).read(rows)
    for row in rows:
        assert same_bits(images[row], reference_image(events[row], geometry["mpmt_image_positions"], PPM)), (
            f"event {row}"
        )
        assert same_bits(clouds[row], reference_cloud(events[row], geometry, 2)), f"event {row}"
    assert np.signbit(images[0, PPM + 1]).any() == False  # noqa: E712  (-0.0 then +0.0: the later +0.0)
    assert np.signbit(images[1]).any(), "+0.0 then -0.0: the later -0.0"


def test_builder_selection_falls_back_to_numpy_without_numba(hit_setup: tuple) -> None:
    """One place picks the builder: numba when it imports, else numpy (logged once); "numba" without it is an error."""
    data, geo, _, _ = hit_setup
    numba_here = importlib.util.find_spec("numba") is not None
    assert hits.builder_kind("auto") == ("numba" if numba_here else "numpy")
    assert hits.builder_kind("numpy") == "numpy"
    with pytest.raises(ValueError, match="unknown hit-list builder 'fast'"):
        hits.builder_kind("fast")
    script = textwrap.dedent(f"""
        import logging, sys
        sys.modules["numba"] = None  # what `import numba` meets where it is not installed
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        import numpy as np
        from dist_train.data import hits
        from dist_train.errors import DataError
        assert hits.builder_kind("auto") == "numpy"
        s = hits.HitSpec(geometry_file={str(geo)!r}, pmts_per_module={PPM})
        reader = hits.HitReader({str(data)!r}, s)
        images = reader.read(np.arange(40))
        assert reader._builder.kernels is None
        np.save(sys.argv[1], images)
        try:
            hits.builder_kind("numba")
        except DataError as exc:
            print("ERROR", exc)
    """)
    out = data.parent / "fallback.npy"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("samples built by the numpy builder (numba is not importable") == 1, done.stderr
    assert "ERROR The numba hit-list builder was requested but numba is not importable" in done.stdout
    assert same_bits(np.load(out), HitReader(data, spec(geo)).read(np.arange(40)))


@pytest.mark.slow  # compiles a kernel without the cache: seconds
def test_compiled_builder_works_where_no_cache_can_be_written(hit_setup: tuple) -> None:
    """No writable cache location (read-only install, no home): numba compiles in memory instead of failing."""
    needs("numba")
    data, geo, _, _ = hit_setup
    script = textwrap.dedent(f"""
        import sys
        import numba.core.caching
        numba.core.caching.CacheImpl._locator_classes = []  # no cache directory is usable
        import numpy as np
        from dist_train.data import hits, hits_jit
        assert type(hits_jit.build_images._cache).__name__ == "NullCache"
        reader = hits.HitReader({str(data)!r}, hits.HitSpec(geometry_file={str(geo)!r}, pmts_per_module={PPM}, builder="numba"))
        np.save(sys.argv[1], reader.read(np.arange(40)))
    """)
    out = data.parent / "nocache.npy"
    done = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr
    assert same_bits(np.load(out), HitReader(data, spec(geo, builder="numpy")).read(np.arange(40)))


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


@pytest.mark.parametrize("representation", ["mpmt_image", "point_cloud"])
def test_ids_beyond_the_geometry_are_a_data_error(tmp_path: Path, builder: str, representation: str) -> None:
    rng = np.random.default_rng(0)
    geometry = random_geometry(rng, modules=4, height=3, width=3, pmts_per_module=PPM)
    events = random_events(rng, 6, 4 * PPM, max_hits=10)
    events[3] = (np.array([0, 4 * PPM], np.int32), np.zeros(2, np.float32), np.ones(2, np.float32))
    events[5] = (np.array([0, 1, -1], np.int32), np.zeros(3, np.float32), np.ones(3, np.float32))
    data = write_hit_file(tmp_path / "bad.h5", events)
    reader = HitReader(
        data, spec(write_geometry(tmp_path / "g.npz", geometry), builder=builder, representation=representation)
    )
    reader.read(np.array([0, 1, 2]))
    with pytest.raises(DataError, match=r"PMT id 12 is outside the geometry, which has 12 PMTs"):
        reader.read(np.array([2, 3]))
    with pytest.raises(DataError, match=r"PMT id -1 is negative; PMT ids count from 0"):
        reader.read(np.array([4, 5]))


@pytest.mark.parametrize("representation", ["mpmt_image", "point_cloud"])
def test_reader_threads_share_one_reader_once_it_is_open(hit_setup: tuple, builder: str, representation: str) -> None:
    """The loader opens the reader (sample_shape) and then lets reader threads call read() at once."""
    from concurrent.futures import ThreadPoolExecutor

    data, geo, _, _ = hit_setup
    s = spec(geo, builder=builder, representation=representation, n_points=20)
    batches = [np.random.default_rng(i).integers(0, 40, 16) for i in range(24)]
    expected = [
        HitReader(data, spec(geo, representation=representation, n_points=20, builder="numpy")).read(rows)
        for rows in batches
    ]
    for _ in range(3):
        shared = HitReader(data, s)
        shared.sample_shape()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(shared.read, batches))
        assert all(same_bits(a, b) for a, b in zip(expected, got, strict=True))


def test_point_cloud_statistics_and_n_hits_count_real_hits_only(hit_setup: tuple, builder: str) -> None:
    """normalize = "auto" statistics over each cloud's real hits (never its zero padding), and n_hits,
    against the per-hit reference; both builders give the same bits."""
    from dist_train.data.hits import HitCountReader
    from dist_train.data.preflight import compute_channel_stats

    data, geo, geometry, events = hit_setup
    n_points = 20  # events hold up to 60 hits: some are truncated, many padded, some empty
    rows = np.arange(1, len(events), 2, dtype=np.int64)
    real = [min(len(events[r][0]), n_points) for r in rows]
    assert 0 in real and n_points in real and any(0 < k < n_points for k in real)
    reference = [reference_cloud(events[r], geometry, n_points) for r in rows]
    values = np.concatenate([cloud[:, :k] for cloud, k in zip(reference, real, strict=True)], axis=1).astype(np.float64)

    def stats(kind: str) -> tuple[list[float], list[float], int]:
        s = spec(geo, builder=kind, representation="point_cloud", n_points=n_points)
        return compute_channel_stats(data, "", rows, reader=HitReader(data, s))

    mean, std, used = stats(builder)
    assert used == len(rows)
    np.testing.assert_allclose(mean, values.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(std, values.std(axis=1), rtol=1e-12, atol=1e-12)
    padded = np.concatenate(reference, axis=1).astype(np.float64)
    assert not np.allclose(padded.mean(axis=1), mean), "the padding must not count"
    assert (mean, std) == stats("numpy")[:2], "numba and numpy statistics differ"
    s = spec(geo, builder=builder, representation="point_cloud", n_points=n_points)
    counts = HitCountReader(data, s).read(rows)
    assert counts.dtype == np.int64 and counts.tolist() == real
    clouds = HitReader(data, s).read(rows)
    assert all(not clouds[i, :, k:].any() for i, k in enumerate(real)), "columns from n_hits on are padding"
    image_counts = HitCountReader(data, spec(geo, builder=builder)).read(rows)
    assert image_counts.tolist() == [len(events[r][0]) for r in rows], "images: every hit of the event"


@pytest.mark.parametrize(("representation", "height"), [("mpmt_image", 5), ("mpmt_image", 4), ("point_cloud", 5)])
def test_compiled_builder_equals_the_numpy_builder_on_long_events_into_any_buffer(
    tmp_path: Path, representation: str, height: int
) -> None:
    """Events of 0-300 hits (duplicate PMTs, empty ones), so point clouds take the 8-hits-at-a-time
    table path with every tail length; n_points not a multiple of 8 and output buffers at every
    4-byte alignment (the padding's streaming stores start at a 32-byte boundary): same bits as the
    numpy builder and the per-hit reference. Images 4 high have 32-byte planes (3 x 4 x 4 floats):
    in an aligned buffer they take the paired scratch path, otherwise the in-place one."""
    needs("numba")
    rng = np.random.default_rng(23)
    geometry = random_geometry(rng, modules=MODULES, height=height, width=4, pmts_per_module=PPM)
    events = random_events(rng, 60, MODULES * PPM, max_hits=300, empty_every=7)
    data = write_hit_file(tmp_path / "long.h5", events)
    geo = write_geometry(tmp_path / "geo.npz", geometry)
    rows = rng.permutation(len(events))
    kernels = hits.compiled_kernels()
    assert kernels is not None
    paired = set()
    for n_points in (101, 256):
        kw: dict[str, object] = {"representation": representation, "n_points": n_points}
        compiled, numpy_built = (HitReader(data, spec(geo, builder=kind, **kw)) for kind in ("numba", "numpy"))
        expected = numpy_built.read(rows)
        for shift in range(8):  # floats of offset into a bigger buffer
            memory = np.full(expected.size + 8, np.nan, dtype=np.float32)
            out = memory[shift : shift + expected.size].reshape(expected.shape)
            if representation == "mpmt_image":
                group = expected[0].size // 2  # charge then time
                paired.add(bool(kernels._rows_aligned(out.reshape(len(out), -1), 0, group)))
            compiled.read(rows, out=out)
            assert same_bits(out, expected), (n_points, shift)
            assert np.isnan(memory[:shift]).all() and np.isnan(memory[shift + expected.size :]).all()
        for b, row in enumerate(rows[:10]):
            reference = (
                reference_cloud(events[row], geometry, n_points)
                if representation == "point_cloud"
                else reference_image(events[row], geometry["mpmt_image_positions"], PPM)
            )
            assert same_bits(expected[b], reference), f"event {row}"
        if representation == "mpmt_image":
            assert paired == ({True, False} if height == 4 else {False}), "both image paths were taken"
            break  # n_points does not shape images
    assert any(len(e[0]) % 8 and len(e[0]) > 8 for e in events) and any(len(e[0]) == 0 for e in events)
