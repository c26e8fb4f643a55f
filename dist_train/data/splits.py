"""Train/val/test splits as arrays of file rows (torch-free).

Two ways to split (see the package docstring for the config keys):

* fractions: ``data.val_split`` / ``data.test_split`` with ``data.split_seed``; rows are drawn
  without replacement, the splits are disjoint and together cover the selected rows;
  ``data.stratify`` keeps each class's share in every split (``true``: the classification labels;
  ``"key"``: the values of that integer dataset, for any task; ``false``: random); ``data.limit`` first takes a seeded
  subset (without replacement) of the whole file.
* explicit index arrays (``data.split_file``):
  - ``path/to/splits.npz`` with arrays ``train_idxs``, ``val_idxs`` and optionally ``test_idxs``
    (the WatChMaL convention);
  - ``path/to/splits.h5`` (or ``.hdf5``) with datasets of those names at the root;
  - ``h5:/group`` (or ``h5:`` for the root): datasets of those names inside the data file itself.
  Arrays are checked: integers, within ``[0, rows)``, no duplicates, no overlap between splits.
  With ``data.limit`` each split is cut to a seeded subset of the same share of ``limit``.

Rows of each split are sorted ascending: the sampler shuffles positions anyway, and ascending
rows keep the per-batch reads local.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dist_train.config import H5_SPLIT_PREFIX, DataConfig
from dist_train.data.h5io import open_h5
from dist_train.errors import DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class SplitRows:
    train: np.ndarray
    val: np.ndarray | None
    test: np.ndarray | None

    def sizes(self) -> dict[str, int]:
        return {name: (0 if rows is None else len(rows)) for name, rows in self.items()}

    def items(self) -> list[tuple[str, np.ndarray | None]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


def make_splits(num_rows: int, strata: np.ndarray | None, cfg: DataConfig, data_path: Path) -> SplitRows:
    """``strata``: one integer per row to stratify by (``data.stratify``), None for random splits."""
    if cfg.split_file:
        arrays = load_split_arrays(cfg.split_file, data_path)
        splits = validate_split_arrays(arrays, num_rows, where=cfg.split_file)
        if cfg.limit:
            splits = _limit_explicit(splits, cfg.limit, cfg.split_seed)
        return splits
    return fraction_splits(num_rows, strata, cfg)


# ----------------------------------------------------------------------------- fraction splits


def select_rows(num_rows: int, limit: int, seed: int) -> np.ndarray:
    """Every row, or a seeded subset of ``limit`` rows drawn without replacement."""
    if not limit or limit >= num_rows:
        return np.arange(num_rows, dtype=np.int64)
    rng = np.random.default_rng([seed, 1])  # its own stream: the split draw below stays independent
    return np.sort(rng.choice(num_rows, size=limit, replace=False)).astype(np.int64)


def _split_counts(n: int, val: float, test: float) -> tuple[int, int]:
    return int(round(n * val)), int(round(n * test))


def fraction_splits(num_rows: int, strata: np.ndarray | None, cfg: DataConfig) -> SplitRows:
    rows = select_rows(num_rows, cfg.limit, cfg.split_seed)
    rng = np.random.default_rng([cfg.split_seed, 2])
    if cfg.stratify is not False:
        if strata is None:
            raise DataError(f"data.stratify = {cfg.stratify!r} needs the values to stratify by, but none were read.")
        parts: list[tuple[np.ndarray, ...]] = []
        row_labels = strata[rows]
        for cls in np.unique(row_labels):
            parts.append(_draw(rows[row_labels == cls], cfg.val_split, cfg.test_split, rng))
        train = np.concatenate([p[0] for p in parts])
        val = np.concatenate([p[1] for p in parts])
        test = np.concatenate([p[2] for p in parts])
    else:
        train, val, test = _draw(rows, cfg.val_split, cfg.test_split, rng)
    if len(train) == 0:
        raise DataError(
            f"the training split is empty ({len(rows)} rows selected, val_split={cfg.val_split}, "
            f"test_split={cfg.test_split}). Use more data (data.limit) or smaller split fractions."
        )
    return SplitRows(
        train=np.sort(train),
        val=np.sort(val) if cfg.val_split > 0 else None,
        test=np.sort(test) if cfg.test_split > 0 else None,
    )


def _draw(rows: np.ndarray, val: float, test: float, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    perm = rng.permutation(rows)
    n_val, n_test = _split_counts(len(perm), val, test)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


# ----------------------------------------------------------------------------- explicit splits


def load_split_arrays(split_file: str, data_path: Path) -> dict[str, np.ndarray]:
    """The ``<name>_idxs`` arrays of a split file (see the module docstring for the formats)."""
    if split_file.startswith(H5_SPLIT_PREFIX):
        group = split_file[len(H5_SPLIT_PREFIX) :] or "/"
        return _read_h5_split_arrays(data_path, group, f"{data_path}:{group}")
    p = Path(split_file).expanduser().absolute()
    if not p.is_file():
        raise DataError(
            f"data.split_file {split_file!r} does not exist. Give an .npz with train_idxs/val_idxs/test_idxs, "
            f"an .h5 file with those datasets, or 'h5:/group' for a group inside the data file."
        )
    if p.suffix.lower() in (".h5", ".hdf5"):
        return _read_h5_split_arrays(p, "/", str(p))
    try:
        with np.load(p, allow_pickle=False) as npz:
            return {name: np.asarray(npz[f"{name}_idxs"]) for name in SPLIT_NAMES if f"{name}_idxs" in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"data.split_file {str(p)!r} is not a readable .npz file: {exc}.") from None


def _read_h5_split_arrays(path: Path, group: str, where: str) -> dict[str, np.ndarray]:
    with open_h5(path) as f:
        g = f.get(group)
        if g is None or not hasattr(g, "keys"):
            raise DataError(
                f"split group {where!r} does not exist in {str(path)!r}; set data.split_file to an existing group."
            )
        return {name: np.asarray(g[f"{name}_idxs"][()]) for name in SPLIT_NAMES if f"{name}_idxs" in g}


def validate_split_arrays(arrays: dict[str, np.ndarray], num_rows: int, where: str) -> SplitRows:
    if "train" not in arrays:
        raise DataError(f"split file {where!r} has no 'train_idxs' array; found: {sorted(arrays) or 'nothing'}.")
    checked: dict[str, np.ndarray] = {}
    for name, arr in arrays.items():
        checked[name] = _check_index_array(arr, name, num_rows, where)
    names = list(checked)
    for i, name in enumerate(names):
        for other in names[:i]:
            both = np.intersect1d(checked[name], checked[other])
            if both.size:
                raise DataError(
                    f"split file {where!r}: {name}_idxs and {other}_idxs overlap in {both.size} rows "
                    f"(e.g. {both[:5].tolist()}); the splits must be disjoint."
                )
    if len(checked["train"]) == 0:
        raise DataError(f"split file {where!r}: train_idxs is empty.")

    def opt(name: str) -> np.ndarray | None:
        arr = checked.get(name)
        return None if arr is None or len(arr) == 0 else np.sort(arr)

    return SplitRows(train=np.sort(checked["train"]), val=opt("val"), test=opt("test"))


def _check_index_array(arr: np.ndarray, name: str, num_rows: int, where: str) -> np.ndarray:
    label = f"split file {where!r}: {name}_idxs"
    if arr.ndim != 1:
        raise DataError(f"{label} must be a 1-D array of row numbers, got shape {arr.shape}.")
    if arr.size and arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise DataError(f"{label} must contain integer row numbers, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if arr.size:
        bad = arr[(arr < 0) | (arr >= num_rows)]
        if bad.size:
            raise DataError(
                f"{label} has {bad.size} indices out of range [0, {num_rows}) (e.g. {bad[:5].tolist()}); "
                "the data file has fewer rows than the split file expects. Was it made for another file?"
            )
        uniq, counts = np.unique(arr, return_counts=True)
        dup = uniq[counts > 1]
        if dup.size:
            raise DataError(
                f"{label} has {dup.size} duplicate indices (e.g. {dup[:5].tolist()}); each row may appear once."
            )
    return arr


def _limit_explicit(splits: SplitRows, limit: int, seed: int) -> SplitRows:
    total = sum(splits.sizes().values())
    if limit >= total:
        return splits
    rng = np.random.default_rng([seed, 3])
    share = limit / total

    def cut(rows: np.ndarray | None, keep_one: bool) -> np.ndarray | None:
        if rows is None:
            return None
        n = max(1 if keep_one else 0, int(round(len(rows) * share)))
        return np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))

    return SplitRows(train=cut(splits.train, True), val=cut(splits.val, False), test=cut(splits.test, False))  # type: ignore[arg-type]
