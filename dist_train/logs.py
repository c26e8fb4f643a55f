"""Logging: per-rank log files, rank-0 console, JSONL + TensorBoard metrics, a SLURM-friendly progress display.

Other ranks get a :class:`NullMetricsLogger`, so the trainer calls the same methods everywhere
instead of scattering ``if rank == 0`` checks.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from dist_train.fsutil import atomic_write_text

log = logging.getLogger("dtrain")

# ``log.info(..., extra=FILE_ONLY)``: the rank's log file gets the record, the console does not
# (step lines while a progress bar is drawn, messages the launcher already gave in its own words).
FILE_ONLY = {"dtrain_console": False}
# Keys of a metrics record that place it (what, when) rather than measure something.
RECORD_COORDINATES = ("kind", "epoch", "step", "time")


def _shown_on_console(record: logging.LogRecord) -> bool:
    return bool(getattr(record, "dtrain_console", True))


def setup_logging(run_dir: Path | None, rank: int, *, console: bool) -> None:
    """One log file per rank in ``<run_dir>/logs``; the console shows rank 0 (or whatever `console` says)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if run_dir is not None:
        logs = run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logs / f"rank{rank}.log", encoding="utf-8")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    if console:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(logging.Formatter("%(message)s"))
        sh.addFilter(_shown_on_console)
        log.addHandler(sh)
    # Python warnings (torch's, the data libraries') would reach only a console rank's stderr:
    # through the log they are in every rank's log file too, once per place as Python shows them.
    warnings.showwarning = _log_warning


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("dtrain.warnings").warning("%s", text)


class MetricsLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullMetricsLogger:
    """What ranks other than 0 use: every call is a no-op."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _finite(value: Any) -> Any:
    # JSON has no NaN/Inf; write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def is_metric(key: str, value: Any) -> bool:
    """A number that measures something: everything numeric in a record but its coordinates."""
    return key not in RECORD_COORDINATES and isinstance(value, int | float) and not isinstance(value, bool)


class RunMetricsLogger:
    """Writes each record to ``metrics.jsonl`` and every metric in it to TensorBoard (same names).

    Every start in a run directory first rewinds both to its starting point, so that no step is
    recorded twice: to the checkpoint's position on a resume, to nothing on a start from scratch
    (a run killed before its first checkpoint, or whose only checkpoint is damaged).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        jsonl: bool,
        tensorboard: bool,
        resume_step: int | None,
        resume_epoch: int | None = None,
    ) -> None:
        """``resume_step``: the checkpoint's step; ``resume_epoch``: the first epoch (1-based, as the
        records count) the resumed run finishes. None for a fresh run."""
        self.jsonl_path = run_dir / "metrics.jsonl"
        tb_dir = run_dir / "tb"
        self._jsonl = None
        purge_step = None
        replay: list[dict[str, Any]] = []
        if resume_step is None:
            if jsonl and self.jsonl_path.exists():
                self._rewrite_jsonl([])
            if tensorboard:
                for events in tb_dir.glob("events.out.tfevents.*"):
                    events.unlink()  # the earlier attempt's, as its metrics.jsonl lines are gone
        else:
            split = self._truncate_after(resume_step, resume_epoch) if jsonl else None
            kept, dropped = split if split is not None else ([], [])
            redone = split is None or any(r.get("step", 0) == resume_step for r in dropped)
            # purge_step drops events a killed run wrote after its last checkpoint; when the epoch's
            # summary at the checkpoint's own step will be written again, that step goes too, and
            # the records kept at that step are written to TensorBoard again (from metrics.jsonl).
            purge_step = resume_step if redone else resume_step + 1
            replay = [r for r in kept if r.get("step", 0) == resume_step] if redone else []
        if jsonl:
            self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            # Deferred: runs with TensorBoard off never import it (it pulls in the tensorboard package).
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)
            for record in replay:
                self._write_scalars(record)
            self._tb.flush()

    @staticmethod
    def _repeated(record: dict[str, Any], step: int, epoch: int | None) -> bool:
        """Will the resumed run write this record again? Everything after the checkpoint's step,
        and epoch/test summaries of epochs the checkpoint had not finished (a checkpoint taken at
        an epoch's last step, before its summary became part of a completed-epoch checkpoint)."""
        if record.get("step", 0) > step or record.get("kind") == "test":
            return True  # the test evaluation always runs again at the end of a resumed run
        return epoch is not None and record.get("kind") == "epoch" and record.get("epoch", -1) >= epoch

    def _truncate_after(self, step: int, epoch: int | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """Drop the records the resumed run repeats; returns (kept, dropped), None without a file."""
        if not self.jsonl_path.exists():
            return None
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        lines = []
        for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill
            if self._repeated(record, step, epoch):
                dropped.append(record)
            else:
                kept.append(record)
                lines.append(line)
        self._rewrite_jsonl(lines)
        return kept, dropped

    def _rewrite_jsonl(self, lines: list[str]) -> None:
        atomic_write_text(self.jsonl_path, "".join(line + "\n" for line in lines))

    def _write_scalars(self, record: dict[str, Any]) -> None:
        assert self._tb is not None
        step = int(record.get("step", 0))
        for key, value in record.items():
            if is_metric(key, value):
                self._tb.add_scalar(key, value, step)

    def log(self, record: dict[str, Any]) -> None:
        if self._jsonl is not None:
            # Wall-clock time of each record: lines up a run's logs with the machine's (GPU monitors, SLURM).
            stamped = {**record, "time": round(time.time(), 3)}
            self._jsonl.write(json.dumps({k: _finite(v) for k, v in stamped.items()}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            self._write_scalars(record)
            self._tb.flush()

    def add_histograms(self, model: Any, step: int) -> None:
        if self._tb is None:
            return
        for name, p in model.named_parameters():
            self._tb.add_histogram(f"weights/{name}", p.detach().float().cpu(), step)

    def add_confusion(self, tag: str, matrix: list[list[int]], step: int) -> None:
        """The confusion matrix as a grey image: row-normalised (each true class's fractions), 16 px a cell."""
        if self._tb is None:
            return
        counts = np.asarray(matrix, dtype=np.float64)
        fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        image = np.kron(fractions, np.ones((16, 16)))
        self._tb.add_image(tag, image[None].astype(np.float32), step, dataformats="CHW")
        self._tb.flush()

    def add_report(self, split: str, name: str, report: dict[str, Any], step: int) -> None:
        """An evaluation's non-scalar result in TensorBoard: the confusion matrix, the residual histograms."""
        if name == "confusion":
            self.add_confusion(f"{split}/confusion", report["matrix"], step)
        elif name == "residuals":
            self.add_residual_histograms(split, report, step)

    def add_residual_histograms(self, split: str, histograms: dict[str, dict[str, Any]], step: int) -> None:
        """``<split>/<target>/residual``: each target's (pred - true) histogram, as the task binned it."""
        if self._tb is None:
            return
        for target, h in histograms.items():
            counts, edges = h["counts"], h["edges"]
            self._tb.add_histogram_raw(
                f"{split}/{target}/residual",
                min=edges[0],
                max=edges[-1],
                num=int(sum(counts)),
                sum=h["sum"],
                sum_squares=h["sum_squares"],
                bucket_limits=edges[1:],  # each bucket's right edge
                bucket_counts=counts,
                global_step=step,
            )
        self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise (no carriage returns in batch logs).

    The rank's log file gets the step lines in every mode; the bar replaces them on the console only.
    """

    def __init__(self, mode: str, *, enabled: bool, log_every: int) -> None:
        # tqdm draws on stderr, so that is the stream that must be a terminal.
        self.use_bar = enabled and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))
        self.lines = enabled and not self.use_bar and mode != "off"  # step lines on the console
        self.enabled = enabled
        self.log_every = log_every
        self._bar: Any = None
        self._last = time.perf_counter()

    def start_epoch(self, epoch: int, epochs: int, total_batches: int) -> None:
        if self.use_bar:
            self._bar = tqdm(
                total=total_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr, **_bar_width()
            )

    def update(self, step: int, batches: int, values: dict[str, float] | None) -> None:
        if self._bar is not None:
            self._bar.update(batches)
            if values:
                self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in values.items()}, refresh=False)
        if self.enabled and values:
            text = "  ".join(f"{k}={v:.4g}" for k, v in values.items())
            log.info("step %d  %s", step, text, extra=None if self.lines else FILE_ONLY)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _bar_width() -> dict[str, Any]:
    """tqdm's size arguments for the terminal on stderr.

    tqdm sizes the bar from the terminal as (columns - 1, lines - 1). A pseudo-terminal that nobody
    gave a size (``script`` or Python's ``pty`` started without a terminal around them) reports
    0 x 0, so tqdm gets -1 lines, counts its bar as below the screen's last line and never draws
    it. Such a terminal gets a fixed size: $COLUMNS x $LINES, else 80 x 24.
    """
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        columns, lines = size.columns, size.lines
    except (OSError, ValueError, AttributeError):
        columns = lines = 0
    if columns > 0 and lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": columns or _env_int("COLUMNS", 80), "nrows": lines or _env_int("LINES", 24)}


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default
