"""dtrain against its peers on the same model, HDF5 file, global batch, fp32, Adam and steps (issue 7).

Contenders (each a fresh set of processes; all but dtrain started by torchrun running this file
with ``--worker``; P = 1 and 2 processes, gloo on the CPU, nccl with ``--device cuda``):

* ``dtrain``         ``dtrain launch CFG --gpus cpu --nproc P`` (its own launcher, batched HDF5 loader);
                     numbers from its ``metrics.jsonl`` epoch record.
* ``dtrain-compiled`` the same with ``train.compile = true`` (``--compile-mode``; compiled in the warm-up
                     epoch, inductor's cache shared by all compiled runs of one invocation).
* ``ddp``            the plain PyTorch DDP loop of the DDP tutorial: DistributedSampler + DataLoader,
                     ``DistributedDataParallel``, zero_grad / backward / step.
* ``accelerate``     ``Accelerator().prepare(model, optimizer, loader)`` + ``accelerator.backward``.
* ``fabric``         ``Fabric(accelerator, devices=P, strategy="ddp")``, ``setup`` / ``setup_dataloaders``
                     / ``fabric.backward``.

Peers read data two ways: ``h5`` = the map-style Dataset their users write (h5py opened lazily in
each process, one sample per ``__getitem__``, default_collate) -- like for like with dtrain, which
reads the same file; ``mem`` = the whole file in a TensorDataset (isolates the training-loop cost;
dtrain still reads the HDF5 file there, from the page cache). Every contender keeps its loss and
accuracy sums on the device (no per-step ``.item()``), as dtrain does.

Measurement: 2 epochs of ``steps`` optimizer steps; epoch 1 is warm-up, epoch 2 is timed (from
creating the loader iterator to the last step, the slowest rank's time). Contenders run interleaved
(A B C D A B C D ...), ``repeats`` times; medians are reported. Data-wait fraction = time blocked
in ``next(loader)`` / epoch time. Peak memory = ru_maxrss of rank 0 (loader workers excluded).

Further sections: strong scaling (dtrain and DDP, 2 processes x 1 thread vs 1 process x 2 threads,
same global batch; DDP gradient all-reduce cost from a ``no_sync`` run), cost growth (epoch time and
memory for 10^4..10^6 samples; checkpoint time and size for 10^5..10^8 parameters) and start-up
(``dtrain launch`` to the first training step vs ``torchrun`` started directly on the same worker).

Goal of issue 24 (GPU): compiled dtrain at least 1.3x the in-memory DDP loop, the GPU busy (NVML
utilisation over the timed epoch) at least 95%. On the CPU the busy figure is not measured. The goal's
workloads (GPU batch 256; name them with ``--workloads``, they are not in the defaults):

* ``resnet18_mpmt``  ResNet-18 (small-input stem) on 38x16x40 mPMT images (wch5 demo layout, channels first).
* ``resnet18_hits``  the same network on a hit-list file (synth_hits's demo detector, configs/hits_resnet.toml's
                     data): dtrain builds the mPMT images from the hits while reading (``data.format = "hits"``).
                     The peers have no hit-list reader, so they (plain DDP over h5py, in-memory DDP,
                     Accelerate, Fabric) read the SAME events already converted to images (``convert_hits``,
                     what ``dtrain data convert`` writes): dtrain does more work per sample than they do.
* ``tutorial_cnn``   the tutorial's SimpleCNN (configs/tutorial_cnn.toml's model) on resnet18_mpmt's images.

Usage: python benchmarks/compare.py [--quick] [--json OUT.json] [--plot OUT.png] [--device cpu|cuda]
           [--workloads mlp,cnn,simple_mlp,resnet18,resnet18_mpmt,resnet18_hits,tutorial_cnn] [--nprocs 1,2]
           [--repeats N] [--sections ...]
           [--compile-mode default|reduce-overhead|...] [--no-compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    GOAL_WORKLOADS,
    REPO,
    WORKLOADS,
    LazyH5Dataset,
    Workload,
    build_workload_model,
    dtrain_config,
    ensure_data,
    in_memory_dataset,
    load_average,
    machine_summary,
    median,
    peak_rss_mb,
    peer_data,
    result_line,
)

PEERS = ("ddp", "accelerate", "fabric")
GLOBAL_BATCH = {
    "mlp": 64,
    "cnn": 64,
    "simple_mlp": 64,
    "resnet18": 128,
    # The goal's workloads are GPU workloads: on the CPU only small batches, to check they run.
    "resnet18_mpmt": 32,
    "resnet18_hits": 32,
    "tutorial_cnn": 64,
}
# Full CPU runs time epochs of a few seconds: a 1 s epoch (cnn had 30 steps) swung 1.4x between repeats
# on this 2-core VM and put cnn at 0.83x the in-memory loop in one run and 1.03x in the next.
STEPS = {
    "mlp": 800,
    "cnn": 150,
    "simple_mlp": 120,
    "resnet18": 5,
    "resnet18_mpmt": 6,
    "resnet18_hits": 6,
    "tutorial_cnn": 40,
}
QUICK_STEPS = {
    "mlp": 200,
    "cnn": 10,
    "simple_mlp": 20,
    "resnet18": 3,
    "resnet18_mpmt": 3,
    "resnet18_hits": 3,
    "tutorial_cnn": 5,
}
# On a GPU a step takes a millisecond or less: larger batches, and enough steps for a timed epoch of
# about a second or more (each epoch reads every sample of its file once). The goal's workloads all
# run at batch 256 (issue 24) with equal steps, so resnet18_mpmt and tutorial_cnn share one file.
GPU_GLOBAL_BATCH = {
    "mlp": 512,
    "cnn": 512,
    "simple_mlp": 128,
    "resnet18": 256,
    **dict.fromkeys(GOAL_WORKLOADS, 256),
}
GPU_STEPS = {"mlp": 400, "cnn": 300, "simple_mlp": 100, "resnet18": 150, **dict.fromkeys(GOAL_WORKLOADS, 150)}
# 80 steps of 256: a timed epoch of about a second at the goal's 21,000 samples/s, so NVML's busy
# figure (sampled every 50 ms) averages a few dozen samples.
GPU_QUICK_STEPS = {"mlp": 100, "cnn": 60, "simple_mlp": 30, "resnet18": 40, **dict.fromkeys(GOAL_WORKLOADS, 80)}
PRECISIONS = {  # --precision: dtrain's train.precision, Accelerate's mixed_precision, Fabric's precision
    "fp32": ("fp32", "no", "32-true"),
    "bf16": ("bf16", "bf16", "bf16-mixed"),
    "fp16": ("fp16", "fp16", "16-mixed"),
}
PEER_TARGET = 1.0  # dtrain / each peer, like-for-like HDF5 data
PLAIN_TARGET = 0.98  # dtrain / the plain DDP loop with in-memory data (the strongest plain loop)
STARTUP_TARGET_S = 1.0
DATA_WAIT_TARGET = 0.05  # resnet18 on a GPU with 8 loader workers: the GPU must not wait for data
DATA_WAIT_WORKLOADS = ("resnet18", *GOAL_WORKLOADS)  # workloads with a GPU data-wait RESULT line
COMPILED_TARGET = 1.3  # compiled dtrain / the in-memory DDP loop (issue 24)
GPU_BUSY_TARGET_PCT = 95.0  # compiled dtrain's GPU utilisation over the timed epoch (issue 24)
# The throughput table's note under a hit-list workload.
HITS_NOTE = (
    "dtrain reads the hit-list file and builds the images; the other contenders have no hit-list reader "
    "and read the same events already converted to images"
)
PY = sys.executable
THIS = Path(__file__).resolve()


# ============================================================================ worker side (torchrun)
def _device_for(spec: dict[str, Any], local_rank: int) -> Any:
    import torch

    if spec["device"] == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _dataset(spec: dict[str, Any]) -> Any:
    path = Path(spec["data"])
    return LazyH5Dataset(path) if spec["variant"] == "h5" else in_memory_dataset(path)


def _loader_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_workers": spec["num_workers"], "pin_memory": spec["device"] == "cuda"}
    if spec["num_workers"] > 0:
        kwargs["persistent_workers"] = True
    return kwargs


def _timed_epochs(
    loader: Any, step: Callable[[Any, Any], int], steps: int, set_epoch: Callable[[int], None], sync: Callable[[], None]
) -> dict[str, float]:
    """Epoch 0 warms up; epoch 1 is timed: wall time from iterator creation, and time inside next()."""
    import time as _time

    stats: dict[str, float] = {}
    for epoch in range(2):
        set_epoch(epoch)
        wall_start = _time.time()
        start = _time.perf_counter()
        wait, samples = 0.0, 0
        batches = iter(loader)
        for _ in range(steps):
            t0 = _time.perf_counter()
            x, y = next(batches)
            wait += _time.perf_counter() - t0
            samples += step(x, y)
        sync()
        del batches
        stats = {
            "time": _time.perf_counter() - start,
            "wait": wait,
            "samples": float(samples),
            "wall_start": wall_start,
            "wall_end": _time.time(),
        }
    return stats


def _reduce_and_write(spec: dict[str, Any], stats: dict[str, float], rank: int) -> None:
    """Global samples over the slowest rank's time, as dtrain's StepTimer reports it."""
    import torch
    import torch.distributed as dist

    times = torch.tensor([stats["time"]], dtype=torch.float64)
    sums = torch.tensor([stats["samples"], stats["wait"], stats["time"]], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        times, sums = times.to(device), sums.to(device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    if rank == 0:
        slowest = float(times[0])
        result = {
            "samples_per_s": float(sums[0]) / slowest,
            "data_wait_frac": float(sums[1]) / float(sums[2]),
            "epoch_time_s": slowest,
            "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads(),
            "window": [stats["wall_start"], stats["wall_end"]],
        }
        Path(spec["out"]).write_text(json.dumps(result))


def _loss_step(
    model: Any,
    criterion: Any,
    optimizer: Any,
    device: Any,
    backward: Callable[[Any], None],
    sums: Any,  # type: ignore[no-untyped-def]
    autocast: Callable[[], Any] | None = None,
    scaler: Any = None,
):
    """forward, loss, zero_grad, backward, step; loss and accuracy sums stay on the device. ``autocast``
    and ``scaler`` are the AMP recipe's for a hand-written loop (frameworks do both inside their wrappers)."""
    import contextlib

    import torch

    def step(x: Any, y: Any) -> int:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast() if autocast else contextlib.nullcontext():
            output = model(x)
            loss = criterion(output, y)
        optimizer.zero_grad()
        if scaler is not None:
            backward(scaler.scale(loss))
            scaler.step(optimizer)
            scaler.update()
        else:
            backward(loss)
            optimizer.step()
        with torch.no_grad():
            sums.add_(torch.stack([loss.detach() * y.shape[0], (output.argmax(dim=1) == y).sum().to(sums.dtype)]))
        return int(y.shape[0])

    return step


