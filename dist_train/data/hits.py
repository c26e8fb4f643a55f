"""Hit-list HDF5 files: events as lists of PMT hits, built into mPMT images or point clouds (torch-free).

The layout (WatChMaL's ``H5CommonDataset``; dataset names configurable with ``data.hit_keys``):
``event_hits_index`` (N,) int, the offset of each event's first hit; ``hit_pmt`` (int),
``hit_time`` and ``hit_charge`` (float), all (total hits,); event ``i`` owns hits
``event_hits_index[i] : event_hits_index[i + 1]`` (the last event: up to the end of the hit
arrays), so an event may have no hits at all. Labels and per-event targets are ordinary datasets.

The geometry file (``data.geometry_file``, an ``.npz``) maps PMT ids to the sample:

* ``mpmt_image_positions`` (M, 2) int: the (row, col) pixel of multi-PMT module m. PMT ``p``
  is channel ``p % pmts_per_module`` of module ``p // pmts_per_module``. An image is
  C x H x W with H, W = 1 + the largest row, col, and ``pmts_per_module`` channels per entry of
  ``data.channels`` in that order (default charge then time: 38 channels for 19-PMT modules).
* ``position`` and ``orientation`` (P, 3) float per PMT, for point clouds: C x ``n_points``,
  each hit a column of its PMT's position (3), orientation (3), time and charge (the entries of
  ``data.channels``, in that order).

Rules (the tests compare every one against a per-hit Python reference):

* A PMT hit more than once in an event: its charges add (in file order, in float32) and its
  time is the earliest one (``np.minimum`` in file order, to the bit: a NaN time wins, and of
  -0.0 and +0.0 the later hit's is kept). Pixels and points without hits are 0.
* Point clouds hold the event's hits in file order, zero-padded to ``n_points``; an event with
  more hits keeps its ``n_points`` earliest ones (equal times: the one earlier in the file),
  still in file order. How many events that truncates is known before training from
  ``event_hits_index`` alone (the launcher prints it; ``dtrain data inspect`` shows it).

Reading (:class:`HitReader`, the same interface as :class:`~dist_train.data.h5io.RowReader` for
x) is batched, with one of two builders (``HitSpec.builder``; "auto" picks the first, chosen in
one place, :func:`builder_kind`, and logged once per process):

* numba (``pip install 'dtrain[hits]'``): one compiled pass over each event's hit range straight
  from the memory maps of the hit arrays (:mod:`dist_train.data.hits_jit`), id check included;
* numpy (the fallback when numba is not importable): a batch's hit ranges become one index array,
  each hit array is read with one gather (a memory map when the arrays are contiguous and
  uncompressed, the usual case; touched chunks otherwise), and the samples are built with a few
  vectorised numpy scatters over all the hits (``np.add.at`` / ``np.minimum.at`` for images,
  fancy assignment for point clouds).

Neither has a Python loop over events or hits, and both give the same bits.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from dist_train.config import DEFAULT_HIT_CHANNELS, HIT_KEY_DEFAULTS, DataConfig
from dist_train.data.aligned import aligned_empty
from dist_train.data.h5io import RowReader, get_dataset, storage_of
from dist_train.errors import DataError

log = logging.getLogger("dtrain")

IMAGE_POSITIONS_KEY = "mpmt_image_positions"
# A batch key of hit-list files that is no dataset: each sample's number of hits (point clouds:
# its real, non-padding columns), for data.input_keys (a model's mask) or data.extra_keys.
HIT_COUNT_KEY = "n_hits"
POSITION_KEY = "position"
ORIENTATION_KEY = "orientation"
# PMT ids are checked over the whole file at launch up to this many hits (2 GiB of int32 ids,
# about a second from the page cache); bigger files are checked in evenly spaced blocks there,
# and every batch's ids are checked when it is read.
FULL_ID_SCAN_HITS = 1 << 29
_SCAN_BLOCK_HITS = 1 << 22


@dataclass(frozen=True)
class HitSpec:
    """What to build from a hit-list file: the ``[data]`` settings of ``format = "hits"`` (picklable)."""

    geometry_file: str
    representation: str = "mpmt_image"
    index_key: str = HIT_KEY_DEFAULTS["index"]
    pmt_key: str = HIT_KEY_DEFAULTS["pmt"]
    time_key: str = HIT_KEY_DEFAULTS["time"]
    charge_key: str = HIT_KEY_DEFAULTS["charge"]
    pmts_per_module: int = 19
    n_points: int = 4000
    channels: tuple[str, ...] = ()
    # "auto": numba's fused builder when numba imports, else numpy's; "numba" / "numpy" force one
    # (tests and benchmarks compare them; "numba" without numba is an error).
    builder: str = "auto"

    @property
    def resolved_channels(self) -> tuple[str, ...]:
        return self.channels or DEFAULT_HIT_CHANNELS[self.representation]

    def key_of(self, role: str) -> str:
        return str(getattr(self, f"{role}_key"))


def hit_spec(d: DataConfig, geometry_file: Path | str | None = None) -> HitSpec | None:
    """The spec of ``[data]`` when ``format = "hits"``, else None. ``geometry_file``: the resolved path."""
    if d.format != "hits":
        return None
    keys = {**HIT_KEY_DEFAULTS, **d.hit_keys}
    geometry = str(geometry_file) if geometry_file is not None else str(Path(d.geometry_file).expanduser().absolute())
    return HitSpec(
        geometry_file=geometry,
        representation=d.representation,
        index_key=keys["index"],
        pmt_key=keys["pmt"],
        time_key=keys["time"],
        charge_key=keys["charge"],
        pmts_per_module=d.pmts_per_module,
        n_points=d.n_points,
        channels=tuple(d.channels),
    )


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """A checked geometry file: what the representation needs, nothing else."""

    path: str
    image_positions: np.ndarray | None  # (M, 2) int64
    position: np.ndarray | None  # (P, 3) float32
    orientation: np.ndarray | None  # (P, 3) float32


def load_geometry(spec: HitSpec) -> Geometry:
    """Read and check ``spec.geometry_file``; DataError naming the file and key on any problem."""
    path = Path(spec.geometry_file)
    where = f"data.geometry_file {str(path)!r}"
    if not path.is_file():
        raise DataError(
            f"{where} does not exist. Give the detector geometry .npz that belongs to the hit-list file "
            "(`dtrain data synth OUT.h5 --layout hits` writes a demo one as OUT_geometry.npz)."
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{where} is not a readable .npz file ({exc}).") from None
    channels = spec.resolved_channels
    if spec.representation == "mpmt_image":
        positions = _image_positions(arrays, where)
        return Geometry(str(path), positions, None, None)
    position = _pmt_table(arrays, POSITION_KEY, where, None)
    orientation = None
    if "orientation" in channels:
        orientation = _pmt_table(arrays, ORIENTATION_KEY, where, len(position))
    return Geometry(str(path), None, position, orientation)


def _require(arrays: dict[str, np.ndarray], key: str, where: str, why: str) -> np.ndarray:
    if key not in arrays:
        have = ", ".join(f"{k} {v.shape}" for k, v in arrays.items()) or "no arrays"
        raise DataError(f"{where} has no {key!r} array ({why}); it holds {have}.")
    return arrays[key]


def _image_positions(arrays: dict[str, np.ndarray], where: str) -> np.ndarray:
    pos = _require(arrays, IMAGE_POSITIONS_KEY, where, "the (row, col) pixel of each mPMT module, needed for images")
    if pos.ndim != 2 or pos.shape[1] != 2 or len(pos) == 0:
        raise DataError(
            f"{where}: {IMAGE_POSITIONS_KEY!r} has shape {pos.shape}; expected (modules, 2) rows and columns."
        )
    if pos.dtype.kind == "f" and np.all(np.isfinite(pos)) and np.all(np.mod(pos, 1) == 0):
        pos = pos.astype(np.int64)
    if pos.dtype.kind not in "iu":
        raise DataError(f"{where}: {IMAGE_POSITIONS_KEY!r} has dtype {pos.dtype}; pixel rows/columns must be integers.")
    pos = pos.astype(np.int64)
    if pos.min() < 0:
        m = int(np.flatnonzero((pos < 0).any(axis=1))[0])
        raise DataError(
            f"{where}: module {m} has a negative pixel {tuple(pos[m].tolist())} in {IMAGE_POSITIONS_KEY!r}."
        )
    width = int(pos[:, 1].max()) + 1
    pixel = pos[:, 0] * width + pos[:, 1]
    order = np.argsort(pixel, kind="stable")
    same = np.flatnonzero(np.diff(pixel[order]) == 0)
    if len(same):
        a, b = int(order[same[0]]), int(order[same[0] + 1])
        raise DataError(
            f"{where}: modules {a} and {b} are both at pixel {tuple(pos[a].tolist())} of {IMAGE_POSITIONS_KEY!r} "
            f"({len(same)} such clashes); each module needs its own pixel, or one would overwrite the other."
        )
    return pos


def _pmt_table(arrays: dict[str, np.ndarray], key: str, where: str, pmts: int | None) -> np.ndarray:
    table = _require(arrays, key, where, "one row of 3 floats per PMT, needed for point clouds")
    if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0:
        raise DataError(f"{where}: {key!r} has shape {table.shape}; expected (PMTs, 3).")
    if table.dtype.kind not in "iuf" or not np.all(np.isfinite(table)):
        raise DataError(f"{where}: {key!r} must hold finite numbers (dtype {table.dtype}).")
    if pmts is not None and len(table) != pmts:
        raise DataError(f"{where}: {key!r} has {len(table)} PMTs but {POSITION_KEY!r} has {pmts}; they must match.")
    return table.astype(np.float32)


# ----------------------------------------------------------------------------- batched builders


def concat_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without the loop (int64)."""
    counts = np.asarray(counts, dtype=np.int64)
    nonempty = counts > 0
    s, c = np.asarray(starts, dtype=np.int64)[nonempty], counts[nonempty]
    if len(c) == 0:
        return np.zeros(0, dtype=np.int64)
    # Steps of 1, except at the first element of each range: a jump from the previous range's
    # last value to this range's start; one cumulative sum then gives every index (a few times
    # faster than arange + repeat + add).
    step = np.ones(int(c.sum()), dtype=np.int64)
    step[0] = s[0]
    step[(np.cumsum(c) - c)[1:]] = s[1:] - (s[:-1] + c[:-1] - 1)
    return np.cumsum(step, out=step)


