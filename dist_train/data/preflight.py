"""Torch-free checks of the configured dataset and the normalisation statistics.

The launcher calls :func:`preflight_check` before it starts any worker (so a wrong key or label
range is reported once, in one paragraph, instead of by every rank after torch has loaded) and
:func:`ensure_normalization` to compute ``normalization.json`` once per run directory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.config import Config, resolve_data_path, resolve_geometry_path
from dist_train.data.h5io import RowReader, Storage, file_size, get_dataset, open_h5, storage_of
from dist_train.data.hits import HitReader, check_hit_file, hit_spec
from dist_train.data.splits import SplitRows, make_splits
from dist_train.data.targets import check_task_keys, label_key, target_normalization_for
from dist_train.data.transform_spec import parse_transforms
from dist_train.errors import DataError
from dist_train.fsutil import atomic_write_text

NORMALIZATION_FILE = "normalization.json"
# "auto" statistics use at most this many training samples (a seeded subset beyond it): enough
# for per-channel mean/std to 3-4 digits without reading a terabyte file end to end.
MAX_STATS_SAMPLES = 200_000
_STATS_BLOCK_BYTES = 32 << 20
_LABEL_BLOCK_ROWS = 1 << 20


@dataclass
class DatasetInfo:
    """What the preflight check found; everything here is plain data (JSON-able via ``to_dict``)."""

    path: Path
    num_rows: int
    x_key: str
    y_key: str | None  # the classification labels (batch["y"]); None for other tasks
    sample_shape: tuple[int, ...]
    x_dtype: str
    y_dtype: str | None
    num_channels: int
    class_counts: list[int]
    x_storage: Storage
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # facts the launcher prints (e.g. truncated point clouds)

    @property
    def fast_path(self) -> bool:
        return self.x_storage.fast_path

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["fast_path"] = self.fast_path
        return d


def channels_of(sample_shape: tuple[int, ...]) -> int:
    """Channels for normalisation: axis 0 of a sample (C of C×H×W), the features of a 1-D sample."""
    return int(sample_shape[0]) if sample_shape else 1


def channels_first_shape(stored: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """A sample's shape as the model sees it: (H, W, C) files are handed over as (C, H, W)."""
    if layout == "channels_last" and len(stored) >= 2:
        return (stored[-1], *stored[:-1])
    return tuple(stored)


def preflight_check(cfg: Config) -> DatasetInfo:
    """Open the file and check keys, dtypes, lengths and the label range; DataError on problems.

    For hit-list files this also checks the PMT ids of the hits against the geometry (a pass over
    ``hit_pmt``), which the ranks' own checks (:func:`inspect_config_data`) skip.
    """
    info, strata = inspect_config_data(cfg, at_launch=True)
    # The splits too (a missing or mismatched split file, an empty training split): said before any worker starts.
    make_splits(info.num_rows, strata, cfg.data, info.path)
    return info


def inspect_config_data(cfg: Config, *, at_launch: bool = False) -> tuple[DatasetInfo, np.ndarray | None]:
    """:func:`preflight_check` plus the values the fraction splits stratify by (int64, one per row;
    None for random or explicit splits).

    Only what the task reads is required: classification its label dataset, regression and custom
    tasks their targets and inputs (no ``labels``), plus a ``data.stratify`` key when one is named.
    """
    d = cfg.data
    path = resolve_data_path(cfg)
    if not d.path:
        raise DataError('data.path is empty: set it to an HDF5 file, e.g. data.path = "data/events.h5".')
    parse_transforms(d.train_transforms, "data.train_transforms")
    parse_transforms(d.eval_transforms, "data.eval_transforms")
    y_key = label_key(cfg)
    strat_key = stratify_key(cfg)
    with open_h5(path) as f:
        if d.format == "hits":
            x_info = _hits_x_info(f, cfg, path, at_launch)
        else:
            x_info = _array_x_info(f, d.x_key, path, d.layout)
        num_rows, rows_key = x_info.num_rows, x_info.rows_key
        labels = y_dtype = None
        if y_key is not None:
            y = get_dataset(f, y_key, path, "task.targets" if y_key != d.y_key else "y_key")
            _check_y_shape(y, path, y_key, rows_key, num_rows)
            labels, y_dtype = read_labels(y, path, y_key), str(y.dtype)
        extra = check_task_keys(f, cfg, path, num_rows, hits=d.format == "hits")
        strata = None
        if strat_key is not None:
            strata = labels if strat_key == y_key else _read_strata(f, strat_key, path, rows_key, num_rows)
    counts: list[int] = []
    if labels is not None and y_key is not None:
        counts = _check_label_range(labels, cfg.model.num_classes, path, y_key)
    info = DatasetInfo(
        path=path,
        num_rows=num_rows,
        x_key=d.x_key,
        y_key=y_key,
        sample_shape=x_info.sample_shape,
        x_dtype=x_info.dtype,
        y_dtype=y_dtype,
        num_channels=channels_of(x_info.sample_shape),
        class_counts=counts,
        x_storage=x_info.storage,
        extra=extra,
        notes=x_info.notes,
    )
    if d.normalize == "given":
        _check_given_stats(d.mean, d.std, info.num_channels)
    return info, strata


