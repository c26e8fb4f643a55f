"""Tasks: what differs between problems (loss, metrics, predictions) behind one small interface.

``[task] name`` picks ``classification`` (the default), ``regression`` or your own class
(``package.module:ClassName``, see :mod:`dist_train.tasks.custom` and docs/tasks.md). The trainer,
evaluation and ``dtrain eval`` only ever talk to a :class:`~dist_train.tasks.base.Task`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from dist_train.data.targets import compute_target_stats
from dist_train.distributed.comm import get_rank
from dist_train.metrics import MetricSums, SampleCollector
from dist_train.models import build_model
from dist_train.tasks.base import Task
from dist_train.tasks.classification import ClassificationTask, balanced_class_weights
from dist_train.tasks.custom import CustomTask, TaskCodeError, import_task_class
from dist_train.tasks.regression import BIAS_BLIND_METRICS, RegressionTask, layout_targets

if TYPE_CHECKING:
    from torch import nn

    from dist_train.config import Config
    from dist_train.data.loader import DataBundle

log = logging.getLogger("dtrain")
#: target_norm = "none" with targets whose scales differ by more than this gets a warning.
TARGET_SCALE_RATIO = 100.0

__all__ = [
    "ClassificationTask",
    "CustomTask",
    "MetricSums",
    "RegressionTask",
    "SampleCollector",
    "Task",
    "TaskCodeError",
    "build_model_for_task",
    "build_task",
    "import_task_class",
]


def build_task(cfg: Config, data: DataBundle) -> Task:
    """The configured task, with what it needs from the data (target shapes, statistics, labels)."""
    t = cfg.task
    targets = t.resolved_targets(cfg.data.y_key)
    if t.is_custom:
        return CustomTask(t.name, t.kwargs, targets)
    if t.name == "regression":
        shapes = {name: data.key_specs[name][0] for name in targets}
        mean, std = data.target_stats if data.target_stats is not None else (None, None)
        task = RegressionTask(
            layout_targets(shapes, {k: str(v) for k, v in t.kinds.items()}),
            loss=t.loss,
            loss_weights={k: float(v) for k, v in t.loss_weights.items()},
            huber_delta=t.huber_delta,
            mean=mean,
            std=std,
            bins=t.bins,
            columns=t.columns,
        )
        if get_rank() == 0:  # once per run, not once per rank
            for warning in regression_warnings(cfg, task, data):
                log.warning("%s", warning)
        return task
    weights = t.class_weights
    if weights == "balanced":
        weights = balanced_class_weights(data.train.read_labels(), cfg.model.num_classes)
    return ClassificationTask(
        cfg.model.num_classes,
        targets[0],
        label_smoothing=t.label_smoothing,
        class_weights=[float(w) for w in weights] if isinstance(weights, list) and weights else None,
    )


def regression_warnings(cfg: Config, task: RegressionTask, data: DataBundle) -> list[str]:
    """Settings that run but hide a problem: raw targets of very different scales, a bias-blind monitor."""
    warnings = []
    if cfg.task.target_norm == "none" and len(task.targets) > 1:
        scales = target_scales(task, data)
        largest, smallest = max(scales, key=scales.__getitem__), min(scales, key=scales.__getitem__)
        if scales[smallest] > 0 and scales[largest] / scales[smallest] > TARGET_SCALE_RATIO:
            warnings.append(
                f'task.target_norm = "none": the targets\' scales differ by {scales[largest] / scales[smallest]:.3g}x '
                f"({largest} ~ {scales[largest]:.3g}, {smallest} ~ {scales[smallest]:.3g}, root mean square on the "
                f"training split), so the loss is nearly all {largest!r} and the others are barely learned. Use "
                'target_norm = "auto" (the default; metrics stay in file units) or task.loss_weights.'
            )
    monitors = (
        ("checkpoint.monitor", cfg.checkpoint.monitor, cfg.checkpoint.save_best),
        ("sched.monitor", cfg.sched.monitor, cfg.sched.name == "plateau"),
    )
    for setting, key, used in monitors:
        blind = key.rpartition("/")[2]
        if used and blind in BIAS_BLIND_METRICS:
            better = key.rpartition("/")[0] + "/frac_rms"
            warnings.append(
                f"{setting} = {key!r} cannot see a bias: a model whose predictions are all a fraction of the truth "
                f"(a collapsed one) has a small {blind}. Monitor {better!r} (the root mean square of (pred - true) "
                "/ true: resolution and bias together) or the target's rmse instead."
            )
    return warnings


def target_scales(task: RegressionTask, data: DataBundle) -> dict[str, float]:
    """Each target's root mean square value over the training split (its columns together)."""
    mean, std = compute_target_stats(data.train.path, [t.name for t in task.targets], data.train.rows)
    squares = np.square(mean) + np.square(std)
    return {t.name: float(np.sqrt(squares[t.columns].mean())) for t in task.targets}


def build_model_for_task(cfg: Config, data: DataBundle, task: Task) -> nn.Module:
    """The configured model with the task's output width (passed as ``num_classes``), checked on a dry batch."""
    width = task.output_width
    model_cfg = cfg.model if width is None else dataclasses.replace(cfg.model, num_classes=width)
    inputs = {key: data.key_specs[key] for key in cfg.data.input_keys}
    return build_model(model_cfg, data.sample_shape, inputs=inputs, check_width=width is not None, task=task.name)
