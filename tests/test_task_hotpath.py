"""The training step's fast path computes exactly what the straightforward one did.

The trainer calls ``task.train_step`` and starts backward from a seed instead of dividing the loss
in the graph; the regression task computes its training sums later, many batches at once
(``MetricSums.defer``). These tests run the old per-step computation beside the new one on the
same batches and require bit-identical gradients and sums, wherever the deferred sums are flushed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from dist_train.metrics import MetricSums, add_rows_in_order
from dist_train.tasks.classification import ClassificationTask
from dist_train.tasks.regression import RegressionTask, layout_targets
from dist_train.trainer import backward_divided

SHAPES = {"energies": (1,), "positions": (1, 3), "angles": (2,)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def regression_task(*, normalised: bool, loss: str = "mse") -> RegressionTask:
    targets = layout_targets(SHAPES, {})
    mean = [500.0, 1.0, -2.0, 3.0, 0.5, 0.1] if normalised else None
    std = [200.0, 50.0, 60.0, 70.0, 0.3, 1.5] if normalised else None
    return RegressionTask(targets, loss=loss, mean=mean, std=std)


def batches(sizes: list[int], target_dtype: torch.dtype, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in sizes:
        out.append(
            {
                "x": torch.randn(b, 8, generator=g),
                "energies": (torch.rand(b, 1, generator=g) * 900 + 100).to(target_dtype),
                "positions": (torch.randn(b, 1, 3, generator=g) * 80).to(target_dtype),
                "angles": (torch.rand(b, 2, generator=g) * 3).to(target_dtype),
            }
        )
    return out


def old_step(task: Any, model: nn.Module, batch: dict[str, torch.Tensor], window: int, meter: MetricSums) -> None:
    """The trainer's micro-step before train_step existed (dist_train/trainer.py at e9fce41)."""
    outputs = model(batch["x"])
    loss_sum = task.loss(outputs, batch)
    (loss_sum / window).backward()
    meter.add({"loss": loss_sum.detach()})
    meter.add(task.metrics(outputs, batch))


def new_step(
    task: Any,
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    window: int,
    meter: MetricSums,
    seeds: dict[tuple[Any, ...], torch.Tensor],
) -> None:
    """What Trainer._micro_step does now (no loss scaler)."""
    step = task.train_step(model(batch["x"]), batch)
    backward_divided(step.loss, window, step.loss_divisor, seeds)
    if step.sums:
        meter.add(step.sums)
    if step.deferred is not None:
        meter.defer(step.deferred)


