"""Model registry: built-in models, torchvision classifiers by name, and ``package.module:ClassName``.

``build_model(cfg, sample_shape)`` is the one entry point. It checks the ``[model]`` kwargs against
the builder's signature, builds the model, and runs a dry forward pass on two zero samples of the
data's shape, so that a model that cannot take the data fails at start-up with a message naming
both, instead of deep inside the first training step.

Built-in builders receive the per-sample shape and the class count, so layer sizes follow the
data (the same ``cnn`` works on 1x28x28 digits, 1x24x24 crops and 16x40x38 water-Cherenkov events).
"""

from __future__ import annotations

import importlib
import inspect
import math
import traceback
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_train.config import ModelConfig
from dist_train.errors import ConfigError
from dist_train.model_check import (
    BUILDER_ARGS,
    TORCHVISION_OPTIONS,
    check_kwargs,
    did_you_mean,
    import_error,
    split_import_path,
    syntax_error,
    unknown_model_error,
)

# A builder: builder(sample_shape, num_classes, **kwargs) -> nn.Module.
ModelBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelBuilder] = {}
# Parameters every builder receives from dtrain itself; they are not user kwargs.
_BUILDER_ARGS = BUILDER_ARGS
# Keys dtrain handles itself for torchvision models (the rest go to the torchvision builder).
_TORCHVISION_OPTIONS = TORCHVISION_OPTIONS
# Batch of the dry forward pass: 2, so that BatchNorm layers accept it in any mode.
_DRY_BATCH = 2


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator: make ``builder`` available as ``[model] name = "<name>"``."""

    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def list_models(include_torchvision: bool = True) -> list[str]:
    """Registered names, then the torchvision classification models (importing torchvision)."""
    names = sorted(_REGISTRY)
    if include_torchvision:
        names += [n for n in _torchvision_names() if n not in _REGISTRY]
    return names


# Per-sample shape and numpy dtype name of an extra model input (``data.input_keys``).
InputSpecs = dict[str, tuple[tuple[int, ...], str]]


def build_model(
    cfg: ModelConfig,
    sample_shape: tuple[int, ...],
    *,
    inputs: InputSpecs | None = None,
    check_width: bool = True,
    task: str = "classification",
) -> nn.Module:
    """Build ``cfg.name`` for samples of ``sample_shape`` (no batch dimension) and check it fits them.

    ``cfg.num_classes`` is the output width (the task's: classes, or regression target columns);
    ``inputs`` are the extra keyword inputs of the forward pass; ``check_width = False`` (a custom
    task without ``output_width``) checks only that the model runs.
    """
    sample_shape = tuple(int(s) for s in sample_shape)
    kwargs = dict(cfg.kwargs)
    if ":" in cfg.name:
        model = _build_imported(cfg.name, cfg.num_classes, sample_shape, kwargs)
    elif cfg.name in _REGISTRY:
        model = _build_registered(cfg.name, cfg.num_classes, sample_shape, kwargs)
    elif cfg.name in _torchvision_names():
        model = _build_torchvision(cfg.name, cfg.num_classes, sample_shape, kwargs)
    else:
        raise unknown_model_error(cfg.name, _REGISTRY, _torchvision_names())
    check_model_fits(model, cfg.name, sample_shape, cfg.num_classes, inputs=inputs, check_width=check_width, task=task)
    return model


# ----------------------------------------------------------------------------- built-in models


class Flatten(nn.Module):
    """Flatten everything but the batch dimension (``nn.Flatten`` with a clearer name in errors)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


def _flat_size(sample_shape: tuple[int, ...]) -> int:
    return math.prod(sample_shape)


@register_model("mlp")
def build_mlp(
    sample_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] | int = (128,), dropout: float = 0.0
) -> nn.Module:
    """Flatten, then Linear+ReLU(+Dropout) per ``hidden`` size, then a linear classifier."""
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in sizes):
        raise ConfigError(f"[model] hidden = {hidden!r} for model 'mlp' must be a list of positive ints, e.g. [128].")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"[model] dropout = {dropout!r} for model 'mlp' must be in [0, 1).")
    layers: list[nn.Module] = [Flatten()]
    width = _flat_size(sample_shape)
    for size in sizes:
        layers += [nn.Linear(width, size), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class SimpleMLP(nn.Module):
    """The water-Cherenkov tutorial's SimpleMLP: flatten -> 160 -> 40 -> classes, ReLU between."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 160)
        self.fc2 = nn.Linear(160, 40)
        self.fc3 = nn.Linear(40, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


@register_model("simple_mlp")
def build_simple_mlp(sample_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SimpleMLP(_flat_size(sample_shape), num_classes)


class ConvNet(nn.Module):
    """The course's conv net: two (conv 5x5 -> ReLU -> maxpool 2) blocks with 32/64 channels, then linear."""

    def __init__(
        self,
        sample_shape: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        padding: int,
        hidden: int,
        dropout: float,
    ) -> None:
        super().__init__()
        # (H, W) samples get a channel axis, so plain grey images work without reshaping the data.
        self.add_channel = len(sample_shape) == 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=padding),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = _conv_output_size(self.features, in_channels, sample_shape)
        head: list[nn.Module] = [Flatten()]
        if hidden > 0:
            head += [nn.Linear(flat, hidden), nn.ReLU()]
            flat = hidden
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.add_channel:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


