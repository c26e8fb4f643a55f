"""Run a LaunchPlan: start torchrun (or the debug worker), forward stop signals, report the outcome.

The processes themselves are torch's business; this module only makes sure that
- a stop request (Ctrl-C, SIGTERM, SLURM's SIGUSR1) reaches the workers exactly once, as SIGTERM,
  which torchrun passes on to every worker (older torchrun versions forward nothing else);
- the launcher dying, even by SIGKILL, takes torchrun down gracefully (PR_SET_PDEATHSIG);
- workers orphaned by a killed torchrun are re-parented to the launcher (a child subreaper), which
  stops them (SIGTERM, so they can still checkpoint, then SIGKILL): no job process outlives it;
- the exit code says success (0), preempted and resumable (75), bad input (2) or failure (1),
  with the failing rank, its exception and its log file named.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from dist_train import envvars
from dist_train.checkpoint.layout import CHECKPOINTS_SUBDIR
from dist_train.envvars import PREEMPTED_EXIT_CODE
from dist_train.errors import USAGE_EXIT_CODE
from launcher.plan import LaunchPlan
from launcher.run_dirs import COMPLETED_MARKER, PREEMPTED_MARKER

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
# Seconds orphaned workers get to checkpoint after torchrun died, unless the plan says otherwise.
LEFTOVER_GRACE_S = 30.0


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A pre-exec hook: if the launcher dies, even by SIGKILL, the kernel sends torchrun SIGTERM.

    It also makes torchrun ignore SIGUSR1/SIGUSR2. srun delivers a forwarded signal to every
    process of the job step, and torchrun has no handler for those: it would die at once and leave
    the launcher reporting before the workers finished their checkpoint. The launcher turns them
    into SIGTERM for torchrun instead; the workers install their own handlers over the inherited
    SIG_IGN as they start.
    """

    def hook() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except OSError:  # pragma: no cover - not Linux
            return
        # The launcher may have died between fork and prctl; then no death signal would ever come.
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


@dataclass
class Outcome:
    exit_code: int
    message: str


class SignalForwarder:
    """Turns the first stop signal into one SIGTERM for the child; a third one kills the whole job."""

    def __init__(self, proc: subprocess.Popen[bytes], run_dir: str) -> None:
        self.proc = proc
        self.run_dir = run_dir
        self.received: list[signal.Signals] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.received.append(sig)
        if len(self.received) == 1:
            print(stop_requested_text(sig), file=sys.stderr, flush=True)
            self._note_signal(sig)
            self._send(signal.SIGTERM)
        elif len(self.received) >= 3:
            print("dtrain: killing the workers now", file=sys.stderr, flush=True)
            # torchrun starts every worker in a session of its own: killing torchrun's process
            # group would leave them running, so each process of the job is killed by pid.
            kill_processes(self.job_processes(), signal.SIGKILL)

    def job_processes(self) -> list[Any]:
        return job_processes(self.run_dir)

    def _note_signal(self, sig: signal.Signals) -> None:
        """Tell the workers which signal their SIGTERM stands for (their logs name it); best effort."""
        try:
            (Path(self.run_dir) / envvars.STOP_SIGNAL_FILE).write_text(sig.name + "\n", encoding="ascii")
        except OSError:
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


def stop_requested_text(sig: signal.Signals) -> str:
    """The first of the three lines a stop shows: requested, checkpoint written, how to resume."""
    what = "Ctrl-C" if sig == signal.SIGINT else sig.name
    again = "press Ctrl-C" if sig == signal.SIGINT else f"send {sig.name}"
    return (
        f"dtrain: stop requested ({what}): the workers write a checkpoint at the next stop check or epoch end, then exit "
        f"({again} twice more to kill them without one)"
    )


def start(plan: LaunchPlan) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches only the launcher, which forwards it once;
    # torchrun receiving it too would cut its own graceful shutdown short.
    return subprocess.Popen(
        list(plan.argv),
        env=plan.full_env(os.environ),
        start_new_session=True,
        preexec_fn=_die_with_parent(os.getpid()),
    )


