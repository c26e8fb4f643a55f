"""Fused numba builders for hit-list files: one compiled pass over each event's hits (optional).

Imported only by :func:`dist_train.data.hits.compiled_kernels`, which falls back to the numpy
builders when numba is not importable. Each kernel reads a batch's hit ranges straight from the
hit arrays (the memory maps of the file, or a gathered copy when the arrays are chunked), checks
every PMT id, and writes each event's sample while it is still in the CPU cache: about ten numpy
passes over the hits become one. The rules are the numpy builders' to the bit (the tests compare
the uint32 views of both against each other and against the per-hit Python reference):

* charges of a PMT hit twice add in file order, in float32 (``out += q`` on a float32 value);
* a PMT's time is ``np.minimum`` over its hits in file order, as ``np.minimum.at`` does it:
  a NaN wins (it propagates), and of two equal times (-0.0 and +0.0) the later hit's is kept;
* point clouds keep an over-full event's ``n_points`` earliest hits (NaN counts as +inf; equal
  times: the earlier in the file) in file order, zero-padded.

Outputs are written with streaming (non-temporal) stores where the rows are 32-byte aligned (the
loader's batch buffers are cache-line aligned, ``dist_train.data.aligned``): they skip reading
the output's cache lines from memory first (see "streaming stores" below); the values are the
same. Images (charge and time) are built in an L2-resident scratch of (charge, time) pairs and
split into their planes (see "paired scratch"); point clouds' rows and zero padding are streamed.
Point clouds' position and orientation rows are written 8 hits at a time from a PMT table padded to 8
columns: one vector load per hit, a transpose in registers, one vector store per row.

Indices are unsigned (``np.uint64``) where a loop does not start at 0: numba handles negative
indices of signed ones with a branch per access, which keeps LLVM from vectorising the loop
(zeroing a cloud's padding: 18 vs 8 us per 128 KB event). Ids are range-checked first.

``nogil=True``: dtrain's reader threads run kernels side by side. ``cache=True``: the machine code
is written next to this file (``__pycache__``) or, where that is read-only, to numba's per-user
cache directory, so a worker process loads it instead of compiling (about 1-2 s per kernel).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types  # type: ignore[import-untyped]
from numba.extending import intrinsic  # type: ignore[import-untyped]

# Codes of a point-cloud channel's source (non-negative: a row of the per-PMT table).
SOURCE_TIME = -1
SOURCE_CHARGE = -2


def _jit(fn, inline: Literal["never", "always"] = "never"):  # type: ignore[no-untyped-def]
    try:
        return njit(cache=True, nogil=True, inline=inline)(fn)
    except RuntimeError:  # no writable cache location at all: compile in every process instead
        return njit(cache=False, nogil=True, inline=inline)(fn)


def _jit_inlined(fn):  # type: ignore[no-untyped-def]
    """A kernel's inner loop, inlined into its caller by numba (one function for LLVM to optimise)."""
    return _jit(fn, inline="always")


@_jit
def build_images(pmt, time, charge, starts, counts, pixel, charge_offset, time_offset, out):  # type: ignore[no-untyped-def]
    """Images of events ``starts[b] : starts[b] + counts[b]`` into ``out`` (B, sample size) float32.

    ``pixel[p]``: PMT p's offset in a sample's first plane group (uint16 when that fits: the
    table then stays in the L1 cache with ``seen``); ``charge_offset`` / ``time_offset``: where
    the charge / time planes start (-1: not built). Returns -1, or the index of the first hit
    whose PMT id has no pixel (``out`` is then partly written).

    Charge and time together (the default), into 32-byte aligned planes: each event is built in
    a scratch of (charge, time) pairs, one cache line per hit instead of two, then split into the
    two planes with streaming stores, which also clears the scratch for the next event (see
    "paired scratch" below). Otherwise the hit loop, written once per channel set, writes the
    zeroed sample in place.
    """
    group = abs(time_offset - charge_offset)
    if (
        charge_offset >= 0
        and time_offset >= 0
        and out.shape[1] == 2 * group
        and _rows_aligned(out, charge_offset, time_offset)
    ):
        return _build_images_paired(pmt, time, charge, starts, counts, pixel, charge_offset, time_offset, out)
    # Whether the event hit each PMT before: its first hit assigns the time, later ones take the
    # minimum. One byte a PMT (12 KB for 11,704 PMTs: L1-resident, unlike an int64 event stamp,
    # measured 20-25% slower), cleared per event; per call, so reader threads never share it.
    seen = np.zeros(pixel.shape[0], dtype=np.uint8)
    for b in range(starts.shape[0]):
        first = np.uint64(starts[b])
        last = first + np.uint64(counts[b])
        bad = _hits_in_place(pmt, time, charge, first, last, pixel, charge_offset, time_offset, out[b], seen)
        if bad >= 0:
            return bad
    return -1


