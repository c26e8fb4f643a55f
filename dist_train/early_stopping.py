"""Early stopping: end training when ``checkpoint.monitor`` stops improving, on every rank at the same epoch.

``[train] early_stop_patience = N`` stops after N evaluated epochs in a row without an improvement of
``checkpoint.monitor`` (in ``checkpoint.mode``) by more than ``early_stop_min_delta``. Epochs whose
metrics lack the monitor (``eval_every_epochs`` > 1) neither count nor reset the wait.

The metrics are reduced identically on every rank, so every rank normally reaches the same verdict;
the verdict is still all-reduced ("any rank stops" = all stop, as Lightning's
``reduce_boolean_decision(all=False)``), so that a last-bit difference can never let one rank leave
the loop while the others wait in the next epoch's collectives. The state (best value, epochs
waited, the agreed stop) is a Stateful in every checkpoint: a resumed run counts on exactly.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from dist_train.config import Config
from dist_train.distributed.comm import sync_bool
from dist_train.errors import ConfigError

log = logging.getLogger("dtrain")


class EarlyStopping:
    """Patience counter over the epochs' monitored value; ``patience = 0`` never stops (and never communicates)."""

    def __init__(self, monitor: str, mode: str, patience: int, min_delta: float) -> None:
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_epoch = 0  # 1-based epoch of ``best``
        self.wait = 0  # evaluated epochs since the last improvement
        self.stopped_epoch = 0  # 1-based epoch after which all ranks agreed to stop (0 = not stopped)

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch > 0

    def _improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False  # NaN/inf never becomes the best; it counts as an epoch without improvement
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _update(self, metrics: dict[str, float], epoch: int) -> bool:
        """This rank's verdict after ``epoch`` (1-based): True when patience has run out."""
        if self.monitor not in metrics:
            return False
        value = float(metrics[self.monitor])
        if self._improves(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return self.wait >= self.patience

    def step(self, metrics: dict[str, float], epoch: int) -> bool:
        """After ``epoch`` (1-based) finished: True when every rank stops now. A collective when enabled."""
        if not self.enabled or self.stopped:
            return self.stopped
        if sync_bool(self._update(metrics, epoch), op="any"):
            self.stopped_epoch = epoch
        return self.stopped

    def reason(self) -> str:
        best = "none" if self.best is None else f"{self.best:.6g} after epoch {self.best_epoch}"
        delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
        return (
            f"early stopping after epoch {self.stopped_epoch}: {self.monitor} has not improved{delta} "
            f"({self.mode}) for {self.wait} evaluated epoch(s) (train.early_stop_patience = {self.patience}; best {best})"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("monitor") != self.monitor:
            # The monitored metric changed between launches: its old best means nothing for the new one.
            log.info(
                "early stopping: checkpoint.monitor is now %s (was %s); counting from scratch",
                self.monitor,
                state.get("monitor"),
            )
            return
        self.best = None if state["best"] is None else float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])


def build_early_stopping(cfg: Config, *, has_val_data: bool) -> EarlyStopping:
    """The run's early stopping; refuses a monitor on a split the run does not evaluate."""
    stopper = EarlyStopping(
        cfg.checkpoint.monitor, cfg.checkpoint.mode, cfg.train.early_stop_patience, cfg.train.early_stop_min_delta
    )
    if stopper.enabled and cfg.checkpoint.monitor.startswith("val/") and not has_val_data:
        raise ConfigError(
            f"train.early_stop_patience = {cfg.train.early_stop_patience} watches checkpoint.monitor = "
            f"{cfg.checkpoint.monitor!r}, but this run has no validation split (data.val_split = {cfg.data.val_split}, "
            "or an empty val_idxs in data.split_file). Give it a validation split, monitor a train/ metric, "
            "or set train.early_stop_patience = 0."
        )
    return stopper
