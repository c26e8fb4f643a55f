"""CPU FSDP workers give large freed buffers back to the OS (dist_train/distributed/cpu_allocator.py).

Each case runs in a fresh plain-python subprocess (malloc settings are per process and cannot be
undone) and observes the resident set in /proc/self/status, not the helper's return value alone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="observes glibc's malloc via /proc"
)

# 16 x 4 MiB numpy buffers (touched, so resident), each followed by a small live buffer that stays: the
# heap's top can then never be trimmed, so with glibc's defaults the freed 4 MiB chunks stay resident.
# One 4 MiB buffer is allocated and freed first, which is what raises glibc's dynamic mmap threshold
# (and is what FSDP's first step does).
PROBE = textwrap.dedent(
    """
    import json, logging, sys
    import numpy as np
    from dist_train.distributed.cpu_allocator import return_large_frees_to_os

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    threshold = return_large_frees_to_os(sys.argv[1], sys.argv[2])
    chunk = 4 * 2**20 // 8
    warm = np.ones(chunk); del warm
    baseline = rss_mib()
    big, pins = [], []
    for _ in range(16):
        big.append(np.ones(chunk))
        pins.append(np.ones(64 * 1024 // 8))
    peak = rss_mib()
    del big
    after = rss_mib()
    print(json.dumps({"threshold": threshold, "baseline": baseline, "peak": peak, "after": after}))
    """
)


def probe(strategy: str = "fsdp", device: str = "cpu", **env: str) -> dict[str, float]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES", "DTRAIN_CPU_MALLOC_THRESHOLD")
    }
    clean.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, strategy, device], env=clean, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, float] = json.loads(out.stdout)
    result["stderr"] = out.stderr  # type: ignore[assignment]
    assert result["peak"] - result["baseline"] > 56, f"the 64 MiB were not resident: {result}"
    return result


def retained(result: dict[str, float]) -> float:
    return result["after"] - result["baseline"]


def test_cpu_fsdp_worker_returns_freed_large_buffers_to_the_os() -> None:
    tuned = probe()
    assert tuned["threshold"] == 2**20
    assert "mallopt(M_MMAP_THRESHOLD, 1048576)" in str(tuned["stderr"])
    # Only the 16 x 64 KiB pins (1 MiB) and noise may stay.
    assert retained(tuned) < 8, tuned
    # Without the helper (DDP, CUDA, or the opt-out), glibc keeps the freed chunks: the probe can tell.
    for untouched in (probe("ddp"), probe("fsdp", "cuda"), probe(DTRAIN_CPU_MALLOC_THRESHOLD="0")):
        assert untouched["threshold"] is None
        assert retained(untouched) > 48, untouched


def test_a_user_set_malloc_threshold_is_left_alone() -> None:
    # The user's 64 MiB threshold keeps the 4 MiB buffers on the heap; dtrain must not lower it to 1 MiB.
    theirs = probe(MALLOC_MMAP_THRESHOLD_=str(64 * 2**20))
    assert theirs["threshold"] is None
    assert "leaves it alone" in str(theirs["stderr"])
    assert retained(theirs) > 48, theirs
    tunable = probe(GLIBC_TUNABLES=f"glibc.malloc.mmap_threshold={64 * 2**20}")
    assert tunable["threshold"] is None
    assert retained(tunable) > 48, tunable


def test_threshold_can_be_chosen() -> None:
    chosen = probe(DTRAIN_CPU_MALLOC_THRESHOLD=str(2 * 2**20))
    assert chosen["threshold"] == 2 * 2**20
    assert retained(chosen) < 8, chosen
