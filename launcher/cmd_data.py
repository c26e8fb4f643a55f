"""`dtrain data`: make demo datasets, convert other formats to HDF5, inspect a file.

Heavy modules (h5py, numpy, PIL) are imported inside the commands so `dtrain --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dist_train.errors import DataError


@click.group(name="data")
def data() -> None:
    """Create, convert and inspect HDF5 datasets."""


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise DataError(f"--shape {text!r}: expected sizes separated by commas, e.g. 1,28,28.") from None
    return shape


@data.command("synth")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--events", "-n", default=4000, show_default=True, help="Number of samples.")
@click.option("--layout", type=click.Choice(["wch5", "wch5_channels_last", "image"]), default="wch5", show_default=True,
              help="wch5: water-Cherenkov keys (16x40x38, 3 classes, energies/positions/angles); wch5_channels_last: the same as (H, W, C) = 16x40 grid x 38 channels; image: (C,H,W) images (1x28x28, 10 classes).")
@click.option("--shape", default=None, help="Sample shape C,H,W (default: the layout's).")
@click.option("--classes", type=int, default=None, help="Number of classes (default: 3 for wch5, 10 for image).")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def synth_cmd(out: Path, events: int, layout: str, shape: str | None, classes: int | None, seed: int, force: bool) -> None:
    """Write a demo dataset with learnable structure to OUT (an .h5 file)."""
    from dist_train.data.synth import synth_dataset

    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it.")
    synth_dataset(out, layout=layout, events=events, seed=seed, shape=_parse_shape(shape), num_classes=classes)
    click.echo(f"wrote {out} ({events} events, layout {layout}, {out.stat().st_size / 1e6:.1f} MB)")


@data.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--x-key", default="event_data", show_default=True, help="Sample dataset name (also looked up in an .npz).")
@click.option("--y-key", default="labels", show_default=True, help="Label dataset name (also looked up in an .npz).")
@click.option("--labels", "labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Labels file for .npy or IDX sources (default: found beside SRC).")
@click.option("--compress", is_flag=True, help="Chunked + gzip (smaller file, slower reads than contiguous).")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_cmd(src: Path, out: Path, x_key: str, y_key: str, labels: Path | None, compress: bool, force: bool) -> None:
    """Convert SRC (.npz, .npy + labels, MNIST IDX[.gz], ImageFolder dir) to an HDF5 file OUT."""
    from dist_train.data.convert import convert

    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it.")
    summary = convert(src, out, x_key=x_key, y_key=y_key, labels=labels, compress=compress)
    click.echo(
        f"wrote {out}: {summary['rows']} samples of shape {tuple(summary['sample_shape'])} "
        f"({summary['x_dtype']}) from {summary['source']} {src}"
    )


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--x-key", default="event_data", show_default=True)
@click.option("--y-key", default="labels", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(file: Path, x_key: str, y_key: str, as_json: bool) -> None:
    """Show the datasets of FILE: shapes, dtypes, storage, class balance, fast-path use."""
    report = inspect_file(file, x_key, y_key)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_format_report(report))


def inspect_file(path: Path, x_key: str, y_key: str) -> dict[str, Any]:
    import numpy as np

    from dist_train.data.h5io import file_size, list_datasets, open_h5, storage_of
    from dist_train.data.preflight import read_labels

    report: dict[str, Any] = {"file": str(path.absolute()), "size_bytes": 0, "datasets": {}}
    with open_h5(path) as f:
        report["size_bytes"] = file_size(path)
        for name, dset in list_datasets(f).items():
            st = storage_of(dset)
            report["datasets"][name] = {
                "shape": list(dset.shape),
                "dtype": str(dset.dtype),
                "storage": st.layout,
                "chunks": list(st.chunks) if st.chunks else None,
                "compression": st.compression,
                "filters": list(st.filters),
                "fast_path": st.fast_path,
            }
        x = f.get(x_key)
        report["x_key"] = x_key if x is not None else None
        report["fast_path"] = bool(x is not None and report["datasets"].get(x_key, {}).get("fast_path"))
        y = f.get(y_key)
        if y is not None and getattr(y, "ndim", 0) in (1, 2) and y.dtype.kind in "iub":
            labels = read_labels(y, path, y_key)
            values, counts = np.unique(labels, return_counts=True)
            report["y_key"] = y_key
            report["class_counts"] = {int(v): int(c) for v, c in zip(values, counts, strict=True)}
        else:
            report["y_key"] = None
            report["class_counts"] = None
    return report


def _format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['file']}  ({r['size_bytes'] / 1e6:.1f} MB)"]
    width = max((len(n) for n in r["datasets"]), default=4)
    for name, d in r["datasets"].items():
        storage = d["storage"]
        if d["chunks"]:
            storage += f" chunks={tuple(d['chunks'])}"
        if d["filters"]:
            storage += " " + "+".join(d["filters"])
        fast = "memmap" if d["fast_path"] else "h5py"
        lines.append(f"  {name:<{width}}  {tuple(d['shape'])!s:<22} {d['dtype']:<8} {storage:<40} reads: {fast}")
    if r["x_key"] is None:
        lines.append(f"  (no dataset named {r.get('x_key') or 'event_data'!r}; pass --x-key)")
    else:
        note = "applies (contiguous, uncompressed)" if r["fast_path"] else "does not apply (chunked/compressed: read per chunk)"
        lines.append(f"fast path for {r['x_key']!r}: {note}")
    if r["class_counts"]:
        total = sum(r["class_counts"].values())
        parts = [f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in r["class_counts"].items()]
        lines.append(f"classes in {r['y_key']!r}: " + ", ".join(parts))
    return "\n".join(lines)
