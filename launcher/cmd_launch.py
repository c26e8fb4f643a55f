"""`dtrain launch`: validate, choose and reserve devices, plan, hand the processes to torchrun."""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from dist_train.checkpoint.layout import CHECKPOINT_GLOB, CHECKPOINTS_SUBDIR, MANIFEST_NAME
from dist_train.config import (
    DEMO_FILE_PREFIX,
    Config,
    check_sync_batchnorm_device,
    load_config,
    make_data_paths_absolute,
    read_toml,
    resolve_data_path,
    resolve_geometry_path,
    save_config,
)
from dist_train.errors import ConfigError, LaunchError
from launcher import plan as plans
from launcher.run_dirs import (
    check_resume_source,
    check_run_kind,
    new_run_dir,
    newest_resumable_run,
    newest_run_if_complete,
    prepare_run_dir,
)


def _echo(message: str) -> None:
    click.echo(message, err=True)


def _is_checkpoint(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and (path / MANIFEST_NAME).is_file())


def resolve_run_dir(cfg: Config, run_dir: str | None, resume: str, *, debug: bool = False) -> tuple[Path, bool]:
    """Returns (run directory, whether it is an existing run that will be resumed).

    ``--debug`` runs and normal runs never continue each other (see launcher/run_dirs.py).
    """
    if resume not in ("auto", "never"):
        check_resume_source(Path(resume), debug=debug)
    if run_dir:
        path = Path(run_dir).expanduser()
        check_run_kind(path, debug=debug)
        has_checkpoints = any((path / CHECKPOINTS_SUBDIR).glob(CHECKPOINT_GLOB))  # files, or sharded directories
        if resume == "never" and has_checkpoints:
            # A fresh run's checkpoints would sit beside the old run's, and a later `--resume auto`
            # would pick whichever has the higher step: two runs mixed into one.
            raise ConfigError(
                f"--resume never with --run-dir {path}: that directory already holds checkpoints of another run. "
                "Use a new --run-dir, resume it (--resume auto), or delete its checkpoints/ folder first."
            )
        return path, has_checkpoints and resume != "never"
    if resume == "auto":
        found = newest_resumable_run(cfg.run.output_dir, cfg.run.name, debug=debug)
        if found is not None:
            return found, True
    return new_run_dir(cfg.run.output_dir, cfg.run.name, debug=debug), False


def ensure_data(cfg: Config, *, dry_run: bool = False) -> None:
    """Pre-flight: the dataset exists (or is generated for demo configs) and has what the config names."""
    from dist_train.data.preflight import preflight_check

    path = resolve_data_path(cfg)
    if not cfg.data.path:
        raise ConfigError(f"{cfg.source}: data.path is empty; set it to your HDF5 file.")
    if not path.exists() and cfg.data.synth_if_missing:
        check_demo_path(cfg, path)
        if dry_run:
            _echo(f"dtrain: {path} does not exist; a real launch generates {cfg.data.synth_events} demo events there")
            make_data_paths_absolute(cfg)
            return
        from dist_train.data.writers.synth import synth_dataset

        _echo(
            f"dtrain: {path} does not exist; generating {cfg.data.synth_events} demo events ({cfg.data.synth_if_missing} layout)"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = tuple(cfg.data.synth_shape) or None
        synth_dataset(
            path,
            layout=cfg.data.synth_if_missing,
            events=cfg.data.synth_events,
            seed=cfg.run.seed,
            shape=shape,
            num_classes=cfg.model.num_classes,
            geometry_path=resolve_geometry_path(cfg) if cfg.data.geometry_file else None,
        )
    # Like data.path: the run directory's config must name the same files from any directory.
    make_data_paths_absolute(cfg)
    info = preflight_check(cfg)
    for note in info.notes:
        _echo(f"dtrain: {note}")
    check_custom_task(cfg)


def check_demo_path(cfg: Config, path: Path) -> None:
    """``synth_if_missing`` writes demo data only at a ``demo*`` file name: a mistyped path to real data
    (in a config copied from the quickstart) stops the launch instead of training on generated events."""
    if path.name.startswith(DEMO_FILE_PREFIX):
        return
    raise ConfigError(
        f"{cfg.source}: data.path {str(path)!r} does not exist. data.synth_if_missing = "
        f"{cfg.data.synth_if_missing!r} generates demo data only at a file name starting with "
        f"{DEMO_FILE_PREFIX!r} (such as the shipped data/demo_wch5.h5), so a mistyped path is never silently "
        "replaced by generated events. Fix data.path, or name a demo file demo_*.h5 "
        '(or set data.synth_if_missing = "" for your own data).'
    )


def check_custom_task(cfg: Config) -> None:
    """A custom task imports and has loss/metrics, checked before any worker starts.

    Workers run ``python -m dist_train`` in this directory, so they import from it; the check
    looks there too. Only custom tasks pay for the import (and torch's, if the module needs it).
    """
    if not cfg.task.is_custom:
        return
    from dist_train.import_path import worker_imports
    from dist_train.tasks.custom import import_task_class

    with worker_imports():
        import_task_class(cfg.task.name)


def check_model_section(cfg: Config, overrides: tuple[str, ...] = ()) -> None:
    """``[model]`` name, import path and keys, before anything is created, reserved or started.

    Read from source, not imported (dist_train/model_check.py): importing torch, or the user's
    module that imports it, would add seconds to every launch. The workers build the model and
    check it again on the real objects, with the data's shape.
    """
    from dist_train.config import parse_override
    from dist_train.model_check import check_model_config

    from_set = {}
    for text in overrides:
        keys, _ = parse_override(text)
        if keys[0] == "model" and len(keys) == 2:
            from_set[keys[1]] = f"--set {text}"

    def origin(key: str) -> str:
        return from_set.get(key, cfg.source)

    check_model_config(cfg.model, origin=origin)


def check_training_strategy(cfg: Config) -> None:
    """``train.strategy = "fsdp"`` needs a newer torch than DDP; said before any worker starts."""
    from dist_train.config import check_strategy_supported

    check_strategy_supported(cfg)


def check_settings_for_devices(cfg: Config, devices: Devices) -> None:
    """Settings that need GPUs, once the launch knows whether it has any (before anything is created)."""
    world_size = devices.topology.nproc_per_node * devices.topology.nnodes
    check_sync_batchnorm_device(cfg, device_type="cuda" if devices.cuda_visible else "cpu", world_size=world_size)


def _job_id() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}:{os.getpid()}"


