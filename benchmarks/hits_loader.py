"""Hit-list loading: dtrain's batched builder vs a per-event Dataset vs reading already-converted samples.

A hit-list file with realistic occupancy (2,000-4,000 hits per event, uniform; the demo detector's
616 mPMT modules of 19 PMTs; about 1% of hits repeat a PMT) is read in the training sampler's
random order, as mPMT images (38x16x40) and as point clouds (8x4000), by:

  dtrain-w0     dtrain's loader (``make_loader``, ``data.format = "hits"``), num_workers 0: each batch
                built from the memory-mapped hit arrays in the calling thread (``--builder``: numba's
                fused pass per event when it imports, else numpy's vectorised scatters);
  dtrain-w2     the same with num_workers 2 (``worker_mode = "auto"``: reader threads on these contiguous
                hit arrays, as many as there are other CPUs);
  dtrain-p2     the same with 2 fork worker processes (``worker_mode = "process"``), for information;
  per-event-w2  the approach physicists use today (WatChMaL-style): a Dataset that memory-maps the hit
                arrays in each worker and builds one event per ``__getitem__`` with numpy (one image or
                cloud per call; duplicates overwrite instead of adding: the cheaper rule), default
                collate of dicts, ``DataLoader(batch_size, num_workers=2)``;
  conv-w0/w2    dtrain reading the file ``dtrain data convert --geometry`` wrote (contiguous samples,
                the memmap fast path) with 0 / 2 workers.

The consumer only takes each batch's length: the loader's own cost. Files are freshly written, so
they are in the page cache: this measures CPU cost, not the disk.

    python benchmarks/hits_loader.py [--quick] [--dir DIR] [--batch 256] [--builder auto|numba|numpy]

Ends with RESULT lines: dtrain (0 and 2 workers) >= 10x the per-event reader and >= 0.5x the
converted-sample read of the same worker count, for images and for point clouds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BENCH_DIR, load_average, machine_summary, result_line  # noqa: E402
from dist_train.config import DataConfig  # noqa: E402
from dist_train.data.dataset import H5Split  # noqa: E402
from dist_train.data.hits import HitSpec, builder_kind  # noqa: E402
from dist_train.data.loader import make_loader  # noqa: E402
from dist_train.data.writers.convert_hits import convert_hits  # noqa: E402
from dist_train.data.writers.synth_hits import demo_geometry  # noqa: E402
from dist_train.sampler import IndexBatch, ResumableDistributedBatchSampler  # noqa: E402

PPM = 19
N_POINTS = 4000
OCCUPANCIES = ((2000, 4000), (200, 400))  # hits per event: realistic (the targets), then low


def write_hit_file(path: Path, events: int, geo: dict[str, np.ndarray], hits: tuple[int, int], seed: int = 0) -> Path:
    """Events of ``hits`` (lo, hi) distinct random PMTs (+1% repeated), contiguous hit arrays."""
    rng = np.random.default_rng(seed)
    pmts = len(geo["position"])
    base = rng.integers(hits[0], hits[1] + 1, events)
    repeats = rng.binomial(base, 0.01)
    counts = base + repeats
    index = np.cumsum(counts) - counts
    total = int(counts.sum())
    with h5py.File(path, "w") as f:
        f["event_hits_index"] = index.astype(np.int64)
        pmt_d = f.create_dataset("hit_pmt", shape=(total,), dtype="int32")
        time_d = f.create_dataset("hit_time", shape=(total,), dtype="float32")
        charge_d = f.create_dataset("hit_charge", shape=(total,), dtype="float32")
        for lo in range(0, events, 256):
            hi = min(events, lo + 256)
            # Distinct PMTs per event: the first `base` entries of a random permutation of each row.
            order = np.argsort(rng.random((hi - lo, pmts)), axis=1)
            pmt = order[np.arange(pmts)[None] < base[lo:hi, None]]
            again = np.arange(len(pmt)) - np.repeat(np.cumsum(base[lo:hi]) - base[lo:hi], base[lo:hi])
            again = again < np.repeat(repeats[lo:hi], base[lo:hi])
            pmt = np.insert(pmt, np.flatnonzero(again) + 1, pmt[again])
            a, b = int(index[lo]), int(index[hi - 1] + counts[hi - 1])
            pmt_d[a:b] = pmt
            time_d[a:b] = rng.uniform(0, 60, b - a).astype(np.float32)
            charge_d[a:b] = rng.exponential(1.0, b - a).astype(np.float32)
        f["labels"] = (np.arange(events) % 3).astype(np.int32)
        f["energies"] = rng.uniform(100, 1000, (events, 1)).astype(np.float32)
        f["positions"] = rng.uniform(-200, 200, (events, 1, 3)).astype(np.float32)
        f["angles"] = rng.uniform(0, 3, (events, 2)).astype(np.float32)
    return path


class PerEventHits(Dataset):  # type: ignore[type-arg]
    """The per-event reader: memory maps opened lazily in each worker, one event built per call."""

    def __init__(self, path: Path, geometry: Path, representation: str) -> None:
        self.path, self.representation = str(path), representation
        with np.load(geometry) as g:
            self.mpmt_positions = g["mpmt_image_positions"].astype(np.int64)
            self.position, self.orientation = g["position"], g["orientation"]
        self.height = int(self.mpmt_positions[:, 0].max()) + 1
        self.width = int(self.mpmt_positions[:, 1].max()) + 1
        with h5py.File(self.path, "r", locking=False) as f:
            self.length = len(f["event_hits_index"])
        self.opened = False

    def __len__(self) -> int:
        return self.length

    def _open(self) -> None:
        f = h5py.File(self.path, "r", locking=False)

        def mapped(key: str) -> np.ndarray:
            d = f[key]
            return np.memmap(self.path, mode="r", dtype=d.dtype, shape=d.shape, offset=d.id.get_offset())

        self.hit_pmt, self.hit_time, self.hit_charge = mapped("hit_pmt"), mapped("hit_time"), mapped("hit_charge")
        self.index = np.append(f["event_hits_index"][...], len(self.hit_pmt)).astype(np.int64)
        self.labels = np.asarray(f["labels"][...])
        self.energies, self.positions, self.angles = f["energies"][...], f["positions"][...], f["angles"][...]
        self.opened = True

    def __getitem__(self, item: int) -> dict[str, Any]:
        if not self.opened:
            self._open()
        start, stop = self.index[item], self.index[item + 1]
        pmt = self.hit_pmt[start:stop].astype(np.int64)
        time_, charge = self.hit_time[start:stop], self.hit_charge[start:stop]
        if self.representation == "mpmt_image":
            module, channel = pmt // PPM, pmt % PPM
            rows, cols = self.mpmt_positions[module, 0], self.mpmt_positions[module, 1]
            data = np.zeros((2 * PPM, self.height, self.width), dtype=np.float32)
            data[channel, rows, cols] = charge
            data[channel + PPM, rows, cols] = time_
        else:
            n = min(N_POINTS, len(pmt))
            data = np.zeros((8, N_POINTS), dtype=np.float32)
            data[:3, :n] = self.position[pmt[:n]].T
            data[3:6, :n] = self.orientation[pmt[:n]].T
            data[6, :n] = time_[:n]
            data[7, :n] = charge[:n]
        return {
            "data": torch.from_numpy(data),
            "labels": int(self.labels[item]),
            "energies": torch.from_numpy(self.energies[item]),
            "positions": torch.from_numpy(self.positions[item]),
            "angles": torch.from_numpy(self.angles[item]),
            "indices": item,
        }


def fixed_batches(n: int, batch: int, samples: int) -> list[IndexBatch]:
    sampler = ResumableDistributedBatchSampler(n, num_replicas=1, rank=0, batch_size=batch, shuffle=True, seed=1)
    out: list[IndexBatch] = []
    for b in sampler:
        out.append(b)
        if len(out) * batch >= samples:
            break
    return out


def consume(batches: Iterable[Any]) -> int:
    return sum(len(b["x"] if "x" in b else b["data"]) for b in batches)


def data_config(workers: int, mode: str = "auto") -> DataConfig:
    cfg = DataConfig(num_workers=workers, persistent_workers=True, prefetch_factor=4, start_method="fork")
    cfg.worker_mode = mode  # type: ignore[assignment]
    return cfg


def samples_per_s(run: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - t0)


def measure(
    hits: Path,
    converted: Path,
    geometry: Path,
    representation: str,
    batch: int,
    samples: int,
    repeats: int,
    builder: str = "auto",
) -> dict[str, float]:
    """Events/s of each reader (best of ``repeats``); readers take turns so load bursts hit them alike."""
    spec = HitSpec(geometry_file=str(geometry), representation=representation, n_points=N_POINTS, builder=builder)
    with h5py.File(hits, "r") as f:
        n = len(f["event_hits_index"])
    batches = fixed_batches(n, batch, samples)
    rows = np.arange(n)
    split = H5Split(hits, rows, extra_keys=["energies", "positions", "angles"], hits=spec)
    conv = H5Split(converted, rows, extra_keys=["energies", "positions", "angles"])
    loaders = {
        "dtrain-w0": make_loader(split, batches, data_config(0), train=False, device_type="cpu"),
        "dtrain-w2": make_loader(split, batches, data_config(2), train=False, device_type="cpu"),
        "dtrain-p2": make_loader(split, batches, data_config(2, "process"), train=False, device_type="cpu"),
        "conv-w0": make_loader(conv, batches, data_config(0), train=False, device_type="cpu"),
        "conv-w2": make_loader(conv, batches, data_config(2), train=False, device_type="cpu"),
    }
    order = [i for b in batches for i in b]
    loaders["per-event-w2"] = DataLoader(
        PerEventHits(hits, geometry, representation),
        batch_size=batch,
        sampler=order,
        num_workers=2,
        persistent_workers=True,
        prefetch_factor=4,
        multiprocessing_context="fork",
    )
    # Same samples from the hit-list file and from the converted file (a check, not timed).
    first_hits, first_conv = next(iter(loaders["dtrain-w0"])), next(iter(loaders["conv-w0"]))
    assert torch.equal(first_hits["x"], first_conv["x"]), "hits and converted samples differ"
    for loader in loaders.values():
        consume(loader)  # warm up: buffers, worker start, files opened in the workers (not timed)
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(repeats):
        for name, loader in loaders.items():
            rates[name].append(samples_per_s(lambda loader=loader: consume(loader)))
    best = {name: max(v) for name, v in rates.items()}
    # CPU time per event of the in-process readers (time.process_time: what a pass costs whatever
    # the machine's load; the per-event reader through a 0-worker DataLoader, same collate).
    inline = DataLoader(PerEventHits(hits, geometry, representation), batch_size=batch, sampler=order, num_workers=0)
    for name, loader in (
        ("dtrain-w0", loaders["dtrain-w0"]),
        ("conv-w0", loaders["conv-w0"]),
        ("per-event-w0", inline),
    ):
        t0 = time.process_time()
        events = consume(loader)
        best[f"cpu-us/{name}"] = 1e6 * (time.process_time() - t0) / events
    # Ratios paired per round (the same load conditions), median kept.
    for a, b in (
        ("dtrain-w0", "per-event-w2"),
        ("dtrain-w2", "per-event-w2"),
        ("dtrain-w0", "conv-w0"),
        ("dtrain-w2", "conv-w2"),
    ):
        paired = sorted(x / y for x, y in zip(rates[a], rates[b], strict=True))
        best[f"{a}/{b}"] = paired[len(paired) // 2]
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller files and fewer events (a few minutes)")
    ap.add_argument("--dir", type=Path, default=BENCH_DIR, help="scratch directory for the test files (removed after)")
    ap.add_argument("--batch", type=int, default=256, help="events per batch")
    ap.add_argument(
        "--builder",
        choices=["auto", "numba", "numpy"],
        default="auto",
        help="dtrain's hit-list builder (auto: numba when it imports)",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    events = 3_000 if args.quick else 12_000
    samples = 1_536 if args.quick else 6_144
    repeats = 3 if args.quick else 5
    print(machine_summary())
    print(f"dtrain hit-list builder: {builder_kind(args.builder)} (--builder {args.builder})")
    args.dir.mkdir(parents=True, exist_ok=True)
    results: list[str] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        geometry = Path(tmp) / "geometry.npz"
        geo = demo_geometry()
        np.savez(
            geometry,
            mpmt_image_positions=geo["mpmt_image_positions"],
            position=geo["position"],
            orientation=geo["orientation"],
        )
        # The realistic occupancy (the RESULT lines), then a low one for information: where
        # per-event Python overhead, not per-hit work, dominates the per-event reader.
        for occupancy in OCCUPANCIES:
            hits = write_hit_file(Path(tmp) / "hits.h5", events, geo, occupancy)
            print(
                f"\nhit-list file: {events} events of {occupancy[0]}-{occupancy[1]} hits, "
                f"{os.path.getsize(hits) / 1e6:.0f} MB, {len(geo['mpmt_image_positions'])} modules, "
                f"{len(geo['position'])} PMTs; batch {args.batch}, {samples} events per pass, best of {repeats} "
                "(events/s); ratios: median of per-round ratios"
            )
            print(
                f"  {'representation':>14}  {'dtrain-w0':>10}  {'dtrain-w2':>10}  {'dtrain-p2':>10}  {'per-event':>10}  "
                f"{'conv-w0':>10}  {'conv-w2':>10}  w0/pe  w2/pe  w0/cv  w2/cv  load"
            )
            for representation, short in (("mpmt_image", "image"), ("point_cloud", "cloud")):
                converted = Path(tmp) / f"{short}.h5"
                spec = HitSpec(geometry_file=str(geometry), representation=representation, n_points=N_POINTS)
                convert_hits(hits, converted, spec, progress=False)
                r = measure(hits, converted, geometry, representation, args.batch, samples, repeats, args.builder)
                print(
                    f"  {representation:>14}  {r['dtrain-w0']:>10.0f}  {r['dtrain-w2']:>10.0f}  {r['dtrain-p2']:>10.0f}  "
                    f"{r['per-event-w2']:>10.0f}  {r['conv-w0']:>10.0f}  {r['conv-w2']:>10.0f}  "
                    f"{r['dtrain-w0/per-event-w2']:5.1f}  {r['dtrain-w2/per-event-w2']:5.1f}  "
                    f"{r['dtrain-w0/conv-w0']:5.2f}  {r['dtrain-w2/conv-w2']:5.2f}  {os.getloadavg()[0]:.1f}"
                )
                print(
                    f"  {'':>14}  CPU per event: dtrain {r['cpu-us/dtrain-w0']:.1f} us, per-event reader "
                    f"{r['cpu-us/per-event-w0']:.1f} us, converted read {r['cpu-us/conv-w0']:.1f} us"
                )
                converted.unlink()
                if occupancy != OCCUPANCIES[0]:
                    continue
                for workers in ("w0", "w2"):
                    results.append(
                        result_line(
                            f"hits_{short}_dtrain_{workers}_vs_per_event",
                            r[f"dtrain-{workers}/per-event-w2"],
                            ">=",
                            10.0,
                            fmt=".2f",
                        )
                    )
                    results.append(
                        result_line(
                            f"hits_{short}_dtrain_{workers}_vs_converted",
                            r[f"dtrain-{workers}/conv-{workers}"],
                            ">=",
                            0.5,
                            fmt=".2f",
                        )
                    )
            hits.unlink()
    print(f"load average at end: {load_average()}")
    print("\n".join(results))


if __name__ == "__main__":
    main()