def worker_ddp(spec: dict[str, Any]) -> None:
    """The DDP tutorial's loop (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK)."""
    import contextlib

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler

    dist.init_process_group("nccl" if spec["device"] == "cuda" else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    device = _device_for(spec, local_rank)
    dataset = _dataset(spec)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=spec["batch"], sampler=sampler, **_loader_kwargs(spec))
    torch.manual_seed(0)
    model = build_workload_model(WORKLOADS[spec["workload"]]).to(device)
    model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sums = torch.zeros(2, device=device)

    def backward(loss: Any) -> None:
        # no_sync = compute only: the difference to a normal run is the gradient all-reduce's cost.
        with model.no_sync() if spec.get("no_sync") else contextlib.nullcontext():
            loss.backward()

    precision = spec.get("precision", "fp32")
    autocast = None
    if precision != "fp32":  # the AMP recipe of PyTorch's docs: autocast around forward + loss
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, device, backward, sums, autocast, scaler)
    stats = _timed_epochs(loader, step, spec["steps"], sampler.set_epoch, _sync_fn(device))
    _reduce_and_write(spec, stats, rank)
    dist.barrier()  # no rank tears gloo down while another still talks to it (that aborts the peer)
    dist.destroy_process_group()


def worker_accelerate(spec: dict[str, Any]) -> None:
    """Accelerate's quick-tour loop."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    mixed = PRECISIONS[spec.get("precision", "fp32")][1]
    accelerator = Accelerator(cpu=spec["device"] == "cpu", mixed_precision=mixed)
    dataset = _dataset(spec)
    loader = DataLoader(dataset, batch_size=spec["batch"], shuffle=True, **_loader_kwargs(spec))
    torch.manual_seed(0)
    model = build_workload_model(WORKLOADS[spec["workload"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sums = torch.zeros(2, device=accelerator.device)
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, accelerator.device, accelerator.backward, sums)
    stats = _timed_epochs(loader, step, spec["steps"], loader.set_epoch, _sync_fn(accelerator.device))
    _reduce_and_write(spec, stats, accelerator.process_index)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def worker_fabric(spec: dict[str, Any]) -> None:
    """Lightning Fabric's loop; under torchrun Fabric joins the existing processes instead of spawning."""
    import torch
    from lightning.fabric import Fabric
    from torch.utils.data import DataLoader

    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    accelerator = "cuda" if spec["device"] == "cuda" else "cpu"
    precision = PRECISIONS[spec.get("precision", "fp32")][2]
    fabric = Fabric(
        accelerator=accelerator, devices=nproc, strategy="ddp" if nproc > 1 else "auto", precision=precision
    )
    fabric.launch()
    dataset = _dataset(spec)
    loader = DataLoader(dataset, batch_size=spec["batch"], shuffle=True, **_loader_kwargs(spec))
    torch.manual_seed(0)
    model = build_workload_model(WORKLOADS[spec["workload"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(loader)
    sums = torch.zeros(2, device=fabric.device)
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, fabric.device, fabric.backward, sums)

    def set_epoch(epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    stats = _timed_epochs(loader, step, spec["steps"], set_epoch, _sync_fn(fabric.device))
    _reduce_and_write(spec, stats, fabric.global_rank)
    fabric.barrier()


def _sync_fn(device: Any) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


WORKERS = {"ddp": worker_ddp, "accelerate": worker_accelerate, "fabric": worker_fabric}


# ============================================================================ driver side
@dataclass
class Run:
    """One measured run of one contender."""

    workload: str
    contender: str  # dtrain | dtrain-compiled | ddp | accelerate | fabric (| ddp-nosync)
    variant: str  # h5 | mem
    nproc: int
    samples_per_s: float = float("nan")
    data_wait_frac: float = float("nan")
    peak_rss_mb: float = float("nan")
    epoch_time_s: float = float("nan")
    wall_s: float = float("nan")
    gpu_util_pct: float = float("nan")  # mean NVML utilisation over the timed epoch (GPU runs)
    rss_anon_mb: float = float("nan")  # dtrain's own memory without memory-mapped file pages (growth)
    error: str = ""

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.contender}-{self.variant}/P{self.nproc}"


class GpuMonitor:
    """NVML utilisation of GPU 0 sampled every 50 ms in a thread; runs ask for their timed window's mean."""

    def __init__(self, period_s: float = 0.05) -> None:
        import threading

        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self._samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(period_s,), daemon=True, name="gpu-monitor")
        self._thread.start()

    def _poll(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            self._samples.append((time.time(), int(util)))

    def mean_between(self, start: float, end: float) -> float:
        inside = [u for t, u in list(self._samples) if start <= t <= end]
        return sum(inside) / len(inside) if inside else float("nan")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()


@dataclass
class Settings:
    device: str
    num_workers: int
    quick: bool
    workdir: Path
    steps: dict[str, int] = field(default_factory=dict)
    verbose: bool = False
    threads: int = 0  # per process; 0 = cores // P, what dtrain launch gives CPU workers
    precision: str = "fp32"
    batch: dict[str, int] = field(default_factory=lambda: dict(GLOBAL_BATCH))
    gpu_monitor: GpuMonitor | None = None
    compile_mode: str = "default"  # the dtrain-compiled contender's train.compile_mode


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_env(nproc: int, settings: Settings, threads: int | None = None) -> dict[str, str]:
    """What dtrain's launcher gives its CPU workers: cores // nproc threads each, no stray rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(threads or max(1, cores() // nproc))
    env["PYTHONWARNINGS"] = "ignore"
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


_ROOT_CAUSE = "Root Cause (first observed failure):"
_TRACEBACK = "Traceback (most recent call last):"


def failure_report(output: str) -> str:
    """What went wrong in a failed run, ending with the line that says why (the runner prints the last line).

    torchrun's own output ends with its ``=====`` summary; the useful part is the root-cause rank's
    exception. Workers run under ``@record``, so the summary's root-cause entry carries that rank's
    traceback; without it (a rank killed by a signal, a failure before the worker function), the
    last traceback the workers printed is the cause. Output that is not torchrun's (dtrain launch's
    own failure report) is kept as it is."""
    if _ROOT_CAUSE in output:
        entry = output.split(_ROOT_CAUSE, 1)[1].split("=" * 20, 1)[0]
        fields = dict(re.findall(r"^\s*(rank|exitcode)\s*:\s*(.*?)\s*$", entry, re.MULTILINE))
        who = f"root cause: rank {fields.get('rank', '?')}, exit code {fields.get('exitcode', '?')}"
        if _TRACEBACK in entry:
            trace = entry.split(_TRACEBACK, 1)[1].rstrip()
            return f"{who}\n{_TRACEBACK}\n{textwrap.dedent(trace).strip(chr(10))}"
        # The workers' own tracebacks (torchrun's, raising ChildFailedError, is not one of them).
        own = [block for block in output.split(_TRACEBACK)[1:] if "torch/distributed/run.py" not in block]
        if own:
            return f"{who}\n{_TRACEBACK}\n" + "\n".join(_one_traceback(own[-1]))
        return who
    return output.strip()[-2000:]


def _one_traceback(text: str) -> list[str]:
    """The frames of a traceback (indented) up to its first unindented line: the exception itself."""
    lines = []
    for line in text.splitlines():
        if not line.strip():
            continue
        lines.append(line)
        if not line.startswith(" "):
            break
    return lines[-30:]


def _run_process(argv: list[str], env: dict[str, str], timeout: float, verbose: bool) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return wall, failure_report(proc.stderr or proc.stdout)
    if verbose:
        print(proc.stderr[-1000:])
    return wall, ""


def run_peer(
    run: Run, data: Path, steps: int, settings: Settings, *, no_sync: bool = False, threads: int | None = None
) -> Run:
    fd, name = tempfile.mkstemp(prefix="peer-", suffix=".json", dir=settings.workdir)
    os.close(fd)  # rank 0 writes it; the driver only needs the name
    out = Path(name)
    spec = {
        "workload": run.workload,
        "data": str(data),
        "variant": run.variant,
        "device": settings.device,
        "batch": settings.batch[run.workload] // run.nproc,
        "steps": steps,
        "num_workers": settings.num_workers,
        "out": str(out),
        "no_sync": no_sync,
        "precision": settings.precision,
    }
    kind = run.contender.removesuffix("-nosync")
    argv = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={run.nproc}",
        str(THIS),
        "--worker",
        kind,
        "--spec",
        json.dumps(spec),
    ]
    env = worker_env(run.nproc, settings, threads or settings.threads or None)
    run.wall_s, run.error = _run_process(argv, env, 900, settings.verbose)
    if not run.error:
        result = json.loads(out.read_text())
        run.samples_per_s, run.data_wait_frac = result["samples_per_s"], result["data_wait_frac"]
        run.peak_rss_mb, run.epoch_time_s = result["peak_rss_mb"], result["epoch_time_s"]
        run.gpu_util_pct = (
            settings.gpu_monitor.mean_between(*result["window"]) if settings.gpu_monitor else float("nan")
        )
    out.unlink(missing_ok=True)
    return run


def dtrain_command(cfg: Path, run_dir: Path, nproc: int, device: str) -> list[str]:
    # On the GPU: the benchmark owns the machine, and NVML's utilisation (averaged over up to a second)
    # can still show the previous contender, so the GPUs are named and forced rather than auto-picked.
    gpus = (
        ["--gpus", "cpu", "--nproc", str(nproc)]
        if device == "cpu"
        else ["--gpus", "".join(f"{i}," for i in range(nproc)), "--force"]
    )  # "0," = GPU 0 ("1" = any one GPU)
    return [PY, "-m", "launcher.cli", "launch", str(cfg), *gpus, "--run-dir", str(run_dir), "--resume", "never"]


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in (json.loads(line) for line in lines if line.strip()) if r.get("kind") == "epoch"]


def direct_torchrun(
    cfg: Path, run_dir: Path, nproc: int, settings: Settings, threads: int | None
) -> tuple[list[str], dict[str, str]]:
    """What the launcher's plan runs, minus the launcher: torchrun straight on the worker module, with the
    same DTRAIN_* variables (and ``threads`` per process, which ``dtrain launch`` would set to cores // P)."""
    shutil.copy(cfg, run_dir / "config.toml")
    env = worker_env(nproc, settings, threads)
    env.update({"DTRAIN_RUN_DIR": str(run_dir), "DTRAIN_RESUME": "never", "PYTHONUNBUFFERED": "1"})
    if settings.device == "cpu":
        env["DTRAIN_DEVICE"] = "cpu"
    argv = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "dist_train",
        str(run_dir / "config.toml"),
    ]
    return argv, env


def run_dtrain(run: Run, data: Path, steps: int, settings: Settings, *, threads: int | None = None) -> Run:
    """Through ``dtrain launch``; through torchrun directly when a thread count is forced (the launcher
    always gives CPU workers cores // P threads). ``dtrain-compiled``: with ``train.compile``; the first
    (warm-up) epoch compiles, the second is timed as for every contender."""
    workload = WORKLOADS[run.workload]
    run_dir = Path(tempfile.mkdtemp(prefix="dtrain-run-", dir=settings.workdir))
    compiled = run.contender == "dtrain-compiled"
    cfg = dtrain_config(
        settings.workdir / f"{run.contender}-{run.workload}.toml",
        workload,
        data,
        batch_size=settings.batch[run.workload] // run.nproc,
        steps_per_epoch=steps,
        epochs=2,
        num_workers=settings.num_workers,
        output_dir=settings.workdir / "runs",
        precision=PRECISIONS[settings.precision][0],
        extra={"train": {"compile": True, "compile_mode": settings.compile_mode}} if compiled else None,
    )
    threads = threads or settings.threads
    if threads:
        argv, env = direct_torchrun(cfg, run_dir, run.nproc, settings, threads)
    else:
        argv, env = dtrain_command(cfg, run_dir, run.nproc, settings.device), worker_env(run.nproc, settings)
    if compiled:  # one cache for all compiled runs: repeats and P compile once per workload, not per run
        env["TORCHINDUCTOR_CACHE_DIR"] = str(settings.workdir / "inductor-cache")
    run.wall_s, run.error = _run_process(argv, env, 900, settings.verbose)
    if not run.error:
        last = epoch_records(run_dir)[-1]  # epoch 1 warms up, the last one is timed
        run.samples_per_s, run.data_wait_frac = last["samples_per_s"], last["data_wait_frac"]
        run.peak_rss_mb, run.epoch_time_s = last["peak_memory_mb"], last["epoch_time_s"]
        if settings.gpu_monitor:
            run.gpu_util_pct = settings.gpu_monitor.mean_between(last["time"] - last["epoch_time_s"], last["time"])
    shutil.rmtree(run_dir, ignore_errors=True)
    return run


# ---------------------------------------------------------------------------- throughput
PEER_PACKAGES = {"accelerate": "accelerate", "fabric": "lightning"}  # peers beyond torch's own DDP


def missing_peers() -> list[str]:
    """Peers whose framework is not installed here (``pip install .[bench]`` brings them)."""
    import importlib.util

    return [peer for peer, package in PEER_PACKAGES.items() if importlib.util.find_spec(package) is None]


def contender_list(variants: list[str], skip: tuple[str, ...] = (), *, compiled: bool = True) -> list[tuple[str, str]]:
    """dtrain (always its HDF5 loader), compiled dtrain, then each peer with each data variant; the
    in-memory plain DDP loop is always there, since the plain-loop targets compare against it."""
    mine = [("dtrain", "h5")] + ([("dtrain-compiled", "h5")] if compiled else [])
    peers = [(peer, variant) for peer in PEERS if peer not in skip for variant in variants]
    if ("ddp", "mem") not in peers:
        peers = [*peers[:1], ("ddp", "mem"), *peers[1:]]
    return mine + peers


def throughput(
    workloads: list[str], nprocs: list[int], contenders: list[tuple[str, str]], repeats: int, settings: Settings
) -> list[Run]:
    """All contenders interleaved: for each repeat, every (workload, P, contender) once."""
    runs: list[Run] = []
    plan = [(name, who, variant, nproc) for name in workloads for nproc in nprocs for who, variant in contenders]
    for rep in range(repeats):
        for name, contender, variant, nproc in plan:
            steps = settings.steps[name]
            run = Run(name, contender, variant, nproc)
            if contender.startswith("dtrain"):
                run_dtrain(run, ensure_data(WORKLOADS[name], steps * settings.batch[name]), steps, settings)
            else:  # a hit-list workload's peers read the same events as images (no hit-list reader)
                run_peer(run, peer_data(WORKLOADS[name], steps * settings.batch[name]), steps, settings)
            runs.append(run)
            status = (
                f"ERROR {run.error.strip().splitlines()[-1] if run.error else ''}"
                if run.error
                else (
                    f"{run.samples_per_s:8.0f} samples/s  wait {run.data_wait_frac:5.1%}  rss {run.peak_rss_mb:6.0f} MB"
                    + (f"  gpu {run.gpu_util_pct:4.0f}%" if run.gpu_util_pct == run.gpu_util_pct else "")
                )
            )
            print(f"  [{rep + 1}/{repeats}] {run.key:32} {status}  ({run.wall_s:.1f} s wall)", flush=True)
            if run.error and settings.verbose:
                print(run.error)
    return runs


def summarize(runs: list[Run]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if not run.error:
            groups.setdefault(run.key, []).append(run)
    return {
        key: {
            "samples_per_s": median([r.samples_per_s for r in group]),
            "data_wait_frac": median([r.data_wait_frac for r in group]),
            "gpu_util_pct": median([r.gpu_util_pct for r in group]),
            "peak_rss_mb": median([r.peak_rss_mb for r in group]),
            "runs": len(group),
            "all_samples_per_s": [r.samples_per_s for r in group],  # type: ignore[dict-item]
        }
        for key, group in groups.items()
    }


def print_throughput(summary: dict[str, dict[str, float]], workloads: list[str], nprocs: list[int]) -> None:
    print(
        f"\n{'workload/contender/P':34} {'samples/s':>10} {'dtrain/x':>9} {'wait':>7} {'rss MB':>7} {'gpu %':>6}  runs"
    )
    for name in workloads:
        for nproc in nprocs:
            ref = summary.get(f"{name}/dtrain-h5/P{nproc}", {}).get("samples_per_s", float("nan"))
            for key, s in summary.items():
                if key.startswith(f"{name}/") and key.endswith(f"/P{nproc}"):
                    runs = " ".join(f"{v:.0f}" for v in s["all_samples_per_s"])  # type: ignore[attr-defined]
                    print(
                        f"{key:34} {s['samples_per_s']:10.0f} {ref / s['samples_per_s']:9.3f} "
                        f"{s['data_wait_frac']:7.1%} {s['peak_rss_mb']:7.0f} {s['gpu_util_pct']:6.0f}  {runs}"
                    )
        if WORKLOADS[name].hits:
            print(f"  ({name}: {HITS_NOTE})")


def ratio_results(
    summary: dict[str, dict[str, float]], workloads: list[str], nprocs: list[int], tag: str = ""
) -> list[str]:
    """One RESULT per target: the worst ratio over P for each workload and peer."""
    lines = []
    targets = [(peer, "h5", PEER_TARGET) for peer in PEERS] + [("ddp", "mem", PLAIN_TARGET)]
    for name in workloads:
        for peer, variant, target in targets:
            ratios = []
            for nproc in nprocs:
                mine = summary.get(f"{name}/dtrain-h5/P{nproc}")
                theirs = summary.get(f"{name}/{peer}-{variant}/P{nproc}")
                if mine and theirs:
                    ratios.append(mine["samples_per_s"] / theirs["samples_per_s"])
            if ratios:
                lines.append(
                    result_line(f"compare_{tag}{name}_vs_{peer}_{variant}_min_over_P", min(ratios), ">=", target)
                )
    return lines


def compiled_results(
    summary: dict[str, dict[str, float]], workloads: list[str], nprocs: list[int], tag: str, gpu: bool
) -> list[str]:
    """Issue 24's goal per workload: compiled dtrain / the in-memory DDP loop (worst over P), and on a
    GPU compiled dtrain's GPU busy (lowest over P); on the CPU a line says busy is not measured."""
    lines = []
    for name in workloads:
        pairs = [(summary.get(f"{name}/dtrain-compiled-h5/P{n}"), summary.get(f"{name}/ddp-mem/P{n}")) for n in nprocs]
        ratios = [mine["samples_per_s"] / theirs["samples_per_s"] for mine, theirs in pairs if mine and theirs]
        if ratios:
            lines.append(
                result_line(
                    f"compare_{tag}{name}_dtrain_compiled_vs_ddp_mem_min_over_P", min(ratios), ">=", COMPILED_TARGET
                )
            )
        busy = [mine["gpu_util_pct"] for mine, _ in pairs if mine]
        if busy and gpu:
            lines.append(
                result_line(
                    f"{tag}{name}_dtrain_compiled_gpu_busy_pct_min_over_P",
                    min(busy),
                    ">=",
                    GPU_BUSY_TARGET_PCT,
                    fmt=".1f",
                )
            )
        elif busy:
            print(
                f"{name}: GPU busy (target >= {GPU_BUSY_TARGET_PCT:g}%) is not measured on the CPU; run with --device cuda"
            )
    return lines


# ---------------------------------------------------------------------------- scaling
def scaling(workload: str, repeats: int, settings: Settings) -> dict[str, Any]:
    """Same global batch: 1 process x 2 threads vs 2 processes x 1 thread (dtrain through torchrun, and the
    in-memory DDP loop), plus the DDP loop without its gradient all-reduce (``no_sync``); interleaved."""
    steps = settings.steps[workload]
    data = ensure_data(WORKLOADS[workload], steps * settings.batch[workload])
    images = peer_data(WORKLOADS[workload], steps * settings.batch[workload])  # data itself unless hit-list
    cases = [
        ("dtrain", 1, 2, False),
        ("dtrain", 2, 1, False),
        ("ddp", 1, 2, False),
        ("ddp", 2, 1, False),
        ("ddp", 2, 1, True),
    ]
    rates: dict[str, list[float]] = {}
    for _ in range(repeats):
        for contender, nproc, threads, no_sync in cases:
            label = f"{contender}{' no_sync' if no_sync else ''} {nproc}proc x {threads}thr"
            run = Run(workload, contender, "h5" if contender == "dtrain" else "mem", nproc)
            if contender == "dtrain":
                run_dtrain(run, data, steps, settings, threads=threads)
            else:
                run_peer(run, images, steps, settings, no_sync=no_sync, threads=threads)
            if run.error:
                print(f"  {label}: ERROR {run.error.strip().splitlines()[-1]}")
                continue
            rates.setdefault(label, []).append(run.samples_per_s)
            print(f"  {label:28} {run.samples_per_s:9.0f} samples/s", flush=True)
    out: dict[str, Any] = {label: median(values) for label, values in rates.items()}
    print(f"strong scaling, {workload}, global batch {settings.batch[workload]} (medians of {repeats}):")
    for label, value in list(out.items()):
        print(f"  {label:28} {value:9.0f} samples/s")
    for contender in ("dtrain", "ddp"):
        one, two = out.get(f"{contender} 1proc x 2thr"), out.get(f"{contender} 2proc x 1thr")
        if one and two:
            out[f"{contender}_speedup_2proc_vs_1proc"] = two / one
            print(f"  {contender}: 2 processes x 1 thread / 1 process x 2 threads = {two / one:.2f}x")
    sync, nosync = out.get("ddp 2proc x 1thr"), out.get("ddp no_sync 2proc x 1thr")
    if sync and nosync:
        out["ddp_allreduce_overhead_frac"] = 1 - sync / nosync
        print(f"  DDP gradient all-reduce cost (1 - with / without all-reduce): {1 - sync / nosync:.1%}")
    return out


# ---------------------------------------------------------------------------- cost growth
GROWTH_WORKLOAD = Workload("growth", {"name": "mlp", "hidden": [16], "num_classes": 10}, "image", (1, 4, 4), 10)


def dataset_growth(sizes: list[int], settings: Settings) -> list[dict[str, float]]:
    """One full epoch of a tiny MLP on 16-float samples: time should grow linearly, memory stay flat."""
    rows = []
    for events in sizes:
        data = ensure_data(GROWTH_WORKLOAD, events)
        run = Run("growth", "dtrain", "h5", 1)
        run_dtrain_full_epoch(run, data, settings)
        row = {
            "samples": events,
            "epoch_time_s": run.epoch_time_s,
            "peak_rss_mb": run.peak_rss_mb,
            "rss_anon_mb": run.rss_anon_mb,
            "file_mb": data.stat().st_size / 1e6,
            "samples_per_s": run.samples_per_s,
        }
        rows.append(row)
        print(
            f"  {events:>9} samples ({row['file_mb']:6.1f} MB file): epoch {run.epoch_time_s:7.2f} s, "
            f"{run.samples_per_s:8.0f} samples/s, peak RSS {run.peak_rss_mb:6.0f} MB (mapped file pages included), "
            f"anonymous RSS {run.rss_anon_mb:6.0f} MB {run.error[-200:]}",
            flush=True,
        )
    return rows


def run_dtrain_full_epoch(run: Run, data: Path, settings: Settings) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="dtrain-growth-", dir=settings.workdir))
    cfg = dtrain_config(
        settings.workdir / "growth.toml",
        GROWTH_WORKLOAD,
        data,
        batch_size=256,
        steps_per_epoch=0,
        epochs=1,
        num_workers=settings.num_workers,
        output_dir=settings.workdir / "runs",
    )
    run.wall_s, run.error = _run_process(
        dtrain_command(cfg, run_dir, 1, settings.device), worker_env(1, settings), 1800, False
    )
    if not run.error:
        last = epoch_records(run_dir)[-1]
        run.samples_per_s, run.epoch_time_s, run.peak_rss_mb = (
            last["samples_per_s"],
            last["epoch_time_s"],
            last["peak_memory_mb"],
        )
        run.rss_anon_mb = last.get("rss_anon_mb", float("nan"))
    shutil.rmtree(run_dir, ignore_errors=True)


