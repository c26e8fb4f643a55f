"""`dtrain eval`: metrics of a checkpoint on a split, in one process, optionally with per-event predictions."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.catalog import load_for_reading, resolve_checkpoint_path, run_dir_of
from dist_train.config import config_from_dict
from dist_train.data.loader import build_data, make_loader
from dist_train.distributed.precision import autocast, resolve_precision
from dist_train.errors import CheckpointError, ConfigError
from dist_train.evaluation import Predictions, evaluate_batches
from dist_train.sampler import ShardedEvalBatchSampler
from dist_train.tasks import build_model_for_task, build_task

log = logging.getLogger("dtrain")


def evaluate_checkpoint(
    target: Path,
    *,
    split: str = "test",
    which: str = "latest",
    predictions_path: Path | None = None,
    batch_size: int = 0,
    data_path: str | None = None,
) -> dict[str, Any]:
    """Rebuild data and model from the checkpoint's own config and evaluate it on ``split``."""
    path = resolve_checkpoint_path(Path(target), which=which)
    run_dir = run_dir_of(path)
    # A sharded checkpoint (directory) is consolidated in this process, without a process group; an
    # exported model's config comes from its sidecar.
    state = load_for_reading(path)
    if not isinstance(state.get("config"), dict):
        raise CheckpointError(
            f"{path} holds no config to rebuild data and model from (a model exported by `dtrain ckpt export` keeps it in "
            f"{path.name}.sha256.json, next to it). Evaluate the run directory or a checkpoint instead."
        )
    cfg = config_from_dict(state["config"], origin=f"{path} (embedded config)")
    if data_path:
        cfg.data.path = data_path
    cfg.data.num_workers = 0
    data = build_data(cfg, run_dir=run_dir)
    subset = {"train": data.train, "val": data.val, "test": data.test}[split]
    if subset is None or len(subset) == 0:
        raise ConfigError(f"the run has no {split} split (data.{split}_split = 0?); choose --split val or train.")
    task = build_task(cfg, data)
    model = build_model_for_task(cfg, data, task)
    model.load_state_dict(state["model"])
    sampler = ShardedEvalBatchSampler(
        len(subset), num_replicas=1, rank=0, batch_size=batch_size or cfg.data.eval_batch_size or cfg.data.batch_size
    )
    loader = make_loader(subset, sampler, cfg.data, train=False, device_type="cpu")
    preds = Predictions() if predictions_path is not None else None
    # The run's precision, as its own evaluation on the CPU used it: a bf16 run's logged metrics are bf16 ones.
    precision = resolve_precision(cfg.train.precision, torch.device("cpu"))
    result = evaluate_batches(
        model,
        loader,
        torch.device("cpu"),
        task,
        input_keys=cfg.data.input_keys,
        autocast=functools.partial(autocast, precision, torch.device("cpu")),
        prefix=split,
        predictions=preds,
    )
    metrics: dict[str, Any] = dict(result.metrics)
    if preds is not None and predictions_path is not None:
        preds.save(predictions_path)
    metrics["checkpoint"] = str(path)
    metrics["epoch"] = state["epoch"]
    metrics["step"] = state["step"]
    return metrics
