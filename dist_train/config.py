"""Typed TOML configuration: one dataclass per section, strict validation, ``--set`` overrides.

This module must stay importable without torch: the launcher validates configs before any
worker starts, and ``dtrain --help`` must be fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomllib

from dist_train.errors import ConfigError
from dist_train.fsutil import atomic_write_text

Precision = Literal["fp32", "fp16", "bf16", "auto"]
# FSDP2 (fully_shard) on the CPU with gloo, and its state_dict helpers, work from this torch on.
FSDP_MIN_TORCH = (2, 7)


@dataclass
class RunConfig:
    """Where outputs go and how randomness is seeded."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    # Deterministic algorithms make resume bit-exact on the CPU; they cost speed on GPU.
    deterministic: bool = False


# Hit-list files (data.format = "hits"): dataset names by role, and the channels each
# representation can build with how many values per point each adds (images: pmts_per_module each).
HIT_KEY_DEFAULTS = {"index": "event_hits_index", "pmt": "hit_pmt", "time": "hit_time", "charge": "hit_charge"}
HIT_CHANNELS: dict[str, dict[str, int]] = {
    "mpmt_image": {"charge": 1, "time": 1},
    "point_cloud": {"position": 3, "orientation": 3, "time": 1, "charge": 1},
}
DEFAULT_HIT_CHANNELS: dict[str, tuple[str, ...]] = {
    "mpmt_image": ("charge", "time"),
    "point_cloud": ("position", "orientation", "time", "charge"),
}


@dataclass
class DataConfig:
    """The HDF5 dataset, its splits and how it is batched."""

    path: str = ""
    x_key: str = "event_data"
    y_key: str = "labels"
    extra_keys: list[str] = field(default_factory=list)
    val_split: float = 0.1
    test_split: float = 0.1
    split_seed: int = 0
    # Fraction splits: false = random; true = each class keeps its share in every split
    # (classification only: by its labels); "key" = stratified by that integer dataset, any task.
    stratify: bool | str = False
    # Reduced dataset size: a seeded subset drawn without replacement (0 = everything).
    limit: int = 0
    # Explicit splits: an .npz/.h5 of train_idxs/val_idxs/test_idxs, or "h5:/group" inside `path`.
    split_file: str = ""
    batch_size: int = 64
    eval_batch_size: int = 0  # 0 = same as batch_size
    num_workers: int = 2
    prefetch_factor: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    # "none": raw values; "auto": per-channel mean/std from the training split; "given": use mean/std.
    normalize: Literal["none", "auto", "given"] = "none"
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    train_transforms: list[str] = field(default_factory=list)
    eval_transforms: list[str] = field(default_factory=list)
    # When `path` does not exist, `dtrain launch` can create demo data of this layout ("" = never).
    # Only at a path whose file name starts with "demo" (DEMO_FILE_PREFIX): any other missing path
    # is an error, so a mistyped path to real data is never silently replaced by generated events.
    synth_if_missing: Literal["", "wch5", "wch5_channels_last", "image", "hits"] = ""
    synth_events: int = 4000
    synth_shape: list[int] = field(default_factory=list)  # image layout (C, H, W); [] = (1, 28, 28)
    # DataLoader worker start method ("" = the platform default); all three are supported.
    start_method: Literal["", "fork", "spawn", "forkserver"] = ""
    # How num_workers read ahead: "thread" (prefetch threads, no inter-process copies: best for
    # contiguous uncompressed files), "process" (DataLoader worker processes: decompression,
    # heavy transforms), "auto" (threads on the memory-map fast path, processes otherwise).
    worker_mode: Literal["auto", "process", "thread"] = "auto"
    # How samples are stored: "channels_first" (C, H, W) as models take them, or "channels_last"
    # (H, W, C) as the water-Cherenkov files store them; handed to the model as (C, H, W) either way.
    layout: Literal["channels_first", "channels_last"] = "channels_first"
    # Extra per-sample inputs, read like x_key and passed to the model as keyword arguments.
    input_keys: list[str] = field(default_factory=list)
    # ---- hit-list files (format = "hits": per-event PMT hits, built into samples while reading;
    # see dist_train/data/hits.py). "array" reads x_key as stored.
    format: Literal["array", "hits"] = "array"
    representation: Literal["mpmt_image", "point_cloud"] = "mpmt_image"
    geometry_file: str = ""  # .npz: mpmt_image_positions (M, 2); position, orientation (P, 3)
    # Dataset names by role; roles left out keep their defaults (HIT_KEY_DEFAULTS).
    hit_keys: dict[str, str] = field(default_factory=lambda: dict(HIT_KEY_DEFAULTS))
    pmts_per_module: int = 19
    n_points: int = 4000  # point clouds: events with more hits keep their n_points earliest
    channels: list[str] = field(default_factory=list)  # [] = DEFAULT_HIT_CHANNELS[representation]


