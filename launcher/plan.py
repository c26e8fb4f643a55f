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
    hang_timeout: float = 0.0  # launch.hang_timeout the workers run with, for the failure report
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
        # Read-only datasets: several jobs (and a user's own h5py.File in the worker) may open the
        # same file; HDF5's lock would refuse the second open with other locking settings.
        "HDF5_USE_FILE_LOCKING": "FALSE",
    }
    if cpu:
        env[envvars.DEVICE] = "cpu"
    if debug:
        env[envvars.DEBUG] = "1"
    return env


def worker_env(
    run_dir: Path, *, resume: str, job_id: str, cuda_visible_devices: str | None, nproc: int
) -> dict[str, str]:
    """base_env plus the devices: the chosen GPUs, or CPU workers that split the cores between them."""
    cpu = cuda_visible_devices == ""
    env = base_env(run_dir, resume=resume, job_id=job_id, cpu=cpu)
    if cuda_visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    if cpu:
        env["OMP_NUM_THREADS"] = str(_threads_per_cpu_worker(nproc))
    return env


def debug_plan(
    config_path: Path,
    run_dir: Path,
    *,
    resume: str,
    job_id: str,
    cuda_visible_devices: str = "",
    verbose: bool = False,
    python: str = sys.executable,
) -> LaunchPlan:
    """One process, no torchrun, no process group: on the one reserved GPU, or on the CPU ("").

    Tracebacks of bad-input errors only with ``dtrain --verbose``, as for every other launch.
    """
    cpu = cuda_visible_devices == ""
    env = base_env(run_dir, resume=resume, job_id=job_id, cpu=cpu, debug=True)
    env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    return LaunchPlan(
        argv=(python, *worker_command(config_path), *(["--verbose"] if verbose else [])),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="debug",
        topology=Topology(nproc_per_node=1),
        cuda_visible_devices=cuda_visible_devices,
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
    console_ranks: str = "0",
    hang_timeout: float = 0.0,
    verbose: bool = False,
    python: str = sys.executable,
) -> LaunchPlan:
    """torch.distributed.run through dtrain's thin wrapper (which records failures).

    The launcher reports stops and failures in its own words, so torchrun's own messages go to
    ``launcher/torchrun.log`` and a worker's bad-input error is printed by the launcher alone.
    ``verbose`` (``dtrain --verbose launch``) keeps torchrun's messages on the console and has the
    workers print the tracebacks of bad-input errors.
    """
    summary = run_dir / "launcher" / "failures.json"
    argv: list[str] = [python, "-m", "launcher.torchrun_main", "--summary", str(summary)]
    if not verbose:
        argv += ["--log", str(run_dir / "launcher" / "torchrun.log")]
    argv.append("--")
    argv += [f"--nproc-per-node={topology.nproc_per_node}", f"--max-restarts={max_restarts}"]
    redirects = redirect_spec(topology.nproc_per_node, console_ranks)
    if redirects:
        argv.append(f"--redirects={redirects}")
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
    argv += worker_command(config_path) + (["--verbose"] if verbose else [])
    env = worker_env(
        run_dir, resume=resume, job_id=job_id, cuda_visible_devices=cuda_visible_devices, nproc=topology.nproc_per_node
    )
    # Newer torch honours this for the grace period between SIGTERM and SIGKILL to workers; a
    # preempted worker needs it to finish its checkpoint.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(shutdown_timeout)
    env[envvars.LAUNCHER_REPORTS_ERRORS] = "1"
    if max_restarts > 0:
        # Workers sharing the rendezvous TCPStore read the previous attempt's addresses after a
        # restart (gloo: "connectFullMesh failed ... Connection refused"; pytorch/pytorch#135712).
        # A store of their own per attempt fixes that; single attempts keep the shared store, whose
        # port is the one already known to be reachable between nodes.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return LaunchPlan(
        argv=tuple(argv),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="torchrun",
        topology=topology,
        cuda_visible_devices=cuda_visible_devices,
        summary_file=str(summary),
        hang_timeout=hang_timeout,
    )


def console_local_ranks(console_ranks: str, nproc_per_node: int) -> set[int]:
    """Local ranks whose output reaches the console: "all", or a comma list ("0", "0,3")."""
    if console_ranks.strip() == "all":
        return set(range(nproc_per_node))
    wanted = {int(r) for r in console_ranks.split(",") if r.strip().isdigit()}
    return {r for r in range(nproc_per_node) if r in wanted}


def redirect_spec(nproc_per_node: int, console_ranks: str) -> str:
    """torchrun ``--redirects`` mapping that sends the other ranks' stdout+stderr to files.

    The console ranks stay attached to the terminal (tqdm bar, no line prefixes); the others'
    output (warnings, tracebacks, faulthandler stack dumps) lands in torchrun's per-rank
    ``stdout.log``/``stderr.log`` under ``--log-dir``, where failure reports point.
    """
    shown = console_local_ranks(console_ranks, nproc_per_node)
    hidden = [r for r in range(nproc_per_node) if r not in shown]
    return ",".join(f"{r}:3" for r in hidden)


def _threads_per_cpu_worker(nproc: int) -> int:
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, nproc))


# dtrain's train.precision -> accelerate's --mixed_precision ("auto" means bf16 on GPUs).
ACCELERATE_MIXED_PRECISION = {"fp16": "fp16", "bf16": "bf16", "fp32": "no", "auto": "bf16"}


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

    CPU jobs of several processes are started with ``--multi_gpu`` and *without* ``--cpu``:
    accelerate 1.x turns ``--cpu`` into its single-process launcher (``--num_processes`` is then
    ignored unless MPI is configured), while ``--multi_gpu`` runs torch.distributed.run, which
    needs no GPU; the workers stay on the CPU because ``DTRAIN_DEVICE=cpu`` tells them to.
    """
    cpu = cuda_visible_devices == ""
    mixed = ACCELERATE_MIXED_PRECISION[precision] if not (cpu and precision == "auto") else "no"
    total = topology.nproc_per_node * topology.nnodes
    argv = [python, "-m", "accelerate.commands.launch", f"--num_processes={total}", f"--num_machines={topology.nnodes}"]
    argv += [f"--mixed_precision={mixed}", "--dynamo_backend=no", f"--main_process_port={main_process_port}"]
    if topology.nnodes > 1:
        host = topology.rdzv_endpoint.rsplit(":", 1)[0]
        argv += [f"--machine_rank={topology.node_rank}", f"--main_process_ip={host}"]
    if total > 1:
        argv.append("--multi_gpu")
    elif cpu:
        argv.append("--cpu")
    argv += ["--module", "dist_train", str(config_path)]
    env = worker_env(
        run_dir, resume=resume, job_id=job_id, cuda_visible_devices=cuda_visible_devices, nproc=topology.nproc_per_node
    )
    return LaunchPlan(
        argv=tuple(argv),
        env=tuple(sorted(env.items())),
        run_dir=str(run_dir),
        backend="accelerate",
        topology=topology,
        cuda_visible_devices=cuda_visible_devices,
    )