def _slurm_step() -> Any:
    from launcher.slurm_env import detect_slurm_step

    return detect_slurm_step(os.environ)


def _cpu_plan_or_reserve(
    cfg: Config, gpus: str, nproc: int | None, opts: dict[str, Any], run_dir: Path
) -> tuple[str, int, Any]:
    """Returns (CUDA_VISIBLE_DEVICES for workers, processes per node, reservation or None)."""
    if gpus == "cpu":
        return "", nproc or cfg.launch.nproc or 1, None
    reservation = _reserve(cfg, gpus, opts, run_dir)
    if reservation.cpu_fallback or reservation.on_cpu:
        if reservation.notice:
            _echo(reservation.notice)
        return "", nproc or cfg.launch.nproc or 1, reservation
    picked = ", ".join(f"GPU {g.index} ({g.uuid})" for g in reservation.gpus)
    _echo(f"dtrain: reserved {picked}")
    return reservation.cuda_visible_devices(), len(reservation.gpus), reservation


def _reserve(cfg: Config, gpus: str, opts: dict[str, Any], run_dir: Path, *, single: bool = False) -> Any:
    """choose_and_reserve with the thresholds, lock directory and waiting of the flags or the config."""
    from launcher.reserve import choose_and_reserve

    return choose_and_reserve(
        gpus,
        free_memory_mb=opts["free_memory_mb"] if opts["free_memory_mb"] is not None else cfg.launch.free_memory_mb,
        free_util_pct=opts["free_util_pct"] if opts["free_util_pct"] is not None else cfg.launch.free_util_pct,
        lock_dir=opts["lock_dir"] or cfg.launch.lock_dir or None,
        force=opts["force"],
        wait=opts["wait"],
        timeout=opts["timeout"],
        job_id=_job_id(),
        run_dir=str(run_dir),
        single=single,
    )