@_jit
def _hits_in_place(pmt, time, charge, first, last, pixel, charge_offset, time_offset, sample, seen):  # type: ignore[no-untyped-def]
    """One image written in place: ``sample`` zeroed, then its hits (one loop per channel set).

    The loop per channel set, over plane views, instead of testing both offsets per hit: LLVM
    unswitched only one of the two tests; without them 0.2-0.3 us an image faster (2026-12-05).
    """
    num_pmts = pixel.shape[0]
    for j in range(sample.shape[0]):  # a loop: slice assignments compile several times slower
        sample[j] = 0.0
    if time_offset >= 0:
        for j in range(num_pmts):
            seen[j] = 0
        times = sample[time_offset:]  # a plane group onwards: pixel offsets index into it
        if charge_offset >= 0:
            return _charge_and_time_hits(pmt, time, charge, first, last, pixel, sample[charge_offset:], times, seen)
        return _time_hits(pmt, time, first, last, pixel, times, seen)
    if charge_offset >= 0:
        return _charge_hits(pmt, charge, first, last, pixel, sample[charge_offset:])
    return np.int64(-1)


# ----------------------------------------------------------------------------- paired scratch
# Measured (2026-12-05, 16 batches of 256 38x16x40 images, 3,000 hits an event): in place, the
# sample is zeroed (2.6 us: every line read from memory first) and each hit then reads and writes
# two lines of a 97 KB sample, charge's and time's, that does not fit the 32 KB L1 cache: 10.0 us
# an image. Pairs (charge, time) side by side in an L2-resident scratch: one line a hit; the
# split into the planes (a shuffle, two streaming stores and the scratch's zeroing per 8 pixels)
# never reads the output from memory: 8.8 us. A planar scratch streamed out (10.6) and writing the
# first hit of a pixel without reading it (10.4) were slower.


@_jit
def _rows_aligned(out, charge_offset, time_offset):  # type: ignore[no-untyped-def]
    """Whether both planes of every sample of ``out`` start at a 32-byte boundary (streaming stores apply)."""
    if out.shape[0] == 0:
        return False
    address, stride = out.ctypes.data, out.strides[0]
    return (address + 4 * charge_offset) % 32 == 0 and (address + 4 * time_offset) % 32 == 0 and stride % 32 == 0


@_jit
def _build_images_paired(pmt, time, charge, starts, counts, pixel, charge_offset, time_offset, out):  # type: ignore[no-untyped-def]
    """:func:`build_images` for charge and time planes (``group`` floats each) that start 32-byte aligned."""
    num_pmts = pixel.shape[0]
    seen = np.zeros(num_pmts, dtype=np.uint8)  # as in build_images
    group = abs(time_offset - charge_offset)
    raw = np.zeros(2 * group + 16, dtype=np.float32)
    skip = (64 - raw.ctypes.data % 64) % 64 // 4
    pairs = raw[skip : skip + 2 * group]  # 64-byte aligned; zero, and zeroed again by each split
    for b in range(starts.shape[0]):
        for j in range(num_pmts):
            seen[j] = 0
        first = np.uint64(starts[b])
        bad = _paired_hits(pmt, time, charge, first, first + np.uint64(counts[b]), pixel, pairs, seen)
        if bad >= 0:
            _store_fence()
            return bad
        _split_pairs(pairs, out[b], charge_offset, time_offset, group)
    _store_fence()
    return -1


