"""BackgroundWriter, the one async-save thread of both checkpoint managers: results, errors, close()."""

from __future__ import annotations

import threading
import time

import pytest

from dist_train.checkpoint.background import BackgroundWriter
from dist_train.errors import CheckpointError


def test_wait_returns_the_result_and_none_when_nothing_is_pending() -> None:
    writer: BackgroundWriter[str] = BackgroundWriter()
    assert writer.wait() is None
    writer.submit(lambda name, suffix: name + suffix, "ckpt", suffix=".pt")
    assert writer.wait() == "ckpt.pt"
    assert writer.wait() is None  # a result is handed back once
    writer.close()


def test_a_failed_save_is_raised_by_the_next_wait_unchanged() -> None:
    writer: BackgroundWriter[None] = BackgroundWriter()
    failure = CheckpointError("could not write checkpoint ckpt-e0000-s00000002.pt: disk full")

    def failing_save() -> None:
        raise failure

    writer.submit(failing_save)
    with pytest.raises(CheckpointError) as raised:
        writer.wait()
    assert raised.value is failure  # the very error, with its message; not wrapped or lost
    writer.close()  # raised once: closing afterwards does not raise it again


def test_close_waits_for_the_pending_save_and_stops_its_thread() -> None:
    writer: BackgroundWriter[None] = BackgroundWriter()
    written: list[str] = []
    threads: list[threading.Thread] = []

    def slow_save() -> None:
        threads.append(threading.current_thread())
        time.sleep(0.2)  # still writing when close() is called
        written.append("done")

    writer.submit(slow_save)
    writer.close()
    assert written == ["done"]
    assert threads and not threads[0].is_alive()
    writer.close()  # idempotent


def test_close_raises_a_pending_failure_and_still_stops_the_thread() -> None:
    writer: BackgroundWriter[str] = BackgroundWriter()
    threads: list[threading.Thread] = []

    def failing_save() -> str:
        threads.append(threading.current_thread())
        raise CheckpointError("No space left on device")

    writer.submit(failing_save)
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.close()
    assert threads and not threads[0].is_alive()
    writer.close()  # the failure was raised once; a second close() is a no-op

    writer.submit(lambda: "next")  # a save after close() gets a new thread
    assert writer.wait() == "next"
    writer.close()
