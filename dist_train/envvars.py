"""The launcher → worker contract: torchrun's variables plus the few ``DTRAIN_*`` variables below.

Nothing else passes between the two. The worker reads its settings from the config file named on
its command line (the resolved ``config.toml`` in the run directory), never from launcher flags.
"""

from __future__ import annotations

import os

# Absolute path of the run directory (config.toml, checkpoints, logs live there).
RUN_DIR = "DTRAIN_RUN_DIR"
# "auto" (newest valid checkpoint in the run directory), "never", or a checkpoint path.
RESUME = "DTRAIN_RESUME"
# "1": debug mode (one process without torchrun, few batches, anomaly detection; the device comes
# from CUDA_VISIBLE_DEVICES and DTRAIN_DEVICE like any worker's).
DEBUG = "DTRAIN_DEBUG"
# "cpu" forces CPU workers even where CUDA is visible (launch --gpus cpu).
DEVICE = "DTRAIN_DEVICE"
# Set by the launcher: a human-readable job id used in lock files and `dtrain gpus`.
JOB_ID = "DTRAIN_JOB_ID"
# "1": the launcher reports a worker's failure from torchrun's error files (a bad-input paragraph, or
# the first rank that failed with its exception and log), so the worker writes its error to its rank
# log only (no traceback on stderr unless --verbose) and the user reads it once.
LAUNCHER_REPORTS_ERRORS = "DTRAIN_LAUNCHER_REPORTS_ERRORS"

# CPU FSDP workers on glibc: mallopt(M_MMAP_THRESHOLD, this many bytes) so that freed all-gather and
# gradient buffers go back to the OS (dist_train/distributed/cpu_allocator.py). Unset: 1 MiB; "0": leave malloc alone.
# A user-set MALLOC_MMAP_THRESHOLD_ (or glibc.malloc.mmap_threshold tunable) always wins.
CPU_MALLOC_THRESHOLD = "DTRAIN_CPU_MALLOC_THRESHOLD"

# Written by the launcher (one signal name, e.g. "SIGINT") before it forwards a stop request to
# torchrun as SIGTERM, so that the workers' logs name the signal the user or scheduler sent.
# Relative to the run directory; removed when a launch prepares the directory.
STOP_SIGNAL_FILE = "launcher/stop_signal"

ALL = (RUN_DIR, RESUME, DEBUG, DEVICE, JOB_ID, LAUNCHER_REPORTS_ERRORS, CPU_MALLOC_THRESHOLD)

# Exit code of a worker (and of `dtrain launch`) that stopped on a preemption signal after writing
# a checkpoint: "interrupted, resumable". 75 is EX_TEMPFAIL from sysexits.h: try again later.
PREEMPTED_EXIT_CODE = 75


def get(name: str, default: str = "") -> str:
    assert name in ALL, f"{name} is not part of the launcher/worker contract"
    return os.environ.get(name, default)
