"""Preemption signals: the handler only sets a flag; the trainer acts at the next step boundary.

Doing the work inside the handler would run a checkpoint in the middle of an optimizer step; a
flag keeps the state consistent, and a second signal during the save just sets the flag again.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from dist_train import envvars
from dist_train.logs import FILE_ONLY

log = logging.getLogger("dtrain")


def parse_signals(names: list[str]) -> list[signal.Signals]:
    from dist_train.errors import ConfigError

    out: list[signal.Signals] = []
    for name in names:
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        try:
            out.append(signal.Signals[key])
        except KeyError:
            raise ConfigError(
                f"launch.preempt_signals: {name!r} is not a signal name; use e.g. SIGTERM, SIGINT, SIGUSR1, SIGUSR2."
            ) from None
    return out


class PreemptionHandler:
    """Installs handlers for the preemption signals while training runs."""

    def __init__(self, signals: list[signal.Signals]) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signal.Signals(signum)
        # Under `dtrain launch` the user's own stop request (Ctrl-C) reaches the workers as the
        # SIGTERM the launcher forwards, and the launcher has already told them in its words.
        extra = FILE_ONLY if envvars.get(envvars.JOB_ID) else None
        if first:
            log.warning(
                "received %s: stopping at the next step boundary and saving a checkpoint", self.received.name, extra=extra
            )
        else:
            log.warning(
                "received %s again: already stopping, the checkpoint in progress is kept", self.received.name, extra=extra
            )

    def install(self) -> PreemptionHandler:
        if self._previous:
            return self  # already installed (idempotent)
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. inside some test runners)
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
