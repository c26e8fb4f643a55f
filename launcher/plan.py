"""Launch plans: pure functions from (config, choices) to a frozen argv + environment.

The launcher plans, torchrun executes. Nothing here starts a process, so tests check plans
exactly, and ``dtrain launch --dry-run`` prints the same plan a real launch would run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dist_train import envvars

# Variables a stale shell (or an outer job) could leak into workers and change their meaning.
_SCRUBBED_PREFIXES = ("TORCHELASTIC_", "SLURM_PROCID", "SLURM_LOCALID")
_SCRUBBED = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}


@dataclass(frozen=True)
class Topology:
    """How many processes where, and how they find each other."""

    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""  # host:port of the c10d rendezvous; "" = single node, standalone
    rdzv_id: str = ""

    @property
    def standalone(self) -> bool:
        return self.nnodes == 1 and not self.rdzv_endpoint


@dataclass(frozen=True)
class LaunchPlan:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]  # only the variables the plan sets on top of the inherited ones
    run_dir: str
    backend: str  # "debug" | "torchrun" | "accelerate"
    topology: Topology
    cuda_visible_devices: str | None
    summary_file: str = ""  # where the torchrun wrapper writes which ranks failed
    notes: tuple[str, ...] = field(default_factory=tuple)

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    def full_env(self, base: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in _SCRUBBED and not k.startswith(_SCRUBBED_PREFIXES)}
        env.update(self.env)
        return env

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def worker_command(config_path: Path) -> list[str]:
    """The module torchrun runs on every rank (the worker reads only its config file)."""
    return ["-m", "dist_train", str(config_path)]


def base_env(run_dir: Path, *, resume: str, job_id: str, cpu: bool, debug: bool = False) -> dict[str, str]:
    env = {
        envvars.RUN_DIR: str(run_dir),
        envvars.RESUME: resume,
        envvars.JOB_ID: job_id,
        # One line per print: worker output interleaves sanely and reaches batch logs promptly.
        "PYTHONUNBUFFERED": "1",
    }
    if cpu:
        env[envvars.DEVICE] = "cpu"
    if debug:
        env[envvars.DEBUG] = "1"
    return env


def debug_plan(config_path: Path, run_dir: Path, *, resume: str, job_id: str, python: str = sys.executable) -> LaunchPlan:
    """One process on the CPU, no torchrun, no process group: the laptop path."""
    env = base_env(run_dir, resume=resume, job_id=job_id, cpu=True, debug=True)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return LaunchPlan(
        argv=(python, *worker_command(config_path), "--verbose"),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="debug",
        topology=Topology(nproc_per_node=1),
        cuda_visible_devices="",
    )


def torchrun_plan(
    config_path: Path,
    run_dir: Path,
    topology: Topology,
    *,
    resume: str,
    job_id: str,
    cuda_visible_devices: str | None,
    max_restarts: int = 0,
    shutdown_timeout: int = 120,
    python: str = sys.executable,
) -> LaunchPlan:
    """torch.distributed.run through dtrain's thin wrapper (which only records failures)."""
    summary = run_dir / "launcher" / "failures.json"
    argv: list[str] = [python, "-m", "launcher.torchrun_main", "--summary", str(summary), "--"]
    argv += [f"--nproc-per-node={topology.nproc_per_node}", f"--max-restarts={max_restarts}"]
    if topology.standalone:
        # c10d rendezvous on a port the OS picks for this job: no clash on 29500 between jobs.
        argv.append("--standalone")
    else:
        argv += [
            f"--nnodes={topology.nnodes}",
            f"--node-rank={topology.node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={topology.rdzv_endpoint}",
            f"--rdzv-id={topology.rdzv_id or job_id}",
        ]
    argv += [f"--log-dir={run_dir / 'launcher' / 'torchrun'}"]
    argv += worker_command(config_path)
    env = base_env(run_dir, resume=resume, job_id=job_id, cpu=cuda_visible_devices == "")
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    # Newer torch honours this for the grace period between SIGTERM and SIGKILL to workers; a
    # preempted worker needs it to finish its checkpoint.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
    if cuda_visible_devices == "":
        env["OMP_NUM_THREADS"] = str(_threads_per_cpu_worker(topology.nproc_per_node))
    return LaunchPlan(
        argv=tuple(argv),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="torchrun",
        topology=topology,
        cuda_visible_devices=cuda_visible_devices,
        summary_file=str(summary),
    )


def _threads_per_cpu_worker(nproc: int) -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc))


def accelerate_plan(
    config_path: Path,
    run_dir: Path,
    topology: Topology,
    *,
    resume: str,
    job_id: str,
    cuda_visible_devices: str | None,
    precision: str,
    main_process_port: int,
    python: str = sys.executable,
) -> LaunchPlan:
    """`accelerate launch` of the same worker; the user's accelerate config file still applies.

    Only process count, mixed precision and rendezvous are set from dtrain's config, as flags,
    which accelerate lets override its config file.
    """
    cpu = cuda_visible_devices == ""
    mixed = {"fp16": "fp16", "bf16": "bf16", "fp32": "no", "auto": "no" if cpu else "bf16"}[precision]
    total = topology.nproc_per_node * topology.nnodes
    argv = [python, "-m", "accelerate.commands.launch", f"--num_processes={total}", f"--num_machines={topology.nnodes}"]
    argv += [f"--mixed_precision={mixed}", f"--main_process_port={main_process_port}"]
    if topology.nnodes > 1:
        host = topology.rdzv_endpoint.rsplit(":", 1)[0]
        argv += [f"--machine_rank={topology.node_rank}", f"--main_process_ip={host}"]
    if cpu:
        argv.append("--cpu")
    if total > 1:
        argv.append("--multi_gpu")
    argv += ["--module", "dist_train", str(config_path)]
    env = base_env(run_dir, resume=resume, job_id=job_id, cpu=cpu)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return LaunchPlan(
        argv=tuple(argv),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="accelerate",
        topology=topology,
        cuda_visible_devices=cuda_visible_devices,
    )
