"""How long a checkpoint blocks training: plain torch.save vs dtrain's synchronous and async saves.

A stack of nn.Linear layers (~100M parameters; ``--quick``: ~20M) plus its Adam state (about 3x the
parameters in bytes) is saved to a directory on the real disk. "Blocked" is the time until the save
call returns, i.e. the time the training loop cannot run:

* plain    ``torch.save(state, path)`` (no fsync, no checksum: what a hand-written loop does)
* sync     ``CheckpointManager.save`` (temp file, sha256 while writing, fsync, rename, pointer)
* async    ``CheckpointManager(async_save=True).save``: a CPU snapshot, then a background write;
           its total time until durable (``wait()``) is printed too. The manager keeps its
           CPU buffers between saves, so the first save (fresh memory) is reported apart.
* sharded  ``ShardedCheckpointManager.save`` (the ``strategy = "fsdp"`` format) in ONE process:
           DCP write + fsync + sha256 of every file + manifest + rename; synchronous, and async
           (``dcp.async_save``: blocked while staging, then total until published). With N ranks
           each rank writes 1/N of this in parallel; one process shows the format's own overhead.

With ``--device cuda`` the model and optimizer live on the GPU, as in training: the plain save then
includes torch.save's own device-to-host copies, and the async save's snapshot copies into pinned
host buffers (non-blocking copies, one synchronize) before the write goes to the background.

Usage: python benchmarks/checkpoint.py [--quick] [--dir PATH] [--repeats N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dist_train.checkpoint.file import CheckpointManager  # noqa: E402
from dist_train.checkpoint.sharded import ShardedCheckpointManager  # noqa: E402

TARGET_RATIO = 0.2


def build_state(params_millions: int, device: str = "cpu") -> tuple[dict, int]:
    """Model + Adam state after one real step, shaped like the trainer's checkpoint dict."""
    width = 2048
    layers = max(1, round(params_millions * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(2, width, device=device)).sum().backward()
    optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    state = {
        "format_version": 1,
        "epoch": 0,
        "step": 1,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": [{"torch": torch.get_rng_state()}],
    }
    return state, params


def state_bytes(state: dict) -> int:
    total = 0
    for value in state["model"].values():
        total += value.numel() * value.element_size()
    for per_param in state["optimizer"]["state"].values():
        total += sum(t.numel() * t.element_size() for t in per_param.values() if isinstance(t, torch.Tensor))
    return total


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # no GPU work of one measurement may run into the next


def timed(action: Callable[[], object]) -> float:
    _sync()
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def measure(state: dict, workdir: Path, repeats: int) -> dict[str, list[float]]:
    """Each method's times; the async manager lives across saves, as in training (its first save is separate)."""
    results: dict[str, list[float]] = {"plain": [], "sync": [], "async_first": [], "async_stall": [], "async_total": []}
    sync_manager = CheckpointManager(workdir / "sync", keep_last=1)
    async_manager = CheckpointManager(workdir / "async", keep_last=1, async_save=True)
    for rep in range(repeats + 1):
        os.sync()  # each method starts without the previous one's dirty pages being written back under it
        _sync()
        start = time.perf_counter()
        async_manager.save(state, epoch=0, step=rep)
        stall = time.perf_counter() - start
        async_manager.wait()
        results["async_first" if rep == 0 else "async_stall"].append(stall)
        if rep == 0:
            continue
        results["async_total"].append(time.perf_counter() - start)

        plain_path = workdir / f"plain-{rep}.pt"
        results["plain"].append(timed(lambda p=plain_path: torch.save(state, p)))
        plain_path.unlink()
        os.sync()
        results["sync"].append(timed(lambda r=rep: sync_manager.save(state, epoch=0, step=r)))
    async_manager.close()
    return results


def measure_sharded(state: dict, workdir: Path, repeats: int) -> dict[str, list[float]]:
    """The sharded format in one process: synchronous save, and the async save's stall and total."""
    tensors = {
        "model": state["model"],
        "optimizer": {
            "state": {str(k): v for k, v in state["optimizer"]["state"].items()},
            "param_groups": state["optimizer"]["param_groups"],
        },
    }
    common = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
    results: dict[str, list[float]] = {"sharded_sync": [], "sharded_async_stall": [], "sharded_async_total": []}
    sync_manager = ShardedCheckpointManager(workdir / "sharded-sync", rank=0, group=None, keep_last=1)
    async_manager = ShardedCheckpointManager(
        workdir / "sharded-async", rank=0, group=None, keep_last=1, async_save=True
    )
    for rep in range(1, repeats + 1):
        os.sync()
        results["sharded_sync"].append(timed(lambda r=rep: sync_manager.save(tensors, common, {}, epoch=0, step=r)))
        os.sync()
        start = time.perf_counter()
        async_manager.save(tensors, common, {}, epoch=0, step=rep)
        results["sharded_async_stall"].append(time.perf_counter() - start)
        async_manager.wait()
        results["sharded_async_total"].append(time.perf_counter() - start)
    async_manager.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="~20M parameters instead of ~100M")
    parser.add_argument("--dir", type=Path, default=REPO / ".bench_tmp", help="where to write (a real disk)")
    parser.add_argument("--repeats", type=int, default=0, help="repetitions per method (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the model and optimizer live")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    repeats = args.repeats or 3

    state, params = build_state(20 if args.quick else 100, args.device)
    size = state_bytes(state)
    args.dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=args.dir))
    try:
        results = measure(state, workdir, repeats)
        results.update(measure_sharded(state, workdir, repeats))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if args.dir == REPO / ".bench_tmp" and not any(args.dir.iterdir()):
            args.dir.rmdir()

    mb = size / 1e6
    print(f"model: {params / 1e6:.1f}M parameters; checkpoint tensors {mb:,.0f} MB (model + Adam state)")
    print(
        f"directory: {args.dir} (median of {repeats}); state on {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
    )
    medians = {name: statistics.median(values) for name, values in results.items()}
    for name, label in [
        ("plain", "plain torch.save (blocked)"),
        ("sync", "dtrain sync save (blocked)"),
        ("async_first", "dtrain async, 1st save (blocked)"),
        ("async_stall", "dtrain async save (blocked)"),
        ("async_total", "dtrain async until durable"),
        ("sharded_sync", "sharded sync save (blocked)"),
        ("sharded_async_stall", "sharded async save (blocked)"),
        ("sharded_async_total", "sharded async until published"),
    ]:
        runs = ", ".join(f"{v:.2f}" for v in results[name])
        print(f"  {label:30} {medians[name]:7.3f} s  {mb / medians[name]:8.0f} MB/s   runs: {runs}")
    ratio = medians["async_stall"] / medians["plain"]
    print(
        f"  async stall / dtrain sync save: {medians['async_stall'] / medians['sync']:.3f}; "
        f"first async save (fresh buffers) / plain: {medians['async_first'] / medians['plain']:.3f}"
    )
    verdict = "met" if ratio <= TARGET_RATIO else "missed"
    name = "checkpoint_async_stall_ratio" + ("_cuda" if args.device == "cuda" else "")
    print(f"RESULT {name} value={ratio:.3f} target=<={TARGET_RATIO} {verdict}")
    sharded_ratio = medians["sharded_async_stall"] / medians["plain"]
    print(f"  sharded sync save / plain torch.save: {medians['sharded_sync'] / medians['plain']:.3f}")
    sharded_verdict = "met" if sharded_ratio <= TARGET_RATIO else "missed"
    print(
        f"RESULT {name.replace('checkpoint_', 'checkpoint_sharded_')} value={sharded_ratio:.3f} target=<={TARGET_RATIO} {sharded_verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
