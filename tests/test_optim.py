"""Optimizers and the lr scheduler: hyperparameters, curves, plateau logic and exact resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from dist_train.config import OptimConfig, SchedConfig
from dist_train.errors import CheckpointError, ConfigError
from dist_train.optim import Scheduler, build_optimizer, build_scheduler


def _optimizer(lr: float = 0.1, name: str = "sgd", **kwargs: object) -> torch.optim.Optimizer:
    model = nn.Linear(3, 2)
    return build_optimizer(OptimConfig(name=name, lr=lr, **kwargs), model.parameters())  # type: ignore[arg-type]


def _sched(cfg: SchedConfig, opt: torch.optim.Optimizer, steps: int = 10, epochs: int = 5) -> Scheduler:
    return build_scheduler(cfg, opt, steps_per_epoch=steps, epochs=epochs)


def _lrs_per_step(sched: Scheduler, steps_per_epoch: int, epochs: int) -> list[float]:
    """The lr used by every optimizer step of the run, driving the scheduler like the trainer."""
    used = []
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            used.append(sched.lr())
            sched.step_batch()
        sched.step_epoch({"val/loss": 1.0})
    return used


# ----------------------------------------------------------------------------- optimizers


def test_sgd_momentum_nesterov_weight_decay() -> None:
    opt = _optimizer(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 5e-4)


def test_sgd_step_moves_parameters_by_lr_times_grad() -> None:
    param = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.5), [param])
    (param * torch.tensor([2.0, 4.0])).sum().backward()
    opt.step()
    assert torch.allclose(param.detach(), torch.tensor([1.0 - 0.5 * 2.0, -2.0 - 0.5 * 4.0]))


@pytest.mark.parametrize(("name", "cls"), [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_family(name: str, cls: type) -> None:
    opt = _optimizer(name=name, lr=3e-4, betas=[0.8, 0.95], eps=1e-6, weight_decay=0.01)
    assert type(opt) is cls
    group = opt.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.01)


def test_optimizer_kwargs_are_passed() -> None:
    opt = _optimizer(name="adam", kwargs={"amsgrad": True})
    assert opt.param_groups[0]["amsgrad"] is True


def test_unknown_optimizer_kwarg_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'amsgrd'.*'adam'.*Did you mean 'amsgrad'"):
        _optimizer(name="adam", kwargs={"amsgrd": True})
    with pytest.raises(ConfigError, match=r"unknown key 'dampning'.*Did you mean 'dampening'"):
        _optimizer(name="sgd", kwargs={"dampning": 0.1})


def test_named_field_in_kwargs_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"set optim.lr instead"):
        _optimizer(name="adam", kwargs={"lr": 0.1})


def test_invalid_combination_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="sgd"):
        _optimizer(name="sgd", nesterov=True, momentum=0.0)


# ----------------------------------------------------------------------------- schedules


def test_none_is_constant() -> None:
    sched = _sched(SchedConfig(name="none"), _optimizer(lr=0.1))
    assert _lrs_per_step(sched, 10, 5) == [0.1] * 50


def test_step_schedule_per_epoch() -> None:
    sched = _sched(SchedConfig(name="step", step_size=2, gamma=0.5), _optimizer(lr=0.1), steps=3, epochs=5)
    used = _lrs_per_step(sched, 3, 5)
    per_epoch = [used[i * 3] for i in range(5)]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert all(used[i * 3] == used[i * 3 + 2] for i in range(5))  # constant within an epoch


def test_multistep_schedule() -> None:
    cfg = SchedConfig(name="multistep", milestones=[1, 3], gamma=0.1)
    used = _lrs_per_step(_sched(cfg, _optimizer(lr=1.0), steps=2, epochs=4), 2, 4)
    assert used == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_then_cosine_at_known_steps() -> None:
    # 10 steps/epoch, 5 epochs: warmup steps 0..9, cosine over steps 10..50.
    cfg = SchedConfig(name="cosine", warmup_epochs=1.0, min_lr=0.0)
    used = _lrs_per_step(_sched(cfg, _optimizer(lr=0.1)), 10, 5)
    assert used[0] == pytest.approx(0.01)  # (0 + 1) / 10 of the base lr
    assert used[4] == pytest.approx(0.05)
    assert used[9] == pytest.approx(0.1)  # last warmup step reaches the base lr
    assert used[10] == pytest.approx(0.1)  # cosine starts at the top
    assert used[20] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.0853553...
    assert used[30] == pytest.approx(0.05)  # half way
    assert used[49] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a >= b for a, b in zip(used[10:], used[11:], strict=False))  # monotone decay


def test_cosine_ends_at_min_lr_and_stays_there() -> None:
    opt = _optimizer(lr=0.1)
    sched = _sched(SchedConfig(name="cosine", min_lr=0.001), opt, steps=4, epochs=2)
    _lrs_per_step(sched, 4, 2)
    assert sched.lr() == pytest.approx(0.001)
    sched.step_batch()  # a run extended past its planned length keeps min_lr
    assert sched.lr() == pytest.approx(0.001)


def test_cosine_without_warmup_matches_torch() -> None:
    ours = _sched(SchedConfig(name="cosine", min_lr=0.01), _optimizer(lr=0.2), steps=7, epochs=3)
    ref_opt = _optimizer(lr=0.2)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=21, eta_min=0.01)
    for _ in range(21):
        assert ours.lr() == pytest.approx(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ours.step_batch()
        ref.step()


def test_fractional_warmup_applies_to_step_schedule() -> None:
    cfg = SchedConfig(name="step", warmup_epochs=0.5, step_size=1, gamma=0.5)
    used = _lrs_per_step(_sched(cfg, _optimizer(lr=0.4), steps=4, epochs=2), 4, 2)
    assert used == pytest.approx([0.2, 0.4, 0.4, 0.4, 0.2, 0.2, 0.2, 0.2])


def test_param_groups_keep_their_ratio() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    sched = _sched(SchedConfig(name="step", step_size=1, gamma=0.5), opt, steps=1, epochs=3)
    sched.step_batch()
    sched.step_epoch({})
    assert sched.lrs() == pytest.approx([0.05, 0.005])


def _plateau_run(values: list[float], mode: str = "min") -> list[float]:
    sched = _sched(SchedConfig(name="plateau", patience=2, factor=0.5, mode=mode), _optimizer(lr=1.0))  # type: ignore[arg-type]
    lrs = []
    for v in values:
        sched.step_batch()
        sched.step_epoch({"val/loss": v, "val/accuracy": 0.5})
        lrs.append(sched.lr())
    return lrs


def test_plateau_reduces_after_patience() -> None:
    # Improves once, then 3 flat epochs: the third bad epoch exceeds patience 2.
    lrs = _plateau_run([1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9])
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25])


def test_plateau_matches_torch_reduce_on_plateau() -> None:
    values = [1.0, 0.8, 0.85, 0.79999, 0.81, 0.7, 0.7, 0.71, 0.72, 0.69, 0.7, 0.7, 0.7]
    ref_opt = _optimizer(lr=1.0)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, mode="min", patience=2, factor=0.5)
    expected = []
    for v in values:
        ref.step(v)
        expected.append(ref_opt.param_groups[0]["lr"])
    assert _plateau_run(values) == pytest.approx(expected)


def test_plateau_max_mode() -> None:
    assert _plateau_run([0.5, 0.6, 0.6, 0.6, 0.6], mode="max") == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5])


def test_plateau_skips_epochs_without_evaluation() -> None:
    sched = _sched(SchedConfig(name="plateau", patience=0, factor=0.5), _optimizer(lr=1.0))
    sched.step_epoch({"val/loss": 1.0, "train/loss": 1.0})
    for _ in range(3):  # eval_every_epochs > 1: only train metrics on these epochs
        sched.step_epoch({"train/loss": 1.0, "lr": 1.0})
    assert sched.lr() == 1.0
    sched.step_epoch({"val/loss": 1.0, "train/loss": 1.0})  # the next evaluation counts
    assert sched.lr() == 0.5


def test_plateau_missing_metric_lists_available() -> None:
    sched = _sched(SchedConfig(name="plateau", monitor="val/los"), _optimizer())
    with pytest.raises(ConfigError, match=r"'val/los'.*val/accuracy, val/loss"):
        sched.step_epoch({"val/loss": 1.0, "val/accuracy": 0.5})


def test_plateau_monitor_of_unknown_split_is_an_error() -> None:
    sched = _sched(SchedConfig(name="plateau", monitor="vall/loss"), _optimizer())
    with pytest.raises(ConfigError, match=r"sched.monitor = 'vall/loss'.*train/loss"):
        sched.step_epoch({"train/loss": 1.0})


def test_plateau_on_training_metric() -> None:
    sched = _sched(SchedConfig(name="plateau", monitor="train/loss", patience=0, factor=0.5), _optimizer(lr=1.0))
    sched.step_epoch({"train/loss": 1.0})
    sched.step_epoch({"train/loss": 1.0})
    assert sched.lr() == 0.5


def test_bad_scheduler_settings() -> None:
    with pytest.raises(ConfigError, match="factor"):
        _sched(SchedConfig(name="plateau", factor=1.5), _optimizer())
    with pytest.raises(ConfigError, match="step_size"):
        _sched(SchedConfig(name="step", step_size=0), _optimizer())


# ----------------------------------------------------------------------------- resume


def _drive(sched: Scheduler, opt: torch.optim.Optimizer, epoch_values: list[float], steps: int) -> list[float]:
    lrs = []
    for v in epoch_values:
        for _ in range(steps):
            lrs.append(sched.lr())
            opt.step()
            sched.step_batch()
        sched.step_epoch({"val/loss": v})
    return lrs


@pytest.mark.parametrize(
    "cfg",
    [
        SchedConfig(name="cosine", warmup_epochs=1.5, min_lr=1e-4),
        SchedConfig(name="plateau", warmup_epochs=0.5, patience=1, factor=0.3),
        SchedConfig(name="multistep", milestones=[2, 5], gamma=0.2),
        SchedConfig(name="step", step_size=3, gamma=0.5, warmup_epochs=2.0),
    ],
    ids=lambda c: c.name,
)
def test_state_dict_round_trip_gives_identical_future_lrs(cfg: SchedConfig) -> None:
    values = [1.0, 0.9, 0.95, 0.97, 0.99, 0.8, 0.85, 0.9]
    steps, epochs = 5, len(values)
    opt = _optimizer(lr=0.1, name="sgd", momentum=0.9)
    sched = _sched(cfg, opt, steps=steps, epochs=epochs)
    first_half = _drive(sched, opt, values[:4], steps)
    # Save as a checkpoint would (weights_only load), then resume into fresh objects.
    buffer = io.BytesIO()
    torch.save({"optim": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_opt = _optimizer(lr=0.1, name="sgd", momentum=0.9)
    resumed_opt.load_state_dict(saved["optim"])
    resumed = _sched(cfg, resumed_opt, steps=steps, epochs=epochs)
    resumed.load_state_dict(saved["sched"])

    assert resumed.lr() == sched.lr()
    continued = _drive(sched, opt, values[4:], steps)
    after_resume = _drive(resumed, resumed_opt, values[4:], steps)
    assert after_resume == continued  # exact, not approx
    uninterrupted_opt = _optimizer(lr=0.1, name="sgd", momentum=0.9)
    uninterrupted = _drive(_sched(cfg, uninterrupted_opt, steps=steps, epochs=epochs), uninterrupted_opt, values, steps)
    assert first_half + after_resume == uninterrupted
    assert len(set(uninterrupted)) > 1  # the schedule actually changed the lr


def test_load_state_rejects_foreign_state() -> None:
    sched = _sched(SchedConfig(name="cosine"), _optimizer())
    with pytest.raises(CheckpointError, match="lacks"):
        sched.load_state_dict({"last_epoch": 3})