def run(
    task: Any,
    data: list[dict[str, torch.Tensor]],
    *,
    new: bool,
    width: int,
    read_at: tuple[int, ...] = (),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> tuple[dict[str, np.ndarray], list[np.ndarray], list[dict[str, np.ndarray]]]:
    torch.manual_seed(3)
    model = nn.Linear(8, width).to(device, dtype)
    meter = MetricSums(torch.device(device))
    seeds: dict[tuple[Any, ...], torch.Tensor] = {}
    reads = []
    for i, batch in enumerate(data):
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["x"] = batch["x"].to(dtype)
        window = 3 * len(batch["x"]) + 1  # any sample count: not a power of two
        if new:
            new_step(task, model, batch, window, meter, seeds)
        else:
            old_step(task, model, batch, window, meter)
        if i in read_at:  # a log step or a checkpoint reads the sums in the middle of an epoch
            reads.append(meter.local_sums())
    grads = [p.grad.float().cpu().numpy() for p in model.parameters()]  # type: ignore[union-attr]
    return meter.local_sums(), grads, reads


def assert_identical(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> None:
    assert set(old) == set(new)
    for key in old:
        np.testing.assert_array_equal(new[key], old[key], err_msg=key)
        assert new[key].dtype == old[key].dtype, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalised", [False, True])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_regression_train_step_gives_the_old_gradients_and_sums_bit_for_bit(
    normalised: bool, target_dtype: torch.dtype, loss: str, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several flushes (every 4 batches), batch sizes changing (an epoch's short last batch), reads in between.
    monkeypatch.setattr(MetricSums, "MAX_DEFERRED", 4)
    data = batches([32, 32, 32, 7, 32, 32, 32, 32, 32, 32, 5, 16, 16], target_dtype)
    task = regression_task(normalised=normalised, loss=loss)
    old_sums, old_grads, old_reads = run(task, data, new=False, width=6, read_at=(2, 3, 9), device=device)
    new_sums, new_grads, new_reads = run(task, data, new=True, width=6, read_at=(2, 3, 9), device=device)
    assert_identical(old_sums, new_sums)
    for old, new in zip(old_reads, new_reads, strict=True):
        assert_identical(old, new)
    for old, new in zip(old_grads, new_grads, strict=True):
        np.testing.assert_array_equal(new, old)
    assert new_sums["count"] == sum(len(b["x"]) for b in data)


def test_regression_train_step_with_bfloat16_outputs() -> None:
    """Autocast hands the task bf16 outputs: the kept copy widens them exactly, as the old float64 path did."""
    data = batches([16, 16, 9], torch.float32, seed=5)
    task = regression_task(normalised=True)
    old_sums, old_grads, _ = run(task, data, new=False, width=6, dtype=torch.bfloat16)
    new_sums, new_grads, _ = run(task, data, new=True, width=6, dtype=torch.bfloat16)
    assert_identical(old_sums, new_sums)
    for old, new in zip(old_grads, new_grads, strict=True):
        np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize("device", DEVICES)
def test_the_flush_points_do_not_change_the_totals(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run reads (flushes) the sums at its checkpoint; an uninterrupted one does not."""
    data = batches([32] * 20 + [11], torch.float32, seed=9)
    task = regression_task(normalised=True)
    results = []
    for max_deferred, reads in ((64, ()), (3, ()), (7, (0, 4, 5, 13))):
        monkeypatch.setattr(MetricSums, "MAX_DEFERRED", max_deferred)
        results.append(run(task, data, new=True, width=6, read_at=reads, device=device)[0])
    for other in results[1:]:
        assert_identical(results[0], other)


@pytest.mark.parametrize("device", DEVICES)
def test_classification_train_step_gives_the_old_gradients_and_sums_bit_for_bit(device: str) -> None:
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(b, 8, generator=g), "y": torch.randint(0, 4, (b,), generator=g)} for b in (12, 12, 5)]
    task = ClassificationTask(4, "labels", label_smoothing=0.1, class_weights=[1.0, 2.0, 0.5, 1.0])
    old_sums, old_grads, _ = run(task, data, new=False, width=4, device=device)
    new_sums, new_grads, _ = run(task, data, new=True, width=4, device=device)
    assert_identical(old_sums, new_sums)
    for old, new in zip(old_grads, new_grads, strict=True):
        np.testing.assert_array_equal(new, old)


def test_only_the_cpu_defers() -> None:
    assert MetricSums(torch.device("cpu"))._max_deferred == MetricSums.MAX_DEFERRED > 1
    assert MetricSums(torch.device("cuda", 0))._max_deferred == 1  # no CUDA call: only the device's type is read


def test_adding_rows_with_a_scan_equals_adding_them_one_by_one() -> None:
    g = torch.Generator().manual_seed(2)
    start = torch.randn(3, 6, generator=g, dtype=torch.float64) * 1e4
    rows = torch.randn(50, 3, 6, generator=g, dtype=torch.float64) * torch.logspace(-6, 6, 6, dtype=torch.float64)
    scanned, looped = start.clone(), start.clone()
    add_rows_in_order(scanned, rows, scan=True)
    add_rows_in_order(looped, rows, scan=False)
    expected = start.clone()
    for row in rows:
        expected = expected + row
    assert torch.equal(scanned, expected) and torch.equal(looped, expected)
