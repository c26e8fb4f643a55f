"""DDP's gradient bucket layout and exact resume (issue 12), with real torchrun + gloo processes.

DDP reduces its first step with one bucket in registration order and every later step with buckets
rebuilt in gradient-ready order. From three ranks on the layout changes the summation order of the
all-reduce, so a resumed process (whose first step is again a "first step") would drift from the
uninterrupted run. ``settle_gradient_buckets`` makes the rebuilt layout apply from the first step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.run import REPO, env_for_tests


def test_settled_ddp_reduces_its_first_step_like_every_later_step_and_changes_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=3",
            str(REPO / "tests" / "helpers" / "ddp_buckets.py"),
            str(out),
        ],
        cwd=REPO,
        env=env_for_tests(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    # The cause: with 3 ranks DDP's own first step (initial layout) sums in another order than its later steps.
    assert report["default_first_step_like_its_rebuilt"] is False, "DDP's first step now reduces like the later ones"
    # The fix: the first step after settling already uses the rebuilt layout, bit for bit.
    assert report["rebuilt_at_first_step"] is True
    assert report["first_step_like_default_rebuilt"] is True
    # Settling leaves the run as it was.
    assert (
        report["rng_unchanged"] and report["buffers_unchanged"] and report["grads_dropped"] and report["mode_restored"]
    ), report