@_jit_inlined
def _paired_hits(pmt, time, charge, first, last, pixel, pairs, seen):  # type: ignore[no-untyped-def]
    """Hits ``first : last`` into ``pairs`` (charge of pixel k at 2k, time at 2k + 1): -1 or the first bad id."""
    num_pmts = pixel.shape[0]
    one = np.uint64(1)
    for i in range(first, last):
        p = pmt[i]
        if p < 0 or p >= num_pmts:
            return np.int64(i)
        p = np.uint64(p)
        k = np.uint64(pixel[p]) << one
        pairs[k] += np.float32(charge[i])
        t = np.float32(time[i])
        if seen[p] == 0:
            seen[p] = 1
            pairs[k + one] = t
        else:
            now = pairs[k + one]
            # np.minimum(now, t): now if now < t or now is NaN, else t (ties: t).
            if not (now < t or now != now):
                pairs[k + one] = t
    return np.int64(-1)


@_jit_inlined
def _split_pairs(pairs, sample, charge_offset, time_offset, group):  # type: ignore[no-untyped-def]
    """``sample``'s charge and time planes from ``pairs`` (streamed), and ``pairs`` zeroed again.

    ``group`` is a multiple of 8: both planes start at a 32-byte boundary, ``4 * group`` bytes apart.
    """
    charges_at = np.uint64(sample.ctypes.data + 4 * charge_offset)
    times_at = np.uint64(sample.ctypes.data + 4 * time_offset)
    pairs_at = np.uint64(pairs.ctypes.data)
    step = np.uint64(4 * _VECTOR)
    for _ in range(0, group, _VECTOR):
        _split_pairs8(charges_at, times_at, pairs_at)
        charges_at += step
        times_at += step
        pairs_at += step + step


@_jit_inlined
def _charge_and_time_hits(pmt, time, charge, first, last, pixel, charges, times, seen):  # type: ignore[no-untyped-def]
    """Hits ``first : last`` into one image's charge and time planes: -1, or the first hit with a bad id.

    The time rule is written out here, in :func:`_paired_hits` and in :func:`_time_hits`: an
    inlined helper for it made this loop 4x slower (46 vs 10 us an image).
    """
    num_pmts = pixel.shape[0]
    for i in range(first, last):
        p = pmt[i]
        if p < 0 or p >= num_pmts:
            return np.int64(i)
        p = np.uint64(p)
        k = np.uint64(pixel[p])
        charges[k] += np.float32(charge[i])
        t = np.float32(time[i])
        if seen[p] == 0:
            seen[p] = 1
            times[k] = t
        else:
            now = times[k]
            # np.minimum(now, t): now if now < t or now is NaN, else t (ties: t).
            if not (now < t or now != now):
                times[k] = t
    return np.int64(-1)


@_jit_inlined
def _charge_hits(pmt, charge, first, last, pixel, charges):  # type: ignore[no-untyped-def]
    """Hits ``first : last`` into one image's charge planes: -1, or the first hit with a bad id."""
    num_pmts = pixel.shape[0]
    for i in range(first, last):
        p = pmt[i]
        if p < 0 or p >= num_pmts:
            return np.int64(i)
        charges[np.uint64(pixel[np.uint64(p)])] += np.float32(charge[i])
    return np.int64(-1)


@_jit_inlined
def _time_hits(pmt, time, first, last, pixel, times, seen):  # type: ignore[no-untyped-def]
    """Hits ``first : last`` into one image's time planes: -1, or the first hit with a bad id."""
    num_pmts = pixel.shape[0]
    for i in range(first, last):
        p = pmt[i]
        if p < 0 or p >= num_pmts:
            return np.int64(i)
        p = np.uint64(p)
        k = np.uint64(pixel[p])
        t = np.float32(time[i])
        if seen[p] == 0:
            seen[p] = 1
            times[k] = t
        else:
            now = times[k]
            if not (now < t or now != now):  # np.minimum(now, t), as above
                times[k] = t
    return np.int64(-1)


