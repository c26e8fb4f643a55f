"""Your own task, imported as ``[task] name = "package.module:ClassName"``.

The class needs ``loss(outputs, batch)`` (a scalar tensor: the SUM over the batch's samples) and
``metrics(outputs, batch)`` (a dict of per-batch SUMS, scalar tensors or numbers, including
``count``); optionally ``finalize(sums)`` (default: each sum divided by ``sums["count"]``),
``predictions(outputs, batch)`` (per-sample rows for ``dtrain eval --predictions``),
``eval_samples(outputs, batch)`` with ``finalize_samples(samples)`` (exact quantiles: per-sample
values of an evaluation, gathered from every rank, each sample once) and an ``output_width`` attribute (the model output width; checked at start-up when given). ``[task]
kwargs`` go to its constructor. dtrain adds the loss sum to the metric sums as ``"loss"`` and
reports ``<split>/loss`` unless ``finalize`` returns its own.

Everything the user's code does is wrapped: an exception names the class and the method, and
metrics without ``count`` or with non-scalar values stop the run with a clear error instead of
turning into a wrong number.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dist_train.errors import ConfigError
from dist_train.metrics import Sums
from dist_train.tasks.base import Batch, Task

REQUIRED_METHODS = ("loss", "metrics")


class TaskCodeError(RuntimeError):
    """An exception raised inside a custom task's method (the original is chained as its cause)."""


def import_task_class(spec: str) -> type:
    """The class named by ``package.module:ClassName``, checked for the protocol's methods."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"task.name = {spec!r}: cannot import module {module_name!r} ({exc}). Make it importable from the "
            "directory you launch in, or add its directory to PYTHONPATH."
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ConfigError(f"task.name = {spec!r}: module {module_name!r} has no attribute {attr!r}.")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise ConfigError(
            f"task.name = {spec!r}: {attr} has no {' or '.join(missing)} method; a task needs "
            "loss(outputs, batch) and metrics(outputs, batch) (see docs/tasks.md)."
        )
    return cls


class CustomTask(Task):
    """Adapts a user's task object to :class:`Task`."""

    def __init__(self, spec: str, kwargs: dict[str, Any], targets: list[str]) -> None:
        cls = import_task_class(spec)
        self.spec = spec
        self.name = cls.__name__
        self.batch_keys = tuple(targets)
        try:
            self.user = cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"task {spec!r} could not be built with [task] kwargs {kwargs!r}: {exc}") from None
        width = getattr(self.user, "output_width", None)
        self.output_width = int(width) if width is not None else None
        self._metrics_checked = False
        self._samples_checked = False
        has = [callable(getattr(self.user, m, None)) for m in ("eval_samples", "finalize_samples")]
        if any(has) and not all(has):
            given, missing = ("eval_samples", "finalize_samples") if has[0] else ("finalize_samples", "eval_samples")
            raise ConfigError(
                f"task {spec!r}: {self.name} has {given}() but no {missing}(); per-sample values need both: "
                "eval_samples(outputs, batch) returns them, finalize_samples(samples) turns the whole split's into "
                "metrics (see docs/tasks.md)."
            )
        self._has_samples = all(has)

    def _call(self, method: str, *args: Any) -> Any:
        fn: Callable[..., Any] = getattr(self.user, method)
        try:
            return fn(*args)
        except (ConfigError, TaskCodeError):
            raise
        except Exception as exc:
            raise TaskCodeError(f"task {self.spec}: {self.name}.{method}() raised {type(exc).__name__}: {exc}") from exc

    def loss(self, outputs: Any, batch: Batch) -> torch.Tensor:
        value = self._call("loss", outputs, batch)
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(
                f"task {self.spec}: {self.name}.loss() returned {_describe(value)}; it must return one scalar "
                "tensor, the loss summed over the batch's samples."
            )
        return value.reshape(())

    def metrics(self, outputs: Any, batch: Batch) -> Sums:
        with torch.no_grad():
            sums = self._call("metrics", outputs, batch)
        if not self._metrics_checked:  # the shape of the answer does not change between batches
            self._check_metrics(sums)
            self._metrics_checked = True
        return sums

    def _check_metrics(self, sums: Any) -> None:
        where = f"task {self.spec}: {self.name}.metrics()"
        if not isinstance(sums, dict):
            raise ConfigError(f"{where} returned {_describe(sums)}; it must return a dict of per-batch sums.")
        if "count" not in sums:
            raise ConfigError(
                f"{where} returned keys {sorted(sums)} without 'count'; add \"count\": the number of samples in the "
                "batch, so that means are exact across ranks (see docs/tasks.md)."
            )
        if "loss" in sums:
            raise ConfigError(f"{where} returned 'loss', which dtrain reserves for the loss sum; rename it.")
        for key, value in sums.items():
            scalar = isinstance(value, int | float) or (isinstance(value, torch.Tensor) and value.numel() == 1)
            if not scalar:
                raise ConfigError(
                    f"{where} returned {key!r} = {_describe(value)}; every metric must be one number per batch "
                    "(a sum over its samples), e.g. (pred == y).sum()."
                )

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        plain = {k: float(np.sum(v)) for k, v in sums.items()}
        if callable(getattr(self.user, "finalize", None)):
            result = self._call("finalize", plain)
            if not isinstance(result, dict):
                raise ConfigError(f"task {self.spec}: {self.name}.finalize() returned {_describe(result)}, not a dict.")
            out = {str(k): float(v) for k, v in result.items()}
        else:
            out = super().finalize(sums)
        out.setdefault("loss", plain["loss"] / max(plain["count"], 1.0))
        return out

    def eval_samples(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if not self._has_samples:
            return {}
        with torch.no_grad():
            values = self._call("eval_samples", outputs, batch)
        if not self._samples_checked:
            self._check_samples(values, outputs)
            self._samples_checked = True
        return values  # type: ignore[no-any-return]

    def _check_samples(self, values: Any, outputs: Any) -> None:
        where = f"task {self.spec}: {self.name}.eval_samples()"
        if not isinstance(values, dict):
            raise ConfigError(f"{where} returned {_describe(values)}; it must return a dict of per-sample tensors.")
        size = outputs.shape[0] if isinstance(outputs, torch.Tensor) else None
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 1 or (size is not None and len(value) != size):
                raise ConfigError(
                    f"{where} returned {key!r} = {_describe(value)}; every value must be a 1-D tensor with one "
                    f"entry per sample of the batch{f' ({size})' if size is not None else ''}."
                )

    def finalize_samples(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        if not self._has_samples:
            return {}
        result = self._call("finalize_samples", samples)
        if not isinstance(result, dict):
            raise ConfigError(
                f"task {self.spec}: {self.name}.finalize_samples() returned {_describe(result)}, not a dict."
            )
        return {str(k): float(v) for k, v in result.items()}

    def predictions(self, outputs: Any, batch: Batch) -> dict[str, torch.Tensor]:
        if not callable(getattr(self.user, "predictions", None)):
            return super().predictions(outputs, batch)
        rows = self._call("predictions", outputs, batch)
        if not isinstance(rows, dict):
            raise ConfigError(f"task {self.spec}: {self.name}.predictions() returned {_describe(rows)}, not a dict.")
        return rows


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
