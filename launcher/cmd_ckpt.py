"""`dtrain ckpt inspect|export`: what a checkpoint holds, whether its bytes verify, one-file export.

Imports torch only when run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dist_train.errors import CheckpointError


@click.group(name="ckpt")
def ckpt() -> None:
    """Inspect and export checkpoints (written by `dtrain launch` under <run_dir>/checkpoints/)."""


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "?"
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} TiB"


def _format_metrics(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "(none)"
    return "  ".join(
        f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}"
        for name, value in sorted(metrics.items())
    )


def _print_listing(records: list[Any]) -> None:
    click.echo(f"{'':2}{'file':34} {'epoch':>5} {'step':>9} {'size':>12}  status")
    for record in records:
        marker = "* " if record.is_latest else "  "
        status = "ok" if record.valid else f"INVALID: {record.problem}"
        click.echo(
            f"{marker}{record.path.name:34} {record.epoch:>5} {record.step:>9} {_size(record.size_bytes):>12}  {status}"
        )
    click.echo("(* = named by the 'latest' pointer)\n")


def _print_description(info: dict[str, Any]) -> None:
    checked = f"sha256 of all {info['files']} files match the manifest" if info.get("files") else "sha256 matches"
    validity = f"ok ({checked})" if info["valid"] else f"INVALID: {info['problem']}"
    sizes = info["tensor_bytes"]
    sections = ", ".join(f"{name} {_size(size)}" for name, size in sizes.items() if name != "total")
    rows = [
        ("checkpoint", info["path"]),
        ("validity", validity),
        ("file size", _size(info["file_bytes"])),
        ("epoch", f"{info['epoch']}  (complete: {info['epoch_complete']})"),
        ("step", info["step"]),
        ("reason", info["reason"]),
        ("metrics", _format_metrics(info["metrics"] or {})),
        ("world size", info["world_size"]),
        (
            "versions",
            f"dtrain {info['dtrain_version']}, torch {info['torch_version']}, format {info['format_version']}",
        ),
        (
            "parameters",
            f"{info['model_elements']:,} elements in {info['model_tensors']} model tensors (parameters + buffers)",
        ),
        ("tensor bytes", f"{_size(sizes.get('total'))} total: {sections or '(none)'}"),
        ("config", "  ".join(f"{k}={v}" for k, v in info["config_summary"].items()) or "(none)"),
    ]
    for label, value in rows:
        click.echo(f"{label:>13}  {value}")


@ckpt.command(name="inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (config included) instead of text.")
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show epoch, step, metrics, versions, sizes, config and checksum validity of a checkpoint.

    PATH is a checkpoint file, a sharded checkpoint directory (ckpt-e*-s*/, written under
    train.strategy = "fsdp"), a checkpoints directory (its newest valid checkpoint is shown, after a
    listing of all of them), or a run directory containing checkpoints/. Exits 2 when the file fails
    verification or cannot be read.
    """
    from dist_train.checkpoint.catalog import describe_checkpoint, list_checkpoints
    from dist_train.checkpoint.layout import CHECKPOINTS_SUBDIR, parse_sharded_name

    records = []
    if path.is_dir() and parse_sharded_name(path.name) is None:
        directory = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
        records = list_checkpoints(directory)
        if records and not as_json:
            _print_listing(records)
    info = describe_checkpoint(path)
    if as_json:
        payload = {**info, "checkpoints": [record.to_json() for record in records]}
        click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        _print_description(info)
    if not info["valid"]:
        raise CheckpointError(
            f"checkpoint {info['path']} failed verification: {info['problem']}. Do not resume from it; "
            "use an older checkpoint (a directory PATH picks the newest valid one)."
        )


@ckpt.command(name="export")
@click.argument("path", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def export_cmd(path: Path, out: Path) -> None:
    """Write the model weights of a checkpoint as one file OUT, with its metadata in OUT.sha256.json.

    PATH is a run directory (its newest valid checkpoint), a checkpoints directory, or one checkpoint.
    A sharded checkpoint is consolidated in this process (no GPUs, no process group). OUT holds exactly
    the model's state_dict: model.load_state_dict(torch.load(OUT, weights_only=True)). The sidecar
    OUT.sha256.json holds its size and sha256, epoch, step, metrics and the run's config, so that
    `dtrain eval OUT` works while the two files stay together.
    """
    from dist_train.checkpoint.catalog import load_for_reading, resolve_checkpoint_path
    from dist_train.checkpoint.file import export_state

    source = resolve_checkpoint_path(path)
    if out.exists() and out.resolve() == source.resolve():
        raise CheckpointError(f"dtrain ckpt export: OUT {out} is the checkpoint itself; pick another file name.")
    written = export_state(load_for_reading(source), source, out)
    click.echo(
        f"exported the model of {source} -> {written} (+ {written.name}.sha256.json: config, epoch, step, metrics)"
    )
