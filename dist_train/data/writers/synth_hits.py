"""A demo hit-list file and its geometry (torch-free): ``dtrain data synth OUT.h5 --layout hits``.

The detector is a water cylinder whose wall is tiled with multi-PMT modules of 19 PMTs; unrolled,
the modules sit on an H x W pixel grid (default 16 x 40, corners left empty: 616 modules, 11,704
PMTs), numbered in a shuffled order as real module ids are. Each event is a particle from a
vertex inside the tank in some direction: PMTs near its Cherenkov cone (42 degrees) are likely to
fire, plus a dark-noise floor. The classes (stored in class blocks, as in the real files: all 0s,
then 1s, then 2s) differ in how sharp and how full the ring is (gamma-like fuzzy, electron-like
slightly sharper, muon-like sharp with a filled centre), so an image or point-cloud network learns
them well above chance but not perfectly. The number of hits grows with the energy, the times
with the distance from the vertex, so ``energies``, ``positions`` and ``angles`` can be regressed.

Written keys: ``event_hits_index`` (N,) int64, ``hit_pmt`` int32, ``hit_time`` and ``hit_charge``
float32 (all contiguous: the memory-map path), ``labels`` (N,) int32, ``energies`` (N, 1),
``positions`` (N, 1, 3), ``angles`` (N, 2) (polar angle, azimuth) float32, ``event_ids`` (N,) int32.
The geometry ``.npz`` has ``mpmt_image_positions`` (M, 2), ``position`` and ``orientation`` (P, 3).
Both files are written to temporary files and published by :func:`dist_train.fsutil.atomic_replace`
when both are complete.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from dist_train.data.writers.progress import progress_bar
from dist_train.errors import DataError
from dist_train.fsutil import atomic_replace

GRID = (16, 40)
PMTS_PER_MODULE = 19
RADIUS = 320.0  # cm
HALF_HEIGHT = 260.0
CHERENKOV = np.deg2rad(42.0)
LIGHT_SPEED = 22.5  # cm/ns in water
_BLOCK_EVENTS = 64


def geometry_path_for(path: Path) -> Path:
    """Where ``dtrain data synth OUT.h5 --layout hits`` writes the geometry: ``OUT_geometry.npz``."""
    return path.with_name(f"{path.stem}_geometry.npz")


def demo_geometry(grid: tuple[int, int] = GRID) -> dict[str, np.ndarray]:
    """Modules on the unrolled cylinder wall (corners empty), 19 PMTs each in a small hexagon."""
    h, w = grid
    rr, cc = np.mgrid[0:h, 0:w]
    corner = (np.minimum(rr, h - 1 - rr) < max(1, h // 8)) & (np.minimum(cc, w - 1 - cc) < max(1, w // 13))
    pixels = np.stack([rr[~corner], cc[~corner]], axis=1)
    pixels = pixels[np.random.default_rng(2024).permutation(len(pixels))]  # module ids are not raster order
    phi = 2 * np.pi * (pixels[:, 1] + 0.5) / w
    z = (pixels[:, 0] + 0.5 - h / 2) * (2 * HALF_HEIGHT / h)
    centre = np.stack([RADIUS * np.cos(phi), RADIUS * np.sin(phi), z], axis=1)
    inward = np.stack([-np.cos(phi), -np.sin(phi), np.zeros_like(phi)], axis=1)
    along = np.stack([-np.sin(phi), np.cos(phi), np.zeros_like(phi)], axis=1)  # tangent, around the wall
    up = np.array([0.0, 0.0, 1.0])
    ring = [(0.0, 0.0)] + [(1.0, a) for a in np.arange(6) * np.pi / 3] + [(2.0, a) for a in np.arange(12) * np.pi / 6]
    offsets = np.array([(r * np.cos(a), r * np.sin(a)) for r, a in ring])  # (19, 2), units of 5 cm
    pos = centre[:, None] + 5.0 * (offsets[None, :, :1] * along[:, None] + offsets[None, :, 1:] * up)
    tilt = 0.08 * (offsets[None, :, :1] * along[:, None] + offsets[None, :, 1:] * up)
    orient = inward[:, None] - tilt
    orient /= np.linalg.norm(orient, axis=-1, keepdims=True)
    return {
        "mpmt_image_positions": pixels.astype(np.int32),
        "position": pos.reshape(-1, 3).astype(np.float32),
        "orientation": orient.reshape(-1, 3).astype(np.float32),
    }


def _event_params(
    rng: np.random.Generator, labels: np.ndarray, hits_per_event: int, pmts: int
) -> dict[str, np.ndarray]:
    n = len(labels)
    energy = rng.uniform(100.0, 1000.0, n)
    r = 0.75 * RADIUS * np.sqrt(rng.uniform(0, 1, n))
    a = rng.uniform(0, 2 * np.pi, n)
    vertex = np.stack([r * np.cos(a), r * np.sin(a), rng.uniform(-0.75, 0.75, n) * HALF_HEIGHT], axis=1)
    theta = np.arccos(rng.uniform(-0.6, 0.6, n))  # mostly towards the barrel
    phi = rng.uniform(-np.pi, np.pi, n)
    counts = np.minimum(rng.poisson(hits_per_event * energy / 550.0), pmts)
    counts[rng.uniform(0, 1, n) < 0.005] = 0  # a few empty events, as real files have
    # About 1% of the hits fire their PMT a second time, later (an afterpulse): real files have
    # such repeats, and the readers' rule for them (charges add, earliest time) must be exercised.
    repeats = rng.binomial(counts, 0.01)
    return {
        "energy": energy,
        "vertex": vertex,
        "theta": theta,
        "phi": phi,
        "pmts_hit": counts.astype(np.int64),
        "repeats": repeats.astype(np.int64),
        "counts": (counts + repeats).astype(np.int64),
    }


def _block_hits(
    rng: np.random.Generator, geo: dict[str, np.ndarray], labels: np.ndarray, p: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hits of a block of events, concatenated in event order (a PMT may fire twice)."""
    classes = int(labels.max()) + 1 if len(labels) else 1
    width = np.array([0.22, 0.16, 0.07, 0.12, 0.1][: max(classes, 3)])[labels]  # ring sharpness (rad)
    filled = np.array([0.0, 0.05, 0.35, 0.2, 0.1][: max(classes, 3)])[labels]  # share of light inside the ring
    pmt_pos = geo["position"].astype(np.float64)
    direction = np.stack(
        [np.sin(p["theta"]) * np.cos(p["phi"]), np.sin(p["theta"]) * np.sin(p["phi"]), np.cos(p["theta"])], axis=1
    )
    to_pmt = pmt_pos[None] - p["vertex"][:, None]  # (B, P, 3)
    dist = np.linalg.norm(to_pmt, axis=-1)
    cos_angle = np.einsum("bpk,bk->bp", to_pmt, direction) / dist
    angle = np.arccos(np.clip(cos_angle, -1.0, 1.0))
    ring = np.exp(-0.5 * ((angle - CHERENKOV) / width[:, None]) ** 2)
    inside = filled[:, None] * (angle < CHERENKOV)
    weight = (ring + inside) * (200.0 / dist) ** 2 + 0.01  # + dark noise
    # Each event's PMTs drawn without replacement with these weights (Gumbel top-k: sort the
    # perturbed log-weights and keep the first `count` of each row).
    keys = np.log(weight) + rng.gumbel(size=weight.shape)
    order = np.argsort(-keys, axis=1)
    counts = p["pmts_hit"]
    chosen = np.arange(weight.shape[1])[None] < counts[:, None]
    pmt = order[chosen]  # row by row: the events' hits in event order
    event = np.repeat(np.arange(len(labels)), counts)
    time = dist[event, pmt] / LIGHT_SPEED + rng.normal(0.0, 1.2, len(pmt)) + 3.0 * (labels[event] == 2)
    charge = rng.exponential(1.0, len(pmt)) * (0.6 + p["energy"][event] / 1000.0)
    # The first `repeats` hits of each event fire again, 20-200 ns later, right after the first hit.
    rank = np.arange(len(pmt)) - np.repeat(np.cumsum(counts) - counts, counts)
    again = rank < p["repeats"][event]
    late = time[again] + rng.uniform(20.0, 200.0, int(again.sum()))
    insert_at = np.flatnonzero(again) + 1
    pmt = np.insert(pmt, insert_at, pmt[again])
    time = np.insert(time, insert_at, late)
    charge = np.insert(charge, insert_at, 0.3 * charge[again])
    return pmt.astype(np.int32), time.astype(np.float32), charge.astype(np.float32)