def stratify_key(cfg: Config) -> str | None:
    """The dataset the fraction splits are stratified by, or None (random splits, or a split file)."""
    s = cfg.data.stratify
    if cfg.data.split_file or s is False:
        return None
    if s is True:  # config validation allows true only for classification
        return label_key(cfg)
    return str(s)


def _read_strata(f: Any, key: str, path: Path, rows_key: str, num_rows: int) -> np.ndarray:
    values = get_dataset(f, key, path, "data.stratify")
    _check_y_shape(values, path, key, rows_key, num_rows, what="data.stratify values")
    return read_labels(values, path, key, what="data.stratify values")


@dataclass
class _XInfo:
    """What the samples are: rows, the per-sample shape the model sees, storage (array or hit list)."""

    num_rows: int
    rows_key: str  # the dataset whose length is the number of samples
    sample_shape: tuple[int, ...]
    dtype: str
    storage: Storage
    notes: list[str] = field(default_factory=list)


def _array_x_info(f: Any, x_key: str, path: Path, layout: str) -> _XInfo:
    x = get_dataset(f, x_key, path, "x_key")
    _check_x(x, path, x_key)
    storage = storage_of(x)
    _check_not_truncated(x, storage, path, x_key)
    shape = channels_first_shape(tuple(int(s) for s in x.shape[1:]), layout)
    return _XInfo(int(x.shape[0]), x_key, shape, str(x.dtype), storage)


def _hits_x_info(f: Any, cfg: Config, path: Path, at_launch: bool) -> _XInfo:
    """Samples built from a hit-list file (``data.format = "hits"``, see :mod:`dist_train.data.hits`)."""
    spec = hit_spec(cfg.data, resolve_geometry_path(cfg))
    assert spec is not None
    hits = check_hit_file(f, path, spec, scan_ids=at_launch)
    # One Storage for the whole x: mappable (offset 0 stands for "yes") only if every hit array is.
    storage = Storage("hits", None, None, (), 0 if hits.memmap else None)
    notes = []
    if hits.over_n_points:
        share = 100.0 * hits.over_n_points / hits.num_events
        notes.append(
            f"{hits.over_n_points} of {hits.num_events} events ({share:.1f}%) have more than data.n_points = "
            f"{spec.n_points} hits (most: {hits.counts_max}); their point clouds keep the {spec.n_points} earliest hits."
        )
    return _XInfo(hits.num_events, spec.index_key, hits.sample_shape, "float32", storage, notes)