@_jit
def kth_smallest(values, n, k):  # type: ignore[no-untyped-def]
    """The k-th smallest (0-based) of ``values[:n]`` (no NaN), reordering them: quickselect, median of 3.

    Written out because numba's ``np.partition`` takes about 25 s to compile.
    """
    lo, hi = 0, n - 1
    while True:
        if hi <= lo + 1:
            if hi == lo + 1 and values[hi] < values[lo]:
                values[lo], values[hi] = values[hi], values[lo]
            return values[k]
        mid = (lo + hi) >> 1
        values[mid], values[lo + 1] = values[lo + 1], values[mid]
        if values[lo] > values[hi]:
            values[lo], values[hi] = values[hi], values[lo]
        if values[lo + 1] > values[hi]:
            values[lo + 1], values[hi] = values[hi], values[lo + 1]
        if values[lo] > values[lo + 1]:
            values[lo], values[lo + 1] = values[lo + 1], values[lo]
        i, j = lo + 1, hi
        pivot = values[lo + 1]
        while True:
            i += 1
            while values[i] < pivot:
                i += 1
            j -= 1
            while values[j] > pivot:
                j -= 1
            if j < i:
                break
            values[i], values[j] = values[j], values[i]
        values[lo + 1] = values[j]
        values[j] = pivot
        if j >= k:
            hi = j - 1
        if j <= k:
            lo = i


@_jit
def build_clouds(pmt, time, charge, starts, counts, table, sources, out):  # type: ignore[no-untyped-def]
    """Point clouds of events ``starts[b] : starts[b] + counts[b]`` into ``out`` (B, C, n_points) float32.

    ``table`` (PMTs, columns) float32: per-PMT values (position / orientation coordinates);
    ``sources[c]``: output channel c's table column, or SOURCE_TIME / SOURCE_CHARGE. Returns
    (-1 or the index of the first hit whose PMT id is outside the table, events truncated).
    """
    num_pmts = table.shape[0]
    n_points = out.shape[2]
    truncated = 0
    longest = 1
    for b in range(counts.shape[0]):
        longest = max(longest, counts[b])
    keys = np.empty(longest, dtype=np.float32)
    work = np.empty(longest, dtype=np.float32)
    kept = np.empty(n_points, dtype=np.int64)  # hit index of each column
    spare = np.empty(n_points, dtype=np.float32)  # where table columns no channel takes are written
    for b in range(starts.shape[0]):
        first = starts[b]
        count = counts[b]
        bad = _first_bad_id(pmt, first, count, num_pmts)
        if bad >= 0:
            return bad, truncated
        used = min(count, n_points)
        cloud = out[b]
        if count > n_points:
            truncated += 1
            _earliest_hits(time, first, count, n_points, keys, work, kept)
            _fill_rows_kept(cloud, sources, pmt, time, charge, table, kept, used)
        else:
            _fill_rows(cloud, sources, pmt, time, charge, table, first, used, spare)
        for c in range(sources.shape[0]):
            _stream_zeros(cloud[c], used)
    _store_fence()
    return -1, truncated


# ----------------------------------------------------------------------------- streaming stores
# A batch of samples (32 MB of point clouds) does not stay in the cache, so ordinary stores
# first read every output line from memory (read for ownership) and later write it back.
# Non-temporal ("streaming") stores write whole lines without reading them: measured here,
# writing a 128 KB cloud of zeros costs 2.9 us this way against 9.0 us with plain stores. A
# cloud's rows are streamed where they start at a 32-byte boundary: the table rows straight from
# the 8x8 transposes, time and charge 8 hits at a time (2026-12-05, 8 x 4000 clouds into aligned
# buffers: 11.7 -> 9.2 us an event). Streaming them through a small buffer or a staged cloud had
# measured slower (21 and 20 vs 17.5 us, into numpy's 16-byte aligned buffers: split lines).
# LLVM's ``!nontemporal`` store (x86: vmovntdq; other targets lower it to what they have, at
# worst a plain store), 8 floats at a 32-byte aligned address; the ends are written plainly.

