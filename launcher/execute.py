"""Run a LaunchPlan: start torchrun (or the debug worker), forward stop signals, report the outcome.

The processes themselves are torch's business; this module only makes sure that
- a stop request (Ctrl-C, SIGTERM, SLURM's SIGUSR1) reaches the workers exactly once, as SIGTERM,
  which torchrun passes on to every worker (older torchrun versions forward nothing else);
- the launcher dying, even by SIGKILL, takes torchrun down gracefully (PR_SET_PDEATHSIG);
- the exit code says success (0), preempted and resumable (75), bad input (2) or failure (1),
  with the failing rank, its exception and its log file named.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.errors import USAGE_EXIT_CODE
from launcher.plan import LaunchPlan
from launcher.run_dirs import PREEMPTED_MARKER

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher dies, the kernel sends torchrun SIGTERM."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # pragma: no cover - not Linux
        pass


@dataclass
class Outcome:
    exit_code: int
    message: str


class SignalForwarder:
    """Turns the first stop signal into one SIGTERM for the child; a third one kills its group."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.received: list[signal.Signals] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received.append(sig)
        if len(self.received) == 1:
            print(
                f"dtrain: {sig.name} received: asking the workers to checkpoint and stop "
                "(send it twice more to kill them without a checkpoint)",
                file=sys.stderr,
                flush=True,
            )
            self._send(signal.SIGTERM)
        elif len(self.received) >= 3:
            print("dtrain: killing the workers now", file=sys.stderr, flush=True)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _send(self, sig: signal.Signals) -> None:
        try:
            self.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def __enter__(self) -> SignalForwarder:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def start(plan: LaunchPlan) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only the launcher, which forwards it once;
    # torchrun receiving it too would cut its own graceful shutdown short.
    return subprocess.Popen(
        list(plan.argv),
        env=plan.full_env(os.environ),
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )


def run_plan(plan: LaunchPlan) -> Outcome:
    proc = start(plan)
    with SignalForwarder(proc) as forwarder:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
    return interpret(plan, code, stop_requested=bool(forwarder.received))


def interpret(plan: LaunchPlan, code: int, *, stop_requested: bool) -> Outcome:
    run_dir = Path(plan.run_dir)
    if (run_dir / PREEMPTED_MARKER).exists():
        return Outcome(
            PREEMPTED_EXIT_CODE,
            f"dtrain: stopped and checkpointed ({(run_dir / PREEMPTED_MARKER).read_text().strip()}); "
            f"run the same command again to resume from {run_dir}.",
        )
    if code == 0:
        return Outcome(0, "")
    if code == USAGE_EXIT_CODE and plan.backend == "debug":
        return Outcome(USAGE_EXIT_CODE, "")  # the worker already printed the one-paragraph error
    if stop_requested:
        return Outcome(
            130,
            "dtrain: stopped before a checkpoint could be written; the newest earlier checkpoint "
            f"in {run_dir / 'checkpoints'} is intact and a relaunch resumes from it.",
        )
    return Outcome(_failure_code(plan), failure_report(plan, code))


def _failure_code(plan: LaunchPlan) -> int:
    failures = _read_failures(plan)
    if failures and all(_is_usage_error(f) for f in failures):
        return USAGE_EXIT_CODE
    return 1


def _read_failures(plan: LaunchPlan) -> list[dict[str, Any]]:
    if not plan.summary_file:
        return []
    try:
        return list(json.loads(Path(plan.summary_file).read_text())["failures"])
    except (OSError, ValueError, KeyError):
        return []


def _is_usage_error(failure: dict[str, Any]) -> bool:
    return failure.get("exitcode") == USAGE_EXIT_CODE


def _first_line_of_error(failure: dict[str, Any]) -> str:
    message = failure.get("message") or ""
    if message.startswith("{"):
        try:
            message = json.loads(message).get("message", message)
        except ValueError:
            pass
    # torchrun's message holds the full traceback; the exception line is the last non-empty one.
    lines = [ln for ln in str(message).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def failure_report(plan: LaunchPlan, code: int) -> str:
    failures = _read_failures(plan)
    logs = Path(plan.run_dir) / "logs"
    if not failures:
        return f"dtrain: the job failed (exit code {code}); see the logs in {logs}."
    # The earliest failure is the cause; the others are usually ranks torn down after it.
    failures.sort(key=lambda f: f.get("timestamp") or 0)
    first = failures[0]
    rank = first["rank"]
    if first.get("signal"):
        what = f"was killed by {first['signal']}"
    else:
        err = _first_line_of_error(first)
        what = f"exited with code {first['exitcode']}" + (f": {err}" if err else "")
    others = [str(f["rank"]) for f in failures[1:]]
    tail = f" Ranks {', '.join(others)} were stopped after it." if others else ""
    return f"dtrain: rank {rank} {what}. Its log: {logs / f'rank{rank}.log'}.{tail}"
