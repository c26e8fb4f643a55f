"""Regression of one or several float targets, with physics metrics for energies, positions, directions.

Targets are HDF5 datasets of any per-sample shape ((N,), (N, 1), (N, 1, 3), (N, 2)); each is
flattened per sample and the targets are concatenated in ``task.targets`` order, so the model
outputs ``width`` = the sum of their sizes. With ``target_norm`` the loss sees
``(target - mean) / std`` and the model learns normalised values; metrics and predictions are
always in the file's units (``prediction = output * std + mean``).

Per-sample loss: ``sum_t w_t * (n_t / n) * l_t`` over the targets, with ``n_t`` the target's columns
of ``n``, ``w_t`` its ``loss_weights`` entry (1) and ``l_t`` the mean over its columns of its
elementwise loss, or for ``angular`` the angle (radians) between predicted and true direction. With
one elementwise loss and no weights this is the mean over all columns, so ``mse`` equals
``F.mse_loss`` of the plain loop. Metrics per target: ``mae``, ``rmse``, ``bias`` (mean signed
error) over all its columns, and per column (``<target>/<i or name>/...``) where it has several.
Derived metrics by kind:

* ``energy``: ``frac_bias``, ``frac_resolution`` (the mean and standard deviation of
  ``(pred - true) / true``) and ``frac_rms`` (its root mean square: bias cannot hide in it);
* ``position`` (3 columns): ``distance_mean`` and ``distance_68``, the mean and 68th percentile
  of the 3-D distance between predicted and true positions;
* ``direction`` (2 angles: zenith, azimuth in radians, or a 3-vector): ``angle_mean_deg`` and
  ``angle_68_deg``, the angle between predicted and true directions.

Percentiles come from every evaluated sample's error (gathered once each), not from sums.

``bins = {energies = [edges]}``: evaluation also reports every target's metrics per bin
``[lo, hi)`` of that (one-column) target's true value, under ``bin_<target>_<lo>_<hi>/``; the
residuals (pred - true) of every target are shown as a histogram per evaluation (a report).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dist_train.errors import ConfigError
from dist_train.metrics import DeferredSums, Sums
from dist_train.tasks.base import Batch, Task, TrainStep

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
                f'but {name!r} has shape {shape} ({width}). Declare it "plain" or fix task.targets.'
            )
        targets.append(Target(name, tuple(shape), start, kind))
        start += width
    return targets


def _guess_kind(name: str, width: int) -> str:
    kind = _KIND_BY_NAME.get(name.lower(), "plain")
    return kind if kind == "plain" or width in _KIND_WIDTHS[kind] else "plain"


#: Per-column losses; "angular" is one value per sample, the angle between the directions.
ELEMENTWISE_LOSSES = ("mse", "l1", "huber", "smooth_l1")
ANGULAR = "angular"
#: Metrics a bias cannot move (a model predicting half the truth keeps its resolution): monitoring one
#: to choose the best checkpoint gets a warning (see dist_train.tasks.task_warnings).
BIAS_BLIND_METRICS = ("frac_resolution",)
# Added under the square root of |a x b|^2: the angular loss keeps a finite gradient where the
# predicted direction equals the true one (1e-10 rad, far below float32's resolution of angles).
_ANGLE_EPS = 1e-20
# asin's gradient is infinite at 1 (opposite directions): stop just short of it.
_ASIN_MAX = 1.0 - 1e-7


def _loss_function(
    name: str, delta: float, reduction: str = "sum"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The elementwise loss ``name`` summed over the batch (``reduction="none"``: per element)."""
    if name == "l1":
        return lambda o, t: F.l1_loss(o, t, reduction=reduction)
    if name == "huber":
        return lambda o, t: F.huber_loss(o, t, reduction=reduction, delta=delta)
    if name == "smooth_l1":
        return lambda o, t: F.smooth_l1_loss(o, t, reduction=reduction, beta=delta)
    return lambda o, t: F.mse_loss(o, t, reduction=reduction)


def _column_weights(terms: list[LossTerm], loss: str, width: int) -> torch.Tensor:
    """Per output column: the weight of its target if that target's loss is ``loss``, else 0."""
    weights = torch.zeros(width)
    for term in terms:
        if term.loss == loss:
            weights[term.target.columns] = term.weight
    return weights


@dataclass(frozen=True)
class LossTerm:
    """One target's share of the loss: which loss and with what weight."""

    target: Target
    loss: str
    weight: float = 1.0