def run_plan(plan: LaunchPlan) -> Outcome:
    # Workers orphaned by a dying torchrun (OOM killer, SIGKILL) are re-parented to us, not to
    # init, so they can still be found and stopped below.
    _become_subreaper()
    proc = start(plan)
    with SignalForwarder(proc, plan.run_dir) as forwarder:
        while True:
            try:
                code = proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for clarity
                continue
        stop_leftovers(plan, code)
    outcome = interpret(plan, code, stop_requested=bool(forwarder.received))
    keep_in_run_logs(plan, outcome)
    return outcome


LAUNCHER_LOG = "launcher.log"


def keep_in_run_logs(plan: LaunchPlan, outcome: Outcome) -> None:
    """The verdict the console shows (which rank failed, why, where its log is) also goes to
    ``<run_dir>/logs/launcher.log``: the run directory alone tells what happened to the run."""
    if not outcome.message:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        logs = Path(plan.run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / LAUNCHER_LOG).open("a", encoding="utf-8") as f:
            f.write(f"{stamp} exit {outcome.exit_code} {outcome.message}\n")
    except OSError:
        pass  # a full or read-only disk must not hide the verdict: the console still gets it


def _become_subreaper() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except OSError:  # pragma: no cover - not Linux
        pass


def job_processes(run_dir: str) -> list[Any]:
    """Our descendants that belong to this job (torchrun, workers, data loaders): they carry its run dir."""
    import psutil

    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.environ().get(envvars.RUN_DIR) == run_dir:
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_processes(procs: list[Any], sig: signal.Signals) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def stop_leftovers(plan: LaunchPlan, code: int) -> None:
    """torchrun is gone; any worker still running (torchrun was killed) is stopped: SIGTERM, then SIGKILL.

    SIGTERM first, so the workers can still agree on a step, checkpoint and mark the run preempted.
    """
    import psutil

    leftovers = job_processes(plan.run_dir)
    if not leftovers:
        return
    print(
        f"dtrain: torchrun exited ({_exit_text(code)}) but {len(leftovers)} of its processes were still running; "
        "asking them to checkpoint and stop",
        file=sys.stderr,
        flush=True,
    )
    kill_processes(leftovers, signal.SIGTERM)
    grace = float(plan.env_dict().get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", LEFTOVER_GRACE_S))
    _, still_running = psutil.wait_procs(leftovers, timeout=grace)
    kill_processes(still_running, signal.SIGKILL)
    psutil.wait_procs(still_running, timeout=10)


def _exit_text(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def interpret(plan: LaunchPlan, code: int, *, stop_requested: bool) -> Outcome:
    run_dir = Path(plan.run_dir)
    if (run_dir / PREEMPTED_MARKER).exists():
        return Outcome(PREEMPTED_EXIT_CODE, stopped_text(run_dir))
    if stop_requested and (run_dir / COMPLETED_MARKER).exists():
        # The workers finished training (and wrote the marker) before the stop reached a point where
        # they act on it; torchrun then still exits as signalled. The run is done, not stopped.
        return Outcome(0, completed_before_stop_text(run_dir))
    if code == 0:
        return Outcome(0, "")
    if code == USAGE_EXIT_CODE and plan.backend == "debug":
        return Outcome(USAGE_EXIT_CODE, "")  # the worker already printed the one-paragraph error
    if stop_requested:
        return Outcome(
            130,
            "dtrain: stopped before a checkpoint could be written; the newest earlier checkpoint "
            f"in {run_dir / CHECKPOINTS_SUBDIR} is intact and a relaunch resumes from it.",
        )
    return Outcome(_failure_code(plan), failure_report(plan, code))


def stopped_text(run_dir: Path) -> str:
    """The stop's last line: the step whose checkpoint was written, and that rerunning resumes.

    The marker holds "step N"; rank 0 writes it once the checkpoint is durable."""
    where = (run_dir / PREEMPTED_MARKER).read_text().strip()
    return (
        f"dtrain: stopped at {where} with the checkpoint written; run the same command again to resume "
        f"(run directory {run_dir})."
    )


def completed_before_stop_text(run_dir: Path) -> str:
    """A stop that came after the last epoch: the run is complete, nothing is left to resume."""
    where = (run_dir / COMPLETED_MARKER).read_text().strip()
    return (
        f"dtrain: the run completed ({where}) before the stop request could take effect: all epochs are "
        f"trained and the final checkpoint is written; there is nothing to resume (run directory {run_dir})."
    )


def _failure_code(plan: LaunchPlan) -> int:
    """2 when the first failing rank rejected its input (a DTrainError), else 1."""
    failures = _read_failures(plan)
    if failures and _is_usage_error(_root_cause(failures)):
        return USAGE_EXIT_CODE
    return 1


def _read_failures(plan: LaunchPlan) -> list[dict[str, Any]]:
    if not plan.summary_file:
        return []
    try:
        return list(json.loads(Path(plan.summary_file).read_text())["failures"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _is_usage_error(failure: dict[str, Any]) -> bool:
    return failure.get("exitcode") == USAGE_EXIT_CODE


def _was_torn_down(failure: dict[str, Any]) -> bool:
    # torchrun stops the surviving ranks with SIGTERM once one has failed.
    return failure.get("signal") == "SIGTERM"


def _was_killed(failure: dict[str, Any]) -> bool:
    # SIGKILL (the OOM killer, a user), SIGSEGV...: such a rank did not fail because another one did,
    # while its peers' collectives then fail with connection errors, sometimes before torchrun notices it.
    return bool(failure.get("signal")) and not _was_torn_down(failure)


# What a rank's collective or rendezvous raises when a peer died or stopped answering (gloo, NCCL,
# the TCP store): the consequence of another rank's failure, never its cause.
PEER_LOST_ERRORS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote worker crashing",
    "NCCL communicator was aborted",
    "NCCL error",
    "collective operation timeout",
    "Timed out waiting",
    "DistNetworkError",
    "DistStoreError",
    "DistBackendError",
)


def lost_a_peer(failure: dict[str, Any]) -> bool:
    """A rank that failed because a collective lost its connection to a failed peer (a victim)."""
    if _was_killed(failure):
        return False
    # A rank torchrun tore down after its collective broke still has that error in its error file.
    text = _error_message(failure)
    return any(marker in text for marker in PEER_LOST_ERRORS)


def _failed_at(failure: dict[str, Any]) -> float:
    # The error file's write time (sub-second) where there is one, else torchrun's whole seconds.
    return float(failure.get("failed_at") or failure.get("timestamp") or 0)


def _ordered(failures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The likely cause first: ranks killed by a signal, then ranks that failed with their own exception
    (earliest first), then ranks whose collective lost a failed peer, then the ones torchrun tore down."""
    return sorted(
        failures,
        key=lambda f: (not _was_killed(f), _was_torn_down(f), lost_a_peer(f), _failed_at(f), f.get("rank", 0)),
    )


def _root_cause(failures: list[dict[str, Any]]) -> dict[str, Any]:
    return _ordered(failures)[0]


def _error_message(failure: dict[str, Any]) -> str:
    """The failed rank's exception text as torchrun recorded it (its error file's "message")."""
    message = failure.get("message") or ""
    if message.startswith("{"):
        try:
            message = json.loads(message).get("message", message)
        except (ValueError, AttributeError):
            pass
    return str(message)


def _first_line_of_error(failure: dict[str, Any]) -> str:
    # torchrun's message holds the full traceback; the exception line is the last non-empty one.
    lines = [ln for ln in _error_message(failure).splitlines() if ln.strip()]
    last = lines[-1].strip() if lines else ""
    # Without an error file torchrun says only "To enable traceback see: ..."; that is no exception.
    return "" if last.startswith("To enable traceback") else last


def _error_paragraph(failure: dict[str, Any]) -> str:
    """A DTrainError's whole message without its class name ("ConfigError: ...")."""
    message = _error_message(failure).strip()
    if "Traceback (most recent call last)" in message or message.startswith("To enable traceback"):
        message = _first_line_of_error(failure)
    name, sep, rest = message.partition(": ")
    return rest if sep and name.isidentifier() and name.endswith("Error") else message


def _stderr_tail(failure: dict[str, Any], limit: int = 64 * 1024) -> str:
    path = failure.get("stderr_file") or ""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _stacks_file(plan: LaunchPlan, failure: dict[str, Any]) -> Path:
    """Where the worker's hang watchdog (dist_train/watchdog.py) dumps its stacks."""
    return Path(plan.run_dir) / "logs" / f"rank{failure.get('rank', 0)}.stacks"


def _dumped_stacks_on_timeout(plan: LaunchPlan, failure: dict[str, Any]) -> bool:
    # faulthandler.dump_traceback_later writes "Timeout (0:00:05)!" before the stacks.
    try:
        dumped = "Timeout (" in _stacks_file(plan, failure).read_text(errors="replace")
    except OSError:
        dumped = False
    return dumped or "Timeout (" in _stderr_tail(failure)


def _looks_hung(plan: LaunchPlan, failure: dict[str, Any]) -> bool:
    """The worker's hang watchdog ends the process with exit code 1 and no Python exception."""
    if plan.hang_timeout <= 0 or failure.get("exitcode") != 1 or failure.get("signal"):
        return False
    return _dumped_stacks_on_timeout(plan, failure) or not _first_line_of_error(failure)


def _traceback(failure: dict[str, Any]) -> str:
    """The failed rank's traceback as its error file recorded it ("" without an error file)."""
    message = failure.get("message") or ""
    try:
        info = json.loads(message).get("extraInfo", {}) if message.startswith("{") else {}
    except (ValueError, AttributeError):
        return ""
    return str(info.get("py_callstack") or "") if isinstance(info, dict) else ""


# Frames of these files are torch's, dtrain's or Python's, not the user's code.
_NOT_USER_CODE = ("/torch/", "/dist_train/", "/launcher/", "<frozen ", "/lib/python", "/site-packages/")
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)', re.MULTILINE)


def _user_frame(failure: dict[str, Any]) -> str:
    """``file:line (in function)`` of the innermost frame of the user's own code in the traceback."""
    frames = [m for m in _FRAME.finditer(_traceback(failure)) if not any(p in m["file"] for p in _NOT_USER_CODE)]
    if not frames:
        return ""
    last = frames[-1]
    return f"{last['file']}:{last['line']} (in {last['name']})"


def _describe(failure: dict[str, Any]) -> str:
    if failure.get("signal"):
        return f"was killed by {failure['signal']}"
    err = _first_line_of_error(failure)
    where = _user_frame(failure)
    text = f"exited with code {failure.get('exitcode')}" + (f": {err}" if err else "")
    return text + (f" at {where}" if where else "")


def _where(plan: LaunchPlan, failure: dict[str, Any]) -> str:
    rank = failure.get("rank", 0)
    text = f"Its log: {Path(plan.run_dir) / 'logs' / f'rank{rank}.log'}"
    if failure.get("stderr_file"):
        text += f"; its stdout/stderr (what it printed, stack dumps): {failure['stderr_file']}"
    return text + "."


def _others(failures: list[dict[str, Any]]) -> str:
    """The ranks that failed because of the first one: named, their tracebacks left to their logs."""
    victims = [f for f in failures if lost_a_peer(f)]
    stopped = [f for f in failures if not lost_a_peer(f)]
    text = ""
    if victims:
        one = len(victims) == 1
        text += (
            f" {_ranks_text(victims).capitalize()} {'was' if one else 'were'} cut off from it (a collective's "
            f"connection broke; {'that traceback is in its log' if one else 'those tracebacks are in their logs'}, "
            "`dtrain --verbose launch` shows it)."
        )
    if stopped:
        text += f" {_ranks_text(stopped).capitalize()} {'was' if len(stopped) == 1 else 'were'} stopped after it."
    return text


def _verbose(plan: LaunchPlan) -> bool:
    # `dtrain --verbose launch` passes --verbose on to the workers (launcher/plan.py).
    return "--verbose" in plan.argv


def _all_tracebacks(failures: list[dict[str, Any]]) -> str:
    """--verbose: every failed rank's traceback from its error file, the cause's first."""
    parts = [f"\n--- rank {f.get('rank')}:\n{_traceback(f).rstrip()}" for f in failures if _traceback(f)]
    return "".join(parts)


def _ranks_text(failures: list[dict[str, Any]]) -> str:
    ranks = [str(f.get("rank")) for f in failures]
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(ranks)}"


def hang_report(plan: LaunchPlan, hung: list[dict[str, Any]]) -> str:
    """Every rank's watchdog fires (the healthy ones wait in a collective), so name them all."""
    stacks = "; ".join(
        f"rank {f.get('rank')}: {_stacks_file(plan, f)}" for f in sorted(hung, key=lambda f: f.get("rank", 0))
    )
    return (
        f"dtrain: {_ranks_text(hung)} made no progress for {plan.hang_timeout:g} s (launch.hang_timeout), "
        "dumped the stack of every thread and exited. The rank whose stack is not waiting in a collective "
        f"(all_reduce, barrier, broadcast) is the one that hung. Stack dumps: {stacks}. "
        f"Logs: {Path(plan.run_dir) / 'logs'}."
    )


def failure_report(plan: LaunchPlan, code: int) -> str:
    failures = _ordered(_read_failures(plan))
    logs = Path(plan.run_dir) / "logs"
    if not failures and code < 0:
        return (
            f"dtrain: torchrun, which supervises the workers, was {_exit_text(code)}; the workers were stopped. "
            f"See the logs in {logs}; a relaunch resumes from the newest checkpoint."
        )
    if not failures:
        return f"dtrain: the job failed (exit code {code}); see the logs in {logs}."
    first, rest = failures[0], failures[1:]
    if _is_usage_error(first):
        paragraph = _error_paragraph(first)
        if paragraph:
            return usage_report(plan, first, paragraph, rest)
    if _looks_hung(plan, first):
        return hang_report(plan, [f for f in failures if _looks_hung(plan, f)])
    rank = first.get("rank", 0)
    report = f"dtrain: rank {rank} {_describe(first)}. {_where(plan, first)}{_others(rest)}"
    if lost_a_peer(first):
        # Every rank here only lost a peer: the one that failed is on another node or left no record.
        report += (
            f" It only lost its connection to another rank, which failed first (on another node, or "
            f"without an error record): look for it in the logs in {logs}."
        )
    return report + (_all_tracebacks(failures) if _verbose(plan) else "")


def usage_report(plan: LaunchPlan, first: dict[str, Any], paragraph: str, rest: list[dict[str, Any]]) -> str:
    """Bad input (config, data, checkpoint, a model that fails its dry forward pass): the worker's own
    paragraph, once, as the launcher's own errors read. Found by every rank, which one does not change
    the fix; found by some ranks only (a rank-dependent model: another rank got past that point and
    then lost its connection to this one), the first is named with its log."""
    if all(_is_usage_error(f) or _was_torn_down(f) for f in rest):
        return f"dtrain: error: {paragraph}"
    rank = first.get("rank", 0)
    log = Path(plan.run_dir) / "logs" / f"rank{rank}.log"
    sentence = paragraph if paragraph.endswith((".", "!", "?")) else paragraph + "."
    report = f"dtrain: error: rank {rank}: {sentence} Its log: {log}.{_others(rest)}"
    return report + (_all_tracebacks([first, *rest]) if _verbose(plan) else "")