def model_growth(param_counts: list[int], settings: Settings) -> list[dict[str, float]]:
    """Checkpoint (model + Adam state, CheckpointManager.save: sha256 + fsync + rename) time and size."""
    import torch

    from dist_train.checkpoint.file import CheckpointManager

    rows = []
    for target in param_counts:
        width = min(4000, max(100, int((target / 4) ** 0.5)))  # about 4 square layers, at most 4000 wide
        layers = max(1, round(target / (width * width + width)))
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model(torch.randn(2, width)).sum().backward()
        optimizer.step()
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "step": 1}
        directory = Path(tempfile.mkdtemp(prefix="ckpt-growth-", dir=settings.workdir))
        manager = CheckpointManager(directory, keep_last=1)
        start = time.perf_counter()
        path = manager.save(state, epoch=0, step=1)
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        row = {"params": params, "checkpoint_s": seconds, "checkpoint_mb": Path(path).stat().st_size / 1e6}
        rows.append(row)
        print(
            f"  {params:>11,} params: checkpoint {row['checkpoint_mb']:8.1f} MB in {seconds:6.2f} s "
            f"({row['checkpoint_mb'] / max(seconds, 1e-9):6.0f} MB/s)",
            flush=True,
        )
        manager.close()
        shutil.rmtree(directory, ignore_errors=True)
        del model, optimizer, state
    return rows


