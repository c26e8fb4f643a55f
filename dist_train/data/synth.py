"""Demo datasets with learnable structure (torch-free): ``wch5``, ``image`` and ``hits`` layouts.

``hits`` (a hit-list file and its geometry) lives in :mod:`dist_train.data.synth_hits`.

``wch5`` reproduces the keys, dtypes and storage of the water-Cherenkov files: ``event_data``
(N, 16, 40, 38) float32 contiguous, ``labels`` (N,) int64 stored in class blocks (all 0s, then
1s, then 2s, like the real files), ``energies`` (N, 1) float32. Each event is a Cherenkov-like
ring with a random centre; the classes differ in ring radius and sharpness (muon-like rings are
sharp and small, the two shower-like classes are fuzzy and differ only slightly) and in their
charge profile across the 16 channels, with per-event jitter and noise, so a small MLP learns
it well above chance but not perfectly.

``image`` writes (N, C, H, W) float32 images (default 1×28×28, 10 classes): each class is a
fixed arrangement of blobs, shifted by a few pixels per sample, plus noise.

Files are written in bounded-memory blocks to a temporary name and renamed when complete, so a
concurrent reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dist_train.errors import DataError

WCH5_SHAPE = (16, 40, 38)
WCH5_CLASSES = 3
IMAGE_SHAPE = (1, 28, 28)
IMAGE_CLASSES = 10
LAYOUTS = ("wch5", "image", "hits")
_BLOCK_BYTES = 32 << 20


def synth_dataset(
    path: Path,
    *,
    layout: str = "wch5",
    events: int,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    progress: bool | None = None,
    geometry_path: Path | None = None,
    hits_per_event: int = 800,
) -> Path:
    """Write a demo dataset to ``path`` (atomically) and return the path.

    ``hits``: a hit-list file plus its geometry at ``geometry_path`` (default ``<stem>_geometry.npz``
    beside it), see :mod:`dist_train.data.synth_hits`; ``shape`` is then the pixel grid H, W.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown synthetic layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if events < 1:
        raise DataError(f"a synthetic dataset needs at least 1 event, got {events}.")
    if layout == "hits":
        from dist_train.data.synth_hits import write_hits_demo

        grid = (int(shape[-2]), int(shape[-1])) if shape else None
        write_hits_demo(
            Path(path), events=events, seed=seed, classes=int(num_classes or WCH5_CLASSES), grid=grid,
            hits_per_event=hits_per_event, geometry_path=geometry_path, progress=progress,
        )
        return Path(path)
    default_shape, default_classes = (WCH5_SHAPE, WCH5_CLASSES) if layout == "wch5" else (IMAGE_SHAPE, IMAGE_CLASSES)
    shape = tuple(int(s) for s in (shape or default_shape))
    classes = int(num_classes or default_classes)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic shape must be C,H,W with positive sizes, got {shape}.")
    if classes < 2:
        raise DataError(f"a synthetic dataset needs at least 2 classes, got {classes}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if layout == "wch5":
            _write_wch5(Path(tmp), events, seed, shape, classes, progress)
        else:
            _write_image(Path(tmp), events, seed, shape, classes, progress)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _progress_bar(total: int, desc: str, progress: bool | None):  # type: ignore[no-untyped-def]
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="ev", disable=not enabled, leave=False)