def _conv_output_size(features: nn.Module, in_channels: int, sample_shape: tuple[int, ...]) -> int:
    """Flattened size after ``features``, computed on the meta device (no memory, no compute)."""
    probe = torch.zeros((1, in_channels, *sample_shape[-2:]), device="meta")
    params = {name: torch.empty_like(p, device="meta") for name, p in features.named_parameters()}
    try:
        out = torch.func.functional_call(features, params, (probe,))
    except RuntimeError as exc:
        raise ConfigError(
            f"model 'cnn' cannot take samples of shape {sample_shape}: {_first_line(exc)}. "
            "The two 5x5 conv + 2x2 pool blocks need at least about 16x16 pixels; set [model] padding = 2 "
            "for smaller images, or check the data's x_key and crop transforms."
        ) from None
    return math.prod(out.shape[1:])


@register_model("cnn")
def build_cnn(
    sample_shape: tuple[int, ...],
    num_classes: int,
    in_channels: int = 0,
    padding: int = 0,
    hidden: int = 0,
    dropout: float = 0.0,
) -> nn.Module:
    """``in_channels = 0`` takes the channel count from the data; ``hidden > 0`` adds a hidden linear layer."""
    if len(sample_shape) not in (2, 3):
        raise ConfigError(
            f"model 'cnn' cannot take samples of shape {sample_shape}: it needs (C, H, W) or (H, W) images. "
            "Check [model] name or the data's x_key."
        )
    channels = in_channels or (1 if len(sample_shape) == 2 else sample_shape[0])
    return ConvNet(sample_shape, num_classes, channels, padding, hidden, dropout)


# ----------------------------------------------------------------------------- torchvision
# torchvision is imported only when a torchvision model is asked for: its import costs 1.3 s per process.


def _torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _torchvision_model_class(builder: Callable[..., Any]) -> type | None:
    """The class a torchvision builder returns (from its return annotation), to validate kwargs."""
    try:
        ret = typing.get_type_hints(builder).get("return")
    except Exception:  # unresolved forward references: skip the extra validation
        return None
    return ret if isinstance(ret, type) else None


def _build_torchvision(name: str, num_classes: int, sample_shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    known = _parameter_names(builder) + list(_TORCHVISION_OPTIONS)
    model_cls = _torchvision_model_class(builder)
    if model_cls is not None:
        init = model_cls.__init__  # type: ignore[misc]  # the class's own signature, read, not called
        known += [p for p in _parameter_names(init) if p not in ("self", "num_classes")]
    _check_kwargs(name, kwargs, known)

    in_channels = int(kwargs.pop("in_channels", 0) or (sample_shape[0] if len(sample_shape) == 3 else 3))
    small_input = bool(kwargs.pop("small_input", False))
    pretrained = kwargs.get("weights") is not None
    # Pretrained weights come with a 1000-class head; build with it and replace the head afterwards.
    model = _call_builder(name, builder, kwargs if pretrained else {**kwargs, "num_classes": num_classes})
    if pretrained:
        _replace_last_linear(model, name, num_classes)
    if small_input:
        _use_small_input_stem(model, name, in_channels)
    elif in_channels != 3:
        _adapt_first_conv(model, name, in_channels)
    return model


def _call_builder(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> nn.Module:
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r} could not be built with [model] kwargs {kwargs!r}: {_first_line(exc)}"
        ) from None


def _find_first_conv(model: nn.Module, name: str) -> tuple[str, nn.Conv2d]:
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return mod_name, module
    raise ConfigError(f"model {name!r} has no Conv2d layer, so [model] in_channels / small_input cannot be applied.")