# ---------------------------------------------------------------------------- start-up
def wait_for_first_step(proc: subprocess.Popen[bytes], metrics: Path, start: float, timeout: float = 300) -> float:
    """Seconds from ``start`` until metrics.jsonl holds the step-1 record (log_every = 1)."""
    while time.perf_counter() - start < timeout:
        if metrics.exists() and '"step": 1' in metrics.read_text():
            return time.perf_counter() - start
        if proc.poll() is not None and not (metrics.exists() and '"step": 1' in metrics.read_text()):
            raise RuntimeError(f"the run ended (exit {proc.returncode}) before its first step")
        time.sleep(0.005)
    raise TimeoutError("no first step")


def launcher_phases(stderr_text: str) -> dict[str, float]:
    """The phase times ``dtrain --verbose launch`` prints before it starts torchrun (seconds by phase)."""
    from launcher.cmd_launch import PHASES_LABEL

    line = next((ln for ln in stderr_text.splitlines() if PHASES_LABEL in ln), "")
    phases_text = line.split(PHASES_LABEL, 1)[-1].split(";", 1)[0]
    phases = {name.strip(): float(value) for name, value in re.findall(r"\s*(.*?) (\d+\.\d+) s(?:,|$)", phases_text)}
    total = re.search(r"total ([0-9.]+) s", line)
    if total:
        phases["total since the command was parsed"] = float(total.group(1))
    return phases