def loss_terms(targets: list[Target], loss: str | Mapping[str, str], weights: Mapping[str, float]) -> list[LossTerm]:
    """Each target's loss (``task.loss``: one name for all, or a table by target; unlisted ones: mse)."""
    names = [t.name for t in targets]
    per_target = dict(loss) if isinstance(loss, Mapping) else {}
    default = loss if isinstance(loss, str) and loss else "mse"
    for setting, table in (("task.loss", per_target), ("task.loss_weights", weights)):
        for key in table:
            if key not in names:
                raise ConfigError(f"{setting}.{key} names no target; the targets are {names}.")
    terms = []
    for t in targets:
        name = str(per_target.get(t.name) or default)
        if name == ANGULAR and t.width not in (2, 3):
            raise ConfigError(
                f'task.loss for {t.name!r} is "angular", which needs a direction: 2 columns (zenith, azimuth in '
                f"radians) or 3 (a vector), but {t.name!r} has shape {t.shape} ({t.width} columns). Give it an "
                "elementwise loss (mse, l1, huber, smooth_l1) in the table task.loss = { ... }."
            )
        terms.append(LossTerm(t, name, float(weights.get(t.name, 1.0))))
    return terms


@dataclass(frozen=True)
class Binning:
    """``task.bins`` of one target: evaluation metrics per bin ``[lo, hi)`` of its true value."""

    target: Target
    edges: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.edges) - 1

    def label(self, i: int) -> str:
        return f"bin_{self.target.name}_{self.edges[i]:g}_{self.edges[i + 1]:g}"

    def index(self, true: torch.Tensor) -> torch.Tensor:
        """Each sample's bin, ``count`` for a value outside every bin (or NaN): a slot that is dropped."""
        values = true[:, self.target.start].contiguous()
        edges = torch.tensor(self.edges, dtype=values.dtype, device=values.device)
        idx = torch.searchsorted(edges, values, right=True) - 1
        return torch.where((idx >= 0) & (idx < self.count), idx, torch.full_like(idx, self.count))


def binnings(targets: list[Target], bins: Mapping[str, Sequence[float]]) -> list[Binning]:
    by_name = {t.name: t for t in targets}
    out = []
    for name, edges in bins.items():
        t = by_name.get(name)
        if t is None:
            raise ConfigError(f"task.bins.{name} names no target; the targets are {list(by_name)}.")
        if t.width != 1:
            raise ConfigError(
                f"task.bins.{name}: {name!r} has {t.width} columns per sample ({t.shape}); bins need a one-column "
                "target such as energies."
            )
        out.append(Binning(t, tuple(float(e) for e in edges)))
    return out


