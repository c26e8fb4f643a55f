"""Importing users' modules (models, tasks) as the workers will: the current directory first.

Workers run ``python -m dist_train`` in the directory ``dtrain`` was started from, and ``python -m``
puts that directory first on the import path. The ``dtrain`` script's own path lacks it, so every
place of the launcher that imports or reads a user's module (``dtrain launch``'s custom-task check,
``dtrain eval``, the ``[model]`` check of dist_train/model_check.py) asks this module for the
workers' path instead of building its own. Torch-free: the launcher imports it at start-up.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def worker_import_path() -> list[str]:
    """The import path of a worker started as ``python -m dist_train`` from this directory.

    ``python -m`` puts the current directory first. This process's own first entry (the ``dtrain``
    script's directory, or the current directory under ``python -m``) is replaced by it, unless
    Python was told to prepend nothing (``-P``).
    """
    prepended = 0 if getattr(sys.flags, "safe_path", False) else 1
    return [os.getcwd(), *sys.path[prepended:]]


@contextlib.contextmanager
def worker_imports() -> Iterator[list[str]]:
    """Import with the workers' path (:func:`worker_import_path`); ``sys.path`` is restored afterwards.

    Modules imported inside stay imported (in ``sys.modules``), as a worker's would.
    """
    saved = list(sys.path)
    sys.path[:] = worker_import_path()
    try:
        yield list(sys.path)
    finally:
        sys.path[:] = saved
