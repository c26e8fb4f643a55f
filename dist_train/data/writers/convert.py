"""Convert common array/image formats to a dtrain HDF5 file (torch-free, bounded memory).

Sources (picked from ``SRC``):

* ``data.npz``: the x and y arrays are found by name (``--x-key``/``--y-key`` if present in the
  archive, else the pairs x/y, X/y, images/labels, data/labels, event_data/labels,
  x_train/y_train); other arrays with one row per sample are copied as extra keys. Members are
  streamed out of the zip archive, never loaded whole.
* ``x.npy`` with ``--labels y.npy`` (or a ``labels.npy``/``y.npy`` beside it), memory-mapped.
* MNIST-style IDX files (``train-images-idx3-ubyte`` or ``.gz``): labels from ``--labels`` or the
  matching ``...labels-idx1-ubyte`` file; 3-D images get a channel axis: (N, 1, H, W).
* an ImageFolder tree (``root/<class>/<image>``): classes sorted by name as in torchvision; all
  images must have one size; stored as uint8 (N, C, H, W), class names in ``labels.attrs``.

The output is written to a temporary file and published by :func:`dist_train.fsutil.atomic_replace`
when complete (a failed conversion leaves the previous file). Datasets are contiguous
(memmap fast path) or, with ``compress``, chunked (~1 MiB chunks) with gzip and shuffle.
"""

from __future__ import annotations

import gzip
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import h5py
import numpy as np

from dist_train.data.writers.progress import progress_bar
from dist_train.errors import DataError
from dist_train.fsutil import atomic_replace