def write_hits_demo(
    path: Path,
    *,
    events: int,
    seed: int = 0,
    classes: int = 3,
    grid: tuple[int, int] | None = None,
    hits_per_event: int = 800,
    geometry_path: Path | None = None,
    progress: bool | None = None,
) -> tuple[Path, Path]:
    """Write the demo hit-list file and its geometry; returns both paths."""
    if classes < 2 or classes > 5:
        raise DataError(f"the hit-list demo has 2 to 5 classes, got {classes}.")
    if hits_per_event < 1:
        raise DataError(f"--hits-per-event must be at least 1, got {hits_per_event}.")
    h, w = (int(g) for g in (grid or GRID))
    if min(h, w) < 3:
        raise DataError(f"the hit-list demo grid must be H,W of at least 3 each, got {(h, w)}.")
    geometry_path = Path(geometry_path) if geometry_path is not None else geometry_path_for(Path(path))
    geo = demo_geometry((h, w))
    labels = (np.arange(events, dtype=np.int64) * classes // events).astype(np.int32)
    blocks = [(lo, min(events, lo + _BLOCK_EVENTS)) for lo in range(0, events, _BLOCK_EVENTS)]
    # Pass 1: every event's parameters (and so the total number of hits) from per-block streams,
    # so the hit arrays can be created contiguous at their final size before pass 2 fills them.
    pmts = len(geo["position"])
    params = [
        _event_params(np.random.default_rng([seed, i, 0]), labels[lo:hi], hits_per_event, pmts)
        for i, (lo, hi) in enumerate(blocks)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    geometry_path.parent.mkdir(parents=True, exist_ok=True)
    # Both written in full before either is published; the geometry goes first (the inner block ends
    # first), so a reader that finds the new hit-list file finds its geometry too.
    with atomic_replace(path, mode=0o644) as tmp, atomic_replace(geometry_path, mode=0o644) as geo_tmp:
        _write_hit_file(
            tmp, geo, labels, blocks, params, seed=seed, progress=progress, geometry_name=geometry_path.name
        )
        _write_geometry(geo_tmp, geo)
    return path, geometry_path


def _write_hit_file(
    path: Path,
    geo: dict[str, np.ndarray],
    labels: np.ndarray,
    blocks: list[tuple[int, int]],
    params: list[dict[str, np.ndarray]],
    *,
    seed: int,
    progress: bool | None,
    geometry_name: str,
) -> None:
    """Pass 2: the hit arrays, created contiguous at their final size, filled block by block."""
    events = len(labels)
    counts = np.concatenate([p["counts"] for p in params])
    index = np.cumsum(counts) - counts
    total = int(counts.sum())
    with h5py.File(path, "w", locking=False) as f:
        f.create_dataset("event_hits_index", data=index.astype(np.int64))
        pmt_d = f.create_dataset("hit_pmt", shape=(total,), dtype="int32")
        time_d = f.create_dataset("hit_time", shape=(total,), dtype="float32")
        charge_d = f.create_dataset("hit_charge", shape=(total,), dtype="float32")
        with progress_bar(events, "hits", progress) as bar:
            for i, ((lo, hi), p) in enumerate(zip(blocks, params, strict=True)):
                pmt, time, charge = _block_hits(np.random.default_rng([seed, i, 1]), geo, labels[lo:hi], p)
                a = int(index[lo])
                pmt_d[a : a + len(pmt)] = pmt
                time_d[a : a + len(pmt)] = time
                charge_d[a : a + len(pmt)] = charge
                bar.update(hi - lo)
        f.create_dataset("labels", data=labels)
        f.create_dataset("energies", data=np.concatenate([p["energy"] for p in params])[:, None].astype(np.float32))
        f.create_dataset("positions", data=np.concatenate([p["vertex"] for p in params])[:, None].astype(np.float32))
        angles = np.stack(
            [np.concatenate([p["theta"] for p in params]), np.concatenate([p["phi"] for p in params])], axis=1
        )
        f.create_dataset("angles", data=angles.astype(np.float32))
        f.create_dataset("event_ids", data=np.arange(events, dtype=np.int32))
        f.attrs["dtrain_synthetic"] = "hits"
        f.attrs["geometry_file"] = geometry_name


def _write_geometry(path: Path, geo: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:  # a file object: np.savez would append ".npz" to a name without it
        np.savez(
            fh,
            mpmt_image_positions=geo["mpmt_image_positions"],
            position=geo["position"],
            orientation=geo["orientation"],
        )