_VECTOR = 8  # floats per streaming store (32 bytes)


def _nontemporal_store(builder, value, pointer):  # type: ignore[no-untyped-def]
    store = builder.store(value, builder.bitcast(pointer, value.type.as_pointer()), align=4 * _VECTOR)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


@intrinsic
def _stream_zero8(typingctx, dst_address):  # type: ignore[no-untyped-def]
    """8 float32 zeros to ``dst_address`` (32-byte aligned) with one streaming store."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vector = ir.VectorType(ir.FloatType(), _VECTOR)
        zeros = ir.Constant(vector, [0.0] * _VECTOR)
        _nontemporal_store(builder, zeros, builder.inttoptr(args[0], vector.as_pointer()))
        return context.get_dummy_value()

    return types.void(types.uint64), codegen


# ----------------------------------------------------------------------------- 8 hits' table rows at once


def _transposed_columns(builder, table, ids_at):  # type: ignore[no-untyped-def]
    """IR: table columns 0..7 of the 8 PMT ids at ``ids_at``, each an 8-float vector (one value per hit)."""
    f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
    vector = ir.VectorType(f32, _VECTOR)
    ids = builder.load(builder.inttoptr(ids_at, ir.VectorType(i32, _VECTOR).as_pointer()), align=4)
    r = []
    for k in range(_VECTOR):
        pmt = builder.zext(builder.extract_element(ids, ir.Constant(i32, k)), i64)
        address = builder.add(table, builder.mul(pmt, ir.Constant(i64, 4 * _VECTOR)))
        r.append(builder.load(builder.inttoptr(address, vector.as_pointer()), align=4))

    def shuffle(a, b, mask):  # type: ignore[no-untyped-def]
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, _VECTOR), mask))

    low, high = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    t = [shuffle(r[k], r[k + 1], mask) for k in (0, 2, 4, 6) for mask in (low, high)]  # t0 t1 t2 ... t7
    even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    u = [shuffle(t[a], t[a + 2], mask) for a in (0, 1, 4, 5) for mask in (even, odd)]  # columns 0,1,2,3 | 4,5,6,7
    first_half, second_half = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [shuffle(u[c], u[c + 4], first_half) for c in range(4)] + [
        shuffle(u[c], u[c + 4], second_half) for c in range(4)
    ]


def _row_address(builder, rows_at, c, offset):  # type: ignore[no-untyped-def]
    """IR: ``rows[c]`` (the uint64 addresses at ``rows_at``) and ``rows[c] + offset``."""
    i64 = ir.IntType(64)
    rows_pointer = builder.inttoptr(rows_at, i64.as_pointer())
    row = builder.load(builder.gep(rows_pointer, [ir.Constant(i64, c)]), align=8)
    return row, builder.add(row, offset)


@intrinsic
def _transpose8(typingctx, rows_address, table_address, ids_address, offset):  # type: ignore[no-untyped-def]
    """Table columns 0..7 of 8 hits, each written as 8 consecutive float32 to its own output row.

    ``ids_address``: 8 consecutive int32 PMT ids (checked before: within the table);
    ``table_address``: a (PMTs, 8) float32 table; ``rows_address``: 8 uint64 addresses, where
    column r goes (plus ``offset`` bytes). One vector load per hit, the 8x8 transpose in
    registers (the usual unpack / shuffle / 128-bit lane permutation), one vector store per
    column: 16 memory operations for 64 values.
    """

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        rows_at, table, ids_at, offset = args
        vector = ir.VectorType(ir.FloatType(), _VECTOR)
        for c, column in enumerate(_transposed_columns(builder, table, ids_at)):
            _, at = _row_address(builder, rows_at, c, offset)
            builder.store(column, builder.inttoptr(at, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64, types.uint64, types.uint64), codegen


@intrinsic
def _transpose8_stream(typingctx, rows_address, table_address, ids_address, offset):  # type: ignore[no-untyped-def]
    """:func:`_transpose8` with streaming stores (rows + offset 32-byte aligned); rows at address 0 are skipped."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        rows_at, table, ids_at, offset = args
        vector = ir.VectorType(ir.FloatType(), _VECTOR)
        for c, column in enumerate(_transposed_columns(builder, table, ids_at)):
            row, at = _row_address(builder, rows_at, c, offset)
            with builder.if_then(builder.icmp_unsigned("!=", row, ir.Constant(ir.IntType(64), 0)), likely=True):
                _nontemporal_store(builder, column, builder.inttoptr(at, vector.as_pointer()))
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64, types.uint64, types.uint64), codegen


