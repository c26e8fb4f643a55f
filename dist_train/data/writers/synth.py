"""Demo datasets with learnable structure (torch-free): ``wch5``, ``image`` and ``hits`` layouts.

``hits`` (a hit-list file and its geometry) lives in :mod:`dist_train.data.writers.synth_hits`.

``wch5`` reproduces the keys, dtypes and storage of the water-Cherenkov files: ``event_data``
(N, 16, 40, 38) float32 contiguous, ``labels`` (N,) int64 stored in class blocks (all 0s, then
1s, then 2s, like the real files), ``energies`` (N, 1), ``positions`` (N, 1, 3) and ``angles``
(N, 2) float32. Each event is a Cherenkov-like ring with a random centre; the classes differ in
ring radius and sharpness (muon-like rings are sharp and small, the two shower-like classes are
fuzzy and differ only slightly) and in their charge profile across the 16 channels, with
per-event jitter and noise, so a small MLP learns it well above chance but not perfectly.
The regression targets follow the event, with noise: the total charge grows with the energy, the
vertex's x/y move the ring's centre and its z the ring's size, and the direction (zenith,
azimuth) follows the centre's offset from the middle of the image. ``wch5_channels_last``
is the same with the axes of the physics files: a 16×40 grid of multi-PMT modules with 38
channels last, (N, 16, 40, 38) = (H, W, C).

``image`` writes (N, C, H, W) float32 images (default 1×28×28, 10 classes): each class is a
fixed arrangement of blobs, shifted by a few pixels per sample, plus noise.

Files are written in bounded-memory blocks to a temporary file and published by
:func:`dist_train.fsutil.atomic_replace` when complete, so a concurrent reader (or a crash) never
sees a half-written file, and a failed write leaves the previous file as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np

from dist_train.data.writers.progress import progress_bar
from dist_train.data.writers.synth_hits import write_hits_demo
from dist_train.errors import DataError
from dist_train.fsutil import atomic_replace

WCH5_SHAPE = (16, 40, 38)
WCH5_CLASSES = 3
IMAGE_SHAPE = (1, 28, 28)
IMAGE_CLASSES = 10
LAYOUTS = ("wch5", "wch5_channels_last", "image", "hits")
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
    beside it), see :mod:`dist_train.data.writers.synth_hits`; ``shape`` is then the pixel grid H, W.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown synthetic layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    if events < 1:
        raise DataError(f"a synthetic dataset needs at least 1 event, got {events}.")
    if layout == "hits":
        grid = (int(shape[-2]), int(shape[-1])) if shape else None
        write_hits_demo(
            Path(path),
            events=events,
            seed=seed,
            classes=int(num_classes or WCH5_CLASSES),
            grid=grid,
            hits_per_event=hits_per_event,
            geometry_path=geometry_path,
            progress=progress,
        )
        return Path(path)
    wch5 = layout.startswith("wch5")
    default_shape, default_classes = (WCH5_SHAPE, WCH5_CLASSES) if wch5 else (IMAGE_SHAPE, IMAGE_CLASSES)
    shape = tuple(int(s) for s in (shape or default_shape))
    classes = int(num_classes or default_classes)
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"synthetic shape must be C,H,W with positive sizes, got {shape}.")
    if classes < 2:
        raise DataError(f"a synthetic dataset needs at least 2 classes, got {classes}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path, mode=0o644) as tmp:
        if wch5:
            _write_wch5(tmp, events, seed, shape, classes, progress, channels_last=layout == "wch5_channels_last")
        else:
            _write_image(tmp, events, seed, shape, classes, progress)
    return path


def _write_blocks(
    path: Path,
    events: int,
    shape: tuple[int, ...],
    labels: np.ndarray,
    make_block: Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]],
    seed: int,
    desc: str,
    progress: bool | None,
) -> None:
    """``make_block`` gives a block's samples and its per-event targets (one dataset each)."""
    row_bytes = int(np.prod(shape)) * 4
    block = max(1, _BLOCK_BYTES // row_bytes)
    with h5py.File(path, "w", locking=False) as f:
        x = f.create_dataset("event_data", shape=(events, *shape), dtype="float32")  # contiguous
        f.create_dataset("labels", data=labels)
        with progress_bar(events, desc, progress) as bar:
            for i, lo in enumerate(range(0, events, block)):
                hi = min(events, lo + block)
                rng = np.random.default_rng([seed, i])  # per block: the output does not depend on the block size
                xb, targets = make_block(rng, labels[lo:hi])
                x[lo:hi] = xb
                for key, values in targets.items():
                    if key not in f:
                        f.create_dataset(key, shape=(events, *values.shape[1:]), dtype="float32")
                    f[key][lo:hi] = values
                bar.update(hi - lo)
        f.attrs["dtrain_synthetic"] = desc


def _class_blocks(events: int, classes: int) -> np.ndarray:
    return (np.arange(events, dtype=np.int64) * classes // events).astype(np.int64)


def _write_wch5(
    path: Path,
    events: int,
    seed: int,
    shape: tuple[int, ...],
    classes: int,
    progress: bool | None,
    *,
    channels_last: bool = False,
) -> None:
    # Channels last: the file's (H, W, C); the event is drawn channels-first and transposed per block.
    h, w, c = shape if channels_last else (shape[1], shape[2], shape[0])
    scale = min(h, w) / 40.0
    class_rng = np.random.default_rng(12345)  # class properties are fixed, not per file
    base_radius = np.linspace(0.24, 0.17, classes) * min(h, w)
    base_radius[: min(2, classes)] = [0.24 * min(h, w), 0.225 * min(h, w)][: min(2, classes)]
    width = np.linspace(2.2, 0.9, classes) * scale
    profiles = 1.0 + 0.25 * class_rng.standard_normal((classes, c))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    def make_block(rng: np.random.Generator, labels: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(labels)
        energy = rng.uniform(50.0, 1000.0, n).astype(np.float32)
        cy = rng.uniform(0.3 * h, 0.7 * h, n).astype(np.float32)
        cx = rng.uniform(0.3 * w, 0.7 * w, n).astype(np.float32)
        vertex_z = rng.uniform(-1.0, 1.0, n).astype(np.float32)  # the farther from the wall, the bigger the ring
        radius = base_radius[labels] * (1.0 + 0.25 * vertex_z) + 1.5 * scale * rng.standard_normal(n)
        radius = radius.clip(1.0).astype(np.float32)
        sharp = width[labels].astype(np.float32) * rng.uniform(0.8, 1.25, n).astype(np.float32)
        dist = np.sqrt((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
        ring = np.exp(-0.5 * ((dist - radius[:, None, None]) / sharp[:, None, None]) ** 2)
        ring *= (energy / (radius * sharp * 40.0))[:, None, None]
        gains = profiles[labels] * (1.0 + 0.5 * rng.standard_normal((n, c)))
        # Each event's channel gains average to 1: the total charge follows the energy (a learnable
        # regression target) while the channel profile still tells the classes apart.
        gains /= np.clip(gains.mean(axis=1, keepdims=True), 0.3, None)
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        x *= 0.3
        x += ring[:, None] * gains[:, :, None, None].astype(np.float32)
        if channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return x, {"energies": energy[:, None], **_vertex_and_direction(rng, cy / h, cx / w, vertex_z)}

    labels = _class_blocks(events, classes)
    desc = "wch5_channels_last" if channels_last else "wch5"
    _write_blocks(path, events, shape, labels, make_block, seed, desc, progress)


def _vertex_and_direction(
    rng: np.random.Generator, fy: np.ndarray, fx: np.ndarray, vertex_z: np.ndarray
) -> dict[str, np.ndarray]:
    """Targets that follow the ring: ``fy``/``fx`` its centre as fractions of the image, with noise."""
    n = len(fy)
    noise = rng.standard_normal((n, 5)).astype(np.float32)
    # Positions in metres in a 4 m detector: x/y from the ring centre, z from the ring size.
    positions = np.stack(
        (
            4.0 * (fx - 0.5) + 0.05 * noise[:, 0],
            4.0 * (fy - 0.5) + 0.05 * noise[:, 1],
            1.5 * vertex_z + 0.05 * noise[:, 2],
        ),
        axis=1,
    )
    # Zenith in [0.5, 2.6] rad from the centre's height, azimuth in [-pi, pi] from its column.
    zenith = 0.5 + 2.1 * (fy - 0.3) / 0.4 + 0.05 * noise[:, 3]
    azimuth = np.pi * (2.0 * (fx - 0.3) / 0.4 - 1.0) + 0.05 * noise[:, 4]
    angles = np.stack((zenith, azimuth), axis=1)
    return {"positions": positions[:, None, :].astype(np.float32), "angles": angles.astype(np.float32)}


def _write_image(
    path: Path, events: int, seed: int, shape: tuple[int, ...], classes: int, progress: bool | None
) -> None:
    c, h, w = shape
    class_rng = np.random.default_rng(54321)
    blobs = 3
    centres = class_rng.uniform(0.25, 0.75, (classes, blobs, 2)) * np.array([h, w])
    sigma = max(1.0, min(h, w) / 14.0)
    gains = 1.0 + 0.3 * class_rng.standard_normal((classes, c))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = np.random.default_rng([seed, 999]).integers(0, classes, events).astype(np.int64)

    def make_block(rng: np.random.Generator, lab: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        n = len(lab)
        shift = rng.uniform(-0.15, 0.15, (n, 1, 2)) * np.array([h, w])
        pos = (centres[lab] + shift).astype(np.float32)  # (n, blobs, 2)
        d2 = (yy[None, None] - pos[..., 0, None, None]) ** 2 + (xx[None, None] - pos[..., 1, None, None]) ** 2
        img = np.exp(-d2 / (2 * sigma**2)).sum(axis=1)  # (n, h, w)
        x = rng.standard_normal((n, c, h, w), dtype=np.float32)
        x *= 0.6
        x += img[:, None] * gains[lab][:, :, None, None].astype(np.float32)
        return x, {}

    _write_blocks(path, events, shape, labels, make_block, seed, "image", progress)
