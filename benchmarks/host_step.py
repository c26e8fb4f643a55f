"""The host side of a training step: main's path against the new one, change by change (A/B).

Batches of the demo water-Cherenkov size (16x40 pixels x 38 channels, batch 256) from HDF5 files in the page
cache, in the training sampler's shuffled order. Each change is timed as interleaved A/B blocks (A = main's
path, B = the new path), repeated; a RESULT line gives the median of the per-repeat ratios B/A.

  defer_<file>        the host's work per batch, in the loader (``make_loader``, num_workers 0, so all of it in
                      this thread; thread CPU time): main's path gathers into float32, permutes channels-last
                      files and normalises on the host; on a GPU the new path gathers the file's bytes as
                      stored (uint8 stays uint8) and leaves cast, permutation and normalisation to the device
                      after the copy (``DeviceFeed``). Files: f32_chw (float32, (C, H, W)), f32_hwc (float32,
                      (H, W, C)), u8_hwc (uint8, (H, W, C)).
  cpu_defer_<file>    the same work when the "device" is this CPU: the new path's gather plus ``DevicePrep`` in
                      the training thread, against main's host path. Deciding whether a CPU run should defer
                      too (it does not: see docs/performance.md).
  pinned_bytes        bytes per batch pinned and copied to the GPU, new/main (u8_hwc: the file's bytes).
  pin_memory          CUDA only: time to pin one batch, new (uint8) / main (float32).
  gpu_prep            CUDA only: a bf16 ResNet-18 step fed the uint8 batch, widened and normalised on the GPU
                      (``DeviceFeed``, all on the compute stream) / the same step fed by main's
                      ``batch_to_device`` of the host-normalised float32 batch. Pinned batches, prepared
                      beforehand: the step's device side only.
  side_stream         CUDA only: the same ``DeviceFeed`` with its copies and preparation on a side stream / on
                      the compute stream.
  channels_last       a ResNet-18 (small-input stem) forward + backward + SGD step on (B, 38, 16, 40) inputs:
                      model and inputs in channels_last / contiguous (CPU: fp32, batch 16; CUDA: bf16, 256).

    python benchmarks/host_step.py [--quick] [--device cpu|cuda] [--repeats 7] [--threads 1] [--dir DIR]

CUDA-only changes print ``RESULT <name> not measured on CPU`` on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `dist_train` importable
    sys.path.insert(0, str(REPO))

from benchmarks.common import BENCH_DIR, load_average, machine_summary, result_line  # noqa: E402
from dist_train.config import DataConfig, ModelConfig  # noqa: E402
from dist_train.data.dataset import H5Split  # noqa: E402
from dist_train.data.device_feed import DeviceFeed, batch_to_device  # noqa: E402
from dist_train.data.loader import make_loader  # noqa: E402
from dist_train.models import build_model  # noqa: E402
from dist_train.sampler import ResumableDistributedBatchSampler  # noqa: E402

HWC = (16, 40, 38)  # the demo files' (H, W, C), as the physics files store it
CHW = (38, 16, 40)
FILES = {
    "f32_chw": ("float32", CHW, "channels_first"),
    "f32_hwc": ("float32", HWC, "channels_last"),
    "u8_hwc": ("uint8", HWC, "channels_last"),
}
BATCH = 256
# A change is kept when B/A is at most this (a 5% cut, more than the spread of a quiet run's repeats).
HELPS = 0.95


def write_file(path: Path, dtype: str, shape: tuple[int, ...], events: int) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        x = f.create_dataset("event_data", shape=(events, *shape), dtype=dtype)
        for lo in range(0, events, 256):
            hi = min(events, lo + 256)
            block = rng.gamma(1.0, 20.0, (hi - lo, *shape))
            x[lo:hi] = np.clip(block, 0, 255).astype(dtype)
        f["labels"] = rng.integers(0, 3, events)
    return path


def split_of(path: Path, layout: str, events: int) -> H5Split:
    mean = [float(c) for c in np.linspace(10.0, 30.0, 38)]
    std = [float(c) for c in np.linspace(15.0, 25.0, 38)]
    return H5Split(path, np.arange(events), mean=mean, std=std, layout=layout)


def loader_pass(split: H5Split, events: int, *, defer: bool, device_type: str = "cpu") -> Callable[[], list[Any]]:
    """One pass of make_loader over the file (num_workers 0: every read in this thread); returns the batches."""
    cfg = DataConfig(num_workers=0, pin_memory=device_type == "cuda")
    sampler = ResumableDistributedBatchSampler(events, num_replicas=1, rank=0, batch_size=BATCH, shuffle=True, seed=0)
    loader = make_loader(split, sampler, cfg, train=False, device_type=device_type, defer_to_device=defer)

    def run() -> list[Any]:
        return [(batch, loader.device_prep) for batch in loader]

    return run


def thread_seconds(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.thread_time()
    out = fn()
    return time.thread_time() - start, out


def ab(name: str, a: Callable[[], float], b: Callable[[], float], repeats: int) -> float:
    """Interleaved A/B (ABBA order alternating), each a seconds figure; the median of the ratios B/A."""
    a(), b()  # warm-up: page cache, buffers, allocator
    ratios, times_a, times_b = [], [], []
    for i in range(repeats):
        if i % 2:
            tb, ta = b(), a()
        else:
            ta, tb = a(), b()
        times_a.append(ta)
        times_b.append(tb)
        ratios.append(tb / ta)
    ratio = statistics.median(ratios)
    print(
        f"  {name:<22} main {statistics.median(times_a) * 1e3:9.2f} ms   new {statistics.median(times_b) * 1e3:9.2f} ms"
        f"   new/main {ratio:.3f}  (ratios {' '.join(f'{r:.2f}' for r in ratios)})"
    )
    return ratio


# ----------------------------------------------------------------------------- the host's work per batch


def host_only(batches: Callable[[], list[Any]]) -> Callable[[], float]:
    """Thread CPU time of a loader pass: what leaves the host, as it leaves it."""
    return lambda: thread_seconds(batches)[0]


def fed_on_cpu(batches: Callable[[], list[Any]], *, channels_last: bool) -> Callable[[], float]:
    """Thread CPU time of a loader pass plus the trainer's DeviceFeed on the CPU (prep, layout)."""

    def run() -> None:
        for batch, prep in batches():
            DeviceFeed(torch.device("cpu"), prep, channels_last=channels_last)(batch)

    return lambda: thread_seconds(run)[0]


