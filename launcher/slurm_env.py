"""Recognise a SLURM job step and turn its variables into torchrun's multi-node arguments.

``dtrain launch`` calls :func:`detect_slurm_step` with ``os.environ``. Inside a job step started by
``srun`` (one task per node, as ``slurm/dtrain.sbatch`` does) it returns where this node sits in the
allocation; everywhere else it returns None, so leftover ``SLURM_*`` variables in a login shell or
in the batch shell itself (which has ``SLURM_JOB_ID`` but no step) never change how ``launch`` runs.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dist_train.errors import LaunchError

# Rendezvous ports are derived from the job id so that every node computes the same one without
# talking to the others, and a requeued job (same id) reuses it. The range avoids well-known and
# ephemeral ports (Linux hands out 32768+ to outgoing connections).
RDZV_PORT_BASE = 20000
RDZV_PORT_SPAN = 10000

HostnameExpander = Callable[[str], list[str]]


@dataclass(frozen=True)
class SlurmStep:
    """This node's place in a SLURM job step; what torchrun needs for a c10d rendezvous."""

    job_id: str
    nnodes: int
    node_rank: int
    master_addr: str
    rdzv_port: int
    # Device ids this node may use, as SLURM exposes them ("" entries never appear); [] on CPU nodes.
    gpus: tuple[str, ...]
    restart_count: int
    # Workers per node when SLURM says it (GPUs on the node); 0 = let the launch arguments decide.
    nproc_per_node: int

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.master_addr}:{self.rdzv_port}"

    def torchrun_args(self) -> list[str]:
        """torchrun's multi-node arguments (the caller adds ``--nproc-per-node``)."""
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--rdzv-id={self.job_id}",
        ]


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a SLURM node list (``gpu[01-03],big7``) with ``scontrol show hostnames``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        )
    except FileNotFoundError:
        raise LaunchError(
            "running inside a SLURM job step, but `scontrol` is not on PATH, so the node list "
            f"{nodelist!r} cannot be expanded to find the rendezvous host. Load the slurm module or fix PATH."
        ) from None
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise LaunchError(f"`scontrol show hostnames {nodelist}` failed: {detail.strip()}") from None
    hosts = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if not hosts:
        raise LaunchError(f"`scontrol show hostnames {nodelist}` printed no host names.")
    return hosts


def rdzv_port_for_job(job_id: str) -> int:
    # Array jobs have ids like "1234_7"; only the digits matter for spreading ports.
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return RDZV_PORT_BASE + int(digits) % RDZV_PORT_SPAN


def _int_var(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        if default is None:
            raise LaunchError(f"inside a SLURM job step but ${name} is not set; is this srun output from a SLURM job?")
        return default
    # SLURM writes some counts as "2(x3)"; the leading number is the one for this node.
    head = raw.split("(", 1)[0].split(",", 1)[0]
    try:
        return int(head)
    except ValueError:
        raise LaunchError(f"${name}={raw!r} is not a number; cannot place this node in the SLURM job.") from None


def _visible_gpus(environ: Mapping[str, str]) -> tuple[str, ...]:
    # CUDA_VISIBLE_DEVICES is what the processes will actually see; SLURM sets it for --gpus jobs.
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        raw = environ.get(name, "").strip()
        if raw and raw not in ("NoDevFiles", "-1"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    count = _int_var(environ, "SLURM_GPUS_ON_NODE", 0)
    return tuple(str(i) for i in range(count))


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True only inside ``srun``'s tasks: the batch shell and login shells lack a step id."""
    step = environ.get("SLURM_STEP_ID", environ.get("SLURM_STEPID", "")).strip()
    return bool(environ.get("SLURM_JOB_ID", "").strip()) and bool(step) and "SLURM_PROCID" in environ


def detect_slurm_step(environ: Mapping[str, str], expand_hostnames: HostnameExpander | None = None) -> SlurmStep | None:
    """This node's place in the SLURM job step we run in, or None outside one.

    ``expand_hostnames`` turns a node list into host names (default: ``scontrol show hostnames``);
    tests pass a pure function.
    """
    if not in_slurm_step(environ):
        return None
    job_id = environ["SLURM_JOB_ID"].strip()
    # The step may span fewer nodes than the job; it is the step that trains.
    nnodes = _int_var(environ, "SLURM_STEP_NUM_NODES", _int_var(environ, "SLURM_NNODES", 1))
    ntasks = _int_var(environ, "SLURM_STEP_NUM_TASKS", _int_var(environ, "SLURM_NTASKS", nnodes))
    if ntasks != nnodes:
        raise LaunchError(
            f"SLURM job step {job_id} has {ntasks} tasks on {nnodes} node(s), but `dtrain launch` must run once per "
            "node (it starts that node's workers itself). Use `srun --ntasks-per-node=1 dtrain launch ...` or "
            "`#SBATCH --ntasks-per-node=1`, as slurm/dtrain.sbatch does."
        )
    node_rank = _int_var(environ, "SLURM_NODEID")
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"$SLURM_NODEID={node_rank} is outside the step's {nnodes} node(s).")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nnodes == 1:
        master = "127.0.0.1"  # one node: no name to resolve, and loopback is always reachable
    elif not nodelist:
        raise LaunchError(f"SLURM job step {job_id} spans {nnodes} nodes but $SLURM_JOB_NODELIST is not set.")
    else:
        master = (expand_hostnames or scontrol_hostnames)(nodelist)[0]
    gpus = _visible_gpus(environ)
    return SlurmStep(
        job_id=job_id,
        nnodes=nnodes,
        node_rank=node_rank,
        master_addr=master,
        rdzv_port=rdzv_port_for_job(job_id),
        gpus=gpus,
        restart_count=_int_var(environ, "SLURM_RESTART_COUNT", 0),
        nproc_per_node=len(gpus),
    )
