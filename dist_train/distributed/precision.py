"""What a run computes in: the one resolution of ``train.precision`` for autocast, FSDP and evaluation.

The trainer's autocast, FSDP's mixed-precision policy and ``dtrain eval`` all call
:func:`resolve_precision`, so a run, its checkpoints' evaluation and its sharded parameters never
disagree about the dtype (bf16 on one and fp32 on another would make "distributed metrics equal a
one-process evaluation" false).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("dtrain")


@dataclass(frozen=True)
class Precision:
    """Resolved mixed precision: autocast dtype (None = fp32) and whether a GradScaler is needed."""

    name: str
    dtype: torch.dtype | None
    use_scaler: bool


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if device.type == "cuda":
        if requested == "auto":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if requested == "bf16":
            return Precision("bf16", torch.bfloat16, False)
        if requested == "fp16":
            return Precision("fp16", torch.float16, True)
        return Precision("fp32", None, False)
    # On the CPU fp32 is usually fastest; bf16 autocast is honoured, fp16 (a GPU setting) maps to bf16
    # so that one config runs on a laptop and on GPUs.
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if requested == "fp16":
        log.info("precision fp16 needs CUDA; using bf16 autocast on the CPU instead")
        return Precision("bf16", torch.bfloat16, False)
    return Precision("fp32", None, False)


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (none for fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)