def host_work(files: dict[str, Path], events: int, repeats: int, results: list[str]) -> None:
    print(f"\nhost work per pass of {events // BATCH} batches of {BATCH} (thread CPU time, medians of {repeats})")
    for name, path in files.items():
        _, _, layout = FILES[name]
        main = loader_pass(split_of(path, layout, events), events, defer=False)
        new = loader_pass(split_of(path, layout, events), events, defer=True)
        ratio = ab(f"defer_{name}", host_only(main), host_only(new), repeats)
        results.append(result_line(f"host_step_defer_{name}", ratio, "<=", HELPS))
        ratio = ab(
            f"cpu_defer_{name}", fed_on_cpu(main, channels_last=False), fed_on_cpu(new, channels_last=False), repeats
        )
        results.append(result_line(f"host_step_cpu_defer_{name}", ratio, "<=", HELPS))
        if layout == "channels_last":
            ratio = ab(
                f"cpu_cl_model_{name}",
                fed_on_cpu(main, channels_last=True),
                fed_on_cpu(new, channels_last=True),
                repeats,
            )
            results.append(result_line(f"host_step_cpu_channels_last_model_{name}", ratio, "<=", HELPS))
    f32, u8 = BATCH * int(np.prod(HWC)) * 4, BATCH * int(np.prod(HWC))
    print(
        f"  pinned and copied per batch: main {f32 / 2**20:.1f} MiB (float32), new {u8 / 2**20:.1f} MiB (u8_hwc as stored)"
    )
    results.append(result_line("host_step_pinned_bytes_u8_hwc", u8 / f32, "<=", HELPS))


# ----------------------------------------------------------------------------- CUDA: pinning, side stream


class ComputeStreamOnly:
    """DeviceFeed's streams without a side stream: copies and preparation queue on the compute stream."""

    def compute(self) -> None:
        return None

    def side(self) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()

    def compute_waits_for_side(self) -> None:
        pass

    def used_by_compute(self, tensor: torch.Tensor) -> None:
        pass