@dataclass
class ModelConfig:
    """A registered model name or ``package.module:ClassName``; other keys are its kwargs."""

    name: str = "simple_mlp"
    num_classes: int = 3
    kwargs: dict[str, Any] = field(default_factory=dict)


TASK_NAMES = ("classification", "regression")
REGRESSION_LOSSES = ("mse", "l1", "huber", "smooth_l1", "angular")
# What a regression target can be declared to be, for the derived physics metrics.
TARGET_KINDS = ("plain", "energy", "position", "direction")


@dataclass
class TaskConfig:
    """What is learned: the loss, the metrics and the predictions (see docs/tasks.md)."""

    # "classification", "regression", or your own class as "package.module:ClassName".
    name: str = "classification"
    # HDF5 datasets learned from, in this order ([] = [data.y_key]).
    targets: list[str] = field(default_factory=list)
    # "" = the task's default: cross_entropy (classification), mse (regression). Regression: one loss
    # for every target, or a table by target, {energies = "mse", angles = "angular"} (unlisted: mse);
    # "angular" = the angle between predicted and true direction, for a target of 2 columns (zenith,
    # azimuth in radians) or 3 (a vector).
    loss: str | dict[str, Any] = ""
    # Regression: each target's weight in the loss ({energies = 3.0}; unlisted: 1).
    loss_weights: dict[str, Any] = field(default_factory=dict)
    huber_delta: float = 1.0
    # Regression: the loss sees (target - mean) / std of the training split ("auto"), or of
    # target_mean/target_std ("given"); metrics and predictions are in file units. "none": raw targets
    # (a warning when their scales differ by more than 100x).
    target_norm: Literal["none", "auto", "given"] = "auto"
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    # Regression: what each target is, for derived metrics ({} = guessed from the standard names
    # energies/positions/angles/directions): "energy", "position", "direction" or "plain".
    kinds: dict[str, Any] = field(default_factory=dict)
    # Regression: evaluation metrics per bin [lo, hi) of a one-column target's true value as well,
    # {energies = [100.0, 200.0, 400.0]} -> val/bin_energies_100_200/positions/distance_68 ...
    bins: dict[str, Any] = field(default_factory=dict)
    # Regression: names of a target's columns in metric keys, {positions = ["x", "y", "z"]} ->
    # val/positions/x/rmse (default: 0, 1, 2).
    columns: dict[str, Any] = field(default_factory=dict)
    # Classification extras.
    label_smoothing: float = 0.0
    class_weights: list[float] | str = field(default_factory=list)  # or "balanced"
    # Keyword arguments of a custom task's constructor.
    kwargs: dict[str, Any] = field(default_factory=dict)

    def resolved_targets(self, y_key: str) -> list[str]:
        return list(self.targets) if self.targets else [y_key]

    @property
    def is_custom(self) -> bool:
        return ":" in self.name


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SchedConfig:
    name: Literal["none", "step", "multistep", "cosine", "plateau"] = "none"
    warmup_epochs: float = 0.0
    step_size: int = 10
    gamma: float = 0.1
    milestones: list[int] = field(default_factory=list)
    min_lr: float = 0.0
    # ReduceLROnPlateau: driven by a reduced validation metric, so all ranks agree.
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    patience: int = 2
    factor: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 5
    precision: Precision = "auto"
    grad_accum: int = 1
    clip_grad_norm: float = 0.0  # 0 = off
    log_every: int = 50
    # torch.compile the model for training (dist_train/compile.py): the whole model under DDP, each
    # sharded unit under FSDP; checkpoints, `dtrain eval` and `ckpt export` stay uncompiled.
    compile: bool = False
    # torch.compile's mode: "reduce-overhead" adds CUDA graphs (CUDA only), "max-autotune" benchmarks
    # kernel choices at compile time (slow to start, sometimes faster steps).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # true: a graph break is an error (the whole forward must compile into one graph per module).
    compile_fullgraph: bool = False
    # Cap on optimizer steps per epoch (0 = full epoch); debug mode sets a small value.
    max_steps_per_epoch: int = 0
    eval_every_epochs: int = 1
    # Optimizer steps between the ranks' agreement on stop requests and time-based checkpoints
    # (one tiny all-reduce); a signal is acted on within this many steps (+1) or at the epoch's end,
    # whichever comes first, at the same step everywhere.
    stop_check_every: int = 10
    detect_anomaly: bool = False
    # Console: "auto" shows a progress bar on a terminal and plain lines otherwise.
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    # Evaluate the held-out test split once after the last epoch (a "test" record in metrics.jsonl);
    # false leaves the test split to `dtrain eval RUN_DIR --split test`.
    test_at_end: bool = True
    # Which weights that test evaluates: "best" (checkpoint.monitor's best checkpoint, when
    # checkpoint.save_best keeps one; else the last weights) or "last" (the weights training ended with).
    test_checkpoint: Literal["best", "last"] = "best"
    # Stop after this many evaluated epochs without an improvement of checkpoint.monitor (in
    # checkpoint.mode) by more than early_stop_min_delta; the run ends as completed (0 = off).
    early_stop_patience: int = 0
    early_stop_min_delta: float = 0.0
    # Passed to DDP: for multi-head models whose loss uses some heads only (costs a graph walk per step).
    find_unused_parameters: bool = False
    # "ddp": every rank holds the whole model; "fsdp": parameters, gradients and optimizer state are
    # sharded across ranks (FSDP2, see [fsdp]; needs torch >= 2.7).
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # BatchNorm layers normalise with the statistics of the whole global batch (every rank's samples)
    # instead of each rank's own: torch.nn.SyncBatchNorm, one all-gather per BatchNorm layer and step.
    # GPUs and DDP only (PyTorch has no CPU kernels for it); a no-op in one process.
    sync_batchnorm: bool = False
    # The model's 4-d weights and 4-d input batches in torch.channels_last memory format (NHWC): faster
    # convolutions on recent GPUs (tensor cores); on CPUs measure first (benchmarks/host_step.py). The numbers
    # may differ in the last bits (other convolution kernels), so it is off by default. DDP only (FSDP2 shards
    # contiguous parameters only).
    channels_last: bool = False


