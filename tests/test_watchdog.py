"""The hang watchdog: real faulthandler timers, in a subprocess (they end the process)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_train import watchdog
from dist_train.watchdog import HangWatchdog


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=Path.cwd())


def test_a_stalled_rank_dumps_its_stack_and_exits(tmp_path: Path) -> None:
    stacks = tmp_path / "rank0.stacks"
    result = _run(
        f"""
        import time
        from pathlib import Path
        from dist_train.watchdog import HangWatchdog
        dog = HangWatchdog(1.0, Path({str(stacks)!r}))
        for _ in range(20):  # progress every 50 ms for a second: kicks, some skipped, never fires
            dog.kick(); time.sleep(0.05)
        print("progressed", flush=True)
        def stuck_in_a_collective():
            time.sleep(30)
        stuck_in_a_collective()
        """,
        tmp_path,
    )
    assert "progressed" in result.stdout
    assert result.returncode != 0
    assert "stuck_in_a_collective" in stacks.read_text()


def test_kicks_inside_the_rearm_interval_do_not_restart_the_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    armed: list[float] = []
    monkeypatch.setattr(watchdog.faulthandler, "dump_traceback_later", lambda limit, **_: armed.append(limit))
    monkeypatch.setattr(watchdog.faulthandler, "cancel_dump_traceback_later", lambda: None)
    clock = [100.0]
    monkeypatch.setattr(watchdog.time, "monotonic", lambda: clock[0])
    dog = HangWatchdog(60.0, None)
    for _ in range(1000):  # a thousand steps within 0.5 s: one timer
        dog.kick()
        clock[0] += 0.0005
    assert armed == [60.0]
    clock[0] += 1.0
    dog.kick()
    dog.kick(600.0)  # a longer limit for a slow phase always re-arms
    dog.pause()
    dog.kick()  # after a pause the timer is off: the next kick must arm it
    assert armed == [60.0, 60.0, 600.0, 60.0]