def cuda_feed(
    device: torch.device, files: dict[str, Path], events: int, repeats: int, steps: int, results: list[str]
) -> None:
    path = files["u8_hwc"]
    main_batches = loader_pass(split_of(path, "channels_last", events), events, defer=False, device_type="cuda")()
    new_batches = loader_pass(split_of(path, "channels_last", events), events, defer=True, device_type="cuda")()
    host32 = [b for b, _ in loader_pass(split_of(path, "channels_last", events), events, defer=False)()]
    host8 = [b for b, _ in loader_pass(split_of(path, "channels_last", events), events, defer=True)()]

    def pin(batches: list[dict[str, torch.Tensor]]) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            for batch in batches:
                batch["x"].pin_memory()
            return time.perf_counter() - start

        return run

    print(f"\nCUDA: pinning, and the step's device side ({steps} steps, medians of {repeats})")
    results.append(
        result_line("host_step_pin_memory_u8_hwc", ab("pin_memory", pin(host32), pin(host8), repeats), "<=", HELPS)
    )
    model = resnet(device).to(memory_format=torch.contiguous_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def main_feed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # main's path
        return batch_to_device(batch, device)

    one_stream = DeviceFeed(device, new_batches[0][1], streams=ComputeStreamOnly())
    side_stream = DeviceFeed(device, new_batches[0][1])

    def steps_with(
        feed: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], batches: list[Any]
    ) -> Callable[[], float]:
        def run() -> float:
            synchronize(device)
            start = time.perf_counter()
            for i in range(steps):
                batch = feed(batches[i % len(batches)][0])
                train_step(model, optimizer, batch["x"], batch["y"], torch.bfloat16)
            synchronize(device)
            return time.perf_counter() - start

        return run

    ratio = ab("gpu_prep", steps_with(main_feed, main_batches), steps_with(one_stream, new_batches), repeats)
    results.append(result_line("host_step_cuda_gpu_prep_u8_hwc", ratio, "<=", 1.0))
    ratio = ab("side_stream", steps_with(one_stream, new_batches), steps_with(side_stream, new_batches), repeats)
    results.append(result_line("host_step_cuda_side_stream", ratio, "<=", 1.0))


# ----------------------------------------------------------------------------- channels_last


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # a timed block ends when the GPU's work does
        torch.cuda.synchronize(device)


def resnet(device: torch.device) -> nn.Module:
    cfg = ModelConfig(name="resnet18", num_classes=3)
    cfg.kwargs["small_input"] = True
    torch.manual_seed(0)
    return build_model(cfg, CHW).to(device)


def train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
) -> None:
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def channels_last(device: torch.device, batch: int, steps: int, repeats: int, results: list[str]) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(
        f"\nchannels_last: ResNet-18 (small-input stem), (B, 38, 16, 40), batch {batch}, {str(dtype)[6:]}, {steps} steps per block"
    )
    contiguous = resnet(device)
    last = resnet(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *CHW, device=device)
    y = torch.randint(0, 3, (batch,), device=device)

    def timed(model: nn.Module, memory_format: torch.memory_format) -> Callable[[], float]:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        inputs = x.contiguous(memory_format=memory_format)

        def run() -> float:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, inputs, y, dtype)
            synchronize(device)
            return time.perf_counter() - start

        return run

    ratio = ab("channels_last", timed(contiguous, torch.contiguous_format), timed(last, torch.channels_last), repeats)
    results.append(result_line(f"host_step_channels_last_{device.type}", ratio, "<=", HELPS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer events and repeats (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeats", type=int, default=0, help="A/B repeats (default 7, --quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where the files go (default: a temporary dir under .bench_tmp)"
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/host_step.py --device cuda: skipped, torch sees no CUDA device")
        return
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    events = 4 * BATCH if args.quick else 8 * BATCH
    print(machine_summary())
    print(f"load average before: {load_average()}; {args.threads} torch thread(s), device {args.device}")
    results: list[str] = []
    BENCH_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir or BENCH_DIR) as tmp:
        files = {
            name: write_file(Path(tmp) / f"{name}.h5", dtype, shape, events)
            for name, (dtype, shape, _) in FILES.items()
        }
        host_work(files, events, repeats, results)
        if args.device == "cuda":
            cuda_feed(torch.device("cuda"), files, events, repeats, 20 if args.quick else 100, results)
        else:
            for name in ("host_step_pin_memory_u8_hwc", "host_step_cuda_gpu_prep_u8_hwc", "host_step_cuda_side_stream"):
                results.append(f"RESULT {name} not measured on CPU (CUDA only: run with --device cuda)")
        if args.device == "cuda":
            channels_last(torch.device("cuda"), BATCH, 10 if args.quick else 50, repeats, results)
        else:
            channels_last(torch.device("cpu"), 8 if args.quick else 16, 1 if args.quick else 2, repeats, results)
    print(f"\nload average after: {load_average()}")
    for line in results:
        print(line)


if __name__ == "__main__":
    main()
