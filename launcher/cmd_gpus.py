"""`dtrain gpus`: every visible GPU, whether dtrain would call it free, and who is using it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING

import click

from dist_train.config import LaunchConfig

if TYPE_CHECKING:
    from launcher.gpus import GpuStatus

_DEFAULTS = LaunchConfig()


@click.command(name="gpus")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--free-memory-mb",
    type=click.IntRange(min=0),
    default=_DEFAULTS.free_memory_mb,
    show_default=True,
    help="A GPU using this much memory or more is busy (launch.free_memory_mb).",
)
@click.option(
    "--free-util-pct",
    type=click.IntRange(0, 100),
    default=_DEFAULTS.free_util_pct,
    show_default=True,
    help="A GPU at this utilisation or more is busy (launch.free_util_pct).",
)
@click.option(
    "--lock-dir",
    default=_DEFAULTS.lock_dir,
    help="GPU lock directory (launch.lock_dir) [default: /tmp/dtrain-gpu-locks].",
)
def gpus(as_json: bool, free_memory_mb: int, free_util_pct: int, lock_dir: str) -> None:
    """List GPUs: memory, utilisation, processes, and which dtrain job reserved each.

    Respects CUDA_VISIBLE_DEVICES. Set DTRAIN_NVML_RECORD=<file.json> to show recorded states instead
    of the driver's (a test and rehearsal hook).
    """
    # Imported here, not at module load: `dtrain --help` should not pay for GPU code it does not run.
    from launcher.gpus import classify, get_backend, query_visible
    from launcher.reserve import list_holders

    visible, why_none = query_visible(get_backend(os.environ), os.environ)
    statuses = classify(
        visible,
        free_memory_mb=free_memory_mb,
        free_util_pct=free_util_pct,
        holders=list_holders(lock_dir or None, probe=True) if visible else {},
    )
    if as_json:
        click.echo(json.dumps(_as_json(statuses, why_none, lock_dir), indent=2))
    elif not statuses:
        click.echo(f"no GPUs found ({why_none})")
    else:
        click.echo(_table(statuses))


def _as_json(statuses: list[GpuStatus], why_none: str, lock_dir: str) -> dict[str, object]:
    from launcher.reserve import resolve_lock_dir

    return {
        "gpus": [
            {
                **s.gpu.to_dict(),
                "free": s.free,
                "state": s.describe(),
                "busy_reasons": list(s.reasons),
                "reserved_by": None if s.holder is None else asdict(s.holder),
            }
            for s in statuses
        ],
        "no_gpus_reason": why_none,
        "lock_dir": resolve_lock_dir(lock_dir or None),
    }


def _table(statuses: list[GpuStatus]) -> str:
    from launcher.gpus import short_uuid

    header = ("GPU", "UUID", "NAME", "MEMORY (MiB)", "UTIL", "STATE")
    rows: list[tuple[str, ...]] = []
    details: list[list[str]] = []
    for s in statuses:
        g = s.gpu
        label = str(g.index) if g.mig_index is None else f"{g.index}:mig{g.mig_index}"
        util = "-" if g.utilization_pct is None else f"{g.utilization_pct}%"
        state = "free" if s.free else ("reserved" if s.holder else ("MIG parent" if g.mig_enabled else "busy"))
        rows.append((label, short_uuid(g.uuid), g.name, f"{g.memory_used_mb}/{g.memory_total_mb}", util, state))
        lines = [s.holder.describe()] if s.holder else []
        if g.mig_enabled:
            lines.append(s.describe())
        else:
            lines += [r for r in s.reasons if not r.startswith("compute processes")]
        lines += [f"pid {p.pid} {p.user}: {p.command}" for p in g.processes]
        details.append(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip()]
    for row, lines in zip(rows, details, strict=True):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.extend(f"    {line}" for line in lines)
    return "\n".join(out)