def column_labels(targets: list[Target], columns: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """The names of each target's columns in metric keys: ``task.columns``, else 0, 1, 2 ..."""
    by_name = {t.name: t for t in targets}
    for name, labels in columns.items():
        t = by_name.get(name)
        if t is None:
            raise ConfigError(f"task.columns.{name} names no target; the targets are {list(by_name)}.")
        if len(labels) != t.width:
            raise ConfigError(
                f"task.columns.{name} = {list(labels)} names {len(labels)} columns, but {name!r} has {t.width} "
                f"per sample (shape {t.shape}); give one name per column."
            )
    return {t.name: [str(c) for c in columns.get(t.name, range(t.width))] for t in targets}


class RegressionTask(Task):
    name = "regression"
    has_histograms = True

    def __init__(
        self,
        targets: list[Target],
        *,
        loss: str | Mapping[str, str] = "mse",
        loss_weights: Mapping[str, float] | None = None,
        huber_delta: float = 1.0,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        bins: Mapping[str, Sequence[float]] | None = None,
        columns: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.targets = targets
        self.width = sum(t.width for t in targets)
        self.output_width = self.width
        self.batch_keys = tuple(t.name for t in targets)
        self.terms = loss_terms(targets, loss, loss_weights or {})
        first = self.terms[0].loss
        # One elementwise loss, unweighted: the plain loop's one loss call over all columns.
        self._uniform = all(term.loss == first != ANGULAR and term.weight == 1.0 for term in self.terms)
        self._loss = _loss_function(first, huber_delta) if self._uniform else self._combined_loss
        # The combined loss: per elementwise loss, its per-column weights; the angular terms.
        self._unreduced = {
            term.loss: _loss_function(term.loss, huber_delta, "none") for term in self.terms if term.loss != ANGULAR
        }
        self._column_weights = {name: _column_weights(self.terms, name, self.width) for name in self._unreduced}
        self._angular = [term for term in self.terms if term.loss == ANGULAR]
        self.binnings = binnings(targets, bins or {})
        self.column_labels = column_labels(targets, columns or {})
        self._mean_list, self._std_list = mean, std
        self._stats: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ targets and units
    def _norm(
        self, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
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
    def _loss_sum(self, outputs: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """The batch's loss sum times the width (the division is the caller's): float32 ``outputs``
        as the model gives them (normalised units) and float32 ``true`` in file units."""
        if self._uniform:
            return self._loss(outputs, self._normalised(true))
        return self._combined_loss(outputs, true)

    def _combined_loss(self, outputs: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        """sum_t w_t * n_t * l_t over the targets (see the module docstring); tensor ops only, no host sync.

        Each elementwise loss runs once over all columns, weighted per column (0 for the columns of
        other losses): a few kernels whatever the number of targets.
        """
        total: torch.Tensor | None = None
        if self._column_weights:
            target = self._normalised(true)
            for name, weights in self._column_weights.items():
                if weights.device != outputs.device:  # moved once: the first step on a GPU
                    weights = self._column_weights[name] = weights.to(outputs.device)
                value = (self._unreduced[name](outputs, target) * weights).sum()
                total = value if total is None else total + value
        if self._angular:
            stats = self._norm(outputs.device)
            for term in self._angular:
                cols = term.target.columns
                # The angle of the directions in file units: normalised angles or vector components are not one.
                pred = outputs[:, cols] if stats is None else outputs[:, cols] * stats[1][cols] + stats[0][cols]
                value = direction_angles_rad(pred, true[:, cols]).sum() * (term.target.width * term.weight)
                total = value if total is None else total + value
        assert total is not None  # a task has at least one target
        return total

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        # Sum over samples of the per-sample mean over columns: F.<loss>(reduction="mean") * batch.
        return self._loss_sum(outputs.float(), self.true_values(batch)) / self.width

    def train_step(self, outputs: torch.Tensor, batch: Batch) -> TrainStep:
        """The loss of :meth:`loss` and the sums of :meth:`metrics`, bit for bit, at a fraction of the cost.

        The targets are joined once, for the loss and the metrics; the metric sums are computed
        later, many batches at once (:meth:`_train_sums`); the division by the width is left to the
        trainer's backward seed. Per step this is the plain loop's work plus one small ``cat``.
        """
        size = outputs.shape[0]
        # A new tensor even for one target: a view could keep a whole shared-memory batch alive until the flush.
        true = torch.cat([batch[name].reshape(size, -1) for name in self.batch_keys], dim=1)
        raw = self._loss_sum(outputs.float(), true.to(torch.float32))
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
        sums: Sums = {
            "err": torch.stack((err.sum(0), err.square().sum(0), err.abs().sum(0))),
            "count": int(true.shape[0]),
        }
        per_sample: dict[str, torch.Tensor] = {}  # what the binned sums add up, one row per sample
        for t in self.targets:
            if t.kind == "energy":
                frac, valid = _fractional_errors(pred[:, t.columns], true[:, t.columns])
                sums[f"{t.name}:frac"] = torch.stack((frac.sum(), frac.square().sum(), valid.sum()))
                per_sample[f"{t.name}:frac"] = torch.stack((frac, frac.square(), valid), dim=1)
            elif t.kind in ("position", "direction"):
                distance = self._distance(t, pred, true)
                sums[f"{t.name}:{t.kind}"] = distance.sum()
                per_sample[f"{t.name}:{t.kind}"] = distance
        if self.binnings:
            per_sample["err"] = torch.stack((err, err.square(), err.abs()), dim=1)
            per_sample["count"] = torch.ones_like(err[:, 0])
            for b in self.binnings:
                idx = b.index(true)
                for key, values in per_sample.items():
                    slots = values.new_zeros((b.count + 1, *values.shape[1:])).index_add_(0, idx, values)
                    sums[f"bin:{b.target.name}:{key}"] = slots[: b.count]
        return sums

    def eval_samples(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        pred, true, _ = self._errors(outputs, batch)
        out = {t.name: self._distance(t, pred, true) for t in self.targets if t.kind in ("position", "direction")}
        out.update({f"bin:{b.target.name}": b.index(true).double() for b in self.binnings})
        return out

    @staticmethod
    def _distance(t: Target, pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        p, q = pred[:, t.columns].double(), true[:, t.columns].double()
        if t.kind == "position":
            return torch.linalg.vector_norm(p - q, dim=1)
        return angle_between_deg(as_unit_vectors(p), as_unit_vectors(q))

    def finalize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        n = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / n}
        err = np.asarray(sums.get("err", np.zeros((3, self.width))))
        for t in self.targets:
            out.update(self._target_metrics(t, t.name, err, n, sums, per_column=True))
        for b in self.binnings:
            counts = sums.get(f"bin:{b.target.name}:count")
            if counts is None:  # training sums have no bins
                continue
            for i in range(b.count):
                label = b.label(i)
                n_i = float(counts[i])
                out[f"{label}/samples"] = n_i
                # This bin's row of every binned sum, under the unbinned sums' names.
                row = {
                    key.split(":", 2)[2]: value[i]
                    for key, value in sums.items()
                    if key.startswith(f"bin:{b.target.name}:")
                }
                for t in self.targets:
                    out.update(self._target_metrics(t, f"{label}/{t.name}", row["err"], n_i, row))
        out["samples"] = float(sums["count"])
        return out

    def _target_metrics(
        self,
        t: Target,
        prefix: str,
        err: np.ndarray,
        n: float,
        sums: Mapping[str, np.ndarray],
        *,
        per_column: bool = False,
    ) -> dict[str, float]:
        """mae/rmse/bias (per column too) and the kind's derived metrics of ``n`` samples (NaN when none)."""
        n = n if n > 0 else math.nan
        out = _error_summary(prefix, err[:, t.columns], n)
        if per_column and t.width > 1:
            for i, label in enumerate(self.column_labels[t.name]):
                out.update(_error_summary(f"{prefix}/{label}", err[:, t.start + i : t.start + i + 1], n))
        if t.kind == "energy" and (frac := sums.get(f"{t.name}:frac")) is not None:
            s, sq, valid = (float(v) for v in frac)
            m = math.nan if math.isnan(n) else valid if valid > 0 else 1.0
            mean = s / m
            out[f"{prefix}/frac_bias"] = mean
            # max(nan, 0.0) is nan: an empty bin stays NaN.
            out[f"{prefix}/frac_resolution"] = math.sqrt(max(sq / m - mean * mean, 0.0))
            out[f"{prefix}/frac_rms"] = math.sqrt(sq / m)
        elif t.kind in ("position", "direction") and (distance := sums.get(f"{t.name}:{t.kind}")) is not None:
            name = "distance_mean" if t.kind == "position" else "angle_mean_deg"
            out[f"{prefix}/{name}"] = float(distance) / n
        return out

    def finalize_samples(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        out = {}
        for t in self.targets:
            values = samples.get(t.name)
            if values is None or t.kind not in ("position", "direction"):
                continue
            name = "distance_68" if t.kind == "position" else "angle_68_deg"
            if len(values):
                out[f"{t.name}/{name}"] = float(np.quantile(values, 0.68))
            for b in self.binnings:
                index = samples.get(f"bin:{b.target.name}")
                if index is None:
                    continue
                for i in range(b.count):
                    chosen = values[index == i]
                    out[f"{b.label(i)}/{t.name}/{name}"] = float(np.quantile(chosen, 0.68)) if len(chosen) else math.nan
        return out

    def eval_histograms(self, outputs: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        _, _, err = self._errors(outputs, batch)
        return {t.name: err[:, t.columns] for t in self.targets}

    def histogram_reports(self, histograms: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``residuals``: each target's pred - true (all its columns) over the split."""
        return {"residuals": histograms} if histograms else {}

    def metric_names(self) -> list[str]:
        """What an evaluation reports: the task's own answer on one zero sample (bins and derived metrics included)."""
        outputs = torch.zeros(1, self.width, dtype=torch.float64)
        batch = {t.name: torch.zeros(1, *t.shape, dtype=torch.float64) for t in self.targets}
        sums = {
            k: np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
            for k, v in self.eval_metrics(outputs, batch).items()
        }
        sums["loss"] = np.zeros(())
        samples = {k: v.double().reshape(-1).numpy() for k, v in self.eval_samples(outputs, batch).items()}
        return list(self.finalize(sums)) + list(self.finalize_samples(samples))

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
    """(B, 2) zenith/azimuth angles in radians, or (B, 3) vectors, as (B, 3) unit vectors (same dtype)."""
    v = values
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


def direction_angles_rad(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """The angular loss: radians between predicted and true directions, row by row, with a finite
    gradient everywhere (also where they agree). (zenith, azimuth) pairs by the haversine formula
    (a dozen kernels, accurate near 0); 3-vectors by ``2 atan2(|a - b|, |a + b|)`` of their unit vectors."""
    if pred.shape[1] == 2:
        z1, a1, z2, a2 = pred[:, 0], pred[:, 1], true[:, 0], true[:, 1]
        # hav(angle) = hav(z1 - z2) + sin z1 sin z2 hav(a1 - a2): algebra on the unit vectors, any zenith.
        h = torch.sin((z1 - z2) * 0.5).square() + torch.sin(z1) * torch.sin(z2) * torch.sin((a1 - a2) * 0.5).square()
        return 2 * torch.asin(torch.sqrt(h.clamp(min=0.0) + _ANGLE_EPS).clamp(max=_ASIN_MAX))
    a, b = as_unit_vectors(pred), as_unit_vectors(true)
    apart = torch.sqrt((a - b).square().sum(1) + _ANGLE_EPS)
    return 2 * torch.atan2(apart, torch.sqrt((a + b).square().sum(1) + _ANGLE_EPS))
