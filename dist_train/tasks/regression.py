"""Regression of one or several float targets, with physics metrics for energies, positions, directions.

Targets are HDF5 datasets of any per-sample shape ((N,), (N, 1), (N, 1, 3), (N, 2)); each is
flattened per sample and the targets are concatenated in ``task.targets`` order, so the model
outputs ``width`` = the sum of their sizes. With ``target_norm`` the loss sees
``(target - mean) / std`` and the model learns normalised values; metrics and predictions are
always in the file's units (``prediction = output * std + mean``).

Per-sample loss is the mean over the target columns, so ``mse`` equals ``F.mse_loss`` of the plain
loop. Metrics per target: ``mae``, ``rmse``, ``bias`` (mean signed error) over all its columns, and
per column (``<target>/<i>/...``) where it has several. Derived metrics by kind:

* ``energy``: ``frac_bias`` and ``frac_resolution``, the mean and standard deviation of
  ``(pred - true) / true``;
* ``position`` (3 columns): ``distance_mean`` and ``distance_68``, the mean and 68th percentile
  of the 3-D distance between predicted and true positions;
* ``direction`` (2 angles: zenith, azimuth in radians, or a 3-vector): ``angle_mean_deg`` and
  ``angle_68_deg``, the angle between predicted and true directions.

Percentiles come from every evaluated sample's error (gathered once each), not from sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.errors import ConfigError
from dist_train.tasks.base import Batch, DeferredSums, Sums, Task, TrainStep

# Kinds guessed from the standard water-Cherenkov dataset names when task.kinds does not say.
_KIND_BY_NAME = {
    "energies": "energy",
    "energy": "energy",
    "positions": "position",
    "position": "position",
    "angles": "direction",
    "directions": "direction",
    "direction": "direction",
}
_KIND_WIDTHS = {"energy": (1,), "position": (3,), "direction": (2, 3)}


@dataclass(frozen=True)
class Target:
    """One regression target: its dataset name, per-sample shape, columns in the output and kind."""

    name: str
    shape: tuple[int, ...]
    start: int
    kind: str = "plain"

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    @property
    def columns(self) -> slice:
        return slice(self.start, self.start + self.width)


def layout_targets(shapes: dict[str, tuple[int, ...]], kinds: dict[str, str]) -> list[Target]:
    """Targets in order with their output columns; kinds declared, or guessed from the name."""
    targets, start = [], 0
    for name, shape in shapes.items():
        width = math.prod(shape)
        kind = kinds.get(name) or _guess_kind(name, width)
        if kind != "plain" and width not in _KIND_WIDTHS[kind]:
            raise ConfigError(
                f"task.kinds.{name} = {kind!r} needs {' or '.join(map(str, _KIND_WIDTHS[kind]))} values per sample, "
                f"but {name!r} has shape {shape} ({width}). Declare it \"plain\" or fix task.targets."
            )
        targets.append(Target(name, tuple(shape), start, kind))
        start += width
    return targets


def _guess_kind(name: str, width: int) -> str:
    kind = _KIND_BY_NAME.get(name.lower(), "plain")
    return kind if kind == "plain" or width in _KIND_WIDTHS[kind] else "plain"


def _loss_function(name: str, delta: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "l1":
        return lambda o, t: F.l1_loss(o, t, reduction="sum")
    if name == "huber":
        return lambda o, t: F.huber_loss(o, t, reduction="sum", delta=delta)
    if name == "smooth_l1":
        return lambda o, t: F.smooth_l1_loss(o, t, reduction="sum", beta=delta)
    return lambda o, t: F.mse_loss(o, t, reduction="sum")


class RegressionTask(Task):
    name = "regression"

    def __init__(
        self,
        targets: list[Target],
        *,
        loss: str = "mse",
        huber_delta: float = 1.0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ) -> None:
        self.targets = targets
        self.width = sum(t.width for t in targets)
        self.output_width = self.width
        self.batch_keys = tuple(t.name for t in targets)
        self.loss_name = loss or "mse"
        self._loss = _loss_function(self.loss_name, huber_delta)
        self._mean_list, self._std_list = mean, std
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ targets and units
    def _norm(self, device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) on ``device``: float32 for the loss, float64 for metrics in file units."""
        if self._mean_list is None or self._std_list is None:
            return None
        key = (device, dtype)
        if key not in self._stats:
            self._stats[key] = (
                torch.tensor(self._mean_list, dtype=dtype, device=device),
                torch.tensor(self._std_list, dtype=dtype, device=device),
            )
        return self._stats[key]

    def true_values(self, batch: Batch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, width) targets in file units, concatenated in target order."""
        parts = [batch[t.name].reshape(batch[t.name].shape[0], -1) for t in self.targets]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return joined.to(dtype)

    def to_file_units(self, outputs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        stats = self._norm(outputs.device, dtype)
        out = outputs.to(dtype)
        return out if stats is None else out * stats[1] + stats[0]

    def _normalised(self, true: torch.Tensor) -> torch.Tensor:
        stats = self._norm(true.device)
        return true if stats is None else (true - stats[0]) / stats[1]

    # ------------------------------------------------------------------ loss and metrics
    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        # Sum over samples of the per-sample mean over columns: F.<loss>(reduction="mean") * batch.
        return self._loss(outputs.float(), self._normalised(self.true_values(batch))) / self.width

    def train_step(self, outputs: torch.Tensor, batch: Batch) -> TrainStep:
        """The loss of :meth:`loss` and the sums of :meth:`metrics`, bit for bit, at a fraction of the cost.

        The targets are joined once, for the loss and the metrics; the metric sums are computed
        later, many batches at once (:meth:`_train_sums`); the division by the width is left to the
        trainer's backward seed. Per step this is the plain loop's work plus one small ``cat``.
        """
        size = outputs.shape[0]
        # A new tensor even for one target: a view could keep a whole shared-memory batch alive until the flush.
        true = torch.cat([batch[name].reshape(size, -1) for name in self.batch_keys], dim=1)
        raw = self._loss(outputs.float(), self._normalised(true.to(torch.float32)))
        # The outputs are kept as they are: the next forward makes new ones, nothing writes these again.
        deferred = DeferredSums(self._train_sums, (outputs.detach(), true, raw.detach()), {"count": size})
        return TrainStep(raw, self.width, {}, deferred)

    def _train_sums(self, kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per batch (one row each): the loss sum and :meth:`metrics`' moments, from what train_step kept.

        Elementwise the same float operations as :meth:`loss` and :meth:`metrics`; the reductions
        run over each batch's own samples (``sum(1)`` of the stacked batches), which adds in the
        same order as ``sum(0)`` of one batch on the CPU (tests/test_task_hotpath.py checks the bits).
        """
        losses = torch.stack([raw for _, _, raw in kept]) / self.width  # float32, like loss()
        moments = []
        start = 0
        while start < len(kept):  # runs of batches of one size (an epoch's last batch may be short)
            size = kept[start][1].shape
            end = start + 1
            while end < len(kept) and kept[end][1].shape == size:
                end += 1
            run = kept[start:end]
            pred = self.to_file_units(torch.stack([out for out, _, _ in run]), torch.float64)
            err = pred - torch.stack([true for _, true, _ in run]).to(torch.float64)
            moments.append(torch.stack((err.sum(1), err.square().sum(1), err.abs().sum(1)), dim=1))
            start = end
        return {"loss": losses, "err": moments[0] if len(moments) == 1 else torch.cat(moments)}

    def _errors(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions, truths and errors in file units, in float64 (energies of hundreds of MeV
        would lose the last digits of their errors in float32)."""
        true = self.true_values(batch, torch.float64)
        pred = self.to_file_units(outputs.detach(), torch.float64)
        return pred, true, pred - true

    def metrics(self, outputs: torch.Tensor, batch: Batch) -> Sums:
        _, true, err = self._errors(outputs, batch)
        # One (3, width) tensor: one accumulator add per step instead of three.
        moments = torch.stack((err.sum(0), err.square().sum(0), err.abs().sum(0)))
        return {"err": moments, "count": int(true.shape[0])}

    def eval_metrics(self, outputs: torch.Tensor, batch: Batch) -> Sums:
        pred, true, err = self._errors(outputs, batch)
        sums: Sums = {"err": torch.stack((err.sum(0), err.square().sum(0), err.abs().sum(0))), "count": int(true.shape[0])}
        for t in self.targets:
            if t.kind == "energy":
                frac, valid = _fractional_errors(pred[:, t.columns], true[:, t.columns])
                sums[f"{t.name}:frac"] = torch.stack((frac.sum(), frac.square().sum(), valid.sum()))
            elif t.kind in ("position", "direction"):
                sums[f"{t.name}:{t.kind}"] = self._distance(t, pred, true).sum()
        return sums

    def eval_samples(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        pred, true, _ = self._errors(outputs, batch)
        return {t.name: self._distance(t, pred, true) for t in self.targets if t.kind in ("position", "direction")}

    @staticmethod
    def _distance(t: Target, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        p, q = pred[:, t.columns], true[:, t.columns]
        if t.kind == "position":
            return torch.linalg.vector_norm(p - q, dim=1)
        return angle_between_deg(as_unit_vectors(p), as_unit_vectors(q))

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / n}
        err = np.asarray(sums.get("err", np.zeros((3, self.width))))
        for t in self.targets:
            out.update(_error_summary(t.name, err[:, t.columns], n))
            if t.width > 1:
                for i in range(t.width):
                    out.update(_error_summary(f"{t.name}/{i}", err[:, t.start + i : t.start + i + 1], n))
            out.update(self._derived(t, sums, n))
        out["samples"] = float(sums["count"])
        return out

    @staticmethod
    def _derived(t: Target, sums: dict[str, np.ndarray], n: float) -> dict[str, float]:
        if t.kind == "energy" and f"{t.name}:frac" in sums:
            s, sq, valid = (float(v) for v in sums[f"{t.name}:frac"])
            m = valid if valid > 0 else 1.0
            mean = s / m
            return {f"{t.name}/frac_bias": mean, f"{t.name}/frac_resolution": math.sqrt(max(sq / m - mean * mean, 0.0))}
        key = f"{t.name}:{t.kind}"
        if key in sums:
            name = "distance_mean" if t.kind == "position" else "angle_mean_deg"
            return {f"{t.name}/{name}": float(sums[key]) / n}
        return {}

    def finalize_samples(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        out = {}
        for t in self.targets:
            values = samples.get(t.name)
            if values is not None and len(values):
                name = "distance_68" if t.kind == "position" else "angle_68_deg"
                out[f"{t.name}/{name}"] = float(np.quantile(values, 0.68))
        return out

    def metric_names(self) -> list[str]:
        sums: dict[str, np.ndarray] = {"loss": np.zeros(()), "count": np.zeros(())}
        for t in self.targets:  # the derived metrics appear when their sums do
            if t.kind == "energy":
                sums[f"{t.name}:frac"] = np.zeros(3)
            elif t.kind != "plain":
                sums[f"{t.name}:{t.kind}"] = np.zeros(())
        names = list(self.finalize(sums))
        names += list(self.finalize_samples({t.name: np.zeros(1) for t in self.targets if t.kind != "plain"}))
        return names

    def predictions(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        pred = self.to_file_units(outputs)
        rows = {}
        for t in self.targets:
            rows[f"{t.name}_pred"] = pred[:, t.columns].reshape(-1, *t.shape)
            rows[f"{t.name}_true"] = batch[t.name].float().reshape(-1, *t.shape)
        return rows


def _error_summary(name: str, err: np.ndarray, n: float) -> dict[str, float]:
    """mae, rmse and bias over the columns of ``err`` = (sum e, sum e^2, sum |e|) per column."""
    values = n * err.shape[1]
    return {
        f"{name}/mae": float(err[2].sum()) / values,
        f"{name}/rmse": math.sqrt(float(err[1].sum()) / values),
        f"{name}/bias": float(err[0].sum()) / values,
    }


def _fractional_errors(pred: torch.Tensor, true: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred - true) / true per sample, 0 where true is 0 (those samples are not counted)."""
    p, q = pred.double().reshape(-1), true.double().reshape(-1)
    valid = q != 0
    frac = torch.where(valid, (p - q) / torch.where(valid, q, torch.ones_like(q)), torch.zeros_like(q))
    return frac, valid.double()


def as_unit_vectors(values: torch.Tensor) -> torch.Tensor:
    """(B, 2) zenith/azimuth angles in radians, or (B, 3) vectors, as (B, 3) unit vectors."""
    v = values.double()
    if v.shape[1] == 2:
        zenith, azimuth = v[:, 0], v[:, 1]
        v = torch.stack(
            (torch.sin(zenith) * torch.cos(azimuth), torch.sin(zenith) * torch.sin(azimuth), torch.cos(zenith)), dim=1
        )
    return v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-12)


def angle_between_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between unit vectors, row by row (atan2 form: accurate near 0 and 180)."""
    cross = torch.linalg.vector_norm(torch.cross(a, b, dim=1), dim=1)
    return torch.rad2deg(torch.atan2(cross, (a * b).sum(1)))