@intrinsic
def _stream_copy8(typingctx, dst_address, src_address):  # type: ignore[no-untyped-def]
    """8 float32 from ``src_address`` (any alignment) to ``dst_address`` (32-byte aligned), streamed."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vector = ir.VectorType(ir.FloatType(), _VECTOR)
        values = builder.load(builder.inttoptr(args[1], vector.as_pointer()), align=4)
        _nontemporal_store(builder, values, builder.inttoptr(args[0], vector.as_pointer()))
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64), codegen


@intrinsic
def _split_pairs8(typingctx, charges_address, times_address, pairs_address):  # type: ignore[no-untyped-def]
    """8 (charge, time) pairs at ``pairs_address`` (32-byte aligned) split into 8 charges and 8 times, each
    one streaming store (32-byte aligned addresses); the 16 floats of pairs are then zeroed (plain stores)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        charges_at, times_at, pairs_at = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vector = ir.VectorType(ir.FloatType(), _VECTOR)
        low = builder.inttoptr(pairs_at, vector.as_pointer())
        high = builder.inttoptr(builder.add(pairs_at, ir.Constant(i64, 4 * _VECTOR)), vector.as_pointer())
        a, b = builder.load(low, align=4 * _VECTOR), builder.load(high, align=4 * _VECTOR)
        evens = ir.Constant(ir.VectorType(i32, _VECTOR), list(range(0, 2 * _VECTOR, 2)))
        odds = ir.Constant(ir.VectorType(i32, _VECTOR), list(range(1, 2 * _VECTOR, 2)))
        _nontemporal_store(
            builder, builder.shuffle_vector(a, b, evens), builder.inttoptr(charges_at, vector.as_pointer())
        )
        _nontemporal_store(builder, builder.shuffle_vector(a, b, odds), builder.inttoptr(times_at, vector.as_pointer()))
        zeros = ir.Constant(vector, [0.0] * _VECTOR)
        builder.store(zeros, low, align=4 * _VECTOR)
        builder.store(zeros, high, align=4 * _VECTOR)
        return context.get_dummy_value()

    return types.void(types.uint64, types.uint64, types.uint64), codegen


