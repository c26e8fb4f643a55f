"""Hit-list test files and the naive per-event, per-hit reference builders the batched ones must equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

Event = tuple[np.ndarray, np.ndarray, np.ndarray]  # (pmt, time, charge) of one event, in file order


def random_geometry(
    rng: np.random.Generator, *, modules: int, height: int, width: int, pmts_per_module: int
) -> dict[str, np.ndarray]:
    """Modules on distinct random pixels (not every pixel used), random PMT positions and orientations."""
    # The last pixel is always used, so the image spans the whole grid.
    pixels = np.append(rng.choice(height * width - 1, size=modules - 1, replace=False), height * width - 1)
    positions = np.stack([pixels // width, pixels % width], axis=1).astype(np.int32)
    pmts = modules * pmts_per_module
    return {
        "mpmt_image_positions": positions,
        "position": rng.uniform(-300, 300, (pmts, 3)).astype(np.float32),
        "orientation": rng.standard_normal((pmts, 3)).astype(np.float32),
    }


def random_events(
    rng: np.random.Generator, n_events: int, num_pmts: int, *, max_hits: int, empty_every: int = 5
) -> list[Event]:
    """Events with repeated PMTs, equal times (rounded), -0.0 and +0.0 times, and empty events."""
    events = []
    for i in range(n_events):
        n = 0 if i % empty_every == 1 else int(rng.integers(1, max_hits + 1))
        pmt = rng.integers(0, num_pmts, n).astype(np.int32)
        time = np.round(rng.uniform(-5, 20, n), 0).astype(np.float32)  # many ties
        if n > 2:
            time[0], time[1] = np.float32(-0.0), np.float32(0.0)
        charge = rng.exponential(2.0, n).astype(np.float32)
        events.append((pmt, time, charge))
    return events


def write_hit_file(
    path: Path,
    events: list[Event],
    *,
    labels: np.ndarray | None = None,
    chunked: bool = False,
    keys: dict[str, str] | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    k = {"index": "event_hits_index", "pmt": "hit_pmt", "time": "hit_time", "charge": "hit_charge", **(keys or {})}
    counts = np.array([len(e[0]) for e in events], dtype=np.int64)
    index = np.cumsum(counts) - counts
    cat = [np.concatenate([e[i] for e in events]) if events else np.zeros(0) for i in range(3)]
    n = len(events)
    if labels is None:
        labels = (np.arange(n) % 3).astype(np.int32)
    opts: dict[str, Any] = {"chunks": (37,), "compression": "gzip"} if chunked else {}
    with h5py.File(path, "w") as f:
        f.create_dataset(k["index"], data=index)
        f.create_dataset(k["pmt"], data=cat[0].astype(np.int32), **opts)
        f.create_dataset(k["time"], data=cat[1].astype(np.float32), **opts)
        f.create_dataset(k["charge"], data=cat[2].astype(np.float32), **opts)
        f.create_dataset("labels", data=labels)
        f.create_dataset("energies", data=np.arange(n, dtype=np.float32)[:, None] * 2)
        f.create_dataset("positions", data=np.arange(3 * n, dtype=np.float32).reshape(n, 1, 3))
        f.create_dataset("angles", data=np.arange(2 * n, dtype=np.float32).reshape(n, 2) / 7)
        for name, arr in (extra or {}).items():
            f.create_dataset(name, data=arr)
    return path


def write_geometry(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- references (one hit at a time)


def reference_image(
    event: Event, positions: np.ndarray, pmts_per_module: int, channels: tuple[str, ...] = ("charge", "time")
) -> np.ndarray:
    """The documented rules, one hit at a time: a PMT's charges add in file order, its time is the earliest.

    "Earliest" is ``np.minimum`` over the PMT's hits in file order, to the bit: a NaN time wins, and
    of equal times (-0.0, +0.0) the later hit's is kept.
    """
    pmt, time, charge = event
    height, width = int(positions[:, 0].max()) + 1, int(positions[:, 1].max()) + 1
    image = np.zeros((pmts_per_module * len(channels), height, width), dtype=np.float32)
    seen: set[int] = set()
    for p, t, q in zip(pmt.tolist(), time, charge, strict=True):
        module, channel = divmod(p, pmts_per_module)
        r, c = int(positions[module][0]), int(positions[module][1])
        if "charge" in channels:
            k = channels.index("charge") * pmts_per_module + channel
            image[k, r, c] = np.float32(image[k, r, c] + q)
        if "time" in channels:
            k = channels.index("time") * pmts_per_module + channel
            image[k, r, c] = t if p not in seen else np.minimum(image[k, r, c], t)
        seen.add(p)
    return image


def reference_cloud(
    event: Event,
    geometry: dict[str, np.ndarray],
    n_points: int,
    channels: tuple[str, ...] = ("position", "orientation", "time", "charge"),
) -> np.ndarray:
    """File order; more than n_points hits: the n_points earliest (equal times: earlier in the file; NaN: latest), in file order."""
    pmt, time, charge = event
    keep = list(range(len(pmt)))
    if len(keep) > n_points:

        def key(i: int) -> tuple[float, int]:
            return (float("inf") if np.isnan(time[i]) else float(time[i]), i)

        keep = sorted(sorted(keep, key=key)[:n_points])
    rows = []
    for i in keep:
        point: list[float] = []
        for name in channels:
            if name in ("position", "orientation"):
                point += geometry[name][pmt[i]].tolist()
            else:
                point.append(float(time[i] if name == "time" else charge[i]))
        rows.append(point)
    width = sum(3 if name in ("position", "orientation") else 1 for name in channels)
    cloud = np.zeros((width, n_points), dtype=np.float32)
    for j, point in enumerate(rows):
        cloud[:, j] = point
    return cloud


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to the bit (np.array_equal calls -0.0 and +0.0 equal and NaN unequal to itself)."""
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))
