"""User-facing errors: each carries one clear paragraph and maps to exit code 2 (bad input)."""

from __future__ import annotations

USAGE_EXIT_CODE = 2


class DTrainError(Exception):
    """A problem the user can fix; printed as one paragraph without a traceback (unless --verbose)."""

    exit_code = USAGE_EXIT_CODE


class ConfigError(DTrainError):
    """The config file or a --set override is invalid."""


class DataError(DTrainError):
    """The dataset cannot be used as configured (missing file or key, bad shapes or labels, corrupt file)."""


class CheckpointError(DTrainError):
    """A checkpoint cannot be written or loaded safely."""


class CompileError(DTrainError):
    """``train.compile``: torch.compile cannot compile the model (a graph break under fullgraph, an op it rejects)."""


class LaunchError(DTrainError):
    """The job cannot be started as requested (GPUs, ports, run directory)."""