def startup(repeats: int, settings: Settings) -> dict[str, Any]:
    """``dtrain launch`` vs ``torchrun -m dist_train`` on the same resolved config, to the first step record.

    ``dtrain launch`` runs with ``--verbose``, which prints the launcher's time per phase; their medians
    say how much of the difference is the launcher's own work (config, data check, NVML + locks) and
    how much is outside it (interpreter start and imports, the process hand-off)."""
    workload = WORKLOADS["mlp"]
    data = ensure_data(workload, 2000)
    cfg = dtrain_config(
        settings.workdir / "startup.toml",
        workload,
        data,
        batch_size=32,
        steps_per_epoch=3,
        epochs=1,
        num_workers=0,
        output_dir=settings.workdir / "runs",
        log_every=1,
    )
    times: dict[str, list[float]] = {"dtrain launch": [], "torchrun": []}
    phases: list[dict[str, float]] = []
    for _ in range(repeats):
        for how in times:
            run_dir = Path(tempfile.mkdtemp(prefix="startup-", dir=settings.workdir))
            if how == "dtrain launch":
                argv, env = dtrain_command(cfg, run_dir, 1, settings.device), worker_env(1, settings)
                argv.insert(argv.index("launch"), "--verbose")
            else:
                argv, env = direct_torchrun(cfg, run_dir, 1, settings, None)
            stderr_path = run_dir.parent / f"{run_dir.name}.stderr"
            with stderr_path.open("wb") as stderr:
                start = time.perf_counter()
                proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
                try:
                    times[how].append(wait_for_first_step(proc, run_dir / "metrics.jsonl", start))
                finally:
                    proc.wait(timeout=300)
            if how == "dtrain launch":
                phases.append(launcher_phases(stderr_path.read_text(errors="replace")))
            stderr_path.unlink()
            shutil.rmtree(run_dir, ignore_errors=True)
    out: dict[str, Any] = {how: median(values) for how, values in times.items()}
    out["extra_s"] = out["dtrain launch"] - out["torchrun"]
    out["runs"] = times
    out["launcher_phases_s"] = (
        {name: median([p[name] for p in phases if name in p]) for name in phases[0]} if phases else {}
    )
    for how, values in times.items():
        print(
            f"  {how:14} median {median(values):6.2f} s to the first step   runs: "
            + " ".join(f"{v:.2f}" for v in values)
        )
    print(f"  dtrain launch - torchrun: {out['extra_s']:+.2f} s")
    if out["launcher_phases_s"]:
        print(
            "  of which the launcher's phases after parsing (medians): "
            + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in out["launcher_phases_s"].items())
        )
    return out


