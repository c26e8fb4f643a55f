"""The progress bar of the writers: on a terminal by default, never in logs or pipes."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, progress: bool | None, *, unit: str = "ev") -> tqdm:
    """A bar over ``total`` items; ``progress=None`` shows it only when stderr is a terminal.

    ``leave=False``: the bar disappears when done, so the command's one-line summary is what stays.
    """
    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)
