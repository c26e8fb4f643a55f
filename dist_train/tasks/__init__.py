"""Tasks: what differs between problems (loss, metrics, predictions) behind one small interface.

``[task] name`` picks ``classification`` (the default), ``regression`` or your own class
(``package.module:ClassName``, see :mod:`dist_train.tasks.custom` and docs/tasks.md). The trainer,
evaluation and ``dtrain eval`` only ever talk to a :class:`~dist_train.tasks.base.Task`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from dist_train.tasks.base import MetricSums, SampleCollector, Task
from dist_train.tasks.classification import ClassificationTask, balanced_class_weights
from dist_train.tasks.custom import CustomTask, TaskCodeError, import_task_class
from dist_train.tasks.regression import RegressionTask, layout_targets

if TYPE_CHECKING:
    from torch import nn

    from dist_train.config import Config
    from dist_train.data.loader import DataBundle

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
        return RegressionTask(
            layout_targets(shapes, {k: str(v) for k, v in t.kinds.items()}),
            loss=t.loss,
            huber_delta=t.huber_delta,
            mean=mean,
            std=std,
        )
    weights = t.class_weights
    if weights == "balanced":
        weights = balanced_class_weights(data.train.read_labels(), cfg.model.num_classes)
    return ClassificationTask(
        cfg.model.num_classes,
        targets[0],
        label_smoothing=t.label_smoothing,
        class_weights=[float(w) for w in weights] if isinstance(weights, list) and weights else None,
    )


def build_model_for_task(cfg: Config, data: DataBundle, task: Task) -> nn.Module:
    """The configured model with the task's output width (passed as ``num_classes``), checked on a dry batch."""
    from dist_train.models import build_model

    width = task.output_width
    model_cfg = cfg.model if width is None else dataclasses.replace(cfg.model, num_classes=width)
    inputs = {key: data.key_specs[key] for key in cfg.data.input_keys}
    return build_model(model_cfg, data.sample_shape, inputs=inputs, check_width=width is not None, task=task.name)
