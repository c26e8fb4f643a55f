"""`dtrain data`: make demo datasets, convert other formats to HDF5, inspect a file.

Heavy modules (h5py, numpy, PIL) are imported inside the commands so `dtrain --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dist_train.config import HIT_KEY_DEFAULTS
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
@click.option(
    "--layout",
    type=click.Choice(["wch5", "wch5_channels_last", "image", "hits"]),
    default="wch5",
    show_default=True,
    help="wch5: water-Cherenkov keys (16x40x38, 3 classes, energies/positions/angles); "
    "wch5_channels_last: the same as (H, W, C) = a 16x40 grid x 38 channels; image: (C,H,W) images (1x28x28, 10 classes); "
    "hits: a hit-list file (WatChMaL layout, 3 classes) and its geometry OUT_geometry.npz.",
)
@click.option(
    "--shape", default=None, help="Sample shape C,H,W (default: the layout's; hits: the module grid H,W, 16,40)."
)
@click.option(
    "--classes", type=int, default=None, help="Number of classes (default: 3 for wch5 and hits, 10 for image)."
)
@click.option("--hits-per-event", type=int, default=800, show_default=True, help="hits: mean hits per event.")
@click.option("--seed", default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def synth_cmd(
    out: Path,
    events: int,
    layout: str,
    shape: str | None,
    classes: int | None,
    hits_per_event: int,
    seed: int,
    force: bool,
) -> None:
    """Write a demo dataset with learnable structure to OUT (an .h5 file)."""
    from dist_train.data.writers.synth import synth_dataset
    from dist_train.data.writers.synth_hits import geometry_path_for

    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it.")
    synth_dataset(
        out,
        layout=layout,
        events=events,
        seed=seed,
        shape=_parse_shape(shape),
        num_classes=classes,
        hits_per_event=hits_per_event,
    )
    click.echo(f"wrote {out} ({events} events, layout {layout}, {out.stat().st_size / 1e6:.1f} MB)")
    if layout == "hits":
        click.echo(f"wrote {geometry_path_for(out)} (its geometry: set data.geometry_file to it)")


@data.command("convert")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--x-key", default="event_data", show_default=True, help="Sample dataset name (also looked up in an .npz)."
)
@click.option("--y-key", default="labels", show_default=True, help="Label dataset name (also looked up in an .npz).")
@click.option(
    "--labels",
    "labels",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Labels file for .npy or IDX sources (default: found beside SRC).",
)
@click.option("--compress", is_flag=True, help="Chunked + gzip (smaller file, slower reads than contiguous).")
@click.option(
    "--geometry",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="SRC is a hit-list file: build its events with this geometry .npz into contiguous samples.",
)
@click.option(
    "--representation",
    type=click.Choice(["mpmt_image", "point_cloud"]),
    default="mpmt_image",
    show_default=True,
    help="With --geometry: what each event becomes.",
)
@click.option("--n-points", type=int, default=4000, show_default=True, help="With --geometry: points per point cloud.")
@click.option(
    "--pmts-per-module", type=int, default=19, show_default=True, help="With --geometry: PMTs per mPMT module."
)
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def convert_cmd(
    src: Path,
    out: Path,
    x_key: str,
    y_key: str,
    labels: Path | None,
    compress: bool,
    geometry: Path | None,
    representation: str,
    n_points: int,
    pmts_per_module: int,
    force: bool,
) -> None:
    """Convert SRC (.npz, .npy + labels, MNIST IDX[.gz], ImageFolder dir; a hit-list .h5 with --geometry) to OUT."""
    from dist_train.data.writers.convert import convert

    if out.exists() and not force:
        raise DataError(f"{out} already exists; pass --force to overwrite it.")
    if geometry is not None:
        _convert_hits(src, out, x_key, geometry, representation, n_points, pmts_per_module)
        return
    summary = convert(src, out, x_key=x_key, y_key=y_key, labels=labels, compress=compress)
    click.echo(
        f"wrote {out}: {summary['rows']} samples of shape {tuple(summary['sample_shape'])} "
        f"({summary['x_dtype']}) from {summary['source']} {src}"
    )


def _convert_hits(
    src: Path, out: Path, x_key: str, geometry: Path, representation: str, n_points: int, pmts_per_module: int
) -> None:
    from dist_train.data.hits import HitSpec
    from dist_train.data.writers.convert_hits import convert_hits

    if n_points < 1 or pmts_per_module < 1:
        raise DataError(f"--n-points ({n_points}) and --pmts-per-module ({pmts_per_module}) must be at least 1.")
    spec = HitSpec(
        geometry_file=str(geometry.absolute()),
        representation=representation,
        n_points=n_points,
        pmts_per_module=pmts_per_module,
    )
    summary = convert_hits(src, out, spec, x_key=x_key)
    note = (
        f"; {summary['truncated_events']} events truncated to {n_points} points" if summary["truncated_events"] else ""
    )
    click.echo(
        f"wrote {out}: {summary['events']} {representation} samples of shape {tuple(summary['sample_shape'])} "
        f"(float32, contiguous) from hit-list file {src}, with {', '.join(summary['copied'])}{note}"
    )


@data.command("inspect")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--x-key", default="event_data", show_default=True)
@click.option("--y-key", default="labels", show_default=True)
@click.option(
    "--geometry",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Hit-list files: check this geometry .npz against the hits and show the sample shapes.",
)
@click.option(
    "--n-points", type=int, default=4000, show_default=True, help="Hit-list files: point-cloud size to check."
)
@click.option(
    "--pmts-per-module", type=int, default=19, show_default=True, help="Hit-list files: PMTs per mPMT module."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(
    file: Path, x_key: str, y_key: str, geometry: Path | None, n_points: int, pmts_per_module: int, as_json: bool
) -> None:
    """Show the datasets of FILE: shapes, dtypes, storage, class balance, fast-path use; hit-list files: hits per event."""
    report = inspect_file(file, x_key, y_key, n_points=n_points)
    if report.get("hits") is not None:
        report["hits"]["representations"] = _hit_representations(
            file, report["hits"], geometry, n_points, pmts_per_module
        )
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(_format_report(report))


def inspect_file(path: Path, x_key: str, y_key: str, *, n_points: int = 4000) -> dict[str, Any]:
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
        # Any hit-list array makes it a hit-list file: a missing one is then named, not reported as "no event_data".
        is_hits = any(k in report["datasets"] for k in HIT_KEY_DEFAULTS.values())
        report["hits"] = _hit_summary(f, path, n_points) if is_hits else None
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


def _hit_summary(f: Any, path: Path, n_points: int) -> dict[str, Any]:
    """Events and hits per event of a hit-list file (default dataset names), after the launch's own
    checks of the arrays and PMT ids (one copy, :func:`dist_train.data.hits.check_hit_arrays`):
    a file the launch would reject stops here with the same message (exit 2)."""
    import numpy as np

    from dist_train.data.hits import HitSpec, check_hit_arrays, hit_counts_of, scan_pmt_ids

    spec = HitSpec(geometry_file="", n_points=n_points)
    dsets, index, num_hits = check_hit_arrays(f, path, spec)
    _, ids_max = scan_pmt_ids(dsets["pmt"], None, path, spec, full=True)
    counts = hit_counts_of(index, num_hits)
    return {
        "events": int(len(index)),
        "hits": num_hits,
        "hits_per_event": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "p95": float(np.percentile(counts, 95)),
            "max": int(counts.max()),
        },
        "empty_events": int((counts == 0).sum()),
        "max_pmt_id": ids_max,
        "n_points": n_points,
        "over_n_points": int((counts > n_points).sum()),
    }


def _hit_representations(
    file: Path, hits: dict[str, Any], geometry: Path | None, n_points: int, ppm: int
) -> dict[str, str]:
    """Whether each representation fits this file (with --geometry: checked against it)."""
    from dist_train.data.hits import HitSpec, load_geometry, make_builder

    over = hits["over_n_points"]
    cloud_note = (
        f"{over} events ({100.0 * over / max(1, hits['events']):.1f}%) have more than {n_points} hits (truncated)"
    )
    if geometry is None:
        modules = hits["max_pmt_id"] // ppm + 1
        return {
            "mpmt_image": f"needs a geometry with mpmt_image_positions for at least {modules} modules "
            f"(PMT ids up to {hits['max_pmt_id']}, {ppm} per module); pass --geometry to check one",
            "point_cloud": f"needs a geometry with position/orientation for at least {hits['max_pmt_id'] + 1} PMTs; "
            f"with n_points = {n_points}: {cloud_note}",
        }
    out = {}
    for rep in ("mpmt_image", "point_cloud"):
        spec = HitSpec(
            geometry_file=str(geometry.absolute()), representation=rep, n_points=n_points, pmts_per_module=ppm
        )
        try:
            builder = make_builder(spec, load_geometry(spec))
        except DataError as exc:
            out[rep] = f"does not fit: {exc}"
            continue
        if hits["max_pmt_id"] >= builder.num_pmts:
            out[rep] = f"does not fit: PMT id {hits['max_pmt_id']} is beyond the geometry's {builder.num_pmts} PMTs" + (
                f" ({ppm} per module)" if rep == "mpmt_image" else ""
            )
            continue
        shape = "x".join(str(s) for s in builder.shape)
        out[rep] = f"fits: samples of {shape}" + (f"; {cloud_note}" if rep == "point_cloud" else "")
    return out


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
    h = r.get("hits")
    if h is not None:
        c = h["hits_per_event"]
        lines.append(
            f"hit-list file: {h['events']} events, {h['hits']} hits; hits per event min {c['min']}, median "
            f"{c['median']:g}, 95% {c['p95']:g}, max {c['max']}; {h['empty_events']} empty events; largest PMT id {h['max_pmt_id']}"
        )
        for rep, verdict in h.get("representations", {}).items():
            lines.append(f"  {rep}: {verdict}")
    elif r["x_key"] is None:
        lines.append(f"  (no dataset named {r.get('x_key') or 'event_data'!r}; pass --x-key)")
    else:
        note = (
            "applies (contiguous, uncompressed)"
            if r["fast_path"]
            else "does not apply (chunked/compressed: read per chunk)"
        )
        lines.append(f"fast path for {r['x_key']!r}: {note}")
    if r["class_counts"]:
        total = sum(r["class_counts"].values())
        parts = [f"{k}: {v} ({100 * v / total:.1f}%)" for k, v in r["class_counts"].items()]
        lines.append(f"classes in {r['y_key']!r}: " + ", ".join(parts))
    return "\n".join(lines)