def _set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _adapt_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the first conv so the model takes ``in_channels`` channels, keeping kernel/stride/padding."""
    conv_name, old = _find_first_conv(model, name)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=old.bias is not None,
    )
    with torch.no_grad():
        # Spread pretrained RGB filters over the new channels, keeping the activation scale.
        new.weight.copy_(old.weight.mean(dim=1, keepdim=True).expand_as(new.weight) * (3.0 / in_channels))
        if old.bias is not None and new.bias is not None:
            new.bias.copy_(old.bias)
    _set_submodule(model, conv_name, new)


def _use_small_input_stem(model: nn.Module, name: str, in_channels: int) -> None:
    """The CIFAR stem: the first conv becomes 3x3 stride 1, and the stem max-pool is removed.

    A 7x7 stride-2 conv plus a max-pool shrinks 32x32 images to 8x8 before the first block, which
    throws most of the image away; the small stem keeps the full resolution.
    """
    conv_name, old = _find_first_conv(model, name)
    new = nn.Conv2d(in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=old.bias is not None)
    _set_submodule(model, conv_name, new)
    if isinstance(getattr(model, "maxpool", None), nn.Module):
        model.maxpool = nn.Identity()


def _replace_last_linear(model: nn.Module, name: str, num_classes: int) -> None:
    last = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ConfigError(f"model {name!r} has no Linear head to resize to num_classes = {num_classes}.")
    head_name, head = last[-1]
    if head.out_features != num_classes:
        _set_submodule(model, head_name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


# ----------------------------------------------------------------------------- registered and imported


def _build_registered(name: str, num_classes: int, sample_shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    builder = _REGISTRY[name]
    _check_kwargs(name, kwargs, [p for p in _parameter_names(builder) if p not in _BUILDER_ARGS])
    try:
        return builder(sample_shape, num_classes, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"model {name!r} could not be built with [model] kwargs {kwargs!r}: {_first_line(exc)}"
        ) from None


def _import_class(spec: str) -> Callable[..., Any]:
    module_name, attr = split_import_path(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise import_error(spec, module_name, str(exc)) from None
    except SyntaxError as exc:  # the module or one it imports; the launcher's check reads only the first
        raise syntax_error(spec, exc) from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(module) if not n.startswith("_")]
            raise ConfigError(
                f"[model] name = {spec!r}: module {module_name!r} has no attribute {attr!r}.{_did_you_mean(part, public)}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"[model] name = {spec!r} is not a class or function.")
    return target


def _build_imported(spec: str, num_classes: int, sample_shape: tuple[int, ...], kwargs: dict[str, Any]) -> nn.Module:
    """Call the user's class or factory with the ``[model]`` keys, as its author would call it.

    A closed signature gets the keys it names (any other key is an error with a hint), plus
    ``num_classes``/``sample_shape`` where it names them. A signature with ``**kwargs`` gets every
    key and ``num_classes`` (``resnet18(num_input_channels=38, num_classes=3)``); ``sample_shape``
    only where it is named, since such factories pass ``**kwargs`` on to constructors that do not
    know it. Whatever the call raises is reported with the model's name.
    """
    factory = _import_class(spec)
    params = _parameter_names(factory)
    open_signature = _takes_var_keyword(factory)
    if not open_signature:
        _check_kwargs(spec, kwargs, [p for p in params if p not in _BUILDER_ARGS])
    call = dict(kwargs)
    if "num_classes" in params or open_signature:
        call["num_classes"] = num_classes
    if "sample_shape" in params:
        call["sample_shape"] = sample_shape
    try:
        model = factory(**call)
    except Exception as exc:
        arguments = ", ".join(f"{k}={v!r}" for k, v in call.items())
        raise ConfigError(
            f"model {spec!r} failed when dtrain called it as {spec.partition(':')[2]}({arguments}): "
            f"{type(exc).__name__}: {_first_line(exc)}. Check the [model] keys against its signature; "
            "`dtrain --verbose launch ...` shows the model's own traceback."
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


# ----------------------------------------------------------------------------- validation


def _parameter_names(fn: Callable[..., Any]) -> list[str]:
    """Names that can be passed as keywords (``**kwargs`` itself excluded)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in sig.parameters.values() if p.kind in keyword_kinds]


