"""Optimizers and one learning-rate scheduler object the trainer drives.

Learning-rate schedule (``[sched]``), per parameter group with base lr ``base`` (``optim.lr``):

* ``warmup_epochs`` (float, any scheduler): the first ``W = round(warmup_epochs * steps_per_epoch)``
  optimizer steps ramp the lr linearly from 0: step ``s`` (0-based) uses ``base * (s + 1) / W``,
  so step ``W - 1`` is the first at the full lr. The schedule below multiplies this ramp.
* ``none``: constant ``base``.
* ``step``: ``base * gamma ** (epoch // step_size)``, ``epoch`` = epochs completed.
* ``multistep``: ``base * gamma ** (number of milestones <= epoch)``.
* ``cosine``: after warmup, per optimizer step, from ``base`` down to ``min_lr``, reached just after
  the run's last step: ``min_lr + (base - min_lr) * (1 + cos(pi * p)) / 2`` with
  ``p = (s - W) / (total - W)``, ``total = epochs * steps_per_epoch`` (held at ``min_lr`` beyond).
* ``plateau``: like ``torch.optim.lr_scheduler.ReduceLROnPlateau``: after each evaluation the lr is
  multiplied by ``factor`` once ``metrics[monitor]`` has not improved (``mode`` min/max, relative
  threshold 1e-4) for more than ``patience`` evaluations. The metrics are the reduced (all-rank)
  values, so every rank takes the same decision.
* ``min_lr`` is also a floor for ``step``, ``multistep`` and ``plateau`` (warmup may start below it).

The whole state is a few numbers (steps, epochs, plateau bookkeeping), so a resumed scheduler
continues with exactly the lrs an uninterrupted run would have used.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch

from dist_train.config import OptimConfig, SchedConfig
from dist_train.errors import CheckpointError, ConfigError

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
# Relative improvement a plateau-monitored metric needs to count as better (torch's default).
_PLATEAU_THRESHOLD = 1e-4
# Splits that are evaluated only on some epochs; a plateau monitor on them waits for the next evaluation.
_EVAL_SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- optimizers


def _named_optimizer_args(cfg: OptimConfig) -> dict[str, Any]:
    """The [optim] fields each optimizer takes; SGD has no betas/eps, Adam(W) no momentum."""
    if cfg.name == "sgd":
        return {"lr": cfg.lr, "momentum": cfg.momentum, "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def _check_optimizer_kwargs(cfg: OptimConfig, named: dict[str, Any]) -> None:
    cls = _OPTIMIZERS[cfg.name]
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in ("self", "params") and params[p].kind is not inspect.Parameter.VAR_KEYWORD]
    for key in cfg.kwargs:
        if key in named:
            raise ConfigError(f"optim.kwargs.{key}: set optim.{key} instead of putting it in [optim] kwargs.")
        if key not in known:
            extra = [k for k in known if k not in named]
            close = difflib.get_close_matches(key, extra, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown key {key!r} in [optim] kwargs for optimizer {cfg.name!r} ({cls.__name__}).{hint} "
                f"Known: {', '.join(extra)}."
            )


def build_optimizer(cfg: OptimConfig, params: Iterable[Any]) -> torch.optim.Optimizer:
    """``sgd`` (momentum, nesterov), ``adam`` or ``adamw`` with the [optim] fields plus ``cfg.kwargs``."""
    if cfg.name not in _OPTIMIZERS:
        raise ConfigError(f"optim.name = {cfg.name!r} is not supported: choose one of {', '.join(_OPTIMIZERS)}.")
    named = _named_optimizer_args(cfg)
    _check_optimizer_kwargs(cfg, named)
    try:
        return _OPTIMIZERS[cfg.name](params, **named, **cfg.kwargs)
    except (ValueError, TypeError) as exc:
        given = {**named, **cfg.kwargs}
        raise ConfigError(f"[optim] cannot build {cfg.name!r} with {given!r}: {exc}") from None


# ----------------------------------------------------------------------------- scheduler


def warmup_steps(cfg: SchedConfig, steps_per_epoch: int) -> int:
    return max(0, round(cfg.warmup_epochs * steps_per_epoch))


class Scheduler:
    """The lr schedule for one optimizer; the trainer calls ``step_batch`` and ``step_epoch``.

    Implements torch's Stateful protocol (``state_dict`` / ``load_state_dict``), so it can be
    saved in a checkpoint beside the optimizer.
    """

    def __init__(
        self, cfg: SchedConfig, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int
    ) -> None:
        if steps_per_epoch < 1:
            raise ConfigError(f"the scheduler needs at least one optimizer step per epoch, got {steps_per_epoch}.")
        if cfg.name == "step" and cfg.step_size < 1:
            raise ConfigError(f"sched.step_size = {cfg.step_size} must be at least 1 epoch.")
        if cfg.warmup_epochs < 0:
            raise ConfigError(f"sched.warmup_epochs = {cfg.warmup_epochs} must be >= 0.")
        if cfg.name == "plateau" and not 0.0 < cfg.factor < 1.0:
            raise ConfigError(f"sched.factor = {cfg.factor} must be in (0, 1): the lr is multiplied by it.")
        self.cfg = cfg
        self.optimizer = optimizer
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.warmup = warmup_steps(cfg, steps_per_epoch)
        # `initial_lr` lives in the optimizer's own state, so the base survives an optimizer reload.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [float(g["initial_lr"]) for g in optimizer.param_groups]
        self.step = 0  # optimizer steps taken
        self.epoch = 0  # epochs completed
        self.plateau_scale = 1.0
        self.best = math.inf if cfg.mode == "min" else -math.inf
        self.bad_epochs = 0
        self._apply()

    # --- the trainer's interface

    def step_batch(self) -> None:
        """Call after every optimizer step: warmup and cosine advance per step."""
        self.step += 1
        self._apply()

    def step_epoch(self, metrics: dict[str, float]) -> None:
        """Call after each epoch with its reduced metrics (all ranks hold the same values).

        ``plateau`` counts evaluations, not epochs: an epoch whose metrics have no key of the
        monitored split (``val/...`` under ``eval_every_epochs > 1``) leaves it unchanged.
        """
        self.epoch += 1
        if self.cfg.name == "plateau":
            self._update_plateau(metrics)
        self._apply()

    def lr(self) -> float:
        """The current lr of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    # --- Stateful

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name,
            "step": self.step,
            "epoch": self.epoch,
            "plateau_scale": self.plateau_scale,
            "best": self.best,
            "bad_epochs": self.bad_epochs,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("step", "epoch", "plateau_scale", "best", "bad_epochs", "base_lrs") if k not in state]
        if missing:
            raise CheckpointError(
                f"the scheduler state in the checkpoint lacks {', '.join(missing)}; it is not a dtrain scheduler state."
            )
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise CheckpointError(
                f"the checkpoint's scheduler has {len(state['base_lrs'])} parameter groups, the optimizer "
                f"{len(self.optimizer.param_groups)}: the model or optimizer setup changed since it was saved."
            )
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.plateau_scale = float(state["plateau_scale"])
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self._apply()

    # --- the schedule

    def _update_plateau(self, metrics: dict[str, float]) -> None:
        key = self.cfg.monitor
        if key not in metrics and self._split_not_evaluated(key, metrics):
            return
        if key not in metrics:
            raise ConfigError(
                f"sched.monitor = {key!r} is not among the evaluated metrics: {', '.join(sorted(metrics))}. "
                "Set sched.monitor to one of them."
            )
        value = float(metrics[key])
        if self._is_better(value):
            self.best = value
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.cfg.patience:
            self.plateau_scale *= self.cfg.factor
            self.bad_epochs = 0

    @staticmethod
    def _split_not_evaluated(key: str, metrics: dict[str, float]) -> bool:
        """True for an epoch that skipped evaluation (eval_every_epochs > 1): no ``val/...`` keys at all."""
        split = key.split("/", 1)[0]
        return split in _EVAL_SPLITS and not any(k.startswith(split + "/") for k in metrics)

    def _is_better(self, value: float) -> bool:
        """torch's ReduceLROnPlateau rule (threshold_mode "rel"); NaN never improves."""
        if math.isnan(value):
            return False
        if self.cfg.mode == "min":
            return value < self.best * (1.0 - _PLATEAU_THRESHOLD)
        return value > self.best * (1.0 + _PLATEAU_THRESHOLD)

    def _warmup_factor(self) -> float:
        if self.step >= self.warmup:
            return 1.0
        return (self.step + 1) / self.warmup

    def _scheduled_lr(self, base: float) -> float:
        """The lr after warmup, for one parameter group."""
        c = self.cfg
        if c.name == "cosine":
            span = max(1, self.total_steps - self.warmup)
            progress = min(1.0, max(0.0, (self.step - self.warmup) / span))
            return c.min_lr + (base - c.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if c.name == "step":
            lr = base * c.gamma ** (self.epoch // c.step_size)
        elif c.name == "multistep":
            lr = base * c.gamma ** sum(1 for m in c.milestones if m <= self.epoch)
        elif c.name == "plateau":
            lr = base * self.plateau_scale
        else:
            return base
        return max(lr, c.min_lr)

    def _apply(self) -> None:
        warm = self._warmup_factor()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = self._scheduled_lr(base) * warm


def build_scheduler(
    cfg: SchedConfig, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int
) -> Scheduler:
    """``steps_per_epoch`` counts optimizer steps (after gradient accumulation and any per-epoch cap)."""
    return Scheduler(cfg, optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs)
