"""*torch-free*: the one background writer both checkpoint managers hand their async saves to.

One worker thread, started by the first save, and at most one save in flight: a manager calls ``wait()``
before it submits the next save. A save's error is kept in its future and raised, unchanged, by the
next ``wait()`` or ``close()``, so a failed background write is never lost.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Generic, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class BackgroundWriter(Generic[T]):
    """Runs one save at a time on a background thread and hands back its result or its error."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: concurrent.futures.Future[T] | None = None

    def submit(self, write: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> None:
        """Start ``write(*args, **kwargs)`` in the background; the caller has waited for the previous save."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dtrain-ckpt")
        self._pending = self._executor.submit(write, *args, **kwargs)

    def wait(self) -> T | None:
        """The pending save's result (None when none is pending); re-raises the error it failed with."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self) -> None:
        """Wait for the pending save and stop the thread, also when the save failed (its error is raised).
        Calling it again does nothing; a later ``submit`` starts a new thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