def build_plan(
    cfg: Config,
    config_path: Path,
    run_dir: Path,
    *,
    debug: bool,
    resume: str,
    backend: str,
    verbose: bool = False,
    cuda_visible: str | None,
    topology: plans.Topology,
    max_restarts: int,
    job_id: str,
) -> plans.LaunchPlan:
    if debug:
        return plans.debug_plan(
            config_path, run_dir, resume=resume, job_id=job_id, cuda_visible_devices=cuda_visible or "", verbose=verbose
        )
    if backend == "accelerate":
        port = int(topology.rdzv_endpoint.rsplit(":", 1)[1]) if topology.rdzv_endpoint else free_port()
        return plans.accelerate_plan(
            config_path,
            run_dir,
            topology,
            resume=resume,
            job_id=job_id,
            cuda_visible_devices=cuda_visible,
            precision=cfg.train.precision,
            main_process_port=port,
        )
    return plans.torchrun_plan(
        config_path,
        run_dir,
        topology,
        resume=resume,
        job_id=job_id,
        cuda_visible_devices=cuda_visible,
        max_restarts=max_restarts,
        shutdown_timeout=cfg.launch.shutdown_timeout,
        console_ranks=cfg.launch.console_ranks,
        hang_timeout=cfg.launch.hang_timeout,
        verbose=verbose,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_run_dir_writable(run_dir: Path) -> None:
    """Pre-flight, before anything is created or reserved: the run directory can be made and written."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable by you"
        raise LaunchError(
            f"cannot create the run directory {run_dir}: {existing} {what}. "
            "Pick another --run-dir or set run.output_dir."
        )


def create_run_dir(run_dir: Path, *, lock: bool, debug: bool = False) -> tuple[Path, int | None]:
    try:
        return prepare_run_dir(run_dir, lock=lock, debug=debug)
    except OSError as exc:
        raise LaunchError(
            f"cannot create the run directory {run_dir}: {exc.strerror or exc}. Pick another --run-dir or set run.output_dir."
        ) from None


@dataclass
class Devices:
    """Where the workers run: the plan's topology, their CUDA_VISIBLE_DEVICES, and the GPU locks held."""

    topology: plans.Topology
    cuda_visible: str | None
    job_id: str
    reservation: Any = None


def choose_devices(cfg: Config, opts: dict[str, Any], run_dir: Path) -> Devices:
    if opts["debug"]:
        return _debug_devices(cfg, opts, run_dir)
    gpus = opts["gpus"] or cfg.launch.gpus
    step = _slurm_step()
    if step is not None:
        return _slurm_devices(cfg, opts, step, gpus)
    topology_args = _multi_node_args(opts)
    cuda_visible, nproc, reservation = _cpu_plan_or_reserve(cfg, gpus, opts["nproc"], opts, run_dir)
    return Devices(plans.Topology(nproc_per_node=nproc, **topology_args), cuda_visible, _job_id(), reservation)


def _debug_devices(cfg: Config, opts: dict[str, Any], run_dir: Path) -> Devices:
    """--debug's one process: one free GPU, reserved and locked like any job's, or the CPU."""
    request = _debug_gpu_request(cfg, opts["gpus"])
    step = _slurm_step()
    if step is not None:
        # SLURM already gave this node its devices: the first of them, no search, no locks.
        on_gpu = bool(step.gpus) and request != "cpu"
        return Devices(plans.Topology(nproc_per_node=1), step.gpus[0] if on_gpu else "", f"slurm-{step.job_id}")
    if request == "cpu":
        return Devices(plans.Topology(nproc_per_node=1), "", _job_id())
    reservation = _reserve(cfg, request, opts, run_dir, single=True)
    if reservation.on_cpu:
        if reservation.notice:
            _echo(reservation.notice)
        return Devices(plans.Topology(nproc_per_node=1), "", _job_id(), reservation)
    (gpu,) = reservation.gpus
    _echo(f"dtrain: reserved GPU {gpu.index} ({gpu.uuid}) for the --debug process")
    return Devices(plans.Topology(nproc_per_node=1), reservation.cuda_visible_devices(), _job_id(), reservation)


def check_debug_options(opts: dict[str, Any]) -> None:
    """--debug is one process: flags asking for more are refused before anything is created or reserved."""
    if not opts["debug"]:
        return
    if opts["gpus"] is not None:
        from launcher.gpus import single_gpu_request

        single_gpu_request(opts["gpus"])
    for flag, value in (("--nproc", opts["nproc"]), ("--nnodes", opts["nnodes"])):
        if value is not None and value > 1:
            raise ConfigError(
                f"{flag} {value} with --debug: debug mode runs one process (no torchrun, no process group). "
                f"Leave out {flag}, or launch without --debug to run several processes."
            )


def _debug_gpu_request(cfg: Config, flag: str | None) -> str:
    """--gpus as given (checked by check_debug_options), or the config's launch.gpus cut down to one GPU."""
    from launcher.gpus import one_gpu_of

    if flag is not None:
        return flag.strip().lower() if flag.strip().lower() in ("auto", "cpu") else flag
    request = one_gpu_of(cfg.launch.gpus)
    if request != cfg.launch.gpus:
        _echo(f"dtrain: --debug runs one process: --gpus {request} instead of launch.gpus = {cfg.launch.gpus!r}")
    return request


def _multi_node_args(opts: dict[str, Any]) -> dict[str, Any]:
    nnodes = opts["nnodes"] or 1
    node_rank = opts["node_rank"] or 0
    if nnodes > 1 and not opts["rdzv_endpoint"]:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint host:port (the first node's address).")
    if nnodes > 1 and not opts["run_dir"]:
        raise ConfigError(
            "--nnodes > 1 needs --run-dir on a shared filesystem: every node must use the same run directory "
            "(a new one is named by the launch time, which differs between nodes)."
        )
    if not 0 <= node_rank < nnodes:
        raise ConfigError(f"--node-rank {node_rank} must be between 0 and --nnodes - 1 ({nnodes - 1}).")
    endpoint = opts["rdzv_endpoint"] or ""
    if endpoint and not _valid_endpoint(endpoint):
        raise ConfigError(f"--rdzv-endpoint {endpoint!r}: expected host:port, e.g. node001:29400.")
    return {"nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": endpoint}


def _valid_endpoint(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _slurm_devices(cfg: Config, opts: dict[str, Any], step: Any, gpus: str) -> Devices:
    """Inside a SLURM job step: SLURM already gave this node its devices; no search, no locks."""
    on_gpus = bool(step.gpus) and gpus != "cpu"
    cuda_visible = ",".join(step.gpus) if on_gpus else ""
    if on_gpus:
        nproc = opts["nproc"] or step.nproc_per_node or len(step.gpus)
    else:
        nproc = opts["nproc"] or cfg.launch.nproc or 1
    topology = plans.Topology(
        nproc_per_node=nproc,
        nnodes=step.nnodes,
        node_rank=step.node_rank,
        rdzv_endpoint=step.rdzv_endpoint,
        rdzv_id=step.job_id,
    )
    return Devices(topology, cuda_visible, f"slurm-{step.job_id}")


@click.command(name="launch", context_settings={"show_default": True})
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config value (repeatable)."
)
@click.option("--gpus", default=None, help="auto | N | 0,3 | cpu  (default: [launch] gpus)")
@click.option("--nproc", type=int, default=None, help="Workers per node for --gpus cpu (default: [launch] nproc or 1).")
@click.option(
    "--debug",
    is_flag=True,
    help="One process without torchrun on one free GPU (or the CPU), few batches, anomaly detection; "
    "debug runs are kept apart from normal runs.",
)
@click.option(
    "--run-dir", default=None, help="Run directory (default: newest unfinished run of this config, or a new one)."
)
@click.option("--resume", default="auto", help="auto | never | PATH to a checkpoint.")
@click.option("--backend", type=click.Choice(["torchrun", "accelerate"]), default=None, help="Process launcher.")
@click.option("--max-restarts", type=int, default=None, help="torchrun restarts after a failure (each resumes).")
@click.option("--nnodes", type=int, default=None, help="Nodes in a multi-node job (inside SLURM: automatic).")
@click.option("--node-rank", type=int, default=None, help="This node's rank in a multi-node job.")
@click.option("--rdzv-endpoint", default=None, help="host:port of the c10d rendezvous for multi-node jobs.")
@click.option("--wait", is_flag=True, help="Wait until enough GPUs are free.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait with --wait.")
@click.option("--force", is_flag=True, help="Use the listed GPUs even if they look busy.")
@click.option("--free-memory-mb", type=int, default=None, help="A GPU using less memory than this counts as free.")
@click.option("--free-util-pct", type=int, default=None, help="A GPU below this utilisation counts as free.")
@click.option("--lock-dir", default=None, help="Directory of the per-GPU reservation locks.")
@click.option("--dry-run", is_flag=True, help="Print the launch plan as JSON and exit.")
def launch(config: str, overrides: tuple[str, ...], **opts: Any) -> None:
    """Train CONFIG on free GPUs (or the CPU) through torchrun; rerun the same command to resume."""
    phases = _PhaseTimer()
    cfg = load_config(config, list(overrides))
    resume = opts["resume"]
    if resume not in ("auto", "never") and not _is_checkpoint(Path(resume)):
        raise ConfigError(
            f"--resume {resume!r}: no such checkpoint. Use auto, never, or a path to a .pt file "
            "(or to a sharded checkpoint directory ckpt-e*-s*/ holding a manifest.json)."
        )
    check_debug_options(opts)
    backend = opts["backend"] or cfg.launch.backend
    phases.mark("config")
    check_model_section(cfg, overrides)
    check_training_strategy(cfg)
    phases.mark("model check")
    ensure_data(cfg, dry_run=opts["dry_run"])
    phases.mark("data check")
    run_dir, resuming = resolve_run_dir(cfg, opts["run_dir"], resume, debug=opts["debug"])
    run_dir = run_dir.absolute()
    check_run_dir_writable(run_dir)
    phases.mark("run dir")
    devices = choose_devices(cfg, opts, run_dir)
    phases.mark("devices (NVML query, reservation)")
    run_lock: int | None = None
    try:
        check_settings_for_devices(cfg, devices)
        launch_plan = build_plan(
            cfg,
            run_dir / "config.toml",
            run_dir,
            debug=opts["debug"],
            resume=resume,
            backend=backend,
            verbose=_verbose(),
            cuda_visible=devices.cuda_visible,
            topology=devices.topology,
            max_restarts=opts["max_restarts"] if opts["max_restarts"] is not None else cfg.launch.max_restarts,
            job_id=devices.job_id,
        )
        if opts["dry_run"]:
            # Nothing is created or started: the plan names the run directory a real launch would use.
            click.echo(launch_plan.to_json())
            return
        # Node 0 alone locks a multi-node job's shared run directory.
        run_dir, run_lock = create_run_dir(run_dir, lock=devices.topology.node_rank == 0, debug=opts["debug"])
        save_config(cfg, run_dir / "config.toml")
        _echo(
            run_dir_text(
                cfg,
                config,
                run_dir,
                resuming=resuming,
                auto=resume == "auto" and not opts["run_dir"],
                debug=opts["debug"],
            )
        )
        phases.mark("plan, run dir, config copy")
        if _verbose():
            _echo(f"dtrain: {PHASES_LABEL} {phases.report()}")
        outcome = run_plan(launch_plan)
    finally:
        if devices.reservation is not None:
            devices.reservation.release()
        if run_lock is not None:
            os.close(run_lock)
    if outcome.message:
        _echo(outcome.message)
    if outcome.exit_code:
        # SystemExit, not click's Exit: click returns Exit's code from main(standalone_mode=False),
        # and launcher.cli.main drops that return value.
        sys.exit(outcome.exit_code)


def run_dir_text(cfg: Config, config: str, run_dir: Path, *, resuming: bool, auto: bool, debug: bool) -> str:
    """ "resuming run in ..." or "new run in ..."; a new run that follows a complete one says how to extend that one."""
    if resuming:
        return f"dtrain: resuming run in {run_dir}"
    complete = newest_run_if_complete(cfg.run.output_dir, cfg.run.name, debug=debug) if auto else None
    if complete is None or complete.absolute() == run_dir:
        return f"dtrain: new run in {run_dir}"
    epochs = _trained_epochs(complete)
    more = f"N (more than its {epochs})" if epochs else "N"
    return (
        f"dtrain: the newest run of {cfg.run.name!r}, {complete}, is complete; starting a new run from scratch in "
        f"{run_dir} (to train the complete run further instead: dtrain launch {config} --run-dir {complete} "
        f"--set train.epochs={more})"
    )


def _trained_epochs(run_dir: Path) -> int | None:
    """train.epochs of a run's saved config.toml (None if unreadable)."""
    try:
        epochs = read_toml(run_dir / "config.toml").get("train", {}).get("epochs")
    except (ConfigError, OSError):
        return None
    return epochs if isinstance(epochs, int) else None


# The label of the `--verbose` phase line; benchmarks/compare.py finds the line by it.
PHASES_LABEL = "launcher time before torchrun:"


class _PhaseTimer:
    """Where the launcher's own start-up time goes (printed with ``dtrain --verbose launch``)."""

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self._phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self._phases.append((name, now - self._last))
        self._last = now

    def report(self) -> str:
        parts = ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self._phases)
        return f"{parts}; total {self._last - self._start:.3f} s since the command was parsed"


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context is not None and context.find_root().params.get("verbose"))


def run_plan(launch_plan: plans.LaunchPlan) -> Any:
    from launcher.execute import run_plan as execute

    return execute(launch_plan)
