"""The training loop every worker runs: the plain PyTorch loop, made distributed, exact and resumable.

    for batch in loader:                      # DistributedSampler order, batched HDF5 reads
        with autocast: step = task.train_step(model(x), batch)   # the task owns loss and metrics
        (step.loss / samples).backward()      # no_sync on non-final micro-steps; divisions in the seed
        scaler.step(optimizer); scheduler.step_batch()
        if all ranks agree a stop was requested: checkpoint and exit resumable

Everything that makes up the run's position is a Stateful and goes into the checkpoint.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dist_train
from dist_train import envvars
from dist_train.checkpoint.catalog import best_checkpoint, latest_valid_checkpoint, verify
from dist_train.checkpoint.layout import CHECKPOINT_GLOB, CHECKPOINTS_SUBDIR, FORMAT_VERSION
from dist_train.checkpoint.store import (
    CheckpointStore,
    OpenedCheckpoint,
    build_checkpoint_store,
    check_config_compatible,
    open_checkpoint,
    starts_fresh_on_resume,
)
from dist_train.compile import Compiler, build_compiler
from dist_train.config import Config, config_to_dict
from dist_train.data import ensure_normalization
from dist_train.data.device_feed import DeviceFeed
from dist_train.data.loader import build_data, make_loader
from dist_train.distributed.comm import (
    AsyncFlags,
    DistInfo,
    all_reduce_max,
    barrier,
    broadcast_object,
    new_cpu_group,
    rank_zero_buffers,
    restore_buffers,
    settle_gradient_buckets,
    sync_bool,
)
from dist_train.distributed.cpu_allocator import return_large_frees_to_os
from dist_train.distributed.precision import autocast, resolve_precision
from dist_train.distributed.strategy import Strategy, build_strategy, use_sync_batchnorm
from dist_train.early_stopping import build_early_stopping
from dist_train.errors import CheckpointError, ConfigError
from dist_train.evaluation import evaluate_batches, forward
from dist_train.fsutil import atomic_write_text
from dist_train.logs import NullMetricsLogger, Progress, RunMetricsLogger
from dist_train.metrics import StepTimer, add_sums, peak_memory_mb, rss_anon_mb, training_state_mb
from dist_train.models import dry_inputs
from dist_train.optim import build_optimizer, build_scheduler
from dist_train.preempt import PreemptionHandler, launcher_reports_stops, parse_signals
from dist_train.sampler import ResumableDistributedBatchSampler, ShardedEvalBatchSampler
from dist_train.state import TrainerCounters, capture_rng, restore_rng, seed_everything
from dist_train.tasks import MetricSums, Task, build_model_for_task, build_task
from dist_train.tasks.base import TrainStep
from dist_train.watchdog import HangWatchdog

log = logging.getLogger("dtrain")

DEBUG_MAX_STEPS = 5


class Trainer:
    """Builds every component from the config and runs fit(); returns the process exit code."""

    def __init__(
        self,
        cfg: Config,
        run_dir: Path | None,
        dist_info: DistInfo,
        *,
        debug: bool = False,
        preemption: PreemptionHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist_info
        self.debug = debug
        self.device = dist_info.device
        if debug:
            _apply_debug_settings(cfg)
        _configure_determinism(cfg.run.deterministic, self.device)
        seed_everything(cfg.run.seed)  # same model init on every rank
        self._prepare_normalization()
        self.data = build_data(cfg, run_dir=run_dir)
        self.task: Task = build_task(cfg, self.data)
        # Before the model's tensors exist, so that all of FSDP's large buffers follow the new threshold.
        return_large_frees_to_os(cfg.train.strategy, self.device.type)
        model = build_model_for_task(cfg, self.data, self.task).to(self.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)  # 4-d weights only; the feed sends x in that layout
        self.model: nn.Module = use_sync_batchnorm(model, cfg, self.device, dist_info.world_size)
        self.strategy: Strategy = build_strategy(cfg, self.device, dist_info.world_size, dist_info.distributed)
        self.compiler: Compiler = build_compiler(cfg, run_dir)
        self.train_model: nn.Module = self._wrap_model(self.model)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.scaler = self.strategy.grad_scaler(enabled=self.precision.use_scaler)
        self.optimizer = build_optimizer(cfg.optim, self.model.parameters())
        self.compiler.report_first_step(self.optimizer)
        self.sampler = ResumableDistributedBatchSampler(
            len(self.data.train),
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            batch_size=cfg.data.batch_size,
            seed=cfg.run.seed,
        )
        self.train_loader = self._make_train_loader()
        self.eval_loaders = self._make_eval_loaders()
        # Host batch -> device batch: copies (on a side stream on CUDA), then what the loader left to the device.
        self.feeds = {
            name: DeviceFeed(self.device, loader.device_prep, channels_last=cfg.train.channels_last)
            for name, loader in (("train", self.train_loader), *self.eval_loaders.items())
        }
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = build_scheduler(
            cfg.sched, self.optimizer, steps_per_epoch=self.steps_per_epoch, epochs=cfg.train.epochs
        )
        self.counters = TrainerCounters()
        self.early_stopping = build_early_stopping(
            cfg, has_val_data=self.data.val is not None and len(self.data.val) > 0
        )
        self.meter = MetricSums(self.device)
        # Backward seeds by (window samples, loss divisor, dtype, device): a handful per run.
        self._backward_seeds: dict[tuple[Any, ...], torch.Tensor] = {}
        self.timer = StepTimer()
        self._state_mb: dict[str, float] | None = None  # this rank's parameters/gradients/optimizer state
        self.control_group = new_cpu_group(cfg.checkpoint.barrier_timeout)
        # On NCCL the flags travel over the CPU group, so reading them never waits for the GPU; on
        # gloo a second group would only compete with the gradient all-reduce for the same cores.
        flag_group = self.control_group if self.device.type == "cuda" else None
        self.flags = AsyncFlags(2, group=flag_group)  # [stop requested, time-based checkpoint due]
        # Installed by the entry point before any slow start-up work, so an early signal is not lost.
        self.preemption = preemption or PreemptionHandler(parse_signals(cfg.launch.preempt_signals))
        stacks = run_dir / "logs" / f"rank{dist_info.rank}.stacks" if run_dir is not None else None
        self.watchdog = HangWatchdog(cfg.launch.hang_timeout, stacks)
        self.ckpt_store = self._make_checkpoint_store()
        self.metrics_logger: RunMetricsLogger | NullMetricsLogger = NullMetricsLogger()
        self.progress = Progress(cfg.train.progress, enabled=dist_info.is_main, log_every=cfg.train.log_every)
        self._last_ckpt_time = time.monotonic()
        self._resumed_mid_epoch = False
        names = self.task.metric_names()
        if names is not None:  # built-in tasks know their metrics before any data is seen
            self._check_monitors([f"{split}/{n}" for split in ("train", "val") for n in names])

    # ------------------------------------------------------------------ construction helpers
    def _wrap_model(self, model: nn.Module) -> nn.Module:
        wrapped = self.strategy.wrap(model)
        if isinstance(wrapped, DistributedDataParallel):
            # Same bucket layout at every step of fresh and resumed processes: exact resume from 3 ranks on.
            settle_gradient_buckets(wrapped, *self._example_inputs())
        return self.compiler.compile(wrapped)

    def _example_inputs(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Two zero samples (and zero extra inputs) of the data's shapes, on the device."""
        x = torch.zeros((2, *self.data.sample_shape), device=self.device)
        specs = {key: self.data.key_specs[key] for key in self.cfg.data.input_keys}
        return x, dry_inputs(specs, str(self.device), batch=2)

    def _make_train_loader(self) -> Any:
        return make_loader(
            self.data.train,
            self.sampler,
            self.cfg.data,
            train=True,
            device_type=self.device.type,
            channels_last=self.cfg.train.channels_last,
        )

    def _make_eval_loaders(self) -> dict[str, Any]:
        """Unpadded, contiguous shards of val and test: every sample is evaluated exactly once."""
        batch_size = self.cfg.data.eval_batch_size or self.cfg.data.batch_size
        loaders = {}
        for name, split in (("val", self.data.val), ("test", self.data.test)):
            if split is not None and len(split) > 0:
                sampler = ShardedEvalBatchSampler(
                    len(split), num_replicas=self.dist.world_size, rank=self.dist.rank, batch_size=batch_size
                )
                loaders[name] = make_loader(
                    split,
                    sampler,
                    self.cfg.data,
                    train=False,
                    device_type=self.device.type,
                    channels_last=self.cfg.train.channels_last,
                )
        return loaders

    def _prepare_normalization(self) -> None:
        """Rank 0 computes normalisation statistics once; the others read the stored file."""
        task = self.cfg.task
        wanted = self.cfg.data.normalize == "auto" or (task.name == "regression" and task.target_norm == "auto")
        if not wanted or self.run_dir is None:
            return
        if self.dist.is_main:
            ensure_normalization(self.cfg, self.run_dir)
        barrier()

    def _steps_per_epoch(self) -> int:
        batches = math.ceil(self.sampler.padded_total() / self.dist.world_size / self.cfg.data.batch_size)
        steps = math.ceil(batches / self.cfg.train.grad_accum)
        if self.cfg.train.max_steps_per_epoch:
            steps = min(steps, self.cfg.train.max_steps_per_epoch)
        return steps

    def _make_checkpoint_store(self) -> CheckpointStore | None:
        """Single files under DDP, one directory of per-rank shards under FSDP (dist_train/checkpoint/store.py)."""
        if self.run_dir is None or not self.cfg.checkpoint.enabled:
            return None
        mode = self.cfg.checkpoint.async_save
        return build_checkpoint_store(
            directory=self.run_dir / CHECKPOINTS_SUBDIR,
            strategy=self.strategy,
            dist_info=self.dist,
            keep_last=self.cfg.checkpoint.keep_last,
            async_save=mode == "on" or (mode == "auto" and self.device.type == "cuda"),
            barrier_timeout=self.cfg.checkpoint.barrier_timeout,
            control_group=self.control_group,
        )

    # ------------------------------------------------------------------ state
    def stateful_components(self) -> dict[str, Any]:
        """Everything but model and optimizer, whose state the strategy collects (sharded under FSDP)."""
        return {
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "sampler": self.sampler,
            "trainer": self.counters,
            "early_stopping": self.early_stopping,
        }

    def _rank_state(self) -> dict[str, Any]:
        return {
            "rng": capture_rng(),
            "meter": _plain_sums(self.meter.local_sums()),
            "buffers": self.strategy.rank_buffers(self.model),
        }

    def _restore_rank_state(self, rank_states: list[Any]) -> None:
        if len(rank_states) == self.dist.world_size:
            mine = rank_states[self.dist.rank]
            restore_rng(mine["rng"])
            self.meter.load_sums(_upgrade_meter(mine["meter"]))
            restore_buffers(self.model, mine.get("buffers", {}))
            return
        # World size changed: the sampler re-shards the rest of the epoch; partial-epoch sums move to
        # rank 0 so the reduced epoch metrics stay exact; RNG streams cannot map 1:1, so re-seed.
        log.warning(
            "checkpoint was written by %d ranks, this run has %d: re-sharding the rest of the epoch; "
            "random streams are re-seeded (augmentation/dropout will differ from an uninterrupted run)",
            len(rank_states),
            self.dist.world_size,
        )
        seed_everything(self.cfg.run.seed * 100003 + self.counters.step * 101 + self.dist.rank)
        self.meter.reset()
        if self.dist.is_main:
            self.meter.load_sums(add_sums([_upgrade_meter(s["meter"]) for s in rank_states]))

    def build_checkpoint(self, reason: str, metrics: dict[str, float]) -> dict[str, Any]:
        """Everything but model, optimizer and the per-rank states, which the checkpoint store collects."""
        state: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "dtrain_version": dist_train.__version__,
            "torch_version": torch.__version__,
            "config": config_to_dict(self.cfg),
            "epoch": self._checkpoint_epoch(reason),
            "step": self.counters.step,
            "epoch_complete": reason in ("epoch", "final"),
            "reason": reason,
            "metrics": {k: float(v) for k, v in metrics.items()},
            "world_size": self.dist.world_size,
        }
        for name, component in self.stateful_components().items():
            state[name] = component.state_dict()
        return state

    def _checkpoint_epoch(self, reason: str) -> int:
        """The epoch a checkpoint is named and labelled by, 1-based as the metrics records count: the
        epoch just finished (an epoch's own checkpoint), or the epoch in progress (a mid-epoch one)."""
        return self.counters.epoch if reason in ("epoch", "final") else self.counters.epoch + 1

    def save_checkpoint(
        self, reason: str, metrics: dict[str, float] | None = None, *, is_best: bool = False, blocking: bool = False
    ) -> None:
        """All ranks call this at the same step; the store decides who writes what.

        ``blocking`` (always for a preemption): return only once the checkpoint is durable."""
        if self.ckpt_store is None:
            return
        rank_state = self._rank_state()  # this rank's own buffers, before they are swapped for rank 0's
        # The model state holds rank 0's buffers, those the logged metrics were computed with (evaluate()).
        with rank_zero_buffers(self.model):
            path = self.ckpt_store.save(
                self.model,
                self.optimizer,
                self.build_checkpoint(reason, metrics or {}),
                rank_state,
                epoch=self._checkpoint_epoch(reason),
                step=self.counters.step,
                metrics=metrics or {},
                is_best=is_best,
                blocking=blocking or reason == "preempt",
            )
        if path is not None:
            log.info("checkpoint (%s) -> %s", reason, path)
        self._last_ckpt_time = time.monotonic()

    def _find_resume_path(self) -> Path | None:
        """The checkpoint to resume from, verified once by rank 0 (sha256 of every file) on every path here."""
        mode = envvars.get(envvars.RESUME, "auto")
        if mode == "never" or self.run_dir is None:
            return None
        if mode not in ("", "auto"):
            return self._verified_by_rank0(Path(mode))
        path = None  # latest_valid_checkpoint verifies as it searches
        if self.dist.is_main:
            found = latest_valid_checkpoint(self.run_dir / CHECKPOINTS_SUBDIR)
            path = str(found) if found else None
        found_path = broadcast_object(path)
        return Path(found_path) if found_path else None

    def _verified_by_rank0(self, path: Path) -> Path:
        """Rank 0 checks sizes and sha256s (of every shard) before anything is loaded and tells the others,
        so that every rank stops with the same error: a rank that went on alone would read a damaged file
        (an unpickling error, or garbage weights) or wait in a collective load for a rank 0 that has left."""
        problem = broadcast_object(verify(path) if self.dist.is_main else None)
        if problem is not None:
            raise CheckpointError(
                f"checkpoint {path} failed verification: {problem}. Nothing was loaded. Resume from another "
                "checkpoint: --resume PATH of an older one, or --resume auto (the newest valid one of the run "
                "directory; `dtrain ckpt inspect PATH` checks one)."
            )
        return path

    def _open_unverified(self, path: Path) -> OpenedCheckpoint:
        """Each rank's part of a checkpoint rank 0 has verified (checking it again would read every byte twice)."""
        return open_checkpoint(path, verify=False, for_rank=(self.dist.rank, self.dist.world_size))

    def _say_if_starting_over(self) -> None:
        """A run directory with earlier training but no checkpoint to resume from starts at step 0: say so."""
        if not self.dist.is_main or self.run_dir is None or envvars.get(envvars.RESUME, "auto") == "never":
            return
        checkpoints = self.run_dir / CHECKPOINTS_SUBDIR
        metrics = self.run_dir / "metrics.jsonl"
        if any(checkpoints.glob(CHECKPOINT_GLOB)) or (metrics.exists() and metrics.stat().st_size > 0):
            log.warning(
                "no valid checkpoint in %s: starting from scratch (step 0); the records of the earlier attempt in "
                "metrics.jsonl and TensorBoard are discarded",
                checkpoints,
            )

    def maybe_resume(self) -> int | None:
        """Load the newest valid checkpoint; returns its step, or None for a fresh start."""
        path = self._find_resume_path()
        if path is None:
            self._say_if_starting_over()
            return None
        opened = self._open_unverified(path)
        state = opened.state
        check_config_compatible(path, state, config_to_dict(self.cfg))
        try:
            group = self.ckpt_store.group if self.ckpt_store is not None else None
            opened.restore_model_and_optimizer(self.model, self.optimizer, self.strategy, group=group)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"cannot resume from {path}: restoring the model and optimizer failed: {exc}"
            ) from None
        for name, component in self.stateful_components().items():
            if starts_fresh_on_resume(name, state):
                continue  # written by an older dtrain: this component starts fresh
            try:
                component.load_state_dict(state[name])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"cannot resume from {path}: restoring the {name} failed: {exc}") from None
        self._restore_rank_state(state["rank_states"])
        self._resumed_mid_epoch = not state["epoch_complete"]
        # 1-based, as the console and metrics.jsonl count: the epoch resumed inside, or the last one finished.
        epoch = self.counters.epoch
        log.info(
            "resumed from %s (%s, step %d, %s)",
            path,
            f"epoch {epoch + 1}" if self._resumed_mid_epoch else f"after epoch {epoch}",
            self.counters.step,
            "mid-epoch" if self._resumed_mid_epoch else "epoch boundary",
        )
        return self.counters.step

    # ------------------------------------------------------------------ steps
    def _micro_step(self, batch: dict[str, torch.Tensor], window_samples: int, sync: bool) -> None:
        """Forward, the task's loss summed over the batch divided by the window's samples, backward.

        Every rank holds the same number of samples per window (the sampler pads the epoch), so
        DDP's average over ranks makes this the mean over the global samples of the step.
        """
        with self.strategy.grad_sync(self.train_model, sync):
            with autocast(self.precision, self.device):
                outputs = forward(self.train_model, batch, self.cfg.data.input_keys)
            step = self.task.train_step(outputs, batch)
            self._backward(step, window_samples)
        if step.sums:
            self.meter.add(step.sums)
        if step.deferred is not None:
            self.meter.defer(step.deferred)

    def _backward(self, step: TrainStep, window_samples: int) -> None:
        """Gradients of ``step.loss / step.loss_divisor / window_samples`` (the mean over the window)."""
        if self.scaler.is_enabled():
            loss_sum = step.loss if step.loss_divisor == 1 else step.loss / step.loss_divisor
            self.scaler.scale(loss_sum / window_samples).backward()
        else:
            backward_divided(step.loss, window_samples, step.loss_divisor, self._backward_seeds)

    def _optimizer_step(self) -> None:
        if self.cfg.train.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            self.strategy.clip_grad_norm(self.model, self.cfg.train.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self._state_mb is None and self.optimizer.state:  # once: gradients and Adam's moments exist now
            self._state_mb = training_state_mb(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step_batch()
        self.counters.step += 1

    def train_one_epoch(self, epoch: int) -> str:
        """Returns "done", or "stop" when all ranks agreed to stop (preemption)."""
        self.train_model.train()
        self.sampler.set_epoch(epoch)
        if not self._resumed_mid_epoch:
            self.meter.reset()
        self._resumed_mid_epoch = False
        self.timer.start()
        total_batches = len(self.sampler)
        steps_done_in_epoch = self.sampler.consumed_samples // max(
            1, self.cfg.data.batch_size * self.dist.world_size * self.cfg.train.grad_accum
        )
        max_steps = self.cfg.train.max_steps_per_epoch
        if max_steps:
            total_batches = min(total_batches, max(0, max_steps - steps_done_in_epoch) * self.cfg.train.grad_accum)
        self.progress.start_epoch(epoch, self.cfg.train.epochs, total_batches)
        self.watchdog.kick()
        loader_iter = iter(self.train_loader)
        status = "done"
        remaining = total_batches
        while remaining > 0:
            window = min(self.cfg.train.grad_accum, remaining)  # the last window of an epoch may be shorter
            batches = self._fetch_window(loader_iter, window)
            window_samples = sum(len(b["index"]) for b in batches)
            for i, batch in enumerate(batches):
                self._micro_step(self.feeds["train"](batch), window_samples, sync=(i == window - 1))
                self.sampler.record_consumed(1)
                self.timer.step_done(len(batch["index"]))
            del batches
            remaining -= window
            self._optimizer_step()
            self.watchdog.kick()
            self._log_step(epoch, window)
            if self._at_step_boundary():
                status = "stop"
                break
        self.progress.end_epoch()
        # Evaluation and checkpoints take their own time: the step-level limit does not apply there.
        self.watchdog.pause()
        del loader_iter
        return status

    def _fetch_window(self, loader_iter: Any, window: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step, so that the loss divisor is their exact sample count."""
        batches = []
        for _ in range(window):
            self.timer.fetching()
            batches.append(next(loader_iter))
            self.timer.batch_arrived()
        return batches

    def _at_step_boundary(self) -> bool:
        """Step-level decisions every rank must take together. Returns True to stop training.

        The flags are posted one step before each ``train.stop_check_every``-th step and read at
        it: the reduction overlaps with one step of compute (no round trip of its own), and a
        request that arrived before the post is acted on at that check. Every rank posts and reads
        at the same steps, so all act on the same answer at the same step.
        """
        stop = time_due = False
        every = self.cfg.train.stop_check_every
        if self.counters.step % every == 0:
            stop, time_due = self.flags.result()
        if (self.counters.step + 1) % every == 0:
            self.flags.post([self.preemption.requested, self._time_checkpoint_due()])
        if stop:
            return True
        every_steps = self.cfg.checkpoint.every_steps
        if time_due or (every_steps and self.counters.step % every_steps == 0):
            self.save_checkpoint("steps" if not time_due else "time", {})
        return False

    def _time_checkpoint_due(self) -> bool:
        every_min = self.cfg.checkpoint.every_minutes
        return every_min > 0 and self.dist.is_main and time.monotonic() - self._last_ckpt_time >= every_min * 60

    def _stop_agreed_at_epoch_boundary(self) -> bool:
        """One synchronous agreement where every rank arrives together (an epoch's end).

        The flags still in flight are read, and any request that arrived since they were posted is
        added: a stop is never carried past the end of an epoch, where the next check may be many
        steps away (or, after the last epoch, never come). A pending time-based checkpoint request
        is dropped here; rank 0 posts it again at the next check.
        """
        pending_stop, _ = self.flags.result()
        return sync_bool(pending_stop or self.preemption.requested)

    def _log_step(self, epoch: int, batches: int) -> None:
        step = self.counters.step
        if step % self.cfg.train.log_every != 0:
            self.progress.update(step, batches, None)
            return
        running = self.task.finalize(self.meter.reduce())
        # Whole-task and per-target values; per-column ones wait for the epoch record.
        values = {f"train/{k}_running": v for k, v in running.items() if k != "samples" and k.count("/") <= 1}
        values["lr"] = self.scheduler.lr()
        self.progress.update(step, batches, values)
        self.metrics_logger.log({"kind": "step", "epoch": epoch + 1, "step": step, **values})

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, split: str, *, epoch: int) -> dict[str, float]:
        """Exact metrics over the whole split: each sample counted once across ranks, then summed.
        ``epoch``: the 1-based epoch its reports (``<name>_<split>.json``) are filed under."""
        loader = self.eval_loaders.get(split)
        if loader is None:
            return {}
        # Every rank evaluates with rank 0's buffers (BatchNorm statistics), the ones the checkpoint holds.
        with self.strategy.eval_context(self.model), rank_zero_buffers(self.model):
            result = evaluate_batches(
                self.model,
                loader,
                self.device,
                self.task,
                input_keys=self.cfg.data.input_keys,
                autocast=functools.partial(autocast, self.precision, self.device),
                prefix=split,
                limit=DEBUG_MAX_STEPS if self.debug else None,
                to_device=self.feeds[split],
            )
        self._write_reports(split, result.reports, epoch)
        return result.metrics

    def _write_reports(self, split: str, reports: dict[str, Any], epoch: int) -> None:
        """Non-scalar results (confusion matrix, residual histograms) as ``<name>_<split>.json`` and in TensorBoard."""
        if not reports or not self.dist.is_main or self.run_dir is None:
            return
        for name, report in reports.items():
            record = {"split": split, "epoch": epoch, "step": self.counters.step, **report}
            atomic_write_text(self.run_dir / f"{name}_{split}.json", json.dumps(record, indent=1) + "\n")
            if isinstance(self.metrics_logger, RunMetricsLogger):
                self.metrics_logger.add_report(split, name, report, self.counters.step)

    # ------------------------------------------------------------------ epochs
    def _epoch_metrics(self, epoch: int) -> dict[str, float]:
        metrics = {f"train/{k}": v for k, v in self.task.finalize(self.meter.reduce()).items()}
        metrics.update(self.timer.reduce("train"))
        metrics["samples_per_s"] = metrics.pop("train/samples_per_s")
        metrics["data_wait_frac"] = metrics.pop("train/data_wait_frac")
        metrics["epoch_time_s"] = metrics.pop("train/epoch_time_s")
        if (epoch + 1) % max(1, self.cfg.train.eval_every_epochs) == 0 or epoch + 1 == self.cfg.train.epochs:
            metrics.update(self.evaluate("val", epoch=epoch + 1))
        metrics["lr"] = self.scheduler.lr()
        metrics["peak_memory_mb"] = peak_memory_mb(self.device)
        metrics.update(self._largest_rank_memory())
        anon = rss_anon_mb()
        if anon is not None:
            metrics["rss_anon_mb"] = anon
        return metrics

    def _largest_rank_memory(self) -> dict[str, float]:
        """``memory/*``: the largest value over the ranks (the rank that must fit the device) of the peak
        memory (CUDA: max allocated; CPU: peak RSS) and of the parameter/gradient/optimizer-state MiB."""
        return all_reduce_max({"memory/peak_mb": peak_memory_mb(self.device), **(self._state_mb or {})})

    def _check_monitors(self, reported: list[str]) -> None:
        """checkpoint.monitor and sched.monitor must name a metric the run reports (any task's)."""
        cfg = self.cfg
        settings = (
            ("checkpoint.monitor", cfg.checkpoint.monitor, cfg.checkpoint.save_best or self.early_stopping.enabled),
            ("sched.monitor", cfg.sched.monitor, cfg.sched.name == "plateau"),
        )
        for setting, key, used in settings:
            split = key.partition("/")[0]
            if used and key not in reported and any(k.startswith(split + "/") for k in reported):
                close = difflib.get_close_matches(key, reported, n=1, cutoff=0.6)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{setting} = {key!r} is not a metric this run reports.{hint} The {split} metrics are: "
                    + ", ".join(k for k in reported if k.startswith(split + "/"))
                    + "."
                )

    def _is_best(self, metrics: dict[str, float]) -> bool:
        key = self.cfg.checkpoint.monitor
        if not self.cfg.checkpoint.save_best or key not in metrics:
            return False
        value = metrics[key]
        best = self.counters.best
        better = best is None or (value < best if self.cfg.checkpoint.mode == "min" else value > best)
        if better:
            self.counters.best = value
        return better

    def fit(self) -> int:
        cfg = self.cfg
        resume_step = self.maybe_resume()
        if self.dist.is_main and self.run_dir is not None:
            self.metrics_logger = RunMetricsLogger(
                self.run_dir,
                jsonl=cfg.log.jsonl,
                tensorboard=cfg.log.tensorboard,
                resume_step=resume_step,
                resume_epoch=None if resume_step is None else self.counters.epoch + 1,
            )
        log.info(
            "training %s (%s): %d train / %s val / %s test samples, world size %d, device %s, precision %s, %d steps/epoch",
            cfg.model.name,
            self.task.name,
            len(self.data.train),
            len(self.data.val) if self.data.val is not None else 0,
            len(self.data.test) if self.data.test is not None else 0,
            self.dist.world_size,
            self.device,
            self.precision.name,
            self.steps_per_epoch,
        )
        anomaly = torch.autograd.set_detect_anomaly(True) if cfg.train.detect_anomaly else contextlib.nullcontext()
        self.preemption.install()
        with anomaly, self.compiler.failures_explained():
            # A request that came during start-up is read at the first check.
            self.flags.post([self.preemption.requested, False])
            while self.counters.epoch < cfg.train.epochs and not self.early_stopping.stopped:
                epoch = self.counters.epoch
                # The epoch's last steps: stop before its evaluation (the relaunch evaluates it).
                if self.train_one_epoch(epoch) == "stop" or self._stop_agreed_at_epoch_boundary():
                    self.save_checkpoint("preempt", {})
                    return self._end_preempted()
                metrics = self._epoch_metrics(epoch)
                self._check_monitors(list(metrics))
                self.scheduler.step_epoch(metrics)
                self.metrics_logger.log({"kind": "epoch", "epoch": epoch + 1, "step": self.counters.step, **metrics})
                if cfg.log.histograms and isinstance(self.metrics_logger, RunMetricsLogger):
                    self.metrics_logger.add_histograms(self.model, self.counters.step)
                self._log_epoch(epoch, metrics)
                is_best = self._is_best(metrics)
                stop_early = self.early_stopping.step(metrics, epoch + 1)  # agreed by all ranks
                self.counters.epoch += 1
                self.sampler.set_epoch(self.counters.epoch)
                last = self.counters.epoch == cfg.train.epochs or stop_early
                # A request that came during the evaluation: stop at this epoch boundary, with the
                # epoch's checkpoint (after the last epoch the relaunch runs only the test).
                stop = self._stop_agreed_at_epoch_boundary()
                if (
                    stop
                    or last
                    or (cfg.checkpoint.every_epochs and self.counters.epoch % cfg.checkpoint.every_epochs == 0)
                ):
                    self.save_checkpoint("epoch", metrics, is_best=is_best, blocking=stop)
                if stop:
                    return self._end_preempted()
            if self.early_stopping.stopped:
                log.info(self.early_stopping.reason())
            self.flags.result()  # drain a reduction still in flight (none after an epoch's end) before other collectives
            if cfg.train.test_at_end and "test" in self.eval_loaders:
                self._test_at_end()
        self._shutdown()
        self._write_marker("completed", f"step {self.counters.step}\n")
        if self.preemption.requested:
            log.warning(
                "%s arrived after the last epoch's checkpoint: the run completed before the stop could take "
                "effect; there is nothing to resume",
                self.preemption.describe(),
                extra=launcher_reports_stops(),
            )
        # Last: a stop signal until here only sets the flag, and cannot kill a rank that is finishing.
        self.preemption.uninstall()
        return 0

    def _end_preempted(self) -> int:
        """After the stop's checkpoint: wait until it is durable everywhere, mark the run, exit 75."""
        barrier()  # no rank exits (and makes torchrun kill the rest) before the write is durable
        self._write_marker("preempted", f"step {self.counters.step}\n")
        log.info(
            "stopped on %s at step %d with a checkpoint; a relaunch resumes here",
            self.preemption.describe(),
            self.counters.step,
            extra=launcher_reports_stops(),
        )
        self._shutdown()
        self.preemption.uninstall()
        return envvars.PREEMPTED_EXIT_CODE

    def _test_at_end(self) -> None:
        """The held-out test split, once, on the weights ``train.test_checkpoint`` names; the record says which."""
        evaluated = self._load_test_weights()
        test = self.evaluate("test", epoch=self.counters.epoch)
        self.metrics_logger.log(
            {"kind": "test", "epoch": self.counters.epoch, "step": self.counters.step, "checkpoint": evaluated, **test}
        )
        log.info(
            "test (%s weights, epoch %d, step %d): %s",
            evaluated["which"],
            evaluated["epoch"],
            evaluated["step"],
            "  ".join(f"{k}={test[k]:.4g}" for k in _console_metric_keys(test, ("test",))),
        )

    def _load_test_weights(self) -> dict[str, Any]:
        """Loads the best checkpoint's weights when the test should use them; returns which weights these are."""
        last = {"which": "last", "epoch": self.counters.epoch, "step": self.counters.step}
        if self.cfg.train.test_checkpoint != "best" or self.ckpt_store is None or not self.cfg.checkpoint.save_best:
            return last
        self.ckpt_store.wait()  # an async write of the best checkpoint must be durable before it is read
        barrier()
        path = None
        if self.dist.is_main and self.run_dir is not None:
            found = best_checkpoint(self.run_dir / CHECKPOINTS_SUBDIR)
            path = str(found) if found else None
        path = broadcast_object(path)
        if path is None:
            log.warning(
                "train.test_checkpoint = 'best', but no best checkpoint exists (%s was never reported?): "
                "the test evaluates the last weights",
                self.cfg.checkpoint.monitor,
            )
            return last
        opened = self._open_unverified(self._verified_by_rank0(Path(path)))
        opened.restore_model(self.model, self.strategy, group=self.ckpt_store.group)
        state = opened.state
        return {"which": "best", "epoch": int(state["epoch"]), "step": int(state["step"]), "path": path}

    def _log_epoch(self, epoch: int, m: dict[str, float]) -> None:
        parts = [f"epoch {epoch + 1}/{self.cfg.train.epochs}", f"step {self.counters.step}"]
        for key in _console_metric_keys(m):
            parts.append(f"{key}={m[key]:.4g}")
        parts.append(f"{m['samples_per_s']:.0f} samples/s")
        parts.append(f"data wait {100 * m['data_wait_frac']:.1f}%")
        parts.append(f"lr {m['lr']:.3g}")
        log.info("  ".join(parts))

    def _write_marker(self, name: str, text: str) -> None:
        """Markers tell the launcher how the run ended (see launcher/run_dirs.py)."""
        if self.dist.is_main and self.run_dir is not None:
            atomic_write_text(self.run_dir / name, text)

    def _shutdown(self) -> None:
        self.watchdog.close()
        if self.ckpt_store is not None:
            self.ckpt_store.close()
        self.metrics_logger.close()


def backward_divided(
    loss: torch.Tensor, samples: int, divisor: int, seeds: dict[tuple[Any, ...], torch.Tensor]
) -> None:
    """``(loss / divisor / samples).backward()`` without the two divisions in the graph.

    Backward starts from ``loss`` with the gradient the divisions would pass down to it, made by
    the same two divisions of a one: bit-identical gradients, two autograd nodes fewer per step.
    ``seeds`` caches the seed tensors (one per window size, divisor, dtype and device).
    """
    key = (samples, divisor, loss.dtype, loss.device)
    seed = seeds.get(key)
    if seed is None:
        seed = torch.ones((), dtype=loss.dtype, device=loss.device) / samples
        if divisor != 1:
            seed = seed / divisor
        seeds[key] = seed
    loss.backward(seed)


def _console_metric_keys(metrics: dict[str, float], splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """The epoch line's metrics: train/val loss, accuracy, and each target's rmse and physics metrics.

    Everything else (mae, bias, per column, per class) is in metrics.jsonl and TensorBoard.
    """
    keys = []
    for key in metrics:
        split, _, name = key.partition("/")
        last = name.rpartition("/")[2]
        per_column_or_class = name.count("/") > 1 or name.startswith("recall/")
        if split in splits and last not in _QUIET_ON_CONSOLE and not per_column_or_class:
            keys.append(key)
    return keys


_QUIET_ON_CONSOLE = ("samples", "mae", "bias")


def _apply_debug_settings(cfg: Config) -> None:
    """Debug mode: data in this process, anomaly detection, a few steps per epoch."""
    cfg.data.num_workers = 0
    cfg.train.detect_anomaly = True
    cfg.train.max_steps_per_epoch = cfg.train.max_steps_per_epoch or DEBUG_MAX_STEPS


def _configure_determinism(deterministic: bool, device: torch.device) -> None:
    if deterministic:
        # cuBLAS reads this when its first handle is made (the first matmul, still to come); without it
        # CUDA matmuls may use non-deterministic split reductions and resume would not be bit-exact.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _plain_sums(sums: dict[str, Any]) -> dict[str, Any]:
    """Metric sums as floats and lists: what ``torch.load(weights_only=True)`` reads back."""
    return {k: v.tolist() if hasattr(v, "tolist") else float(v) for k, v in sums.items()}


def _upgrade_meter(sums: dict[str, Any]) -> dict[str, Any]:
    """Partial-epoch sums of checkpoints written before tasks existed (``loss_sum``) under today's names."""
    if "loss_sum" in sums:
        sums = {("loss" if k == "loss_sum" else k): v for k, v in sums.items()}
    return sums
