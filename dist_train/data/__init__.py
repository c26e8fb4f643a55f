"""HDF5 data pipeline: file checks, splits, statistics and batched loading.

Configuration (``[data]``): ``path``, ``x_key`` / ``y_key`` (default ``event_data`` / ``labels``),
``extra_keys`` (returned in each batch under their own names), ``normalize`` (``"none"``,
``"auto"``: per-channel mean/std of the training split stored in ``<run_dir>/normalization.json``,
``"given"``: ``mean`` / ``std``), ``train_transforms`` / ``eval_transforms``, and the splits:

* fractions ``val_split`` / ``test_split`` with ``split_seed``, ``stratify`` (``true``: by the
  classification labels; ``"key"``: by that integer dataset) and ``limit``;
  ``test_split = 0`` means no test set;
* or ``split_file``: an ``.npz`` with ``train_idxs`` / ``val_idxs`` / ``test_idxs`` (row numbers of
  the data file), an ``.h5`` file with datasets of those names at its root, or ``"h5:/group"``
  for a group of such datasets inside the data file itself (``"h5:"`` = its root).

With ``format = "hits"`` the samples are built from a hit-list file (per-event PMT hits; keys
``hit_keys``) with the geometry ``geometry_file``: mPMT images or point clouds
(``representation``, ``channels``, ``pmts_per_module``, ``n_points``); see :mod:`.hits`.

A batch is a dict ``{"x": float32 (B, *sample_shape), "y": int64 (B,), "index": int64 file rows
(B,), <extra_key>: tensor (B, ...)}`` in exactly the batch sampler's order; ``"y"`` (class labels)
only for classification: other tasks read no labels. Hit-list files add the derived key ``n_hits``.

This package root and the modules ``h5io``, ``hits``, ``splits``, ``preflight``, ``targets`` and
``transform_spec`` are torch-free (the launcher uses them before starting workers); ``dataset``,
``transforms``, ``prefetch`` and ``loader`` import torch. The torch names are importable from here too,
lazily: ``from dist_train.data import build_data`` imports torch only at that moment. The files dtrain
writes (``dtrain data synth|convert``) come from the torch-free subpackage :mod:`.writers`, which reads
through this package and is not imported by it.
"""

from __future__ import annotations

import importlib
from typing import Any

from dist_train.data.preflight import (
    NORMALIZATION_FILE,
    DatasetInfo,
    compute_channel_stats,
    ensure_normalization,
    preflight_check,
)
from dist_train.data.splits import SplitRows, make_splits

_TORCH_NAMES = {
    "DataBundle": "dist_train.data.loader",
    "build_data": "dist_train.data.loader",
    "make_loader": "dist_train.data.loader",
    "H5Split": "dist_train.data.dataset",
}

__all__ = [
    "NORMALIZATION_FILE",
    "DatasetInfo",
    "SplitRows",
    "compute_channel_stats",
    "ensure_normalization",
    "make_splits",
    "preflight_check",
    *_TORCH_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module 'dist_train.data' has no attribute {name!r}")
