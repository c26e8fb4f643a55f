"""`dtrain ckpt inspect`: what a checkpoint holds and whether its bytes verify. Imports torch only when run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dist_train.errors import CheckpointError


@click.group(name="ckpt")
def ckpt() -> None:
    """Inspect checkpoints (files written by `dtrain launch` under <run_dir>/checkpoints/)."""


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
    validity = "ok (sha256 matches)" if info["valid"] else f"INVALID: {info['problem']}"
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

    PATH is a checkpoint file, a checkpoints directory (its newest valid checkpoint is shown, after a
    listing of all of them), or a run directory containing checkpoints/. Exits 2 when the file fails
    verification or cannot be read.
    """
    from dist_train.checkpoint import CHECKPOINTS_SUBDIR, CheckpointManager, describe_checkpoint

    records = []
    if path.is_dir():
        directory = path / CHECKPOINTS_SUBDIR if (path / CHECKPOINTS_SUBDIR).is_dir() else path
        records = CheckpointManager(directory).list_checkpoints()
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