_BLOCK_BYTES = 32 << 20
_CHUNK_BYTES = 1 << 20
_NPZ_PAIRS = [
    ("x", "y"),
    ("X", "y"),
    ("images", "labels"),
    ("data", "labels"),
    ("event_data", "labels"),
    ("x_train", "y_train"),
]
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ArraySource:
    """Rows of an array read front to back in blocks."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]  # (lo, hi) -> rows lo:hi, called with increasing lo
    close: Callable[[], None] = lambda: None


def convert(
    src: Path,
    out: Path,
    *,
    x_key: str = "event_data",
    y_key: str = "labels",
    labels: Path | None = None,
    compress: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Convert ``src`` to ``out``; returns a summary (rows, sample shape, dtypes, source kind)."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"conversion source {str(src)!r} does not exist.")
    kind, x, y, extras, attrs = _open_source(src, x_key, y_key, labels)
    try:
        if y.shape[0] != x.shape[0]:
            raise DataError(
                f"{str(src)!r}: {x.shape[0]} samples but {y.shape[0]} labels; they must have the same length."
            )
        _write_h5(Path(out), x_key, x, y_key, y, extras, attrs, compress, progress)
    finally:
        for s in (x, y, *extras.values()):
            s.close()
    return {
        "source": kind,
        "rows": x.shape[0],
        "sample_shape": list(x.shape[1:]),
        "x_dtype": str(x.dtype),
        "out": str(out),
    }


def _open_source(
    src: Path, x_key: str, y_key: str, labels: Path | None
) -> tuple[str, ArraySource, ArraySource, dict[str, ArraySource], dict[str, str]]:
    if src.is_dir():
        x, y, classes = _imagefolder_sources(src)
        return "imagefolder", x, y, {}, {"classes": json.dumps(classes)}
    suffix = src.suffix.lower()
    if suffix == ".npz":
        x, y, extras = _npz_sources(src, x_key, y_key)
        return "npz", x, y, extras, {}
    if suffix == ".npy":
        label_path = labels or _sibling_labels(src, y_key)
        return "npy", _npy_source(src), _npy_source(label_path), {}, {}
    if _looks_like_idx(src):
        label_path = labels or _idx_label_path(src)
        x = _idx_source(src, add_channel=True)
        return "idx", x, _idx_source(label_path, add_channel=False), {}, {}
    raise DataError(
        f"{str(src)!r}: unknown source format. Give an .npz, an .npy (with --labels), an MNIST IDX file "
        "(optionally .gz) or an ImageFolder directory."
    )


# ----------------------------------------------------------------------------- .npy / .npz


def _npy_source(path: Path) -> ArraySource:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{str(path)!r} is not a readable .npy file: {exc}.") from None
    if arr.ndim == 0:
        raise DataError(f"{str(path)!r} holds a scalar, not an array of samples.")
    return ArraySource(tuple(arr.shape), arr.dtype, lambda lo, hi: np.asarray(arr[lo:hi]))


def _sibling_labels(x_path: Path, y_key: str) -> Path:
    for name in (f"{y_key}.npy", "labels.npy", "y.npy"):
        candidate = x_path.with_name(name)
        if candidate.is_file() and candidate != x_path:
            return candidate
    raise DataError(f"{str(x_path)!r}: no labels given; pass --labels y.npy (or put labels.npy beside it).")


def _npz_member_source(zf: zipfile.ZipFile, member: str) -> ArraySource:
    """Stream an .npy member of a zip archive: header first, then rows in order."""
    fh = zf.open(member)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh)
    if fortran and len(shape) > 1:
        fh.close()
        raise DataError(f"npz member {member!r} is Fortran-ordered; save it with np.ascontiguousarray first.")
    if dtype.hasobject:
        fh.close()
        raise DataError(f"npz member {member!r} holds Python objects; only numeric arrays can be converted.")
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    position = [0]

    def read(lo: int, hi: int) -> np.ndarray:
        if lo != position[0]:
            raise RuntimeError("npz members are streamed front to back")
        raw = fh.read((hi - lo) * row_bytes)
        position[0] = hi
        return np.frombuffer(raw, dtype=dtype).reshape((hi - lo, *shape[1:]))

    return ArraySource(tuple(shape), dtype, read, fh.close)


def _npz_sources(path: Path, x_key: str, y_key: str) -> tuple[ArraySource, ArraySource, dict[str, ArraySource]]:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{str(path)!r} is not a readable .npz archive: {exc}.") from None
    names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    pair = next(((a, b) for a, b in [(x_key, y_key), *_NPZ_PAIRS] if a in names and b in names), None)
    if pair is None:
        raise DataError(
            f"{str(path)!r} has arrays {names}; none match an x/labels pair. Pass --x-key and --y-key with "
            "the names of the sample and label arrays."
        )
    x = _npz_member_source(zf, pair[0] + ".npy")
    y = _npz_member_source(zf, pair[1] + ".npy")
    extras = {}
    for name in names:
        if name in pair:
            continue
        src = _npz_member_source(zf, name + ".npy")
        if src.shape and src.shape[0] == x.shape[0] and src.dtype.kind in "biuf":
            extras[name] = src
        else:
            src.close()
    return x, y, extras


# ----------------------------------------------------------------------------- IDX (MNIST)


def _open_maybe_gzip(path: Path) -> IO[bytes]:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return cast(IO[bytes], gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb"))  # noqa: SIM115


def _looks_like_idx(path: Path) -> bool:
    try:
        with _open_maybe_gzip(path) as fh:
            head = fh.read(4)
    except (OSError, EOFError):
        return False
    return len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in _IDX_DTYPES and 1 <= head[3] <= 4


def _idx_label_path(images: Path) -> Path:
    name = images.name
    for a, b in (("images-idx3", "labels-idx1"), ("images", "labels")):
        if a in name:
            candidate = images.with_name(name.replace(a, b))
            if candidate.is_file():
                return candidate
    raise DataError(f"{str(images)!r}: cannot find the matching labels file; pass --labels LABELS-idx1-ubyte.")


def _idx_source(path: Path, add_channel: bool) -> ArraySource:
    fh = _open_maybe_gzip(path)
    head = fh.read(4)
    if len(head) != 4 or head[:2] != b"\x00\x00" or head[2] not in _IDX_DTYPES:
        fh.close()
        raise DataError(f"{str(path)!r} is not an IDX file (bad magic number).")
    ndim = head[3]
    dims = tuple(int(d) for d in np.frombuffer(fh.read(4 * ndim), dtype=">i4"))
    dtype = np.dtype(_IDX_DTYPES[head[2]])
    row_shape = dims[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    shape = (dims[0], 1, *row_shape) if add_channel and len(row_shape) == 2 else dims
    native = dtype.newbyteorder("=")

    def read(lo: int, hi: int) -> np.ndarray:
        raw = fh.read((hi - lo) * row_bytes)
        if len(raw) != (hi - lo) * row_bytes:
            raise DataError(f"{str(path)!r} is truncated: expected {dims[0]} rows.")
        return np.frombuffer(raw, dtype=dtype).astype(native).reshape((hi - lo, *shape[1:]))

    return ArraySource(tuple(shape), native, read, fh.close)


# ----------------------------------------------------------------------------- ImageFolder


def _imagefolder_sources(root: Path) -> tuple[ArraySource, ArraySource, list[str]]:
    # Pillow, only for ImageFolder sources: not a declared dependency of dtrain (torchvision brings it).
    from PIL import Image

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        files += [(p, label) for p in sorted((root / cls).rglob("*")) if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{str(root)!r}: no images found in class sub-directories (expected root/<class>/<image>).")
    with Image.open(files[0][0]) as first:
        mode = "L" if first.mode in ("L", "1", "I", "I;16") else "RGB"
        size = first.size
    channels = 1 if mode == "L" else 3

    def read(lo: int, hi: int) -> np.ndarray:
        out = np.empty((hi - lo, channels, size[1], size[0]), dtype=np.uint8)
        for i, (path, _) in enumerate(files[lo:hi]):
            try:
                with Image.open(path) as img:
                    if img.size != size:
                        raise DataError(
                            f"{str(path)!r} is {img.size[0]}x{img.size[1]} but the first image is {size[0]}x{size[1]}; "
                            "all images must have one size (resize them first)."
                        )
                    arr = np.asarray(img.convert(mode))
            except OSError as exc:
                raise DataError(f"{str(path)!r} is not a readable image: {exc}.") from None
            out[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
        return out

    labels = np.array([label for _, label in files], dtype=np.int64)
    x = ArraySource((len(files), channels, size[1], size[0]), np.dtype(np.uint8), read)
    y = ArraySource(labels.shape, labels.dtype, lambda lo, hi: labels[lo:hi])
    return x, y, classes


# ----------------------------------------------------------------------------- writing


def _write_h5(
    out: Path,
    x_key: str,
    x: ArraySource,
    y_key: str,
    y: ArraySource,
    extras: dict[str, ArraySource],
    attrs: dict[str, str],
    compress: bool,
    progress: bool | None,
) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    n = x.shape[0]
    row_bytes = max(1, int(np.prod(x.shape[1:], dtype=np.int64)) * x.dtype.itemsize)
    block = max(1, _BLOCK_BYTES // row_bytes)
    with atomic_replace(out, mode=0o644) as tmp, h5py.File(tmp, "w", locking=False) as f:
        targets = {
            x_key: (x, _create(f, x_key, x.shape, x.dtype, compress)),
            y_key: (y, _create(f, y_key, (n,), np.dtype(np.int64), compress)),
        }
        for name, src in extras.items():
            targets[name] = (src, _create(f, name, src.shape, src.dtype, compress))
        for k, v in attrs.items():
            targets[y_key][1].attrs[k] = v
        with progress_bar(n, "convert", progress, unit="rows") as bar:
            for lo in range(0, n, block):
                hi = min(n, lo + block)
                for src, dset in targets.values():
                    data = src.read(lo, hi)
                    dset[lo:hi] = data.reshape((hi - lo, *dset.shape[1:]))
                bar.update(hi - lo)


def _create(f: Any, name: str, shape: tuple[int, ...], dtype: np.dtype, compress: bool) -> Any:
    if not compress:
        return f.create_dataset(name, shape=shape, dtype=dtype)
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    rows = int(max(1, min(shape[0], _CHUNK_BYTES // row_bytes)))
    return f.create_dataset(
        name, shape=shape, dtype=dtype, chunks=(rows, *shape[1:]), compression="gzip", compression_opts=4, shuffle=True
    )
