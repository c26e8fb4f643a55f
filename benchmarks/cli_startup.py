"""CLI start-up cost: `dtrain --help` (and two subcommands' --help) against a bare `python -c pass`.

The launcher must not import torch (or pynvml/psutil) at module load; this measures what a user waits
for before anything happens. Runs each command N times, alternating commands so machine load affects
all alike, and reports medians.

    python benchmarks/cli_startup.py [--runs 10] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.3


def dtrain_command() -> list[str]:
    # Prefer the installed console script (what users run); fall back to the module.
    script = Path(sys.executable).with_name("dtrain")
    if script.exists():
        return [str(script)]
    found = shutil.which("dtrain")
    return [found] if found else [sys.executable, "-m", "launcher.cli"]


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="5 runs per command")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs

    dtrain = dtrain_command()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "dtrain --help": [*dtrain, "--help"],
        "dtrain gpus --help": [*dtrain, "gpus", "--help"],
        "dtrain launch --help": [*dtrain, "launch", "--help"],
    }
    for argv in commands.values():  # warm the page cache and .pyc files
        time_once(argv)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            samples[name].append(time_once(argv))

    baseline = statistics.median(samples["python -c pass"])
    print(f"{'command':24s} {'median s':>9s} {'min s':>7s} {'overhead s':>10s}   ({runs} runs each)")
    for name, values in samples.items():
        median = statistics.median(values)
        print(f"{name:24s} {median:9.3f} {min(values):7.3f} {median - baseline:10.3f}")
    overhead = max(statistics.median(samples[name]) for name in commands if name.startswith("dtrain")) - baseline
    verdict = "met" if overhead <= TARGET_S else "missed"
    print(f"RESULT cli_help_overhead_s value={overhead:.3f} target=<={TARGET_S} {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