@dataclass
class FSDPConfig:
    """How ``train.strategy = "fsdp"`` shards the model (ignored under DDP)."""

    # Module class names sharded as their own units; empty = every block with >= min_params parameters.
    wrap: list[str] = field(default_factory=list)
    min_params: int = 100_000
    # Free the gathered parameters after each unit's forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    # true: recompute the sharded units' activations in backward; or a list of module class names.
    activation_checkpointing: bool | list[str] = False
    # Keep sharded parameters, gradients and optimizer state in host memory.
    cpu_offload: bool = False


@dataclass
class LogConfig:
    tensorboard: bool = True
    histograms: bool = False
    jsonl: bool = True


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_epochs: int = 1
    every_steps: int = 0
    every_minutes: float = 0.0
    # Complete checkpoints kept on disk, newest first (the one `latest` names and best.pt/`best`
    # are always kept too); 0 keeps every checkpoint.
    keep_last: int = 3
    monitor: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    save_best: bool = True
    # "auto": background writes on GPU, synchronous on the CPU.
    async_save: Literal["auto", "on", "off"] = "auto"
    # Seconds the collectives around a save may wait for a slow or dead rank.
    barrier_timeout: float = 300.0


@dataclass
class LaunchConfig:
    gpus: str = "auto"
    backend: Literal["torchrun", "accelerate"] = "torchrun"
    nproc: int = 0  # CPU workers for gpus = "cpu" (0 = 1)
    max_restarts: int = 0
    # A GPU is free when it has no compute processes and is below both thresholds.
    free_memory_mb: int = 1024
    free_util_pct: int = 10
    lock_dir: str = ""
    hang_timeout: float = 0.0  # seconds without progress before stacks are dumped (0 = off)
    pg_timeout: float = 600.0  # process-group collective timeout in seconds
    # Seconds torchrun waits after SIGTERM (a stop request) before SIGKILL: time for the checkpoint.
    shutdown_timeout: int = 120
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    console_ranks: str = "0"


@dataclass
class SlurmConfig:
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 0
    cpus_per_task: int = 0
    mem: str = ""
    time: str = ""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    job_name: str = ""
    signal_grace: int = 120
    max_requeues: int = 10
    sbatch_args: list[str] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    # Where the config was read from, for error messages and relative data paths; not serialised.
    source: str = field(default="", compare=False, repr=False)


