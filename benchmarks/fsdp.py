"""Sharded training (issue 14): what FSDP saves in memory, costs in time, and how long its checkpoints block.

The model is ``benchmarks/fsdp_model.py:BlockStack`` (pre-norm residual MLP blocks; width 1024 x 12 blocks =
101.6M parameters on 784 inputs), sharded per ``Block``. Sections (``--sections``, all by default):

* ``memory``      dtrain itself, ``dtrain launch --gpus cpu --nproc 2``, ``train.strategy`` ddp vs fsdp on the
                  101.6M model, Adam, fp32: the epoch record's ``memory/*`` (the largest rank's parameter,
                  gradient and Adam-state MiB, and its peak RSS: ``ru_maxrss``; CUDA: ``max_memory_allocated``),
                  as shipped (CPU FSDP workers set glibc's mmap threshold to 1 MiB) and with that switched off
                  (``DTRAIN_CPU_MALLOC_THRESHOLD=0``: glibc's defaults; see ALLOCATORS).
* ``throughput``  the same data (the same HDF5 file), global batch, Adam, fp32 and steps for: dtrain ddp,
                  dtrain fsdp (``dtrain launch``), Accelerate with its FSDP2 plugin
                  (``FullyShardedDataParallelPlugin(fsdp_version=2)``, transformer-layer policy on ``Block``),
                  Lightning Fabric with ``ModelParallelStrategy`` (Lightning's FSDP2 path: its
                  ``parallelize_fn`` calls ``fully_shard`` per ``Block``), and a hand-written ``fully_shard``
                  loop (the floor: no framework). Peers run under ``torchrun`` from this file (``--worker``) and
                  read the file into a TensorDataset (their fastest input path). Two epochs of ``steps``; the
                  second is timed (global samples / slowest rank's time). Contenders are interleaved and
                  repeated; ratios are medians of the per-round paired ratios.
* ``malloc``      (only when named) dtrain fsdp as shipped vs ``DTRAIN_CPU_MALLOC_THRESHOLD=0``: what the CPU
                  worker's fixed 1 MiB mmap threshold costs in samples/s and saves in peak RSS (paired rounds).
* ``checkpoint``  two gloo processes (``torchrun``) holding the FSDP2-sharded model and its Adam state after
                  one step: ``dcp.save`` of the sharded state dict (every rank writes its shard), the time
                  ``dcp.async_save`` blocks (state-dict view + staging copy; the write runs in a thread), its
                  time until durable, and the full save (``get_state_dict(full_state_dict=True)``, gathered on
                  rank 0, ``torch.save`` + fsync). All writes fsync (DCP's default). The first async save is
                  checked: tensors changed right after it returns, loading it gives the values of the save
                  moment. torch.distributed.checkpoint is used directly here (dtrain's manager gets DCP separately).

``--device cuda`` (one GPU: world size 1, so nothing is sharded and the 2-rank memory ratio is not measured):
dtrain fsdp vs ddp in bf16 on CUDA (samples/s, ``max_memory_allocated``) for the 101.6M model and ResNet-18
(BatchNorm), each saving a checkpoint per epoch (sharded and async under fsdp), and the checkpoint section
with the state in GPU memory (async DCP staging copies device to host; the time a save blocks training).
``--quick``: about 3 minutes on one H100/H200.

Usage: python benchmarks/fsdp.py [--quick] [--device cpu|cuda] [--sections memory,throughput,checkpoint]
           [--repeats N] [--json OUT.json] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    BENCH_DIR,
    WORKLOADS,
    Workload,
    dtrain_config,
    ensure_data,
    in_memory_dataset,
    load_average,
    machine_summary,
    median,
    result_line,
)
from compare import (  # noqa: E402
    Settings,
    _loss_step,
    _reduce_and_write,
    _run_process,
    _sync_fn,
    _timed_epochs,
    dtrain_command,
    epoch_records,
    worker_env,
)

PY = sys.executable
THIS = Path(__file__).resolve()
MEMORY_TARGET = 0.6  # FSDP / DDP per rank, 2 ranks (ideal 0.5)
THROUGHPUT_TARGET = 1.0  # dtrain fsdp / each contender
SHARDED_SAVE_TARGET = 1.0  # sharded save / full save of the gathered state
ASYNC_STALL_TARGET = 0.2  # async save's blocked time / full save (as benchmarks/checkpoint.py)


@dataclass(frozen=True)
class Size:
    width: int
    depth: int

    def model(self) -> dict[str, Any]:
        return {"name": "fsdp_model:BlockStack", "num_classes": 10, "width": self.width, "depth": self.depth}

    def params(self, inputs: int = 784, classes: int = 10) -> int:
        w = self.width
        return inputs * w + w + self.depth * (8 * w * w + 7 * w) + 2 * w + w * classes + classes

    def label(self) -> str:
        return f"{self.params() / 1e6:.1f}M params (width {self.width}, {self.depth} blocks)"


BIG = Size(1024, 12)  # 101.6M: the "at least 100M parameters"
SHAPE = (1, 28, 28)


def workload(size: Size) -> Workload:
    return Workload(f"blockstack{size.width}x{size.depth}", size.model(), "image", SHAPE, 10)


def bench_env(nproc: int, settings: Settings) -> dict[str, str]:
    """compare.py's worker environment (cores // P threads each) plus benchmarks/ on PYTHONPATH for the model."""
    env = worker_env(nproc, settings)
    env["PYTHONPATH"] = os.pathsep.join([str(THIS.parent), env["PYTHONPATH"]])
    return env