def _check_x(x: Any, path: Path, key: str) -> None:
    if x.dtype.kind not in "biuf" or x.dtype.fields is not None:
        raise DataError(
            f"{str(path)!r}: {key!r} has dtype {x.dtype}, which is not numeric; data.x_key must name a "
            "dataset of numbers (float or int)."
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{str(path)!r}: {key!r} has shape {x.shape}; it needs at least one sample (axis 0).")


def _check_y_shape(y: Any, path: Path, y_key: str, x_key: str, num_rows: int, what: str = "labels") -> None:
    if y.ndim == 0 or not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        raise DataError(f"{str(path)!r}: {what} {y_key!r} have shape {y.shape}; expected (N,) or (N, 1).")
    if y.shape[0] != num_rows:
        raise DataError(
            f"{str(path)!r}: {y_key!r} has {y.shape[0]} {what} but {x_key!r} has {num_rows} samples; "
            "the two must have the same length (axis 0)."
        )
    if y.dtype.kind not in "biuf":
        raise DataError(f"{str(path)!r}: {what} {y_key!r} have dtype {y.dtype}; expected integer class ids.")


def _check_not_truncated(x: Any, storage: Storage, path: Path, key: str) -> None:
    if storage.offset is not None and storage.offset + x.id.get_storage_size() > file_size(path):
        raise DataError(
            f"{str(path)!r} is truncated: {key!r} should end at byte {storage.offset + x.id.get_storage_size()} "
            f"but the file has {file_size(path)} bytes. The copy is incomplete; copy the file again."
        )
    try:
        x[0:1]
        x[x.shape[0] - 1 : x.shape[0]]
    except (OSError, ValueError, RuntimeError) as exc:
        raise DataError(f"{str(path)!r}: reading {key!r} failed ({exc}); the file is corrupt or truncated.") from None


def read_labels(y: Any, path: Path | str, key: str, what: str = "labels") -> np.ndarray:
    """All labels as int64, read in blocks; float labels must hold whole numbers."""
    n = int(y.shape[0])
    out = np.empty(n, dtype=np.int64)
    try:
        for lo in range(0, n, _LABEL_BLOCK_ROWS):
            block = np.asarray(y[lo : lo + _LABEL_BLOCK_ROWS]).reshape(-1)
            if block.dtype.kind == "f" and not np.all(np.isfinite(block) & (np.mod(block, 1) == 0)):
                raise DataError(
                    f"{str(path)!r}: {what} {key!r} are floats that are not whole numbers; {what} must be class ids"
                    + (" (stratify by an integer dataset, or set data.stratify = false)." if what != "labels" else ".")
                )
            out[lo : lo + len(block)] = block
    except OSError as exc:
        raise DataError(
            f"{str(path)!r}: reading {what} {key!r} failed ({exc}); the file is corrupt or truncated."
        ) from None
    return out


def _check_label_range(labels: np.ndarray, num_classes: int, path: Path, key: str) -> list[int]:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise DataError(
            f"{str(path)!r}: labels {key!r} range from {lo} to {hi}, but model.num_classes = {num_classes} allows "
            f"0..{num_classes - 1}. Set model.num_classes = {hi + 1}"
            + (" and remap negative labels." if lo < 0 else ".")
        )
    return np.bincount(labels, minlength=num_classes).astype(int).tolist()


def _check_given_stats(mean: list[float], std: list[float], channels: int) -> None:
    if len(mean) not in (1, channels):
        raise DataError(
            f"data.mean has {len(mean)} values but the samples have {channels} channels (axis 1 of the data); "
            f'give 1 or {channels} values, or use normalize = "auto".'
        )
    if any(s <= 0 for s in std):
        raise DataError(f"data.std = {std} must be positive.")


# ----------------------------------------------------------------------------- splits and statistics


def prepare_splits(cfg: Config) -> tuple[DatasetInfo, SplitRows]:
    info, strata = inspect_config_data(cfg)
    return info, make_splits(info.num_rows, strata, cfg.data, info.path)


def compute_channel_stats(
    path: Path | str,
    x_key: str,
    rows: np.ndarray,
    *,
    max_samples: int = MAX_STATS_SAMPLES,
    seed: int = 0,
    layout: str = "channels_first",
    reader: RowReader | HitReader | None = None,
) -> tuple[list[float], list[float], int]:
    """Per-channel mean and std (population) over ``rows``; a seeded subset if there are more than ``max_samples``.

    ``reader``: where the samples come from (default: the dataset ``x_key``); it is closed after.
    Point clouds of a hit-list file: over their real hits only (each sample's first ``n_hits``
    columns), never the zero padding.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) > max_samples:
        rows = np.sort(np.random.default_rng([seed, 4]).choice(rows, size=max_samples, replace=False))
    reader = reader if reader is not None else RowReader(path, x_key)
    sample_shape = reader.sample_shape()
    row_bytes = max(1, int(np.prod(sample_shape, dtype=np.int64)) * 8)
    block_rows = max(1, _STATS_BLOCK_BYTES // row_bytes)
    channels_last = layout == "channels_last" and len(sample_shape) >= 2
    channels = int(sample_shape[-1]) if channels_last else channels_of(sample_shape)
    count = 0.0
    mean = np.zeros(channels)
    m2 = np.zeros(channels)
    try:
        for lo in range(0, len(rows), block_rows):
            block = reader.read(rows[lo : lo + block_rows]).astype(np.float64, copy=False)
            if channels_last:  # (B, H, W, C) -> (B, C, H*W): the statistics are per channel either way
                block = block.reshape(len(block), -1, channels).transpose(0, 2, 1)
            values = _real_values(block.reshape(len(block), channels, -1), reader, rows[lo : lo + block_rows])
            n_b = float(values.shape[1])
            if n_b == 0:
                continue
            mean_b = values.mean(axis=1)
            m2_b = ((values - mean_b[:, None]) ** 2).sum(axis=1)
            # Chan et al.'s pairwise update: stable for any number of blocks.
            delta = mean_b - mean
            total = count + n_b
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta**2 * (count * n_b / total)
            count = total
    finally:
        reader.close()
    std = np.sqrt(m2 / max(count, 1.0))
    # A constant channel would divide by zero; leaving it unscaled is the useful choice.
    std = np.where(std > 0, std, 1.0)
    return mean.tolist(), std.tolist(), len(rows)


def _real_values(block: np.ndarray, reader: RowReader | HitReader, rows: np.ndarray) -> np.ndarray:
    """(C, values) of a (B, C, L) block: every value, or for point clouds only each sample's real hits."""
    if not (isinstance(reader, HitReader) and reader.spec.representation == "point_cloud"):
        return block.transpose(1, 0, 2).reshape(block.shape[1], -1)
    real = np.arange(block.shape[2])[None, :] < reader.hits_in_samples(rows)[:, None]  # (B, L)
    return block.transpose(1, 0, 2)[:, real]


def rows_fingerprint(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()


def ensure_normalization(cfg: Config, run_dir: Path) -> tuple[list[float], list[float]] | None:
    """The (mean, std) to apply, or None for ``normalize = "none"``; idempotent, numpy-only.

    For ``"auto"`` the statistics of the training split are computed once and stored in
    ``run_dir/normalization.json``; later calls (other ranks, restarts, resume) read that file.
    """
    info, splits = prepare_splits(cfg)
    # Regression targets' statistics (target_norm = "auto") are made at the same moment, once.
    target_normalization_for(cfg, info.extra, splits.train, rows_fingerprint(splits.train), run_dir)
    return normalization_for(cfg, info, splits, run_dir)


def normalization_for(
    cfg: Config, info: DatasetInfo, splits: SplitRows, run_dir: Path | None
) -> tuple[list[float], list[float]] | None:
    d = cfg.data
    if d.normalize == "none":
        return None
    if d.normalize == "given":
        _check_given_stats(d.mean, d.std, info.num_channels)
        return list(d.mean), list(d.std)
    fingerprint = rows_fingerprint(splits.train)
    target = Path(run_dir) / NORMALIZATION_FILE if run_dir is not None else None
    if target is not None and target.is_file():
        return _load_stats(target, info, fingerprint)
    spec = hit_spec(d, resolve_geometry_path(cfg))
    reader = HitReader(info.path, spec) if spec is not None else None
    mean, std, used = compute_channel_stats(
        info.path, d.x_key, splits.train, seed=d.split_seed, reader=reader, layout=d.layout
    )
    if target is not None:
        record = {
            "version": 1,
            "data_path": str(info.path),
            "x_key": d.x_key,
            "channels": info.num_channels,
            "mean": mean,
            "std": std,
            "train_rows": int(len(splits.train)),
            "train_rows_sha256": fingerprint,
            "samples_used": used,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    return mean, std


def _load_stats(target: Path, info: DatasetInfo, fingerprint: str) -> tuple[list[float], list[float]]:
    try:
        record = json.loads(target.read_text())
        mean, std = list(map(float, record["mean"])), list(map(float, record["std"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{target} is not a valid normalization file ({exc}); delete it to recompute.") from None
    if record.get("train_rows_sha256") != fingerprint or len(mean) != info.num_channels:
        raise DataError(
            f"{target} was computed for a different training split or data layout (the data file or the split "
            "settings changed since this run started). Resuming would normalise differently; use a new run "
            f"directory, or delete {target.name} to recompute on purpose."
        )
    return mean, std