def _takes_var_keyword(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def _check_kwargs(model_name: str, kwargs: dict[str, Any], known: Iterable[str]) -> None:
    # The launcher's torch-free check (dist_train/model_check.py) gives the same message.
    check_kwargs(model_name, kwargs, known)


def check_model_fits(
    model: nn.Module,
    name: str,
    sample_shape: tuple[int, ...],
    num_classes: int,
    *,
    inputs: InputSpecs | None = None,
    check_width: bool = True,
    task: str = "classification",
) -> None:
    """Dry forward on a batch of zeros; turn a shape failure into a ConfigError naming model and data.

    The meta device costs neither memory nor compute; models whose forward cannot run on meta
    tensors (data-dependent control flow, ``.item()``) get one real CPU pass instead. The model's
    train/eval mode is restored and no buffers change, so parameter init stays reproducible.
    """
    was_training = model.training
    model.eval()
    try:
        try:
            out = _meta_forward(model, sample_shape, inputs or {})
        except Exception:
            out = _cpu_forward(model, name, sample_shape, inputs or {})
    finally:
        model.train(was_training)
    if not check_width:
        return
    if not isinstance(out, torch.Tensor):
        raise ConfigError(
            f"model {name!r} returned {type(out).__name__} for a batch of shape {(_DRY_BATCH, *sample_shape)}; "
            "dtrain needs a tensor of logits (batch, num_classes)."
        )
    expected = (_DRY_BATCH, num_classes)
    if tuple(out.shape) != expected and task == "regression":
        raise ConfigError(
            f"model {name!r} gives outputs of width {tuple(out.shape)[1:]} (shape {tuple(out.shape)} for a batch "
            f"of {_DRY_BATCH}), but the regression targets need width {num_classes} (task.targets, flattened and "
            "concatenated). dtrain passes that width as num_classes; make the model use it for its last layer."
        )
    if tuple(out.shape) != expected:
        raise ConfigError(
            f"model {name!r} returns outputs of shape {tuple(out.shape)} for samples of shape {sample_shape}, "
            f"expected {expected} (batch, num_classes = {num_classes}). Check [model] num_classes and its kwargs."
        )


def dry_inputs(inputs: InputSpecs, device: str, batch: int = _DRY_BATCH) -> dict[str, torch.Tensor]:
    """Zeros for each extra input, with the batch's dtype (as the loader will give them)."""
    out = {}
    for key, (shape, dtype) in inputs.items():
        np_dtype = np.dtype(dtype)
        # As the loader gives them: unsigned integers wider than a byte arrive as int64.
        tensor_dtype = (
            torch.int64
            if np_dtype.kind == "u" and np_dtype.itemsize > 1
            else torch.from_numpy(np.zeros(0, np_dtype)).dtype
        )
        out[key] = torch.zeros((batch, *shape), dtype=tensor_dtype, device=device)
    return out


def _meta_forward(model: nn.Module, sample_shape: tuple[int, ...], inputs: InputSpecs) -> Any:
    state = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict(keep_vars=True).items()}
    x = torch.zeros((_DRY_BATCH, *sample_shape), device="meta")
    with torch.no_grad():
        return torch.func.functional_call(model, state, (x,), dry_inputs(inputs, "meta"), strict=False)


def _cpu_forward(model: nn.Module, name: str, sample_shape: tuple[int, ...], inputs: InputSpecs) -> Any:
    x = torch.zeros((_DRY_BATCH, *sample_shape))
    try:
        with torch.no_grad():
            return model(x, **dry_inputs(inputs, "cpu"))
    except Exception as exc:
        raise dry_forward_error(name, sample_shape, exc) from None


# Where torch's and dtrain's own frames live: a traceback's frames outside them are the model author's.
_LIBRARY_DIRS = (Path(torch.__file__).resolve().parent, Path(__file__).resolve().parent)
# What torch raises when a tensor's shape, size or dtype does not fit an operation.
_SHAPE_ERRORS = (RuntimeError, ValueError, IndexError)


def _in_library(filename: str) -> bool:
    path = Path(filename).resolve()
    return any(path.is_relative_to(d) for d in _LIBRARY_DIRS)


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of the exception's traceback in the model's own code (not torch's, not dtrain's)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not _in_library(f.filename)]
    return frames[-1] if frames else None


def dry_forward_error(name: str, sample_shape: tuple[int, ...], exc: BaseException) -> ConfigError:
    """The dry forward pass failed: a shape problem only when torch rejected the tensor; otherwise the
    model's own exception, with its type, message and the model's line that raised it or called torch."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = _user_frame(exc)
    where = f" at {user.filename}:{user.lineno} (in {user.name}: `{(user.line or '').strip()}`)" if user else ""
    error = f"{type(exc).__name__}: {_first_line(exc)}"
    raised_by_torch = bool(frames) and _in_library(frames[-1].filename)
    if raised_by_torch and isinstance(exc, _SHAPE_ERRORS):
        return ConfigError(
            f"model {name!r} cannot take samples of shape {sample_shape}: {error}{where}. "
            "Check [model] (name, in_channels and size kwargs) or the data's x_key and transforms."
        )
    return ConfigError(
        f"model {name!r} raised {error}{where} on dtrain's dry forward pass (a batch of zeros of shape "
        f"{(_DRY_BATCH, *sample_shape)}, before training). The model's own code raised it: fix the model, "
        "or its [model] keys."
    )


def _did_you_mean(word: str, choices: list[str]) -> str:
    return did_you_mean(word, choices)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
