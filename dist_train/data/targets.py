"""Torch-free data side of tasks: which datasets a task reads, their checks and target statistics.

The launcher calls :func:`check_task_keys` (through the preflight check) before any worker starts,
so a missing or mistyped target is one paragraph naming the key, not an error on every rank.
``target_norm = "auto"`` statistics are computed once on the training split and stored in
``<run_dir>/target_normalization.json``, like ``normalize = "auto"``: every rank and every resume
uses the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.config import Config
from dist_train.data.h5io import RowReader, get_dataset
from dist_train.data.hits import HIT_COUNT_KEY
from dist_train.errors import ConfigError, DataError
from dist_train.fsutil import atomic_write_text

TARGET_NORMALIZATION_FILE = "target_normalization.json"
# Names the batch dict uses itself; a dataset with one of these names cannot be a target or input.
RESERVED_BATCH_KEYS = ("x", "y", "index")


def is_classification(cfg: Config) -> bool:
    return cfg.task.name == "classification"


def label_key(cfg: Config) -> str | None:
    """The dataset read as ``batch["y"]``: the classification target; None for other tasks, which
    read their targets under their own names (a file without class labels trains them)."""
    return cfg.task.resolved_targets(cfg.data.y_key)[0] if is_classification(cfg) else None


def regression_targets(cfg: Config) -> list[str]:
    return cfg.task.resolved_targets(cfg.data.y_key) if cfg.task.name == "regression" else []


def task_target_keys(cfg: Config) -> list[str]:
    """Targets read per batch under their own names (classification labels come as ``y``)."""
    return [] if is_classification(cfg) else cfg.task.resolved_targets(cfg.data.y_key)


def batch_keys(cfg: Config) -> list[str]:
    """Every dataset read per batch besides x and y: extra keys, task targets, model inputs."""
    return list(dict.fromkeys([*cfg.data.extra_keys, *task_target_keys(cfg), *cfg.data.input_keys]))


def key_origin(cfg: Config, key: str) -> str:
    """The config setting that asked for ``key`` (for error messages)."""
    if key in cfg.data.input_keys:
        return "data.input_keys"
    if key in task_target_keys(cfg):
        return "task.targets"
    return "data.extra_keys"


def check_task_keys(f: Any, cfg: Config, path: Path, num_rows: int, *, hits: bool = False) -> dict[str, dict[str, Any]]:
    """Shapes and dtypes of :func:`batch_keys`, checked: present, numeric, one row per sample.

    ``hits``: a hit-list file, whose ``n_hits`` (:data:`~dist_train.data.hits.HIT_COUNT_KEY`) is derived, not read.
    """
    out = {}
    regression = set(regression_targets(cfg))
    for key in batch_keys(cfg):
        origin = key_origin(cfg, key)
        if key in RESERVED_BATCH_KEYS:
            raise ConfigError(
                f"{origin} names {key!r}, which the batch uses for itself (x, y, index); rename the dataset."
            )
        if hits and key == HIT_COUNT_KEY:
            out[key] = _hit_count_spec(f, cfg, path, origin)
            continue
        e = get_dataset(f, key, path, origin)
        if e.ndim == 0 or e.shape[0] != num_rows:
            raise DataError(
                f"{str(path)!r}: {key!r} (from {origin}) has shape {e.shape} but {cfg.data.x_key!r} has {num_rows} "
                "rows; it needs one row per sample."
            )
        if e.dtype.kind not in "biuf":
            raise DataError(f"{str(path)!r}: {key!r} (from {origin}) has non-numeric dtype {e.dtype}.")
        if key in regression and e.dtype.kind != "f":
            raise DataError(
                f"{str(path)!r}: regression target {key!r} has dtype {e.dtype}; regression targets must be floats. "
                'For integer class ids use task.name = "classification".'
            )
        out[key] = {"shape": [int(s) for s in e.shape[1:]], "dtype": str(e.dtype)}
    return out


def _hit_count_spec(f: Any, cfg: Config, path: Path, origin: str) -> dict[str, Any]:
    if HIT_COUNT_KEY in f:
        raise DataError(
            f'{str(path)!r} has its own dataset {HIT_COUNT_KEY!r}, but in a hit-list file (data.format = "hits") '
            f"{origin} = {HIT_COUNT_KEY!r} means the hits of each sample, counted by dtrain. Rename the dataset."
        )
    if HIT_COUNT_KEY in regression_targets(cfg):
        raise DataError(
            f"task.targets names {HIT_COUNT_KEY!r}, the integer hit count of a hit-list file; regression targets must be float datasets."
        )
    return {"shape": [], "dtype": "int64"}


def target_widths(cfg: Config, shapes: dict[str, dict[str, Any]]) -> list[int]:
    return [math.prod(shapes[name]["shape"]) for name in regression_targets(cfg)]


def expand_given_stats(values: list[float], widths: list[int], what: str) -> list[float]:
    """Per-target values spread over each target's columns, or per-column values as given."""
    if len(values) == len(widths):
        return [v for v, w in zip(values, widths, strict=True) for _ in range(w)]
    if len(values) == sum(widths):
        return list(values)
    raise ConfigError(
        f"task.{what} has {len(values)} values; give one per target ({len(widths)}) or one per target column "
        f"({sum(widths)}: widths {widths})."
    )


