"""Preemption signals: the handler only sets a flag; the trainer acts at the next stop check or epoch end.

Doing the work inside the handler would run a checkpoint in the middle of an optimizer step; a
flag keeps the state consistent, and a second signal during the save just sets the flag again.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from dist_train import envvars
from dist_train.errors import ConfigError
from dist_train.logs import FILE_ONLY

log = logging.getLogger("dtrain")


def parse_signals(names: list[str]) -> list[signal.Signals]:
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


def launcher_reports_stops() -> dict[str, bool] | None:
    """``extra=`` for stop messages: file only under `dtrain launch`, which tells the user in its own words."""
    return FILE_ONLY if envvars.get(envvars.JOB_ID) else None


def launcher_stop_signal_file() -> Path | None:
    """Where `dtrain launch` notes the stop signal it forwards as SIGTERM (None outside a launch)."""
    run_dir = envvars.get(envvars.RUN_DIR)
    if not run_dir or not envvars.get(envvars.JOB_ID):
        return None
    return Path(run_dir) / envvars.STOP_SIGNAL_FILE


class PreemptionHandler:
    """Installs handlers for the preemption signals while training runs.

    ``relayed_from``: the launcher's note of the signal it received (see envvars.STOP_SIGNAL_FILE);
    the launcher turns every stop request into a SIGTERM for torchrun, and the log should still say
    that the user pressed Ctrl-C (SIGINT) or that SLURM sent SIGUSR1.
    """

    def __init__(self, signals: list[signal.Signals], relayed_from: Path | None = None) -> None:
        self.signals = signals
        self.relayed_from = relayed_from
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def describe(self) -> str:
        """The received signal's name, e.g. "SIGINT (Ctrl-C)"; "" before any."""
        if self.received is None:
            return ""
        return f"{self.received.name} (Ctrl-C)" if self.received == signal.SIGINT else self.received.name

    def _original_signal(self, sig: signal.Signals) -> signal.Signals:
        """The signal the launcher received, when ``sig`` is its forwarded SIGTERM."""
        if sig != signal.SIGTERM or self.relayed_from is None:
            return sig
        try:
            return signal.Signals[self.relayed_from.read_text(encoding="ascii").strip()]
        except (OSError, KeyError, ValueError):
            return sig

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = self._original_signal(signal.Signals(signum))
        extra = launcher_reports_stops()
        if first:
            log.warning(
                "received %s: stopping at the next stop check or epoch end and saving a checkpoint",
                self.describe(),
                extra=extra,
            )
        else:
            log.warning(
                "received %s again: already stopping, the checkpoint in progress is kept", self.describe(), extra=extra
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