# ============================================================================ worker side (torchrun)
def _build_model(spec: dict[str, Any]) -> Any:
    import torch
    from fsdp_model import BlockStack

    torch.manual_seed(0)
    return BlockStack(SHAPE, 10, width=spec["width"], depth=spec["depth"])


def _shard_blocks(model: Any, mesh: Any, **kwargs: Any) -> Any:
    """FSDP2 as its docs apply it: each Block its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh, **kwargs)
    fully_shard(model, mesh=mesh, **kwargs)
    return model


def _peak_mb(device: Any) -> float:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _finish(spec: dict[str, Any], stats: dict[str, float], rank: int, device: Any, how: str) -> None:
    """compare.py's result (global samples / slowest rank), plus what the framework really ran and the
    largest rank's peak memory."""
    import torch
    import torch.distributed as dist

    peak = torch.tensor([_peak_mb(device)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        peak = peak.to(device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    _reduce_and_write(spec, stats, rank)
    if rank == 0:
        out = Path(spec["out"])
        result = json.loads(out.read_text())
        result.update({"how": how, "peak_mb_max_rank": float(peak[0])})
        out.write_text(json.dumps(result))


def _loader(spec: dict[str, Any], sampler: Any = None) -> Any:
    from torch.utils.data import DataLoader

    dataset = in_memory_dataset(Path(spec["data"]))
    if sampler is not None:
        return DataLoader(dataset, batch_size=spec["batch"], sampler=sampler(dataset))
    return DataLoader(dataset, batch_size=spec["batch"], shuffle=True)


def worker_fsdp2(spec: dict[str, Any]) -> None:
    """A hand-written FSDP2 loop: fully_shard per Block over a CPU (gloo) mesh, DistributedSampler, Adam."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.utils.data import DistributedSampler

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    loader = _loader(spec, lambda ds: DistributedSampler(ds, shuffle=True, seed=0))
    model = _shard_blocks(_build_model(spec), init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sums = torch.zeros(2)
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, device, lambda loss: loss.backward(), sums)
    stats = _timed_epochs(loader, step, spec["steps"], loader.sampler.set_epoch, _sync_fn(device))
    _finish(spec, stats, rank, device, "fully_shard")
    dist.barrier()
    dist.destroy_process_group()


def worker_accelerate(spec: dict[str, Any]) -> None:
    """Accelerate's FSDP2 recipe: the plugin with fsdp_version=2 and the transformer-layer wrap policy."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True,
    )
    accelerator = Accelerator(cpu=spec["device"] == "cpu", fsdp_plugin=plugin)
    loader = _loader(spec)
    model = _build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sums = torch.zeros(2, device=accelerator.device)
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, accelerator.device, accelerator.backward, sums)
    stats = _timed_epochs(loader, step, spec["steps"], loader.set_epoch, _sync_fn(accelerator.device))
    # On the CPU Accelerate 1.x takes the FSDP plugin only for GPU-like devices: say what it really ran.
    how = f"{accelerator.distributed_type.value}: {type(model).__name__}"
    _finish(spec, stats, accelerator.process_index, accelerator.device, how)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def worker_fabric(spec: dict[str, Any]) -> None:
    """Lightning Fabric's FSDP2 path: ModelParallelStrategy, whose parallelize_fn applies fully_shard."""
    import torch
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def parallelize(model: Any, mesh: Any) -> Any:
        return _shard_blocks(model, mesh["data_parallel"])

    strategy = ModelParallelStrategy(parallelize, data_parallel_size=nproc, tensor_parallel_size=1)
    fabric = Fabric(accelerator="cuda" if spec["device"] == "cuda" else "cpu", devices=nproc, strategy=strategy)
    fabric.launch()
    model = fabric.setup(_build_model(spec))
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-3))
    loader = fabric.setup_dataloaders(_loader(spec))
    sums = torch.zeros(2, device=fabric.device)
    step = _loss_step(model, torch.nn.CrossEntropyLoss(), optimizer, fabric.device, fabric.backward, sums)

    def set_epoch(epoch: int) -> None:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)

    stats = _timed_epochs(loader, step, spec["steps"], set_epoch, _sync_fn(fabric.device))
    _finish(spec, stats, fabric.global_rank, fabric.device, "ModelParallelStrategy (fully_shard)")
    fabric.barrier()


