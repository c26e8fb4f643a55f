"""``train.compile``: torch.compile for the training forward, with its cost reported and its cache kept.

What gets compiled depends on how the strategy wrapped the model:

* DDP (or one process): the wrapped model as a whole. Dynamo's DDP optimizer splits the graph at
  the gradient buckets, so the all-reduce still overlaps with backward. The plain model underneath
  stays uncompiled: checkpoints take its state_dict (no ``_orig_mod.`` keys) and evaluation runs it
  eagerly (no recompiles for the eval mode and the last, shorter batches).
* FSDP2: each sharded unit in place (``Module.compile``), after ``fully_shard``: torchtitan's
  per-block compile. Units of one class share their compiled code; FSDP's own hooks run eagerly
  between them, and a module compiled in place keeps its state_dict keys.

The compiled code goes to a cache the user owns: ``TORCHINDUCTOR_CACHE_DIR`` when set, else the
run directory's ``compile_cache/`` (inductor's default, ``/tmp/torchinductor_<user>``, is a path
any user could create first and fill with code that this process would load). A relaunch of the
run (a requeued job, a resume) finds inductor's FX graph and autograd caches there and starts faster.

Imports: dynamo and inductor modules (1.5-3 s per process) and FSDP (0.7 s) are imported inside the
functions that need them, so the trainer importing this module costs nothing when compile is off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from dist_train.config import Config
from dist_train.errors import CompileError
from dist_train.fsutil import make_private_dir
from dist_train.logs import FILE_ONLY

log = logging.getLogger("dtrain")

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
RUN_CACHE_DIR = "compile_cache"


class Compiler(Protocol):
    def compile(self, train_model: nn.Module) -> nn.Module:
        """The module the training forward runs through (``train_model`` itself, or a compiled wrapper)."""
        ...

    def report_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log what the first optimizer step cost in compilation, once it is done."""
        ...

    def failures_explained(self) -> contextlib.AbstractContextManager[None]:
        """Around training: a compiler failure becomes one paragraph naming the model (exit 2)."""
        ...


def build_compiler(cfg: Config, run_dir: Path | None) -> Compiler:
    if not cfg.train.compile:
        return NoCompile()
    return ModelCompiler(cfg, use_private_cache(run_dir))