# `synth_if_missing` generates data only at paths whose file name starts with this.
DEMO_FILE_PREFIX = "demo"
# `data.split_file` naming a group of the data file itself instead of a file.
H5_SPLIT_PREFIX = "h5:"


# Sections whose unknown keys are collected into `kwargs` instead of being errors.
_OPEN_SECTIONS = {"model"}


def section_types() -> dict[str, type]:
    return {f.name: f.type_obj for f in _fields(Config) if f.name != "source"}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Field:
    name: str
    type_obj: Any


def _fields(cls: type) -> list[_Field]:
    hints = typing.get_type_hints(cls)
    return [_Field(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, dict):
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a field type; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        hint = _did_you_mean(str(value), [str(a) for a in allowed])
        raise ConfigError(f"{where} = {value!r} is not allowed: expected {_type_name(tp)}.{hint}")
    if origin in (types.UnionType, typing.Union):
        for option in get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} = {value!r} has the wrong type: expected {tp}.")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} has the wrong type: expected a list ({_type_name(tp)}).")
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {value!r} has the wrong type: expected a table.")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} = {value!r} has the wrong type: expected float, got {type(value).__name__}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r} has the wrong type: expected int, got {type(value).__name__}.")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(
                f"{where} = {value!r} has the wrong type: expected {tp.__name__}, got {type(value).__name__}."
            )
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")  # pragma: no cover - programming error


def _build_section(cls: type, table: Any, section: str, origin: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: [{section}] must be a table, got {table!r}.")
    known = {f.name: f for f in _fields(cls)}
    kwargs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known or (key == "kwargs" and section in _OPEN_SECTIONS):
            if section in _OPEN_SECTIONS:
                extras[key] = value
                continue
            hint = _did_you_mean(key, list(known))
            raise ConfigError(f"{origin}: unknown key '{key}' in [{section}].{hint} Known keys: {', '.join(known)}.")
        kwargs[key] = _coerce(value, known[key].type_obj, f"{origin}: {section}.{key}")
    if extras:
        kwargs["kwargs"] = {**kwargs.get("kwargs", {}), **extras}
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any], origin: str = "<config>", *, checks_origin: str | None = None) -> Config:
    """``checks_origin``: what cross-field errors name (the file plus the --set arguments that went in)."""
    sections = {f.name: f.type_obj for f in _fields(Config) if f.name != "source"}
    built: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in sections:
            hint = _did_you_mean(name, list(sections))
            raise ConfigError(f"{origin}: unknown section [{name}].{hint} Known sections: {', '.join(sections)}.")
        built[name] = _build_section(sections[name], table, name, origin)
    cfg = Config(**built, source=origin)
    validate(cfg, checks_origin or origin)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is a TOML literal, or a bare string if it is not one.

    An empty value (``--set data.split_file=``, which is what the shell makes of ``data.split_file=""``)
    is the empty string: it clears a string option such as a path.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value (for example --set train.epochs=3).")
    dotted, literal = text.split("=", 1)
    parts = [p.strip() for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key (for example train.epochs).")
    if not literal.strip():
        return parts, ""
    try:
        value = tomllib.loads(f"v = {literal}")["v"]
    except tomllib.TOMLDecodeError:
        if any(c in literal for c in "[]{}\"'"):
            raise ConfigError(f"--set {text!r}: {literal!r} is not a valid TOML value.") from None
        value = literal.strip()  # bare words such as `--set launch.gpus=cpu`
    return parts, value


def check_override(text: str) -> None:
    """Section, key and type of one ``--set``, so that its mistakes name the ``--set`` argument.

    Merged into the file's tables first, a bad override would be reported as the file's mistake.
    ``[model]`` keys other than its fields are the model's (checked against the model's signature),
    and keys below a table (``optim.kwargs.amsgrad``) are checked with the rest of the config.
    """
    parts, value = parse_override(text)
    where = f"--set {text}"
    sections = section_types()
    section = parts[0]
    if section not in sections:
        hint = _did_you_mean(section, list(sections))
        raise ConfigError(f"{where}: unknown section [{section}].{hint} Known sections: {', '.join(sections)}.")
    known = {f.name: f for f in _fields(sections[section])}
    key = parts[1]
    if key not in known or (key == "kwargs" and section in _OPEN_SECTIONS):
        if section in _OPEN_SECTIONS:
            return
        hint = _did_you_mean(key, list(known))
        raise ConfigError(f"{where}: unknown key '{key}' in [{section}].{hint} Known keys: {', '.join(known)}.")
    if len(parts) == 2:
        _coerce(value, known[key].type_obj, f"{where}: {section}.{key}")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    merged = json.loads(json.dumps(raw))  # deep copy of plain TOML data
    for text in overrides:
        parts, value = parse_override(text)
        node = merged
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table.")
        node[parts[-1]] = value
    return merged


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist. Check the path, or start from configs/quickstart.toml."
        )
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}. Fix the syntax at that line.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file; a config must be TOML text.") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    overrides = overrides or []
    raw = read_toml(path)
    for text in overrides:
        check_override(text)
    merged = apply_overrides(raw, overrides)
    with_sets = f"{path} with " + " ".join(f"--set {text}" for text in overrides) if overrides else None
    return config_from_dict(merged, origin=str(path), checks_origin=with_sets)