def earliest_hits_mask(time: np.ndarray, counts: np.ndarray, n_points: int) -> np.ndarray:
    """Per hit: whether it is among its event's ``n_points`` earliest (equal times: earlier in the file).

    Only events with more than ``n_points`` hits are looked at: their times, padded into one row
    per event, give each event's ``n_points``-th smallest time with one ``np.partition`` (linear
    time, no sort); hits before it are kept, and hits at it in file order until the event is full.
    NaN times count as +inf (the latest).
    """
    counts = np.asarray(counts, dtype=np.int64)
    keep = np.ones(len(time), dtype=bool)
    over = np.flatnonzero(counts > n_points)
    if len(over) == 0:
        return keep
    sub_counts = counts[over]
    sub = concat_ranges((np.cumsum(counts) - counts)[over], sub_counts)  # the hits of those events
    t = np.asarray(time, dtype=np.float32)[sub]
    t = np.where(np.isnan(t), np.float32(np.inf), t)
    row = np.repeat(np.arange(len(over), dtype=np.int64), sub_counts)
    width = int(sub_counts.max())
    sub_first = np.cumsum(sub_counts) - sub_counts
    col = np.arange(len(sub), dtype=np.int64) - np.repeat(sub_first, sub_counts)
    padded = np.full((len(over), width), np.inf, dtype=np.float32)
    padded.reshape(-1)[row * width + col] = t
    threshold = np.partition(padded, n_points - 1, axis=1)[:, n_points - 1][row]
    before = t < threshold
    tied = t == threshold
    free = n_points - np.add.reduceat(before.astype(np.int64), sub_first)  # slots left for tied hits
    tied_rank = np.cumsum(tied) - 1  # among the tied hits of the event, in file order
    tied_rank -= np.repeat(tied_rank[sub_first] + 1 - tied[sub_first], sub_counts)
    keep[sub] = before | (tied & (tied_rank < free[row]))
    return keep


