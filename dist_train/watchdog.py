"""Hang watchdog: if a rank makes no progress for ``launch.hang_timeout`` seconds, dump every
thread's Python stack to ``logs/rank<R>.stacks`` and end the process.

A rank stuck in a collective otherwise waits for the process-group timeout (minutes) and says
nothing about where it was. faulthandler's timer runs in C, so it fires even when the Python main
thread is blocked inside a C call.
"""

from __future__ import annotations

import faulthandler
import sys
import time
from pathlib import Path
from typing import IO


class HangWatchdog:
    def __init__(self, timeout_s: float, stacks_file: Path | None) -> None:
        self.timeout_s = timeout_s
        self._file: IO[str] | None = None
        if timeout_s > 0 and stacks_file is not None:
            stacks_file.parent.mkdir(parents=True, exist_ok=True)
            self._file = stacks_file.open("a", encoding="utf-8")
        self._armed_limit: float | None = None
        self._armed_at = 0.0

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def kick(self, timeout_s: float | None = None) -> None:
        """Progress was made: restart the countdown (optionally with a longer limit for slow phases)."""
        if not self.enabled:
            return
        limit = timeout_s or self.timeout_s
        now = time.monotonic()
        if limit == self._armed_limit and now - self._armed_at < _rearm_interval(limit):
            return  # armed moments ago: the countdown still has at least 90% of the limit to run
        target = self._file if self._file is not None else sys.stderr
        faulthandler.dump_traceback_later(limit, exit=True, file=target)
        self._armed_limit, self._armed_at = limit, now

    def pause(self) -> None:
        if self.enabled:
            faulthandler.cancel_dump_traceback_later()
            self._armed_limit = None

    def close(self) -> None:
        self.pause()
        if self._file is not None:
            self._file.close()
            self._file = None


def _rearm_interval(limit: float) -> float:
    """How long a kick may be skipped: every re-arm starts a new C thread (~30 us of CPU), which per
    training step is a measurable cost; skipping kicks for up to 10% of the limit (at most 1 s) only
    shortens the effective limit to 90% of it."""
    return min(1.0, 0.1 * limit)