class NoCompile:
    """``train.compile = false``: the model runs eagerly."""

    def compile(self, train_model: nn.Module) -> nn.Module:
        return train_model

    def report_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def failures_explained(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class ModelCompiler:
    def __init__(self, cfg: Config, cache_dir: Path) -> None:
        self.model_name = cfg.model.name
        self.mode = cfg.train.compile_mode
        self.fullgraph = cfg.train.compile_fullgraph
        self.cache_dir = cache_dir
        self.timer = CompileTimer()

    def options(self) -> dict[str, Any]:
        return {"mode": None if self.mode == "default" else self.mode, "fullgraph": self.fullgraph}

    def compile(self, train_model: nn.Module) -> nn.Module:
        units = sharded_units(train_model)
        if units and units != [train_model]:
            what = (
                f"{len(units)} FSDP unit(s) one by one ({', '.join(sorted({model_class(u).__name__ for u in units}))})"
            )
        else:
            what = "the model as a whole"
        log.info(
            "torch.compile (mode %s%s): %s, compiled at the first step; cache %s",
            self.mode,
            ", fullgraph" if self.fullgraph else "",
            what,
            self.cache_dir,
        )
        self.timer.install()
        if units:
            for unit in units:
                unit.compile(**self.options())  # in place: state_dict keys and FSDP's hooks unchanged
            return train_model
        return cast(nn.Module, torch.compile(train_model, **self.options()))

    def report_first_step(self, optimizer: torch.optim.Optimizer) -> None:
        handle: Any = None

        def after_step(*_: Any) -> None:
            handle.remove()
            log.info("torch.compile: %s", self.timer.first_step_summary())
            self.timer.report_later_compiles()

        handle = optimizer.register_step_post_hook(after_step)

    @contextlib.contextmanager
    def failures_explained(self) -> Iterator[None]:
        from torch._dynamo.exc import TorchDynamoException

        try:
            yield
        except TorchDynamoException as exc:
            # The whole error (often pages: the graph, the user frames) stays in the rank's log.
            log.error("torch.compile failed for model %s:\n%s", self.model_name, exc, extra=FILE_ONLY)
            raise CompileError(
                f"model {self.model_name!r} cannot be compiled (train.compile = true, mode {self.mode!r}"
                f"{', fullgraph' if self.fullgraph else ''}): {first_line(exc)}. {self._hint()} The whole error is in "
                f"the run's logs/rank{os.environ.get('RANK', '0')}.log."
            ) from exc

    def _hint(self) -> str:
        if self.fullgraph:
            return (
                "With train.compile_fullgraph = false the compiler runs such code eagerly between graphs; "
                "or train without compiling (--set train.compile=false)."
            )
        return (
            "Train it without compiling (--set train.compile=false), or change the model where the compiler "
            "stops (TORCH_LOGS=graph_breaks lists where it could not follow)."
        )


def sharded_units(train_model: nn.Module) -> list[nn.Module]:
    """FSDP2: the outermost sharded units below the root, to compile one by one ([] for anything else).

    Norm layers sharded on their own (kept in fp32 under mixed precision) are left out: they are no
    blocks worth a graph, and inside a unit they are compiled with it. Without a unit of the model's own
    classes, the root (the whole model) is compiled in place instead. A unit wrapped for activation
    checkpointing is compiled inside the wrapper, so the recomputation in backward runs compiled too.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(train_model, FSDPModule):
        return []
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in train_model.modules():
        if module is train_model or id(module) in inside or not isinstance(module, FSDPModule):
            continue
        inside.update(id(m) for m in module.modules())
        unit = getattr(module, "_checkpoint_wrapped_module", module)
        if not isinstance(unit, _NormBase) and not _is_torch_layer(unit):
            units.append(unit)
    return units or [train_model]


def _is_torch_layer(module: nn.Module) -> bool:
    """A layer of torch.nn itself (Linear, Conv2d...): dynamo skips frames that start in torch's own
    files, so such a unit compiled on its own yields no graph; the model compiled as a whole covers it."""
    return model_class(module).__module__.startswith("torch.")


def model_class(module: nn.Module) -> type:
    """The module's own class: fully_shard swaps it for a generated subclass (``FSDP<Name>``, defined in torch)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


class CompileTimer:
    """Seconds spent compiling (dynamo, AOT autograd, inductor, lazily compiled backwards), from
    torch's compile callbacks, and inductor's cache hits and misses."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compiles = 0
        self.first_start: float | None = None
        self._started = 0.0
        self._log_each = False

    def install(self) -> None:
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, _: Any) -> None:
        self._started = time.perf_counter()
        if self.first_start is None:
            self.first_start = self._started

    def _end(self, args: Any) -> None:
        took = time.perf_counter() - self._started
        self.seconds += took
        self.compiles += 1
        if self._log_each:
            # After the first step a compile means new input shapes (an epoch's last, shorter batch),
            # a new mode or a guard that failed: worth a line, since the step it lands in is slow.
            log.info(
                "torch.compile: compiled again (%s, %s) in %.1f s",
                args.compile_id,
                args.callback_trigger.name.lower(),
                took,
            )

    def report_later_compiles(self) -> None:
        self._log_each = True

    def first_step_summary(self) -> str:
        from torch._dynamo.utils import counters

        step = time.perf_counter() - self.first_start if self.first_start is not None else 0.0
        hits = counters["inductor"]["fxgraph_cache_hit"]
        misses = counters["inductor"]["fxgraph_cache_miss"]
        graphs = counters["stats"]["unique_graphs"]
        return (
            f"first step {step:.1f} s, {self.seconds:.1f} s of it compiling ({self.compiles} compile(s), {graphs} graph(s)); "
            f"inductor's FX graph cache: {hits} hit(s), {misses} miss(es)"
            + (" (compiled code reused from an earlier start)" if hits and not misses else "")
        )


def use_private_cache(run_dir: Path | None) -> Path:
    """Point inductor's caches at a directory this user owns (set before the first compile reads it)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Importing parts of torch (dynamo, FSDP) sets the variable to inductor's default, in this process
    # and (through the launcher's environment) in the workers: only another value is the user's choice.
    chosen = os.environ.get(CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        path = Path(chosen)
    elif run_dir is not None:
        path = run_dir / RUN_CACHE_DIR
    else:
        path = Path(tempfile.gettempdir()) / f"dtrain-compile-cache-{os.getuid()}"
    make_private_dir(path)
    os.environ[CACHE_ENV] = str(path.absolute())
    return path


def first_line(exc: BaseException) -> str:
    """The error's first non-empty line, without a trailing full stop, at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return (text if len(text) <= 300 else text[:297] + "...").rstrip(".")