def _write_blocks(
    path: Path,
    events: int,
    shape: tuple[int, ...],
    labels: np.ndarray,
    make_block: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray | None]],
    seed: int,
    desc: str,
    progress: bool | None,
    with_energies: bool,
) -> None:
    import h5py

    row_bytes = int(np.prod(shape)) * 4
    block = max(1, _BLOCK_BYTES // row_bytes)
    with h5py.File(path, "w", locking=False) as f:
        x = f.create_dataset("event_data", shape=(events, *shape), dtype="float32")  # contiguous
        f.create_dataset("labels", data=labels)
        e = f.create_dataset("energies", shape=(events, 1), dtype="float32") if with_energies else None
        with _progress_bar(events, desc, progress) as bar:
            for i, lo in enumerate(range(0, events, block)):
                hi = min(events, lo + block)
                rng = np.random.default_rng([seed, i])  # per block: the output does not depend on the block size
                xb, eb = make_block(rng, labels[lo:hi])
                x[lo:hi] = xb
                if e is not None and eb is not None:
                    e[lo:hi] = eb
                bar.update(hi - lo)
        f.attrs["dtrain_synthetic"] = desc


def _class_blocks(events: int, classes: int) -> np.ndarray:
    return (np.arange(events, dtype=np.int64) * classes // events).astype(np.int64)


def _write_wch5(path: Path, events: int, seed: int, shape: tuple[int, ...], classes: int, progress: bool | None) -> None:
    c, h, w = shape
    scale = min(h, w) / 40.0
    class_rng = np.random.default_rng(12345)  # class properties are fixed, not per file
    base_radius = np.linspace(0.24, 0.17, classes) * min(h, w)
    base_radius[: min(2, classes)] = [0.24 * min(h, w), 0.225 * min(h, w)][: min(2, classes)]
    width = np.linspace(2.2, 0.9, classes) * scale
    profiles = 1.0 + 0.25 * class_rng.standard_normal((classes, c))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def make_block(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(labels)
        energy = rng.uniform(50.0, 1000.0, n).astype(np.float32)
        cy = rng.uniform(0.3 * h, 0.7 * h, n).astype(np.float32)
        cx = rng.uniform(0.3 * w, 0.7 * w, n).astype(np.float32)
        radius = (base_radius[labels] + 1.5 * scale * rng.standard_normal(n)).clip(1.0).astype(np.float32)
        sharp = width[labels].astype(np.float32) * rng.uniform(0.8, 1.25, n).astype(np.float32)
        dist = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
        ring = np.exp(-0.5 * ((dist - radius[:, None, None]) / sharp[:, None, None]) ** 2)
        ring *= (energy / (radius * sharp * 40.0))[:, None, None]
        gains = profiles[labels] * (1.0 + 0.5 * rng.standard_normal((n, c)))
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        x *= 0.3
        x += ring[:, None] * gains[:, :, None, None].astype(np.float32)
        return x, energy[:, None]

    labels = _class_blocks(events, classes)
    _write_blocks(path, events, shape, labels, make_block, seed, "wch5", progress, with_energies=True)


def _write_image(path: Path, events: int, seed: int, shape: tuple[int, ...], classes: int, progress: bool | None) -> None:
    c, h, w = shape
    class_rng = np.random.default_rng(54321)
    blobs = 3
    centres = class_rng.uniform(0.25, 0.75, (classes, blobs, 2)) * np.array([h, w])
    sigma = max(1.0, min(h, w) / 14.0)
    gains = 1.0 + 0.3 * class_rng.standard_normal((classes, c))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.random.default_rng([seed, 999]).integers(0, classes, events).astype(np.int64)

    def make_block(rng: np.random.Generator, lab: np.ndarray) -> tuple[np.ndarray, None]:
        n = len(lab)
        shift = rng.uniform(-0.15, 0.15, (n, 1, 2)) * np.array([h, w])
        pos = (centres[lab] + shift).astype(np.float32)  # (n, blobs, 2)
        d2 = (yy[None, None] - pos[..., 0, None, None]) ** 2 + (xx[None, None] - pos[..., 1, None, None]) ** 2
        img = np.exp(-d2 / (2 * sigma**2)).sum(axis=1)  # (n, h, w)
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        x *= 0.6
        x += img[:, None] * gains[lab][:, :, None, None].astype(np.float32)
        return x, None

    _write_blocks(path, events, shape, labels, make_block, seed, "image", progress, with_energies=False)