def worker_checkpoint(spec: dict[str, Any]) -> None:
    """Sharded (DCP) vs full checkpoints of an FSDP2 model + Adam state, timed on every rank (max reported)."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    cuda = spec["device"] == "cuda"
    if cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # The background write's collectives must not share a group with training's (the docs' advice).
    ckpt_group = dist.new_group(backend="gloo")
    model = _shard_blocks(_build_model(spec).to(device), init_device_mesh(device.type, (world,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(4, *SHAPE, device=device)
    torch.nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device=device)).backward()
    optimizer.step()  # Adam's moments exist now
    root = Path(spec["dir"])

    def sharded() -> dict[str, Any]:
        msd, osd = get_state_dict(model, optimizer)
        return {"model": msd, "optimizer": osd}

    def local_snapshot() -> list[Any]:
        state = sharded()
        return [_local(t).detach().clone() for t in _tensors(state)]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    def start_clean() -> None:
        if rank == 0:
            os.sync()  # the previous method's dirty pages are not written back under this one
        sync()

    times: dict[str, list[float]] = {
        "full": [],
        "sharded": [],
        "async_first": [],
        "async_blocked": [],
        "async_total": [],
    }
    consistent = True
    for rep in range(spec["repeats"] + 1):
        # async: blocked until async_save returns; durable when its future is done
        start_clean()
        before = local_snapshot() if rep == 0 else None
        start = time.perf_counter()
        future = dcp.async_save(sharded(), checkpoint_id=str(root / f"async-{rep}"), process_group=ckpt_group)
        blocked = time.perf_counter() - start
        if before is not None:
            with torch.no_grad():  # training goes on and changes the tensors while the write runs
                for p in model.parameters():
                    _local(p).mul_(-0.5)
        future.result()
        total = time.perf_counter() - start
        times["async_first" if rep == 0 else "async_blocked"].append(blocked)
        if before is not None:
            state = sharded()
            dcp.load(state, checkpoint_id=str(root / "async-0"), process_group=ckpt_group)
            consistent = all(torch.equal(_local(a), b) for a, b in zip(_tensors(state), before, strict=True))
        else:
            times["async_total"].append(total)
        _remove(root / f"async-{rep}", rank, sync)
        if rep == 0:
            continue
        # sharded, synchronous
        start_clean()
        start = time.perf_counter()
        dcp.save(sharded(), checkpoint_id=str(root / f"sharded-{rep}"), process_group=ckpt_group)
        times["sharded"].append(time.perf_counter() - start)
        _remove(root / f"sharded-{rep}", rank, sync)
        # full: gathered on rank 0 (every rank takes part), one file written there
        start_clean()
        start = time.perf_counter()
        full_model, full_optim = get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if rank == 0:
            path = root / f"full-{rep}.pt"
            with path.open("wb") as f:
                torch.save({"model": full_model, "optimizer": full_optim}, f)
                f.flush()
                os.fsync(f.fileno())
        del full_model, full_optim
        sync()
        times["full"].append(time.perf_counter() - start)
        if rank == 0:
            (root / f"full-{rep}.pt").unlink()
    state_bytes = sum(_local(t).numel() * _local(t).element_size() for t in _tensors(sharded()))
    gathered = [None] * world
    dist.all_gather_object(gathered, {"times": times, "consistent": consistent, "state_bytes": state_bytes})
    if rank == 0:
        merged = {
            name: [max(g["times"][name][i] for g in gathered) for i in range(len(values))]  # type: ignore[index]
            for name, values in times.items()
        }
        Path(spec["out"]).write_text(
            json.dumps(
                {
                    "times": merged,
                    "consistent": all(g["consistent"] for g in gathered),  # type: ignore[index]
                    "state_bytes_per_rank": [g["state_bytes"] for g in gathered],  # type: ignore[index]
                    "device": torch.cuda.get_device_name() if cuda else "cpu",
                }
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def _tensors(state: Any) -> list[Any]:
    """The tensors of a nested state dict in a fixed order."""
    import torch

    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, list | tuple):
        return [t for item in state for t in _tensors(item)]
    return [state] if isinstance(state, torch.Tensor) else []


def _remove(path: Path, rank: int, sync: Any) -> None:
    sync()  # every rank's write is done
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)


WORKERS = {
    "fsdp2": worker_fsdp2,
    "accelerate": worker_accelerate,
    "fabric": worker_fabric,
    "checkpoint": worker_checkpoint,
}


# ============================================================================ driver side
@dataclass
class Plan:
    device: str
    quick: bool
    repeats: int
    workdir: Path
    verbose: bool
    results: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings(self.device, 0, self.quick, self.workdir, verbose=self.verbose)


def run_torchrun(kind: str, spec: dict[str, Any], nproc: int, plan: Plan, timeout: float = 1200) -> dict[str, Any]:
    fd, name = tempfile.mkstemp(prefix=f"{kind}-", suffix=".json", dir=plan.workdir)
    os.close(fd)
    out = Path(name)
    spec = {**spec, "out": str(out), "device": plan.device}
    argv = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(THIS),
        "--worker",
        kind,
        "--spec",
        json.dumps(spec),
    ]
    wall, error = _run_process(argv, bench_env(nproc, plan.settings), timeout, plan.verbose)
    result: dict[str, Any] = {"error": error, "wall_s": wall}
    if not error:
        result.update(json.loads(out.read_text()))
    out.unlink(missing_ok=True)
    return result


def run_dtrain(
    strategy: str,
    size: Size | Workload,
    data: Path,
    plan: Plan,
    *,
    nproc: int,
    batch: int,
    steps: int,
    epochs: int,
    precision: str = "fp32",
    env: dict[str, str] | None = None,
    checkpoint: bool = False,
    wrap: tuple[str, ...] = ("Block",),
) -> dict[str, Any]:
    """``dtrain launch`` with ``train.strategy``; the last epoch record (its ``memory/*`` too).
    ``wrap``: fsdp.wrap (empty: the automatic policy); ``checkpoint``: a checkpoint after every epoch."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"dtrain-{strategy}-", dir=plan.workdir))
    work = size if isinstance(size, Workload) else workload(size)
    extra = {"train": {"strategy": strategy}, "fsdp": {"wrap": list(wrap)} if strategy == "fsdp" and wrap else {}}
    cfg = dtrain_config(
        plan.workdir / f"{strategy}.toml",
        work,
        data,
        batch_size=batch,
        steps_per_epoch=steps,
        epochs=epochs,
        num_workers=0,
        output_dir=plan.workdir / "runs",
        precision=precision,
        checkpoint=checkpoint,
        extra={k: v for k, v in extra.items() if v},
    )
    wall, error = _run_process(
        dtrain_command(cfg, run_dir, nproc, plan.device),
        {**bench_env(nproc, plan.settings), **(env or {})},
        1800,
        plan.verbose,
    )
    result: dict[str, Any] = {"error": error, "wall_s": wall, "how": f"dtrain {strategy}"}
    if not error:
        result.update(epoch_records(run_dir)[-1])
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def _status(result: dict[str, Any]) -> str:
    if result["error"]:
        return "ERROR " + result["error"].strip().splitlines()[-1]
    return f"{result['samples_per_s']:8.1f} samples/s ({result['wall_s']:.0f} s wall)"


# ---------------------------------------------------------------------------- memory
MEMORY_KEYS = ("memory/params_mb", "memory/grads_mb", "memory/optimizer_mb", "memory/state_mb", "memory/peak_mb")


# glibc keeps freed heap memory resident (the dynamic mmap threshold rises to 32 MiB after the first large
# free, and a fragmented heap cannot shrink): FSDP's per-step all-gather and reduce-scatter buffers then
# stay in the RSS. dtrain's CPU FSDP workers therefore set a fixed 1 MiB threshold themselves
# (dist_train/distributed/cpu_allocator.py: each large buffer gets its own mapping, returned on free); the second
# setting switches that off to show glibc's defaults. DDP workers are never changed.
ALLOCATORS = {"dtrain default (mallopt 1 MiB)": {}, "glibc defaults (opt-out)": {"DTRAIN_CPU_MALLOC_THRESHOLD": "0"}}


def memory(plan: Plan) -> None:
    nproc, batch = 2, 8
    steps = 3 if plan.quick else 5
    data = ensure_data(workload(BIG), 4 * steps * batch * nproc)
    print(
        f"\nmemory per rank: dtrain launch --nproc {nproc} (gloo, CPU), {BIG.label()}, Adam, fp32, batch {batch} per rank, "
        f"{steps} steps; the epoch record's memory/* (the largest rank's)",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    for allocator, env in ALLOCATORS.items():
        for strategy in ("ddp", "fsdp"):
            result = run_dtrain(strategy, BIG, data, plan, nproc=nproc, batch=batch, steps=steps, epochs=1, env=env)
            if result["error"]:
                print(f"  {strategy}, {allocator}: {_status(result)}\n{result['error']}")
                return
            rows[f"{strategy}, {allocator}"] = result
    print(f"  {'MiB per rank':22} {'allocator':32} {'ddp':>7} {'fsdp':>7} {'fsdp/ddp':>9}")
    for key in MEMORY_KEYS:
        for allocator in ALLOCATORS if key == "memory/peak_mb" else list(ALLOCATORS)[:1]:
            ddp, fsdp = rows[f"ddp, {allocator}"][key], rows[f"fsdp, {allocator}"][key]
            shown = allocator if key == "memory/peak_mb" else "(any)"
            print(f"  {key:22} {shown:32} {ddp:7.0f} {fsdp:7.0f} {fsdp / ddp:9.3f}")
    print(
        "  (state: measured after the first optimizer step, identical under both allocators; peak: ru_maxrss, the\n"
        "   process's resident high-water mark, with the ~0.55-0.7 GB of an idle torch + dtrain worker; DDP's also\n"
        "   holds its gradient buckets)"
    )
    plan.report["memory"] = {name: {k: row[k] for k in MEMORY_KEYS} for name, row in rows.items()}
    first, second = list(ALLOCATORS)
    ratio = rows[f"fsdp, {first}"]["memory/state_mb"] / rows[f"ddp, {first}"]["memory/state_mb"]
    plan.results.append(result_line("fsdp_state_memory_ratio_2ranks", ratio, "<=", MEMORY_TARGET))
    for allocator, suffix in ((first, ""), (second, "_glibc_defaults")):
        peak = rows[f"fsdp, {allocator}"]["memory/peak_mb"] / rows[f"ddp, {allocator}"]["memory/peak_mb"]
        plan.results.append(result_line(f"fsdp_peak_memory_ratio_2ranks{suffix}", peak, "<=", MEMORY_TARGET))


# ---------------------------------------------------------------------------- throughput
CONTENDERS = ("dtrain-fsdp", "dtrain-ddp", "accelerate-fsdp2", "fabric-fsdp2", "fully_shard-loop")
PEER_KIND = {"accelerate-fsdp2": "accelerate", "fabric-fsdp2": "fabric", "fully_shard-loop": "fsdp2"}


def throughput(plan: Plan, size: Size, global_batch: int, steps: int) -> None:
    nproc = 2
    data = ensure_data(workload(size), steps * global_batch)
    print(
        f"\nthroughput: {nproc} processes x {max(1, os.cpu_count() or 1) // nproc} thread(s), {size.label()}, Adam, fp32, "
        f"global batch {global_batch}, {steps} steps per epoch (2nd epoch timed), {plan.repeats} interleaved rounds",
        flush=True,
    )
    rounds: list[dict[str, dict[str, Any]]] = []
    for rep in range(plan.repeats):
        order = CONTENDERS[rep % len(CONTENDERS) :] + CONTENDERS[: rep % len(CONTENDERS)]  # rotated each round
        this_round: dict[str, dict[str, Any]] = {}
        for who in order:
            if who.startswith("dtrain-"):
                result = run_dtrain(
                    who.split("-")[1], size, data, plan, nproc=nproc, batch=global_batch // nproc, steps=steps, epochs=2
                )
            else:
                spec = {
                    "data": str(data),
                    "batch": global_batch // nproc,
                    "steps": steps,
                    "width": size.width,
                    "depth": size.depth,
                }
                result = run_torchrun(PEER_KIND[who], spec, nproc, plan)
            this_round[who] = result
            print(f"  [{rep + 1}/{plan.repeats}] {who:18} {_status(result)}  load {load_average()}", flush=True)
            if result["error"] and plan.verbose:
                print(result["error"])
        rounds.append(this_round)
    ok = [r for r in rounds if all(not v["error"] for v in r.values())]
    hows = {who: next((r[who].get("how", "") for r in rounds if not r[who]["error"]), "failed") for who in CONTENDERS}
    print(f"\n  {'contender':18} {'samples/s':>10} {'dtrain-fsdp/x':>14} {'peak MB/rank':>13}  runs; what ran")
    summary: dict[str, Any] = {}
    for who in CONTENDERS:
        rates = [r[who]["samples_per_s"] for r in rounds if not r[who]["error"]]
        ratios = [r["dtrain-fsdp"]["samples_per_s"] / r[who]["samples_per_s"] for r in ok]
        peaks = [
            r[who].get("peak_mb_max_rank", r[who].get("memory/peak_mb", math.nan))
            for r in rounds
            if not r[who]["error"]
        ]
        summary[who] = {"samples_per_s": median(rates), "paired_ratio": median(ratios), "runs": rates, "how": hows[who]}
        print(
            f"  {who:18} {median(rates):10.1f} {median(ratios):14.3f} {median(peaks):13.0f}  "
            + " ".join(f"{v:.1f}" for v in rates)
            + f"; {hows[who]}"
        )
    plan.report["throughput"] = {
        "model": size.label(),
        "global_batch": global_batch,
        "steps": steps,
        "summary": summary,
    }
    for who in CONTENDERS[1:]:
        if summary[who]["runs"] and ok:
            plan.results.append(
                result_line(
                    f"fsdp_throughput_vs_{who.replace('-', '_')}", summary[who]["paired_ratio"], ">=", THROUGHPUT_TARGET
                )
            )


# ---------------------------------------------------------------------------- malloc
def malloc_cost(plan: Plan, size: Size, global_batch: int, steps: int) -> None:
    """What the CPU FSDP worker's fixed 1 MiB mmap threshold costs in step time: dtrain fsdp as shipped vs
    ``DTRAIN_CPU_MALLOC_THRESHOLD=0`` (glibc's defaults), interleaved (order alternating), paired per round."""
    nproc = 2
    data = ensure_data(workload(size), steps * global_batch)
    print(
        f"\nmalloc: dtrain fsdp, {nproc} processes, {size.label()}, Adam, fp32, global batch {global_batch}, {steps} steps "
        f"per epoch (2nd epoch timed), {plan.repeats} interleaved rounds: mmap threshold 1 MiB (default) vs glibc's",
        flush=True,
    )
    settings: dict[str, dict[str, str]] = {
        "threshold 1 MiB": {},
        "glibc defaults": {"DTRAIN_CPU_MALLOC_THRESHOLD": "0"},
    }
    ratios: list[float] = []
    rates: dict[str, list[float]] = {k: [] for k in settings}
    peaks: dict[str, list[float]] = {k: [] for k in settings}
    for rep in range(plan.repeats):
        order = list(settings) if rep % 2 == 0 else list(settings)[::-1]
        this_round: dict[str, dict[str, Any]] = {}
        for name in order:
            result = run_dtrain(
                "fsdp",
                size,
                data,
                plan,
                nproc=nproc,
                batch=global_batch // nproc,
                steps=steps,
                epochs=2,
                env=settings[name],
            )
            print(
                f"  [{rep + 1}/{plan.repeats}] {name:16} {_status(result)}  peak {result.get('memory/peak_mb', math.nan):.0f} MiB"
                f"  load {load_average()}",
                flush=True,
            )
            if result["error"]:
                return
            this_round[name] = result
            rates[name].append(result["samples_per_s"])
            peaks[name].append(result["memory/peak_mb"])
        ratios.append(this_round["threshold 1 MiB"]["samples_per_s"] / this_round["glibc defaults"]["samples_per_s"])
    print("  paired ratios (1 MiB / glibc): " + " ".join(f"{r:.3f}" for r in ratios) + f"; median {median(ratios):.3f}")
    plan.report["malloc"] = {"model": size.label(), "rates": rates, "peaks": peaks, "ratios": ratios}
    tag = f"{size.params() / 1e6:.0f}m"
    plan.results.append(result_line(f"fsdp_cpu_malloc_threshold_throughput_ratio_{tag}", median(ratios), ">=", 0.95))
    plan.results.append(
        result_line(
            f"fsdp_cpu_malloc_threshold_peak_ratio_{tag}",
            median(peaks["threshold 1 MiB"]) / median(peaks["glibc defaults"]),
            "<=",
            1.0,
        )
    )


# ---------------------------------------------------------------------------- checkpoint
def checkpoint(plan: Plan, size: Size, nproc: int) -> None:
    repeats = 2 if plan.quick else 3
    directory = Path(tempfile.mkdtemp(prefix="fsdp-ckpt-", dir=plan.workdir))
    print(
        f"\ncheckpoint: {nproc} rank(s) ({'NCCL, state in GPU memory' if plan.device == 'cuda' else 'gloo, CPU'}), "
        f"{size.label()} + Adam state, FSDP2-sharded; {repeats} repeats (+1 first async save), max over ranks",
        flush=True,
    )
    spec = {"width": size.width, "depth": size.depth, "repeats": repeats, "dir": str(directory)}
    result = run_torchrun("checkpoint", spec, nproc, plan)
    shutil.rmtree(directory, ignore_errors=True)
    if result["error"]:
        print("  ERROR\n" + result["error"])
        return
    times = result["times"]
    mb = sum(result["state_bytes_per_rank"]) / 1e6
    print(
        f"  state: {mb:,.0f} MB in all, per rank: "
        + ", ".join(f"{b / 1e6:,.0f} MB" for b in result["state_bytes_per_rank"])
    )
    labels = {
        "full": "full: gather on rank 0 + torch.save + fsync",
        "sharded": "sharded dcp.save (every rank writes its shard)",
        "async_first": "dcp.async_save, 1st (blocked)",
        "async_blocked": "dcp.async_save (blocked)",
        "async_total": "dcp.async_save until durable",
    }
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, label in labels.items():
        print(
            f"  {label:48} {medians[name]:7.3f} s  {mb / medians[name]:8.0f} MB/s   runs: "
            + ", ".join(f"{v:.2f}" for v in times[name])
        )
    print(
        f"  async save: tensors changed right after it returned; loading it gave the values of the save moment: "
        f"{'yes' if result['consistent'] else 'NO'}"
    )
    plan.report["checkpoint"] = {"ranks": nproc, "model": size.label(), **result}
    tag = "_cuda" if plan.device == "cuda" else ""
    plan.results.append(
        result_line(f"fsdp_sharded_save_vs_full{tag}", medians["sharded"] / medians["full"], "<=", SHARDED_SAVE_TARGET)
    )
    plan.results.append(
        result_line(
            f"fsdp_async_save_blocked_vs_full{tag}",
            medians["async_blocked"] / medians["full"],
            "<=",
            ASYNC_STALL_TARGET,
        )
    )
    plan.results.append(
        result_line(f"fsdp_async_save_consistent{tag}", float(result["consistent"]), ">=", 1, fmt=".0f")
    )


# ---------------------------------------------------------------------------- GPU (one device: world size 1)
def gpu(plan: Plan) -> None:
    """bf16 on CUDA through dtrain launch, fsdp then ddp on 1 GPU, for the 101.6M BlockStack (LayerNorm) and
    ResNet-18 (BatchNorm: its norm layers run in fp32 under FSDP as under DDP's autocast). Each run writes
    its end-of-epoch checkpoints (FSDP: the default async sharded save, on its own gloo group); the second
    epoch is timed. RESULT lines: fsdp/ddp samples/s and peak memory (``max_memory_allocated``)."""
    steps = 20 if plan.quick else 60
    models: list[tuple[str, Size | Workload, int, tuple[str, ...]]] = [
        ("blockstack", BIG, 32, ("Block",)),
        ("resnet18", WORKLOADS["resnet18"], 128, ()),
    ]
    print(
        f"\nGPU: dtrain launch --gpus 0, (world size 1: nothing is sharded), bf16, Adam, {steps} steps per epoch, "
        "2 epochs (2nd timed), checkpoint after each epoch",
        flush=True,
    )
    plan.report["gpu"] = {}
    for name, model, batch, wrap in models:
        work = model if isinstance(model, Workload) else workload(model)
        data = ensure_data(work, steps * batch)
        label = model.label() if isinstance(model, Size) else "ResNet-18 (small-input stem), 3x32x32"
        rows: dict[str, dict[str, Any]] = {}
        for strategy in ("fsdp", "ddp"):
            result = run_dtrain(
                strategy,
                model,
                data,
                plan,
                nproc=1,
                batch=batch,
                steps=steps,
                epochs=2,
                precision="bf16",
                checkpoint=True,
                wrap=wrap,
            )
            if result["error"]:
                print(f"  {name} {strategy}: ERROR\n{result['error']}", flush=True)
                continue
            rows[strategy] = result
            print(
                f"  {name:10} dtrain {strategy}: {result['samples_per_s']:9.1f} samples/s, train/loss "
                f"{result['train/loss']:.4f}, "
                + ", ".join(f"{k} {result[k]:.0f}" for k in MEMORY_KEYS)
                + f"  ({label}, batch {batch})",
                flush=True,
            )
        plan.report["gpu"][name] = rows
        if len(rows) == 2:
            fsdp, ddp = rows["fsdp"], rows["ddp"]
            plan.results.append(
                result_line(
                    f"fsdp_vs_ddp_cuda_bf16_1rank_{name}_throughput",
                    fsdp["samples_per_s"] / ddp["samples_per_s"],
                    ">=",
                    0.9,
                )
            )
            plan.results.append(
                result_line(
                    f"fsdp_vs_ddp_cuda_bf16_1rank_{name}_peak_memory",
                    fsdp["memory/peak_mb"] / ddp["memory/peak_mb"],
                    "<=",
                    1.1,
                )
            )
        else:
            plan.results.append(result_line(f"fsdp_vs_ddp_cuda_bf16_1rank_{name}_trains", 0.0, ">=", 1, fmt=".0f"))


# ---------------------------------------------------------------------------- main
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and rounds, a 12.1M model for throughput (~5 min on 2 cores)"
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sections", default="", help="memory,throughput,checkpoint and malloc (cuda: gpu,checkpoint)")
    p.add_argument("--repeats", type=int, default=0, help="interleaved throughput rounds (default 3; quick 2)")
    p.add_argument("--size", default="", help="WIDTHxDEPTH: one model size for every section (a smoke test: 128x2)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        from torch.distributed.elastic.multiprocessing.errors import record

        record(WORKERS[args.worker])(json.loads(args.spec))
        return 0
    gpu_run = args.device == "cuda"
    if gpu_run and not _cuda_available():
        print("benchmarks/fsdp.py --device cuda: skipped, torch sees no CUDA device")
        return 0
    sections = (args.sections or ("gpu,checkpoint" if gpu_run else "memory,throughput,checkpoint")).split(",")
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fsdp-", dir=BENCH_DIR) as tmp:
        plan = Plan(args.device, args.quick, args.repeats or (2 if args.quick else 3), Path(tmp), args.verbose)
        if args.size:
            global BIG
            BIG = Size(*(int(n) for n in args.size.split("x")))
        plan.report.update(
            {
                "machine": machine_summary(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join([Path(PY).name, *sys.argv]),
            }
        )
        print(plan.report["machine"])
        if "memory" in sections:
            memory(plan)
        if "throughput" in sections:
            # Quick: a 12.9M model (a 101.6M step takes seconds on 2 shared cores); full: the 101.6M model.
            size, batch, steps = (Size(384, 10), 32, 12) if args.quick and not args.size else (BIG, 16, 6)
            throughput(plan, size, batch, steps)
        if "malloc" in sections:
            size, batch, steps = (Size(384, 10), 32, 12) if args.quick and not args.size else (BIG, 16, 6)
            malloc_cost(plan, size, batch, steps)
        if "gpu" in sections:
            gpu(plan)
        if "checkpoint" in sections:
            # A GPU machine writes the 101.6M model's 1.2 GB in seconds; 2 shared CPU cores take much longer.
            quick_cpu = args.quick and not args.size and not gpu_run
            checkpoint(plan, Size(512, 12) if quick_cpu else BIG, 1 if gpu_run else 2)
    plan.report["load_average_after"] = load_average()
    plan.report["results"] = plan.results
    print(f"\n{time.time() - started:.0f} s; load average after the run: {plan.report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(plan.report, indent=2, default=str))
    for line in plan.results:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
