"""``python -m launcher.torchrun_main --summary FILE -- <torchrun args>``: torchrun, plus a failure record.

Process management is torch's own (``torch.distributed.run.main``). This wrapper only writes
which ranks failed, with their exit codes and exception messages from torchrun's error files,
to a JSON file the launcher turns into a one-paragraph report. It imports torch, so it runs in
torchrun's process, never in the launcher's.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _failure_record(failures: dict[int, Any], log_dir: str) -> list[dict[str, Any]]:
    out = []
    for rank, f in sorted(failures.items()):
        out.append(
            {
                "rank": rank,
                "local_rank": f.local_rank,
                "pid": f.pid,
                "exitcode": f.exitcode,
                "signal": f.signal_name() if f.exitcode is not None and f.exitcode < 0 else "",
                "message": f.message if isinstance(f.message, str) else json.dumps(f.message),
                "error_file": f.error_file,
                "stderr_file": _stderr_file(log_dir, f.local_rank, f.error_file),
                "timestamp": f.timestamp,
                # The error file's write time: sub-second, where torchrun's timestamp has whole
                # seconds, so that of two ranks failing in one second the first is known.
                "failed_at": _mtime(f.error_file),
            }
        )
    return out


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None


def _stderr_file(log_dir: str, local_rank: int, error_file: str) -> str:
    """The failed rank's redirected stderr.log ("" when its output was not redirected).

    torchrun writes ``<log_dir>/<run id>_<random>/attempt_<n>/<local rank>/stderr.log``; error.json,
    when the rank wrote one, sits next to it. A rank that died without an error file (a signal, the
    hang watchdog) is found in the newest run's last attempt: the run lock gives one torchrun per
    run directory at a time.
    """
    candidates = []
    if error_file and os.path.isfile(error_file):
        candidates.append(Path(error_file).parent / "stderr.log")
    attempt = _newest_attempt(log_dir)
    if attempt is not None:
        candidates.append(attempt / str(local_rank) / "stderr.log")
    return next((str(c) for c in candidates if c.is_file()), "")


def _newest_attempt(log_dir: str) -> Path | None:
    """``<log_dir>/<run id>_<random>/attempt_<n>/`` of the newest run's last attempt (None without one)."""
    if not log_dir:
        return None
    runs = sorted(Path(log_dir).glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True)
    attempts = sorted(runs[0].glob("attempt_*"), key=lambda p: int(p.name.split("_")[1])) if runs else []
    return attempts[-1] if attempts else None


def _failures_from_error_files(log_dir: str, first_rank: int) -> list[dict[str, Any]]:
    """The failure record rebuilt from the last attempt's error files, for when torchrun could not build it.

    A rank torn down while it writes its error file leaves that file empty; torch's elastic agent then
    raises a JSONDecodeError instead of reporting the failed ranks. Such a rank (or one without an
    error file) is recorded as stopped by torchrun; the ranks with complete error files keep their
    exceptions, so the report still names the rank that failed first.
    """
    attempt = _newest_attempt(log_dir)
    if attempt is None:
        return []
    out = []
    for rank_dir in sorted((d for d in attempt.iterdir() if d.name.isdigit()), key=lambda d: int(d.name)):
        local_rank = int(rank_dir.name)
        error_file = rank_dir / "error.json"
        try:
            message = json.loads(error_file.read_text(encoding="utf-8"))["message"]
        except (OSError, ValueError, KeyError, TypeError):
            message = None
        record: dict[str, Any] = {
            "rank": first_rank + local_rank,
            "local_rank": local_rank,
            "pid": None,
            "exitcode": 1 if message is not None else -15,
            "signal": "" if message is not None else "SIGTERM",
            "message": "" if message is None else message if isinstance(message, str) else json.dumps(message),
            "error_file": str(error_file) if message is not None else "",
            "stderr_file": _stderr_file(log_dir, local_rank, str(error_file) if message is not None else ""),
            "timestamp": 0,
            "failed_at": _mtime(str(error_file)) if message is not None else None,
        }
        out.append(record)
    return out


def _first_rank_of_node(args: Any) -> int:
    try:
        return int(args.node_rank) * int(args.nproc_per_node)
    except (TypeError, ValueError):
        return 0


def _write(path: Path, payload: dict[str, Any]) -> None:
    from dist_train.fsutil import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2))


USAGE = "usage: python -m launcher.torchrun_main --summary FILE [--log FILE] -- <torchrun args>"


def _parse(argv: list[str]) -> tuple[Path, Path | None, list[str]] | None:
    """(summary file, torchrun's log file or None for the console, torchrun's arguments)."""
    if "--" not in argv:
        return None
    split = argv.index("--")
    head, torchrun_args = argv[:split], argv[split + 1 :]
    if len(head) % 2:
        return None
    options = dict(zip(head[::2], head[1::2], strict=True))
    if "--summary" not in options or set(options) - {"--summary", "--log"}:
        return None
    log = Path(options["--log"]) if "--log" in options else None
    return Path(options["--summary"]), log, torchrun_args


def _torch_messages_to(path: Path) -> None:
    """torchrun's own log lines (its warnings when stopping workers, its failure lines) go to a file.

    They name SIGTERM and exit codes where the user pressed Ctrl-C or made a config mistake; the
    launcher says what happened in dtrain's words. torchrun's loggers all live under
    ``torch.distributed``; this process runs nothing but torchrun.
    """
    import logging

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # torch's logging setup gives "torch.distributed" a stderr handler of its own: replace it.
    logger = logging.getLogger("torch.distributed")
    for previous in list(logger.handlers):
        logger.removeHandler(previous)
    logger.addHandler(handler)
    logger.propagate = False


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    summary, log_file, torchrun_args = parsed
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if log_file is not None:
        _torch_messages_to(log_file)
    args = get_args_parser().parse_args(torchrun_args)
    try:
        run(args)
    except ChildFailedError as exc:
        _write(summary, {"status": "failed", "failures": _failure_record(exc.failures, args.log_dir or "")})
        return 1
    except json.JSONDecodeError:
        # torch's agent could not read a half-written error file (see _failures_from_error_files).
        _write(
            summary,
            {"status": "failed", "failures": _failures_from_error_files(args.log_dir or "", _first_rank_of_node(args))},
        )
        return 1
    except SignalException as exc:
        # torchrun already sent the signal on to the workers and waited for them.
        _write(summary, {"status": "signalled", "signal": exc.sigval.name, "failures": []})
        return 128 + int(exc.sigval)
    _write(summary, {"status": "ok", "failures": []})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