@intrinsic
def _store_fence(typingctx):  # type: ignore[no-untyped-def]
    """Orders the streaming stores before anything this thread does next (they are weakly ordered)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@_jit
def _stream_zeros(row, used):  # type: ignore[no-untyped-def]
    """``row[used:] = 0`` (float32, contiguous): plain stores up to a 32-byte boundary, then streamed."""
    n = row.shape[0]
    address = row.ctypes.data
    start = n
    if address % 4 == 0:
        start = used + ((4 * _VECTOR - (address + 4 * used) % (4 * _VECTOR)) % (4 * _VECTOR)) // 4
        start = min(n, start)
    for j in range(np.uint64(used), np.uint64(start)):
        row[j] = 0.0
    at = np.uint64(address + 4 * start)
    step = np.uint64(4 * _VECTOR)
    j = start
    while j + _VECTOR <= n:
        _stream_zero8(at)
        at += step
        j += _VECTOR
    for k in range(np.uint64(j), np.uint64(n)):
        row[k] = 0.0


@_jit
def _first_bad_id(pmt, first, count, num_pmts):  # type: ignore[no-untyped-def]
    """-1, or the index of the first of hits ``first : first + count`` whose id is not in ``0 .. num_pmts - 1``.

    The largest id seen as unsigned (a negative one wraps above any PMT count) is a reduction
    LLVM vectorises; a loop that returns at the first bad id is not (3 vs 0.3 us an event of
    3,000 hits). The slow search runs only when there is a bad id.
    """
    first, count = np.uint64(first), np.uint64(count)
    largest = np.uint32(0)
    for i in range(first, first + count):
        largest = max(largest, np.uint32(pmt[i]))
    if np.int64(largest) < num_pmts:
        return -1
    for i in range(first, first + count):
        p = pmt[i]
        if p < 0 or p >= num_pmts:
            return np.int64(i)
    return -1


@_jit
def _fill_rows(cloud, sources, pmt, time, charge, table, first, used, spare):  # type: ignore[no-untyped-def]
    """``cloud[:, :used]`` from hits ``first : first + used``: the table channels 8 hits at a time, then time and charge.

    The builder pads the table to 8 columns (:func:`_fill_table_rows8`); any other table (and
    ids that are not int32) is read one value at a time. Measured on 3,000-hit events (the
    default 8 channels), against one pass per position / orientation writing three rows a
    hit: 17.0 -> 13.7 us an event.
    """
    vectors = table.shape[1] == _VECTOR and pmt.itemsize == 4
    if vectors:
        _fill_table_rows8(cloud, sources, pmt, table, first, used, spare)
    for c in range(sources.shape[0]):
        if sources[c] < 0 or not vectors:
            _fill_row(cloud[c], sources[c], pmt, time, charge, table, first, used)


@_jit
def _fill_table_rows8(cloud, sources, pmt, table, first, used, spare):  # type: ignore[no-untyped-def]
    """Every table channel of ``cloud[:, :used]`` (hits ``first : first + used``), 8 hits at a time.

    ``table`` has 8 columns (zero-padded): 8 hits' rows, transposed (:func:`_transpose8`), give 8
    consecutive values of every column, one vector store per output row (columns no channel
    takes go to ``spare``). The last ``used % 8`` hits are written one by one.
    """
    first, used = np.uint64(first), np.uint64(used)
    eight = np.uint64(_VECTOR)
    rows = np.empty(_VECTOR, dtype=np.uint64)
    for r in range(_VECTOR):
        rows[r] = spare.ctypes.data
    for c in range(sources.shape[0]):
        if sources[c] >= 0:
            rows[sources[c]] = cloud[c].ctypes.data
    whole = used - used % eight
    table_at = np.uint64(table.ctypes.data)
    rows_at = np.uint64(rows.ctypes.data)
    ids_at = np.uint64(pmt.ctypes.data) + np.uint64(4) * first
    if _table_rows_aligned(cloud, sources):
        for r in range(_VECTOR):
            if rows[r] == spare.ctypes.data:
                rows[r] = 0  # nothing to write: a streamed spare row would go to memory every time
        for j in range(np.uint64(0), whole, eight):
            _transpose8_stream(rows_at, table_at, ids_at + np.uint64(4) * j, np.uint64(4) * j)
    else:
        for j in range(np.uint64(0), whole, eight):
            _transpose8(rows_at, table_at, ids_at + np.uint64(4) * j, np.uint64(4) * j)
    for c in range(sources.shape[0]):
        s = sources[c]
        if s >= 0:
            row = cloud[c]
            for j in range(whole, used):
                row[j] = table[np.uint64(pmt[first + j]), np.uint64(s)]


@_jit
def _fill_row(row, source, pmt, time, charge, table, first, used):  # type: ignore[no-untyped-def]
    """``row[:used]``: channel ``source`` of hits ``first : first + used``: a plain gather or copy, in order."""
    first, used = np.uint64(first), np.uint64(used)
    if source >= 0:
        for j in range(used):
            row[j] = table[np.uint64(pmt[first + j]), source]
    elif source == SOURCE_TIME:
        _copy_hits(row, time, first, used)
    else:
        _copy_hits(row, charge, first, used)


@_jit
def _table_rows_aligned(cloud, sources):  # type: ignore[no-untyped-def]
    """Whether every table channel's row of ``cloud`` starts at a 32-byte boundary (streaming stores apply)."""
    for c in range(sources.shape[0]):
        if sources[c] >= 0 and cloud[c].ctypes.data % (4 * _VECTOR) != 0:
            return False
    return True