# ---------------------------------------------------------------------------- plot
def plot(summary: dict[str, dict[str, float]], workloads: list[str], nprocs: list[int], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("plot: skipped, matplotlib is not installed (pip install .[bench])")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4.2), squeeze=False)
    for ax, name in zip(axes[0], workloads, strict=True):
        labels = sorted(
            {key.split("/")[1] for key in summary if key.startswith(f"{name}/")},
            key=lambda c: (not c.startswith("dtrain"), c),
        )
        width = 0.8 / max(1, len(nprocs))
        for i, nproc in enumerate(nprocs):
            values = [summary.get(f"{name}/{label}/P{nproc}", {}).get("samples_per_s", 0.0) for label in labels]
            ax.bar([x + i * width for x in range(len(labels))], values, width, label=f"{nproc} process(es)")
        ax.set_xticks([x + width * (len(nprocs) - 1) / 2 for x in range(len(labels))], labels, rotation=35, ha="right")
        ax.set_title(name)
        ax.set_ylabel("samples/s (median)")
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced everything (a few minutes on 2 cores)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--workloads",
        default="",
        help="default mlp,cnn,simple_mlp (quick: mlp); resnet18 is opt-in on the CPU; issue 24's goal: "
        + ",".join(GOAL_WORKLOADS),
    )
    p.add_argument("--nprocs", default="1,2")
    p.add_argument("--variants", default="", help="peers' data: h5,mem (quick: h5; the in-memory DDP loop always runs)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved repeats (default 3; quick 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads per process for every contender (0 = cores // P, as dtrain launch sets; "
        "1 avoids OpenMP oversubscription on a loaded shared machine; dtrain then runs via torchrun)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers per process (default: 0 on the CPU, where 2 cores have none to spare; 8 with cuda)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="train.compile_mode of the dtrain-compiled contender (reduce-overhead: CUDA graphs)",
    )
    p.add_argument("--no-compiled", action="store_true", help="leave out the dtrain-compiled contender")
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="fp32",
        help="every contender's mixed precision (each framework's own switch; autocast+GradScaler in the plain loop)",
    )
    p.add_argument("--sections", default="throughput,scaling,growth,startup")
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this file")
    p.add_argument("--plot", type=Path, default=BENCH_DIR / "compare.png")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from torch.distributed.elastic.multiprocessing.errors import record

        # record: a failing rank's exception goes into torchrun's summary (see failure_report).
        record(WORKERS[args.worker])(json.loads(args.spec))
        return 0
    gpu = args.device == "cuda"
    default_workloads = "mlp,cnn,simple_mlp,resnet18" if gpu else "mlp,cnn,simple_mlp"
    workloads = (args.workloads or ("mlp" if args.quick else default_workloads)).split(",")
    unknown = [name for name in workloads if name not in GLOBAL_BATCH]
    if unknown:
        print(f"unknown workload(s) {', '.join(unknown)}; compare.py runs {', '.join(GLOBAL_BATCH)}", file=sys.stderr)
        return 2
    nprocs = [int(n) for n in args.nprocs.split(",")]
    missing = missing_peers()
    contenders = contender_list(
        (args.variants or ("h5" if args.quick else "h5,mem")).split(","), tuple(missing), compiled=not args.no_compiled
    )
    repeats = args.repeats or (2 if args.quick else 3)
    sections = args.sections.split(",")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine_summary(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(PY).name, *sys.argv]),
        "device": args.device,
    }
    print(report["machine"])
    if missing:
        print(
            f"not installed, so not measured: {', '.join(f'{p} ({PEER_PACKAGES[p]})' for p in missing)}; "
            "pip install .[bench] adds them"
        )
    results: list[str] = []
    with tempfile.TemporaryDirectory(prefix="compare-", dir=BENCH_DIR) as tmp:
        steps = (GPU_QUICK_STEPS if args.quick else GPU_STEPS) if gpu else (QUICK_STEPS if args.quick else STEPS)
        num_workers = args.num_workers if args.num_workers is not None else (8 if gpu else 0)
        settings = Settings(
            args.device,
            num_workers,
            args.quick,
            Path(tmp),
            steps=steps,
            verbose=args.verbose,
            threads=args.threads,
            precision=args.precision,
            batch=dict(GPU_GLOBAL_BATCH if gpu else GLOBAL_BATCH),
            gpu_monitor=GpuMonitor() if gpu else None,
            compile_mode=args.compile_mode,
        )
        report["settings"] = {
            "steps": steps,
            "global_batch": settings.batch,
            "precision": args.precision,
            "num_workers": num_workers,
            "compile_mode": args.compile_mode,
        }
        if "throughput" in sections:
            print(
                f"\nthroughput: {repeats} interleaved repeats, steps {settings.steps}, global batch {settings.batch}, precision {settings.precision}, "
                f"{settings.num_workers} loader workers per process"
            )
            runs = throughput(workloads, nprocs, contenders, repeats, settings)
            summary = summarize(runs)
            print_throughput(summary, workloads, nprocs)
            report["throughput"] = {"runs": [asdict(r) for r in runs], "summary": summary}
            tag = "" if not gpu and args.precision == "fp32" else f"{args.device}_{args.precision}_"
            results += ratio_results(summary, workloads, nprocs, tag)
            results += compiled_results(summary, workloads, nprocs, tag, gpu)
            for name in [w for w in workloads if gpu and w in DATA_WAIT_WORKLOADS]:
                wait = summary.get(f"{name}/dtrain-h5/P{nprocs[0]}", {}).get("data_wait_frac", float("nan"))
                results.append(result_line(f"{tag}{name}_dtrain_data_wait_frac", wait, "<=", DATA_WAIT_TARGET))
            plot(summary, workloads, nprocs, args.plot)
        if "scaling" in sections:
            print("\nstrong scaling")
            report["scaling"] = scaling(workloads[-1], repeats, settings)
        if "growth" in sections:
            print("\ncost growth: dataset size (dtrain, 1 process, one full epoch, batch 256, 16-float samples)")
            report["dataset_growth"] = dataset_growth([10**4, 10**5] if args.quick else [10**4, 10**5, 10**6], settings)
            print("cost growth: model size (checkpoint of model + Adam state)")
            report["model_growth"] = model_growth(
                [10**5, 10**6, 10**7] if args.quick else [10**5, 10**6, 10**7, 10**8], settings
            )
        if "startup" in sections:
            print(f"\nstart-up to the first training step ({2 if args.quick else 5} interleaved repeats)")
            report["startup"] = startup(2 if args.quick else 5, settings)
            results.append(
                result_line("startup_extra_s", report["startup"]["extra_s"], "<=", STARTUP_TARGET_S, fmt=".2f")
            )
        if settings.gpu_monitor:
            settings.gpu_monitor.close()
    report["load_average_after"] = load_average()
    report["results"] = results
    print(f"\nload average after the run: {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