def compute_target_stats(path: Path | str, keys: list[str], rows: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-column mean and (population) std of the targets over ``rows``, in float64."""
    means: list[float] = []
    stds: list[float] = []
    for key in keys:
        reader = RowReader(path, key)
        try:
            values = reader.read(np.asarray(rows, dtype=np.int64)).astype(np.float64).reshape(len(rows), -1)
        finally:
            reader.close()
        std = values.std(axis=0)
        means += values.mean(axis=0).tolist()
        # A constant column would divide by zero; leaving it unscaled is the useful choice.
        stds += np.where(std > 0, std, 1.0).tolist()
    return means, stds


def target_normalization_for(
    cfg: Config, shapes: dict[str, dict[str, Any]], train_rows: np.ndarray, fingerprint: str, run_dir: Path | None
) -> tuple[list[float], list[float]] | None:
    """The per-column (mean, std) the regression loss normalises with, or None."""
    t = cfg.task
    if cfg.task.name != "regression" or t.target_norm == "none":
        return None
    widths = target_widths(cfg, shapes)
    if t.target_norm == "given":
        return expand_given_stats(t.target_mean, widths, "target_mean"), expand_given_stats(
            t.target_std, widths, "target_std"
        )
    keys = regression_targets(cfg)
    target = Path(run_dir) / TARGET_NORMALIZATION_FILE if run_dir is not None else None
    if target is not None and target.is_file():
        return _load_target_stats(target, keys, fingerprint, sum(widths))
    mean, std = compute_target_stats(cfg.data.path, keys, train_rows)
    if target is not None:
        record = {
            "version": 1,
            "targets": keys,
            "widths": widths,
            "mean": mean,
            "std": std,
            "train_rows_sha256": fingerprint,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(record, indent=2) + "\n")
    return mean, std


def _load_target_stats(target: Path, keys: list[str], fingerprint: str, width: int) -> tuple[list[float], list[float]]:
    try:
        record = json.loads(target.read_text())
        mean, std = list(map(float, record["mean"])), list(map(float, record["std"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{target} is not a valid target normalization file ({exc}); delete it to recompute.") from None
    if record.get("train_rows_sha256") != fingerprint or record.get("targets") != keys or len(mean) != width:
        raise DataError(
            f"{target} was computed for other targets or another training split (the data file, task.targets or "
            "the split settings changed since this run started). Use a new run directory, or delete "
            f"{target.name} to recompute on purpose."
        )
    return mean, std