@_jit
def _copy_hits(row, values, first, used):  # type: ignore[no-untyped-def]
    """``row[:used] = values[first : first + used]`` (float32): plain stores up to a 32-byte boundary, then streamed."""
    address = row.ctypes.data
    start = used  # all plain: values that are not 4-byte floats, or a row not 4-byte aligned
    if address % 4 == 0 and values.itemsize == 4:
        start = min(used, ((4 * _VECTOR - address % (4 * _VECTOR)) % (4 * _VECTOR)) // 4)
    for j in range(np.uint64(start)):
        row[j] = np.float32(values[first + j])
    whole = start + (used - start) // _VECTOR * _VECTOR
    at = np.uint64(address + 4 * start)
    source = np.uint64(values.ctypes.data) + np.uint64(4) * (first + np.uint64(start))
    step = np.uint64(4 * _VECTOR)
    for _ in range(np.uint64(start), np.uint64(whole), np.uint64(_VECTOR)):
        _stream_copy8(at, source)
        at += step
        source += step
    for j in range(np.uint64(whole), used):
        row[j] = np.float32(values[first + j])


@_jit
def _fill_rows_kept(cloud, sources, pmt, time, charge, table, kept, used):  # type: ignore[no-untyped-def]
    """``cloud[:, :used]`` from hits ``kept[:used]``, three table rows per pass where they can be (as :func:`_fill_rows`)."""
    c = 0
    channels = sources.shape[0]
    while c < channels:
        s = sources[c]
        if s >= 0 and c + 2 < channels and sources[c + 1] == s + 1 and sources[c + 2] == s + 2:
            row0, row1, row2 = cloud[c], cloud[c + 1], cloud[c + 2]
            for j in range(used):
                p = pmt[kept[j]]
                row0[j] = table[p, s]
                row1[j] = table[p, s + 1]
                row2[j] = table[p, s + 2]
            c += 3
        else:
            _fill_row_kept(cloud[c], s, pmt, time, charge, table, kept, used)
            c += 1


@_jit
def _fill_row_kept(row, source, pmt, time, charge, table, kept, used):  # type: ignore[no-untyped-def]
    """``row[:used]``: channel ``source`` of hits ``kept[:used]`` (an over-full event's earliest)."""
    if source >= 0:
        for j in range(used):
            row[j] = table[pmt[kept[j]], source]
    elif source == SOURCE_TIME:
        for j in range(used):
            row[j] = np.float32(time[kept[j]])
    else:
        for j in range(used):
            row[j] = np.float32(charge[kept[j]])


@_jit
def _earliest_hits(time, first, count, n_points, keys, work, kept):  # type: ignore[no-untyped-def]
    """``kept[:n_points]``: the hit indices of the ``n_points`` earliest of ``first : first + count``, in file order.

    The n_points-th smallest time (NaN as +inf) is the threshold; hits before it are kept, hits
    at it in file order while slots are left (equal times: the earlier in the file).
    """
    inf = np.float32(np.inf)
    for j in range(count):
        t = np.float32(time[first + j])
        keys[j] = inf if t != t else t
        work[j] = keys[j]
    threshold = kth_smallest(work, count, n_points - 1)
    before = 0
    for j in range(count):
        if keys[j] < threshold:
            before += 1
    free_ties = n_points - before
    column = 0
    for j in range(count):
        key = keys[j]
        if key < threshold or (key == threshold and free_ties > 0):
            if not key < threshold:
                free_ties -= 1
            kept[column] = first + j
            column += 1
