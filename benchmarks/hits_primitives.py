"""Per-hit cost of the numpy primitives the hit-list builders could use (information, no RESULT line).

One cache-sized block of the hits_loader benchmark's occupancy (10 events of 2,000-4,000 hits, 1%
repeating a PMT, the demo detector's 11,704 PMTs, 38x16x40 images and 8x4000 point clouds), each
candidate timed interleaved with the others; reported as ns per hit, the minimum (the least
disturbed run: on a shared machine the medians mostly measure the other jobs) and the median.

    python benchmarks/hits_primitives.py [--rounds 40]

Image rules (charges add in file order in float32, time is the earliest):
  add.at                 ``np.add.at(charge_plane, flat, charge)`` (what the builder does)
  bincount+cast          ``np.bincount(flat, weights=charge)`` (float64) cast into the charge planes
  inf+minimum.at         ``times[flat] = inf; np.minimum.at(times, flat, time)`` (what the builder does)
  assign+verify          ``times[flat] = time``, then only the hits whose pixel holds another value
                         go through ``np.minimum.at``
Per-PMT lookups (the pixel of each hit; point-cloud position/orientation columns):
  table[pmt]             fancy indexing with the file's int32 ids
  table.take(pmt, clip)  ``np.take(..., mode="clip")`` with intp ids (what the builders do; ids are
                         checked per batch before)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_summary  # noqa: E402
from dist_train.data.hits import ImageBuilder  # noqa: E402
from dist_train.data.writers.synth_hits import demo_geometry  # noqa: E402

PPM = 19
EVENTS = 10  # about one 1 MB block of images (hits.BLOCK_BYTES)


def block_hits(rng: np.random.Generator, pmts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    counts, ids = [], []
    for _ in range(EVENTS):
        p = rng.permutation(pmts)[: rng.integers(2000, 4001)]
        again = rng.random(len(p)) < 0.01
        p = np.insert(p, np.flatnonzero(again) + 1, p[again])
        ids.append(p)
        counts.append(len(p))
    pmt = np.concatenate(ids).astype(np.int32)
    time_ = rng.uniform(0, 60, len(pmt)).astype(np.float32)
    charge = rng.exponential(1.0, len(pmt)).astype(np.float32)
    return pmt, time_, charge, np.array(counts, dtype=np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    print(machine_summary())
    geo = demo_geometry()
    builder = ImageBuilder(geo["mpmt_image_positions"].astype(np.int64), PPM, ("charge", "time"))
    pmt, time_, charge, counts = block_hits(np.random.default_rng(0), builder.num_pmts)
    n = len(pmt)
    out = np.zeros((EVENTS, *builder.shape), dtype=np.float32)
    values = out.reshape(-1)
    assert builder.charge_offset is not None and builder.time_offset is not None
    charges, times = values[builder.charge_offset :], values[builder.time_offset :]
    flat = np.repeat(np.arange(EVENTS, dtype=np.intp) * builder.sample_size, counts)
    flat += builder.pixel.take(pmt, mode="clip")
    group = builder.sample_size // 2
    dense = np.repeat(np.arange(EVENTS, dtype=np.intp) * group, counts) + builder.pixel.take(pmt, mode="clip")
    table = np.ascontiguousarray(geo["position"][:, 0].astype(np.float32))
    table_intp = builder.pixel
    ids = pmt.astype(np.intp)
    gathered = np.empty(n, dtype=np.float32)

    def bincount_cast() -> None:
        sums = np.bincount(dense, weights=charge, minlength=EVENTS * group)
        out[:, : builder.shape[0] // 2].reshape(EVENTS, -1)[...] = sums.reshape(EVENTS, group)

    def inf_minimum_at() -> None:
        times[flat] = np.inf
        np.minimum.at(times, flat, time_)

    def assign_verify() -> None:
        times[flat] = time_
        lost = np.flatnonzero(times.view(np.uint32).take(flat) != time_.view(np.uint32))
        np.minimum.at(times, flat[lost], time_[lost])

    candidates: dict[str, Callable[[], object]] = {
        "image: zero the block": lambda: out.fill(0.0),
        "charge: add.at": lambda: np.add.at(charges, flat, charge),
        "charge: bincount+cast": bincount_cast,
        "charge: plain assignment (no sum)": lambda: charges.__setitem__(flat, charge),
        "time: inf+minimum.at": inf_minimum_at,
        "time: assign+verify": assign_verify,
        "pixel lookup: table[pmt]": lambda: table_intp[pmt],
        "pixel lookup: take(clip)": lambda: table_intp.take(pmt, mode="clip"),
        "cloud column: table[pmt]": lambda: table[pmt],
        "cloud column: take(intp, clip, out)": lambda: np.take(table, ids, out=gathered, mode="clip"),
    }
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
    print(f"block: {EVENTS} events, {n} hits; ns per hit, min / median of {args.rounds} interleaved rounds")
    for name, times_s in runs.items():
        times_s.sort()
        print(f"  {name:<38} {times_s[0] / n * 1e9:6.2f}  {times_s[len(times_s) // 2] / n * 1e9:6.2f}")


if __name__ == "__main__":
    main()