# Samples are built a few events at a time, about this many output bytes per block: each scatter
# then lands in memory that is still in the CPU cache (a 38x16x40 image is 97 KB). Measured on
# 3,000-hit events: 2-3x faster than one pass of each scatter over a whole 256-event batch, whose
# output (25 MB) every pass would stream through the cache again. The per-block cost of a dozen
# numpy calls is small against the block's thousands of hits.
BLOCK_BYTES = 1 << 20
# Columns of the compiled point-cloud builder's per-PMT table (position and orientation: 6, padded).
TABLE_WIDTH = 8


class _BlockBuilder:
    """Drives a builder's ``_build_block`` over cache-sized blocks of a batch's events.

    With ``kernels`` (the compiled module, set by :func:`make_builder`) the reader calls
    ``build_ranges`` instead: one fused pass per event, no concatenated hit arrays.
    """

    shape: tuple[int, ...]
    kernels: ModuleType | None = None

    def build(self, pmt: np.ndarray, time: np.ndarray, charge: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
        """Samples of ``len(counts)`` events whose hits are concatenated in ``pmt``/``time``/``charge``.

        Every id in ``pmt`` must be within the geometry (:func:`check_pmt_ids`): the per-PMT
        lookups take with ``mode="clip"``, which skips numpy's bounds-checked gather.
        """
        counts = np.asarray(counts, dtype=np.int64)
        step = max(1, BLOCK_BYTES // (int(np.prod(self.shape)) * out.itemsize))
        ends = np.cumsum(counts).tolist()
        with np.errstate(invalid="ignore"):  # NaN times are data (they propagate), not a warning per batch
            for lo in range(0, len(counts), step):
                hi = min(len(counts), lo + step)
                a, z = (ends[lo - 1] if lo else 0), ends[hi - 1]
                self._build_block(pmt[a:z], time[a:z], charge[a:z], counts[lo:hi], out[lo:hi])

    def _build_block(
        self, pmt: np.ndarray, time: np.ndarray, charge: np.ndarray, counts: np.ndarray, out: np.ndarray
    ) -> None:
        raise NotImplementedError


class ImageBuilder(_BlockBuilder):
    """Builds (B, C, H, W) mPMT images from the concatenated hits of B events."""

    def __init__(self, positions: np.ndarray, pmts_per_module: int, channels: tuple[str, ...]) -> None:
        rows, cols = positions[:, 0], positions[:, 1]
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        plane = height * width
        self.shape = (pmts_per_module * len(channels), height, width)
        self.num_pmts = len(positions) * pmts_per_module  # ids at or beyond have no module
        self.sample_size = int(np.prod(self.shape))
        pmt = np.arange(self.num_pmts, dtype=np.intp)
        module = pmt // pmts_per_module
        # Offset of each PMT's value in a sample, within the first plane group (charge's or time's);
        # intp, the index type numpy's scatters use without converting the index array first.
        self.pixel = ((pmt % pmts_per_module) * plane + rows[module] * width + cols[module]).astype(np.intp)
        # The compiled builder's copy: uint16 where the offsets fit (any detector up to 65,536
        # pixels per plane group), a quarter of the bytes, so it stays in the L1 cache.
        self.compact_pixel = self.pixel.astype(np.uint16 if plane * pmts_per_module <= 1 << 16 else np.int32)
        group = pmts_per_module * plane
        self.charge_offset = channels.index("charge") * group if "charge" in channels else None
        self.time_offset = channels.index("time") * group if "time" in channels else None

    def build_ranges(
        self,
        pmt: np.ndarray,
        time: np.ndarray,
        charge: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        out: np.ndarray,
    ) -> int:
        """Compiled: the images of hits ``starts[b]:starts[b] + counts[b]``; -1 or the first hit with a bad id."""
        assert self.kernels is not None
        charge_at = -1 if self.charge_offset is None else self.charge_offset
        time_at = -1 if self.time_offset is None else self.time_offset
        flat = out.reshape(len(out), self.sample_size)
        return int(
            self.kernels.build_images(pmt, time, charge, starts, counts, self.compact_pixel, charge_at, time_at, flat)
        )

    def _build_block(
        self, pmt: np.ndarray, time: np.ndarray, charge: np.ndarray, counts: np.ndarray, out: np.ndarray
    ) -> None:
        out.fill(0.0)
        if len(pmt) == 0:
            return
        flat = np.repeat(np.arange(len(counts), dtype=np.intp) * self.sample_size, counts)
        # take with mode="clip" (ids were checked by the reader) skips the bounds-checking
        # buffer of pixel[pmt]: about 1 instead of 2 ns a hit.
        flat += self.pixel.take(pmt, mode="clip")
        values = out.reshape(-1)
        if self.charge_offset is not None:
            # ufunc.at accumulates in index order: charges of a PMT hit twice add in file order.
            np.add.at(values[self.charge_offset :], flat, charge)
        if self.time_offset is not None:
            times = values[self.time_offset :]
            times[flat] = np.inf  # only the hit pixels: minimum.at then leaves each one's earliest time
            np.minimum.at(times, flat, time)


class PointCloudBuilder(_BlockBuilder):
    """Builds (B, C, n_points) point clouds from the concatenated hits of B events."""

    def __init__(self, geometry: Geometry, channels: tuple[str, ...], n_points: int) -> None:
        assert geometry.position is not None
        self.n_points = n_points
        self.num_pmts = len(geometry.position)
        # One entry per output channel: a per-PMT table (contiguous, for 1-D gathers) or a hit array's name.
        self.sources: list[np.ndarray | str] = []
        for name in channels:
            if name == "position":
                self.sources += list(np.ascontiguousarray(geometry.position.T))
            elif name == "orientation":
                assert geometry.orientation is not None
                self.sources += list(np.ascontiguousarray(geometry.orientation.T))
            else:
                self.sources.append(name)
        self.shape = (len(self.sources), n_points)
        self.truncated_events = 0  # events cut to n_points by this builder (in this process)
        # The compiled builder's form of the sources: one (PMTs, columns) table, each PMT's values
        # side by side (one cache line per hit, not one per column), and a code per channel.
        tables = [src for src in self.sources if not isinstance(src, str)]
        self.table = np.ascontiguousarray(
            np.stack(tables, axis=1) if tables else np.zeros((self.num_pmts, 0), np.float32)
        )
        if 0 < self.table.shape[1] < TABLE_WIDTH:
            # Zero columns up to 8: each PMT's row is then one 32-byte vector, and the compiled
            # builder writes 8 hits' table values with 16 vector loads and stores, not 96 scalar ones.
            pad = np.zeros((self.num_pmts, TABLE_WIDTH - self.table.shape[1]), np.float32)
            self.table = np.ascontiguousarray(np.concatenate([self.table, pad], axis=1))
        codes, row = [], 0
        for src in self.sources:
            if isinstance(src, str):
                codes.append(-1 if src == "time" else -2)  # hits_jit.SOURCE_TIME / SOURCE_CHARGE
            else:
                codes.append(row)
                row += 1
        self.source_codes = np.array(codes, dtype=np.int64)

    def build_ranges(
        self,
        pmt: np.ndarray,
        time: np.ndarray,
        charge: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        out: np.ndarray,
    ) -> int:
        """Compiled: the clouds of hits ``starts[b]:starts[b] + counts[b]``; -1 or the first hit with a bad id."""
        assert self.kernels is not None
        bad, truncated = self.kernels.build_clouds(
            pmt, time, charge, starts, counts, self.table, self.source_codes, out
        )
        self.truncated_events += int(truncated)
        return int(bad)

    def _build_block(
        self, pmt: np.ndarray, time: np.ndarray, charge: np.ndarray, counts: np.ndarray, out: np.ndarray
    ) -> None:
        out.fill(0.0)
        n = self.n_points
        counts = np.asarray(counts, dtype=np.int64)
        if len(counts) and counts.max() > n:
            keep = earliest_hits_mask(time, counts, n)
            pmt, time, charge = pmt[keep], time[keep], charge[keep]
            self.truncated_events += int((counts > n).sum())
            counts = np.minimum(counts, n)
        if len(pmt) == 0:
            return
        # Hit j of event b goes to column j. Full clouds: a boolean mask over (events, columns)
        # selects the first counts[b] columns of each row in row-major order, i.e. in the hits'
        # order; one mask assignment per channel costs ~0.5 ns a column, about half a fancy-index
        # scatter per hit (~4 ns). Sparse clouds (under 1/8 full): the scatter, which costs per hit.
        hit_values = {"time": time, "charge": charge}
        # Per-PMT columns are gathered with one intp copy of the ids and take(mode="clip") into one
        # reused buffer: ~1.2 ns a hit and column against ~2 ns for source[pmt] (which converts
        # the int32 ids and bounds-checks through a buffer on every call).
        ids = pmt.astype(np.intp)
        gathered = np.empty(len(ids), dtype=np.float32)

        def column(source: np.ndarray | str) -> np.ndarray:
            if isinstance(source, str):
                return hit_values[source]
            return np.take(source, ids, out=gathered, mode="clip")

        if len(pmt) * 8 >= len(counts) * n:
            columns = np.arange(n)[None, :] < counts[:, None]
            for c, source in enumerate(self.sources):
                out[:, c, :][columns] = column(source)
            return
        dest = concat_ranges(np.arange(len(counts), dtype=np.intp) * self.shape[0] * n, counts)
        values = out.reshape(-1)
        for c, source in enumerate(self.sources):
            values[c * n :][dest] = column(source)


Builder = ImageBuilder | PointCloudBuilder


def make_builder(spec: HitSpec, geometry: Geometry, kind: str = "numpy") -> Builder:
    """The builder of ``spec``; ``kind`` "numba" (from :func:`builder_kind`) attaches the compiled kernels.

    The default, numpy, is what shape and id checks need (the launcher never imports numba).
    """
    builder: Builder
    if spec.representation == "mpmt_image":
        assert geometry.image_positions is not None
        builder = ImageBuilder(geometry.image_positions, spec.pmts_per_module, spec.resolved_channels)
    else:
        builder = PointCloudBuilder(geometry, spec.resolved_channels, spec.n_points)
    if kind == "numba":
        builder.kernels = compiled_kernels()
        assert builder.kernels is not None, "builder_kind() returns numba only when it imports"
    return builder


@functools.cache
def compiled_kernels() -> ModuleType | None:
    """The numba kernels (:mod:`dist_train.data.hits_jit`), or None when numba does not import; logged once."""
    try:  # numba (optional, heavy) only when a hit-list file is read; the launcher's checks stay without it
        from dist_train.data import hits_jit
    except ImportError as exc:
        log.info(
            "hit-list files: samples built by the numpy builder (numba is not importable: %s); "
            "`pip install 'dtrain[hits]'` adds the compiled one, several times faster per hit",
            exc,
        )
        return None
    log.info("hit-list files: samples built by the compiled numba builder")
    return hits_jit


def builder_kind(requested: str) -> str:
    """Which builder reads hit-list files here: the one place that decides ("auto": numba if it imports)."""
    if requested not in ("auto", "numba", "numpy"):
        raise ValueError(f"unknown hit-list builder {requested!r}; expected auto, numba or numpy")
    if requested == "numpy":
        return "numpy"
    if compiled_kernels() is not None:
        return "numba"
    if requested == "numba":
        raise DataError(
            "The numba hit-list builder was requested but numba is not importable; "
            "`pip install 'dtrain[hits]'` or use the numpy builder."
        )
    return "numpy"


def check_pmt_ids(pmt: np.ndarray, num_pmts: int | None, where: str) -> None:
    """DataError if a PMT id is negative or has no place in the geometry (``num_pmts`` None: no geometry)."""
    if len(pmt) == 0:
        return
    lo, hi = int(pmt.min()), int(pmt.max())
    if lo < 0:
        # Said the same way with or without a geometry: `dtrain data inspect` and the launch agree.
        raise DataError(
            f"{where}: PMT id {lo} is negative; PMT ids count from 0. The file is corrupt, or "
            "data.hit_keys.pmt names another dataset."
        )
    if num_pmts is not None and hi >= num_pmts:
        bad = hi
        raise DataError(
            f"{where}: PMT id {bad} is outside the geometry, which has {num_pmts} PMTs (ids 0..{num_pmts - 1}). "
            "The geometry file does not belong to this hit-list file (or data.pmts_per_module is wrong)."
        )


# ----------------------------------------------------------------------------- the reader


class HitReader:
    """Builds the samples of a batch of events; the interface of ``RowReader`` for x.

    Picklable without open handles (each process opens its own, lazily, like RowReader).
    """

    ROLES = ("index", "pmt", "time", "charge")

    def __init__(self, path: Path | str, spec: HitSpec) -> None:
        self.path = str(path)
        self.spec = spec
        self._readers: dict[str, RowReader] | None = None
        self._builder: Builder | None = None
        self.num_events = 0
        self.num_hits = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["spec"])  # type: ignore[misc]

    def _ensure_open(self) -> tuple[dict[str, RowReader], Builder]:
        if self._readers is None or self._builder is None:
            readers = {role: RowReader(self.path, self.spec.key_of(role)) for role in self.ROLES}
            # All four opened now: reader threads then share open readers (opening is not thread-safe;
            # the loader calls sample_shape() before it starts them).
            rows = {role: reader.num_rows() for role, reader in readers.items()}
            self.num_events, self.num_hits = rows["index"], rows["pmt"]
            self._builder = make_builder(self.spec, load_geometry(self.spec), builder_kind(self.spec.builder))
            self._readers = readers
        return self._readers, self._builder

    @property
    def uses_memmap(self) -> bool:
        readers, _ = self._ensure_open()
        return all(r.uses_memmap for r in readers.values())

    def sample_shape(self) -> tuple[int, ...]:
        return self._ensure_open()[1].shape

    def dtype_after_open(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def truncated_events(self) -> int:
        builder = self._builder
        return builder.truncated_events if isinstance(builder, PointCloudBuilder) else 0

    def hits_in_samples(self, rows: np.ndarray) -> np.ndarray:
        """``n_hits`` of events ``rows`` (int64): the hits each sample holds, i.e. a point cloud's
        real (non-padding) columns, min(hits, n_points); all of the event's hits for an image."""
        _, counts = self.hit_counts(np.asarray(rows, dtype=np.int64))
        if self.spec.representation == "point_cloud":
            counts = np.minimum(counts, self.spec.n_points)
        return counts

    def hit_counts(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first hit, number of hits) of each event in ``rows``."""
        readers, _ = self._ensure_open()
        index = readers["index"]
        starts = index.read(rows).astype(np.int64, copy=False)
        nxt = rows + 1
        last = nxt >= self.num_events
        ends = index.read(np.where(last, 0, nxt)).astype(np.int64, copy=False)
        ends[last] = self.num_hits
        counts = ends - starts
        if len(counts) and (counts.min() < 0 or starts.min() < 0 or ends.max() > self.num_hits):
            raise DataError(
                f"{self.path!r}: {self.spec.index_key!r} is not a list of increasing offsets into the hit arrays "
                f"({self.num_hits} hits) for some of rows {rows[:8].tolist()}...; the file is corrupt or not a hit-list file."
            )
        return starts, counts

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The samples of events ``rows`` (any order, duplicates allowed) into ``out`` (float32)."""
        readers, builder = self._ensure_open()
        rows = np.asarray(rows, dtype=np.int64)
        if out is None:
            out = aligned_empty((len(rows), *builder.shape))
        target = out if out.flags.c_contiguous and out.dtype == np.float32 else aligned_empty(out.shape)
        starts, counts = self.hit_counts(rows)
        if builder.kernels is not None:
            self._build_compiled(readers, builder, starts, counts, target)
        else:
            hits = concat_ranges(starts, counts)
            pmt = readers["pmt"].read(hits)
            check_pmt_ids(pmt, builder.num_pmts, self._pmt_where)
            time = readers["time"].read(hits, out=np.empty(len(hits), dtype=np.float32))
            charge = readers["charge"].read(hits, out=np.empty(len(hits), dtype=np.float32))
            builder.build(pmt, time, charge, counts, target)
        if target is not out:
            out[...] = target
        return out

    @property
    def _pmt_where(self) -> str:
        return f"{self.path!r}: {self.spec.pmt_key!r}"

    def _build_compiled(
        self, readers: dict[str, RowReader], builder: Builder, starts: np.ndarray, counts: np.ndarray, out: np.ndarray
    ) -> None:
        """The fused kernel over the memory maps themselves, or over gathered copies of the batch's hits.

        The maps are used as they are when they hold the common dtypes (int32 ids, float32 time and
        charge, native byte order): one compiled signature, no copy of the hits at all. Anything
        else (chunked arrays, other dtypes) is gathered and cast as the numpy builder does.
        """
        hit_arrays = self._direct_hit_arrays(readers)
        if hit_arrays is None:
            hit_arrays = self._gathered_hit_arrays(readers, builder.num_pmts, starts, counts)
            starts = np.cumsum(counts) - counts
        pmt, time, charge = hit_arrays
        bad = builder.build_ranges(
            pmt,
            time,
            charge,
            np.ascontiguousarray(starts, dtype=np.int64),
            np.ascontiguousarray(counts, dtype=np.int64),
            out,
        )
        if bad >= 0:
            check_pmt_ids(np.asarray(pmt[bad : bad + 1]), builder.num_pmts, self._pmt_where)
            raise AssertionError(f"the compiled builder rejected PMT id {int(pmt[bad])}, which is within the geometry")

    @staticmethod
    def _direct_hit_arrays(readers: dict[str, RowReader]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The (pmt, time, charge) memory maps when they hold int32 / float32 / float32 (native order)."""
        pmt, time, charge = (readers[role].memmap_array() for role in ("pmt", "time", "charge"))
        if pmt is None or time is None or charge is None:
            return None
        if pmt.dtype != np.int32 or time.dtype != np.float32 or charge.dtype != np.float32:
            return None
        return pmt, time, charge

    def _gathered_hit_arrays(
        self, readers: dict[str, RowReader], num_pmts: int, starts: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch's hits gathered one array after the other as int32 / float32 (read-only)."""
        hits = concat_ranges(starts, counts)
        pmt = readers["pmt"].read(hits)
        if pmt.dtype != np.int32:
            check_pmt_ids(pmt, num_pmts, self._pmt_where)  # before the cast could wrap an id into range
            pmt = pmt.astype(np.int32)
        time = readers["time"].read(hits, out=np.empty(len(hits), dtype=np.float32))
        charge = readers["charge"].read(hits, out=np.empty(len(hits), dtype=np.float32))
        for a in (pmt, time, charge):
            a.flags.writeable = False  # read-only like the maps: the same compiled signature
        return pmt, time, charge

    def read_range(self, lo: int, hi: int) -> np.ndarray:
        return self.read(np.arange(lo, hi, dtype=np.int64))

    def close(self) -> None:
        if self._readers is not None:
            for reader in self._readers.values():
                reader.close()
        self._readers = None


class HitCountReader:
    """``n_hits`` (:data:`HIT_COUNT_KEY`) as a batch key: the interface of ``RowReader`` for a value
    derived from ``event_hits_index`` (see :meth:`HitReader.hits_in_samples`), not a dataset."""

    def __init__(self, path: Path | str, spec: HitSpec) -> None:
        self.hits = HitReader(path, spec)

    @property
    def uses_memmap(self) -> bool:
        return self.hits.uses_memmap

    def sample_shape(self) -> tuple[int, ...]:
        return ()

    def dtype_after_open(self) -> np.dtype:
        return np.dtype(np.int64)

    def num_rows(self) -> int:
        self.hits.sample_shape()  # opens the file
        return self.hits.num_events

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        counts = self.hits.hits_in_samples(rows)
        if out is None:
            return counts
        out[...] = counts
        return out

    def close(self) -> None:
        self.hits.close()


def extra_reader(path: Path | str, key: str, hits: HitSpec | None) -> RowReader | HitCountReader:
    """The reader of a per-sample batch key: a dataset, or ``n_hits`` of a hit-list file."""
    if hits is not None and key == HIT_COUNT_KEY:
        return HitCountReader(path, hits)
    return RowReader(path, key)


# ----------------------------------------------------------------------------- checks before training


@dataclass
class HitFileInfo:
    """What :func:`check_hit_file` found (plain data)."""

    num_events: int
    num_hits: int
    sample_shape: tuple[int, ...]
    memmap: bool  # every hit array (and the index) is read through a memory map
    counts_min: int
    counts_median: float
    counts_max: int
    empty_events: int
    over_n_points: int  # events a point cloud truncates (0 for images)
    ids_checked: str  # "all" or "sampled"


def hit_counts_of(index: np.ndarray, num_hits: int) -> np.ndarray:
    """Hits per event from the whole ``event_hits_index``."""
    return np.diff(np.append(index.astype(np.int64, copy=False), np.int64(num_hits)))


def check_hit_arrays(f: Any, path: Path | str, spec: HitSpec) -> tuple[dict[str, Any], np.ndarray, int]:
    """The hit-list arrays of an open file, checked without a geometry: present, 1-D, integer index and
    ids, one entry per hit in each hit array, offsets increasing and inside the hit arrays.

    Returns (datasets by role, the whole index as int64, the number of hits). The one copy of these
    checks: the launch (:func:`check_hit_file`) and ``dtrain data inspect`` both run it.
    """
    dsets = {role: get_dataset(f, spec.key_of(role), path, f"hit_keys.{role}") for role in HitReader.ROLES}
    for role, dset in dsets.items():
        if dset.ndim != 1:
            raise DataError(
                f"{str(path)!r}: {dset.name.lstrip('/')!r} (hit_keys.{role}) has shape {dset.shape}; hit-list "
                "arrays are 1-D (one value per event for the index, per hit for the others)."
            )
        integer = role in ("index", "pmt")
        if dset.dtype.kind not in ("iu" if integer else "iuf"):
            kind = "integers" if integer else "numbers"
            raise DataError(
                f"{str(path)!r}: {spec.key_of(role)!r} (hit_keys.{role}) has dtype {dset.dtype}; expected {kind}."
            )
    num_hits = int(dsets["pmt"].shape[0])
    for role in ("time", "charge"):
        if dsets[role].shape[0] != num_hits:
            raise DataError(
                f"{str(path)!r}: {spec.key_of(role)!r} has {dsets[role].shape[0]} hits but {spec.pmt_key!r} has "
                f"{num_hits}; the hit arrays must have one entry per hit each."
            )
    index_dset = dsets["index"]
    if index_dset.shape[0] == 0:
        raise DataError(f"{str(path)!r}: {spec.index_key!r} is empty; the file has no events.")
    try:
        index = np.asarray(index_dset[...], dtype=np.int64)
    except OSError as exc:
        raise DataError(
            f"{str(path)!r}: reading {spec.index_key!r} failed ({exc}); the file is corrupt or truncated."
        ) from None
    _check_index(index, num_hits, path, spec.index_key)
    return dsets, index, num_hits


def check_hit_file(f: Any, path: Path | str, spec: HitSpec, *, scan_ids: bool) -> HitFileInfo:
    """Check the hit arrays of an open file against ``spec`` and its geometry; DataError naming the problem.

    ``scan_ids``: also check every PMT id against the geometry (the launcher does; ranks do not).
    """
    dsets, index, num_hits = check_hit_arrays(f, path, spec)
    geometry = load_geometry(spec)
    builder = make_builder(spec, geometry)
    ids_checked = "per batch"
    if scan_ids:
        ids_checked, _ = scan_pmt_ids(dsets["pmt"], builder.num_pmts, path, spec, full=num_hits <= FULL_ID_SCAN_HITS)
    counts = hit_counts_of(index, num_hits)
    over = int((counts > spec.n_points).sum()) if spec.representation == "point_cloud" else 0
    return HitFileInfo(
        num_events=len(index),
        num_hits=num_hits,
        sample_shape=tuple(int(s) for s in builder.shape),
        memmap=all(storage_of(d).fast_path for d in dsets.values()),
        counts_min=int(counts.min()),
        counts_median=float(np.median(counts)),
        counts_max=int(counts.max()),
        empty_events=int((counts == 0).sum()),
        over_n_points=over,
        ids_checked=ids_checked,
    )


def _check_index(index: np.ndarray, num_hits: int, path: Path | str, key: str) -> None:
    if index[0] < 0:
        raise DataError(f"{str(path)!r}: {key!r} starts at {int(index[0])}; hit offsets cannot be negative.")
    down = np.flatnonzero(np.diff(index) < 0)
    if len(down):
        i = int(down[0])
        raise DataError(
            f"{str(path)!r}: {key!r} is not increasing: event {i + 1} starts at hit {int(index[i + 1])}, before "
            f"event {i} (hit {int(index[i])}). Each event's hits must follow the previous event's; the file is "
            "corrupt or the key is not an event index."
        )
    if index[-1] > num_hits:
        i = int(np.flatnonzero(index > num_hits)[0])
        raise DataError(
            f"{str(path)!r}: {key!r} points beyond the hit arrays: event {i} starts at hit {int(index[i])} but "
            f"there are {num_hits} hits. The hit arrays are truncated or belong to another file."
        )


def scan_pmt_ids(pmt: Any, num_pmts: int | None, path: Path | str, spec: HitSpec, *, full: bool) -> tuple[str, int]:
    """Every PMT id (or evenly spaced blocks of them) non-negative and, with ``num_pmts``, within the
    geometry. Returns ("all" or "sampled", the largest id seen; -1 without hits)."""
    n = int(pmt.shape[0])
    if full:
        blocks = [(lo, min(n, lo + _SCAN_BLOCK_HITS)) for lo in range(0, n, _SCAN_BLOCK_HITS)]
    else:
        starts = np.linspace(0, max(0, n - _SCAN_BLOCK_HITS), 64).astype(np.int64)
        blocks = [(int(lo), min(n, int(lo) + _SCAN_BLOCK_HITS)) for lo in np.unique(starts)]
    where = f"{str(path)!r}: {spec.pmt_key!r}"
    largest = -1
    try:
        for lo, hi in blocks:
            block = np.asarray(pmt[lo:hi])
            check_pmt_ids(block, num_pmts, where)
            largest = max(largest, int(block.max())) if len(block) else largest
    except OSError as exc:
        raise DataError(f"{where}: reading failed ({exc}); the file is corrupt or truncated.") from None
    return ("all" if full else "sampled"), largest