def validate(cfg: Config, origin: str) -> None:
    """Cross-field checks that a type alone cannot express."""

    def fail(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{origin}: {key} = {value!r} {why}")

    d = cfg.data
    for key in ("val_split", "test_split"):
        v = getattr(d, key)
        if not 0.0 <= v < 1.0:
            fail(f"data.{key}", v, "must be a fraction in [0, 1).")
    if d.val_split + d.test_split >= 1.0:
        fail(
            "data.val_split + data.test_split",
            d.val_split + d.test_split,
            "leaves no training data; keep the sum below 1.",
        )
    if d.batch_size < 1:
        fail("data.batch_size", d.batch_size, "must be at least 1 (it is the per-process batch).")
    if d.eval_batch_size < 0:
        fail("data.eval_batch_size", d.eval_batch_size, "must be >= 0 (0 = same as batch_size).")
    if d.num_workers < 0:
        fail("data.num_workers", d.num_workers, "must be >= 0.")
    if d.limit < 0:
        fail("data.limit", d.limit, "must be >= 0 (0 = use every event).")
    if d.normalize == "given" and (not d.mean or len(d.mean) != len(d.std)):
        fail("data.mean/std", (d.mean, d.std), "must be non-empty lists of equal length when normalize = 'given'.")
    _validate_hit_settings(d, fail)
    _validate_stratify(cfg, fail)
    if cfg.model.num_classes < 1:
        fail("model.num_classes", cfg.model.num_classes, "must be at least 1.")
    if cfg.optim.lr <= 0 or not math.isfinite(cfg.optim.lr):
        fail("optim.lr", cfg.optim.lr, "must be a positive number.")
    if len(cfg.optim.betas) != 2:
        fail("optim.betas", cfg.optim.betas, "must have two values, e.g. [0.9, 0.999].")
    t = cfg.train
    if t.epochs < 1:
        fail("train.epochs", t.epochs, "must be at least 1.")
    if t.grad_accum < 1:
        fail("train.grad_accum", t.grad_accum, "must be at least 1.")
    if t.stop_check_every < 1:
        fail("train.stop_check_every", t.stop_check_every, "must be at least 1 (optimizer steps).")
    if t.log_every < 1:
        fail("train.log_every", t.log_every, "must be at least 1.")
    if t.clip_grad_norm < 0:
        fail("train.clip_grad_norm", t.clip_grad_norm, "must be >= 0 (0 = off).")
    if t.early_stop_patience < 0:
        fail("train.early_stop_patience", t.early_stop_patience, "must be >= 0 (epochs without improvement; 0 = off).")
    if not t.early_stop_min_delta >= 0:
        fail(
            "train.early_stop_min_delta",
            t.early_stop_min_delta,
            "must be >= 0 (the smallest change that counts as an improvement).",
        )
    if t.early_stop_patience and cfg.checkpoint.monitor.startswith("val/") and d.val_split == 0 and not d.split_file:
        fail(
            "train.early_stop_patience",
            t.early_stop_patience,
            f"watches checkpoint.monitor = {cfg.checkpoint.monitor!r}, but data.val_split = 0 leaves no validation split; "
            "set data.val_split, monitor a train/ metric, or set train.early_stop_patience = 0.",
        )
    if t.sync_batchnorm and t.strategy == "fsdp":
        raise ConfigError(
            f"{origin}: train.sync_batchnorm = true with train.strategy = 'fsdp' is not supported: SyncBatchNorm is "
            "untested under FSDP2 (its parameters are sharded and cast by FSDP's mixed precision). Use "
            "train.strategy = 'ddp' for synchronised BatchNorm, or set train.sync_batchnorm = false."
        )
    if t.channels_last and t.strategy == "fsdp":
        raise ConfigError(
            f"{origin}: train.channels_last = true with train.strategy = 'fsdp' is not supported: FSDP2 shards only "
            "contiguous parameters (torch raises 'FSDP does not support non-contiguous parameters' for channels_last "
            "convolution weights). Use train.strategy = 'ddp', or set train.channels_last = false."
        )
    f = cfg.fsdp
    if f.min_params < 1:
        fail("fsdp.min_params", f.min_params, "must be at least 1 (parameters per automatically sharded block).")
    for key in ("wrap", "activation_checkpointing"):
        names = getattr(f, key)
        if isinstance(names, list) and not all(n.strip() and n.isidentifier() for n in names):
            fail(f"fsdp.{key}", names, 'must list module class names such as "TransformerBlock".')
    c = cfg.checkpoint
    if c.keep_last < 0:
        fail("checkpoint.keep_last", c.keep_last, "must be >= 0 (the newest N checkpoints are kept; 0 keeps all).")
    if c.every_epochs < 0 or c.every_steps < 0 or c.every_minutes < 0:
        fail("checkpoint.every_*", (c.every_epochs, c.every_steps, c.every_minutes), "must be >= 0 (0 = off).")
    if cfg.launch.nproc < 0:
        fail("launch.nproc", cfg.launch.nproc, "must be >= 0.")
    if cfg.launch.shutdown_timeout < 1:
        fail(
            "launch.shutdown_timeout",
            cfg.launch.shutdown_timeout,
            "must be at least 1 second (time to checkpoint on a stop).",
        )
    if cfg.launch.pg_timeout <= 0:
        fail("launch.pg_timeout", cfg.launch.pg_timeout, "must be a positive number of seconds.")
    if cfg.sched.name == "multistep" and not cfg.sched.milestones:
        fail("sched.milestones", cfg.sched.milestones, "must list epochs when sched.name = 'multistep'.")
    _validate_task(cfg, fail)


def _validate_task(cfg: Config, fail: Any) -> None:
    t = cfg.task
    if not t.is_custom and t.name not in TASK_NAMES:
        hint = _did_you_mean(t.name, list(TASK_NAMES))
        fail(
            "task.name",
            t.name,
            f'is not a task.{hint} Use one of {", ".join(map(repr, TASK_NAMES))} or your own class as "package.module:ClassName".',
        )
    if len(set(t.targets)) != len(t.targets):
        fail("task.targets", t.targets, "names a dataset twice.")
    if t.name == "classification":
        if t.loss not in ("", "cross_entropy"):
            fail(
                "task.loss", t.loss, 'is not a classification loss; use "cross_entropy" (or task.name = "regression").'
            )
        if len(t.resolved_targets(cfg.data.y_key)) != 1:
            fail("task.targets", t.targets, "must name one label dataset for classification.")
        if isinstance(t.class_weights, str) and t.class_weights != "balanced":
            fail("task.class_weights", t.class_weights, 'must be a list of per-class weights or "balanced".')
        if isinstance(t.class_weights, list) and t.class_weights and len(t.class_weights) != cfg.model.num_classes:
            fail(
                "task.class_weights",
                t.class_weights,
                f"must have one weight per class (model.num_classes = {cfg.model.num_classes}).",
            )
        if not 0.0 <= t.label_smoothing < 1.0:
            fail("task.label_smoothing", t.label_smoothing, "must be in [0, 1).")
    if t.name != "regression":
        for key in ("loss_weights", "bins", "columns"):
            if getattr(t, key):
                fail(
                    f"task.{key}",
                    getattr(t, key),
                    f'applies to task.name = "regression" only (this task is {t.name!r}).',
                )
    if t.name == "regression":
        _validate_regression_tables(t, t.resolved_targets(cfg.data.y_key), fail)
        if t.huber_delta <= 0:
            fail("task.huber_delta", t.huber_delta, "must be positive.")
        for target, kind in t.kinds.items():
            if target not in t.resolved_targets(cfg.data.y_key):
                fail(
                    f"task.kinds.{target}", kind, f"names no target; targets are {t.resolved_targets(cfg.data.y_key)}."
                )
            if kind not in TARGET_KINDS:
                hint = _did_you_mean(str(kind), list(TARGET_KINDS))
                fail(
                    f"task.kinds.{target}",
                    kind,
                    f"is not a target kind.{hint} Use one of {', '.join(map(repr, TARGET_KINDS))}.",
                )
        if t.target_norm == "given" and (not t.target_mean or len(t.target_mean) != len(t.target_std)):
            fail(
                "task.target_mean/target_std",
                (t.target_mean, t.target_std),
                "must be non-empty lists of equal length when target_norm = 'given'.",
            )
        if any(s <= 0 for s in t.target_std):
            fail("task.target_std", t.target_std, "must be positive.")
    overlap = set(cfg.data.input_keys) & ({cfg.data.x_key} | set(t.resolved_targets(cfg.data.y_key)))
    if overlap:
        fail("data.input_keys", cfg.data.input_keys, f"repeats {sorted(overlap)}, already the model input or a target.")


def _validate_regression_tables(t: TaskConfig, targets: list[str], fail: Callable[[str, Any, str], None]) -> None:
    """task.loss (a name or a table by target), loss_weights, bins and columns of a regression."""
    losses = t.loss if isinstance(t.loss, dict) else {"": t.loss}
    for target, loss in losses.items():
        where = f"task.loss.{target}" if target else "task.loss"
        if target and target not in targets:
            fail(where, loss, f"names no target; targets are {targets}.")
        if loss not in ("", *REGRESSION_LOSSES):
            hint = _did_you_mean(str(loss), list(REGRESSION_LOSSES))
            fail(where, loss, f"is not a regression loss.{hint} Use one of {', '.join(map(repr, REGRESSION_LOSSES))}.")
    for target, weight in t.loss_weights.items():
        if target not in targets:
            fail(f"task.loss_weights.{target}", weight, f"names no target; targets are {targets}.")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
            fail(f"task.loss_weights.{target}", weight, "must be a number >= 0.")
    for target, edges in t.bins.items():
        if target not in targets:
            fail(f"task.bins.{target}", edges, f"names no target; targets are {targets}.")
        numbers = isinstance(edges, list) and all(isinstance(e, int | float) and not isinstance(e, bool) for e in edges)
        if not numbers or len(edges) < 2 or any(not a < b for a, b in zip(edges, edges[1:], strict=False)):
            fail(
                f"task.bins.{target}",
                edges,
                "must be a list of at least 2 increasing bin edges, e.g. [100.0, 200.0, 400.0].",
            )
    for target, names in t.columns.items():
        if target not in targets:
            fail(f"task.columns.{target}", names, f"names no target; targets are {targets}.")
        plain = isinstance(names, list) and all(isinstance(n, str) and n and "/" not in n for n in names)
        if not plain or len(set(names)) != len(names):
            fail(
                f"task.columns.{target}",
                names,
                'must be a list of distinct non-empty names without "/", e.g. ["x", "y", "z"].',
            )


def _validate_hit_settings(d: DataConfig, fail: Callable[[str, Any, str], None]) -> None:
    """The [data] keys of hit-list files (checked whatever the format, so typos surface early)."""
    for role, key in d.hit_keys.items():
        if role not in HIT_KEY_DEFAULTS:
            hint = _did_you_mean(role, list(HIT_KEY_DEFAULTS))
            fail(f"data.hit_keys.{role}", key, f"is not a hit-list role.{hint} Roles: {', '.join(HIT_KEY_DEFAULTS)}.")
        if not isinstance(key, str) or not key:
            fail(f"data.hit_keys.{role}", key, "must be the name of a dataset in the file (a non-empty string).")
    d.hit_keys = {**HIT_KEY_DEFAULTS, **d.hit_keys}
    allowed = HIT_CHANNELS[d.representation]
    for name in d.channels:
        if name not in allowed:
            hint = _did_you_mean(name, list(allowed))
            fail(
                "data.channels",
                d.channels,
                f"names {name!r}, which {d.representation} samples cannot have.{hint} "
                f"Choose from {', '.join(allowed)}.",
            )
    if len(set(d.channels)) != len(d.channels):
        fail("data.channels", d.channels, "names a channel twice.")
    if d.pmts_per_module < 1:
        fail("data.pmts_per_module", d.pmts_per_module, "must be at least 1 (19 for the mPMT modules).")
    if d.n_points < 1:
        fail("data.n_points", d.n_points, "must be at least 1 (points per point-cloud sample).")
    if d.format == "hits" and not d.geometry_file:
        fail(
            "data.geometry_file",
            d.geometry_file,
            "is empty: hit-list files need the detector geometry (.npz with "
            "mpmt_image_positions for images, position/orientation for point clouds).",
        )
    if d.synth_if_missing == "hits" and d.format != "hits":
        fail("data.synth_if_missing", d.synth_if_missing, 'writes a hit-list file: set data.format = "hits" too.')


def _validate_stratify(cfg: Config, fail: Callable[[str, Any, str], None]) -> None:
    s = cfg.data.stratify
    if isinstance(s, str) and not s.strip():
        fail(
            "data.stratify", s, 'must be true, false or the name of an integer dataset to stratify by (e.g. "labels").'
        )
    if s is True and cfg.task.name != "classification" and not cfg.data.split_file:
        fail(
            "data.stratify",
            s,
            f"stratifies by class labels, which a {cfg.task.name!r} task does not have. Name an integer "
            'dataset to stratify by instead (e.g. data.stratify = "labels"), or set it to false (random splits).',
        )


def resolve_geometry_path(cfg: Config) -> Path:
    """``data.geometry_file``, relative to the working directory like ``data.path``."""
    return Path(cfg.data.geometry_file).expanduser().absolute()


# ----------------------------------------------------------------------------- serialisation


def config_to_dict(cfg: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in _fields(Config):
        if f.name == "source":
            continue
        section = dataclasses.asdict(getattr(cfg, f.name))
        if f.name in _OPEN_SECTIONS:
            section.update(section.pop("kwargs"))
        out[f.name] = section
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum() and key.isascii()
    return key if bare else json.dumps(key)


def dumps_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, table in data.items():
        lines.append(f"[{_toml_key(section)}]")
        for key, value in table.items():
            if value is None:
                continue
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def config_to_toml(cfg: Config) -> str:
    header = "# Resolved dtrain config: every default made explicit. Loading this file reproduces the run.\n"
    return header + dumps_toml(config_to_dict(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(Path(path), config_to_toml(cfg))


def resolve_data_path(cfg: Config) -> Path:
    """Relative data paths are relative to the working directory, as in a plain ``python train.py``.

    The launcher stores the absolute path in the run directory's config.toml, so workers started
    elsewhere (SLURM nodes, restarts) read the same file.
    """
    return Path(cfg.data.path).expanduser().absolute()


def resolve_split_file(cfg: Config) -> str:
    """``data.split_file`` as an absolute path ("" and "h5:/group", a group of the data file, as they are)."""
    s = cfg.data.split_file
    if not s or s.startswith(H5_SPLIT_PREFIX):
        return s
    return str(Path(s).expanduser().absolute())


def make_data_paths_absolute(cfg: Config) -> None:
    """``data.path``, ``geometry_file`` and ``split_file`` made absolute (relative ones are relative to the
    working directory): the run directory's config.toml then names the same files from any directory
    (SLURM nodes, restarts, ``dtrain eval``)."""
    d = cfg.data
    if d.path:
        d.path = str(resolve_data_path(cfg))
    if d.geometry_file:
        d.geometry_file = str(resolve_geometry_path(cfg))
    d.split_file = resolve_split_file(cfg)


def torch_version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_sync_batchnorm_device(cfg: Config, *, device_type: str, world_size: int) -> None:
    """``train.sync_batchnorm`` on several CPU processes is a config error: torch's SyncBatchNorm has CUDA
    kernels only (its forward raises on CPU input). Checked by the launcher once it knows the devices,
    and again in the worker."""
    if not cfg.train.sync_batchnorm or world_size <= 1 or device_type != "cpu":
        return
    raise ConfigError(
        f"{cfg.source or '<config>'}: train.sync_batchnorm = true needs GPUs, but this job runs {world_size} "
        "processes on the CPU, and PyTorch's SyncBatchNorm has no CPU implementation. Launch on GPUs "
        "(--gpus auto), or set train.sync_batchnorm = false: each rank then normalises with its own "
        "batch's statistics, and evaluation and checkpoints use rank 0's running statistics."
    )


def check_strategy_supported(cfg: Config, torch_version: str | None = None) -> None:
    """``strategy = "fsdp"`` with a torch that has no CPU/gloo FSDP2 is a config error, before any worker starts.

    Reads the installed version from package metadata: the launcher must not import torch.
    """
    if cfg.train.strategy != "fsdp":
        return
    if torch_version is None:
        try:
            torch_version = importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            return  # the workers' own import reports a missing torch
    if torch_version_tuple(torch_version) < FSDP_MIN_TORCH:
        need = ".".join(map(str, FSDP_MIN_TORCH))
        raise ConfigError(
            f"{cfg.source or '<config>'}: train.strategy = 'fsdp' needs torch >= {need} (fully_shard on the CPU "
            f"and GPUs); this environment has torch {torch_version}. Install torch>={need}, "
            "or use train.strategy = 'ddp'."
        )
