"""In-process loading (dist_train.data.prefetch): order, determinism, errors, thread clean-up."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dist_train.config import Config
from dist_train.data import prefetch
from dist_train.data.aligned import CACHE_LINE, aligned_empty
from dist_train.data.loader import build_data, make_loader, use_threads
from dist_train.data.prefetch import INLINE_PROBE_BATCHES, PrefetchLoader, RecycledBuffers
from dist_train.errors import ConfigError, DataError
from dist_train.sampler import ResumableDistributedBatchSampler

N = 203  # not a multiple of the batch size: the last batch is short


def make_images(path: Path, *, compression: str | None = None) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        chunks = (16, 2, 10, 10) if compression else None
        f.create_dataset(
            "event_data",
            data=rng.uniform(0, 255, (N, 2, 10, 10)).astype(np.float32),
            chunks=chunks,
            compression=compression,
        )
        f["labels"] = rng.integers(0, 4, N)
        f["energies"] = rng.uniform(0, 100, (N, 1)).astype(np.float32)
    return path


def config(path: Path, *, mode: str, workers: int, transforms: list[str] | None = None) -> Config:
    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.extra_keys = ["energies"]
    cfg.data.normalize = "auto"
    cfg.data.train_transforms = list(transforms or [])
    cfg.data.eval_transforms = ["CenterCrop(8)"] if transforms else []
    cfg.data.num_workers = workers
    cfg.data.prefetch_factor = 2
    cfg.data.persistent_workers = False
    cfg.data.start_method = "fork"
    cfg.data.worker_mode = mode  # type: ignore[assignment]  # a str (the tests also try an invalid one)
    cfg.model.num_classes = 4
    return cfg


def epoch(cfg: Config, tmp_path: Path, *, seed_epoch: int = 0) -> list[dict[str, torch.Tensor]]:
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=16, seed=5)
    sampler.set_epoch(seed_epoch)
    # All batches are kept alive until compared: recycled buffers must not overwrite held batches.
    return list(make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu"))


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) and len(a) > 3
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


@pytest.mark.parametrize("transforms", [[], ["RandomCrop(8)", "RandomHorizontalFlip()"]])
def test_threads_give_the_dataloader_batches_in_order(tmp_path: Path, transforms: list[str]) -> None:
    path = make_images(tmp_path / "img.h5")
    reference = epoch(config(path, mode="process", workers=0, transforms=transforms), tmp_path, seed_epoch=1)
    for mode, workers in (("thread", 0), ("thread", 2), ("auto", 0), ("auto", 2)):
        got = epoch(config(path, mode=mode, workers=workers, transforms=transforms), tmp_path, seed_epoch=1)
        assert_same_batches(reference, got)
    # The batches really are in the sampler's (shuffled) order, not sorted.
    rows = torch.cat([b["index"] for b in reference]).tolist()
    assert rows != sorted(rows) and sorted(rows) == sorted(set(rows))


def test_random_transforms_leave_the_training_rng_alone(tmp_path: Path) -> None:
    """Threads must not seed torch's global generator under the training thread's feet."""
    path = make_images(tmp_path / "img.h5")
    cfg = config(path, mode="thread", workers=2, transforms=["RandomCrop(8)"])
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=16, seed=5)
    loader = make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu")
    torch.manual_seed(123)
    expected = [torch.rand(3) for _ in range(len(sampler))]
    torch.manual_seed(123)
    drawn = []
    for _batch in loader:
        drawn.append(torch.rand(3))  # what dropout would draw between batches
    assert all(torch.equal(a, b) for a, b in zip(expected, drawn, strict=True))


def test_many_threads_keep_the_order() -> None:
    """More threads than cores (bypassing make_loader's cap): slots still come back in order."""
    batches = [[i] * (1 + i % 3) for i in range(57)]

    def plan(index_batch: list[int], buffers: RecycledBuffers) -> list[int]:
        return index_batch

    def gather(job: list[int]) -> dict[str, torch.Tensor]:
        return {"x": torch.tensor(job)}

    loader = PrefetchLoader(plan, gather, None, batches, num_threads=4, depth=6, pin_memory=False)
    for _ in range(2):
        assert [b["x"].tolist() for b in loader] == batches


def _counting_loader(
    n: int, *, read_s: float = 0.0, fail_at: int | None = None, threads: int = 2, depth: int = 4
) -> PrefetchLoader:
    batches = [[i, i + 1] for i in range(n)]

    def gather(job: list[int]) -> dict[str, torch.Tensor]:
        if read_s:
            time.sleep(read_s)
        if job[0] == fail_at:
            raise OSError(f"simulated I/O error at batch {fail_at}")
        return {"x": torch.tensor(job)}

    return PrefetchLoader(
        lambda index_batch, buffers: index_batch,
        gather,
        None,
        batches,
        num_threads=threads,
        depth=depth,
        pin_memory=False,
    )


def loader_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """dtrain's threads alive now that were not before (a thread left by another test is not counted)."""
    return [t for t in threading.enumerate() if t not in before and t.name.startswith("dtrain-")]


def test_the_switch_to_inline_reads_stops_the_threads_and_keeps_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """What happens once the pass is judged (the judgement itself, on timings, is tested below)."""
    monkeypatch.setattr(prefetch, "threads_save_nothing", lambda recent: len(recent) >= INLINE_PROBE_BATCHES)
    loader = _counting_loader(40, threads=2, depth=4)
    before = set(threading.enumerate())
    it = iter(loader)
    got = [next(it)["x"].tolist() for _ in range(INLINE_PROBE_BATCHES - 1)]
    assert len(loader_threads(before)) == 2, "the threads read during the probe"
    got += [next(it)["x"].tolist() for _ in range(7)]
    assert loader_threads(before) == [], "the reader threads stopped after the probe"
    got += [b["x"].tolist() for b in it]
    assert got == [[i, i + 1] for i in range(40)]


def test_a_pass_of_tiny_reads_gives_every_batch_in_order_whatever_the_timings() -> None:
    """With real timings (switched or not, which depends on the machine's load): same batches, threads gone at the end."""
    loader = _counting_loader(40, threads=1, depth=1)
    before = set(threading.enumerate())
    assert [b["x"].tolist() for b in loader] == [[i, i + 1] for i in range(40)]
    assert loader_threads(before) == []


@pytest.mark.parametrize(
    ("read_s", "consumer_s", "inline"),
    [
        (30e-6, 40e-6, True),  # small reads the consumer waits for anyway: a hand-off only adds cost
        (60e-6, 5e-6, False),  # a busy consumer (a training step) finds its batches ready: threads pay
        (400e-6, 500e-6, False),  # big reads: two readers beat one even when the consumer waits
    ],
)
def test_the_switch_to_inline_reads_weighs_reads_against_the_consumers_wait(
    read_s: float, consumer_s: float, inline: bool
) -> None:
    it = iter(_counting_loader(40))
    try:
        for _ in range(INLINE_PROBE_BATCHES):
            it._judge_threads(read_s, consumer_s)  # type: ignore[attr-defined]
        assert (it._inline is not None) == inline  # type: ignore[attr-defined]
    finally:
        it.close()  # type: ignore[attr-defined]


def test_slow_reads_keep_the_threads() -> None:
    loader = _counting_loader(20, read_s=0.002)
    before = set(threading.enumerate())
    it = iter(loader)
    got = [next(it)["x"].tolist() for _ in range(INLINE_PROBE_BATCHES + 4)]
    assert len(loader_threads(before)) == 2, "2 ms reads are worth reading ahead"
    got += [b["x"].tolist() for b in it]
    assert got == [[i, i + 1] for i in range(20)]


def test_read_error_late_in_a_pass_of_tiny_reads_surfaces_at_its_batch() -> None:
    """Whether or not the pass switched to inline reads by then, the error comes at its position."""
    it = iter(_counting_loader(30, fail_at=INLINE_PROBE_BATCHES + 8, threads=1, depth=1))
    for i in range(INLINE_PROBE_BATCHES + 8):
        assert next(it)["x"].tolist() == [i, i + 1]
    with pytest.raises(OSError, match="simulated I/O error"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_big_batch_buffers_survive_between_passes() -> None:
    """Three batches' buffers are kept for the next pass even above max_bytes (no re-faulting per epoch)."""
    pool = RecycledBuffers(limit=5, max_bytes=1 << 20)
    shape = (64, 1024, 8)  # 2 MiB each, above max_bytes
    held = [pool.get(shape) for _ in range(3)]
    del held
    pool.trim()
    assert len(pool._blocks) == 3, "trimmed to max_bytes, the next pass would fault in 6 MiB afresh"


def test_read_error_surfaces_at_its_batch(tmp_path: Path) -> None:
    path = make_images(tmp_path / "img.h5")
    cfg = config(path, mode="thread", workers=2)
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=16, seed=5)
    loader = make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu")
    bad_rows = set(bundle.train.rows[list(sampler)[3]].tolist())
    real_read = loader.gather.__self__._x.read  # type: ignore[attr-defined]

    def failing_read(rows: np.ndarray, out: Any = None) -> np.ndarray:
        if set(rows.tolist()) == bad_rows:
            raise OSError("simulated I/O error")
        return real_read(rows, out=out)

    loader.gather.__self__._x.read = failing_read  # type: ignore[attr-defined]
    before = set(threading.enumerate())
    it = iter(loader)
    for _ in range(3):
        next(it)
    with pytest.raises(DataError, match="simulated I/O error"):
        next(it)
    assert loader_threads(before) == []  # the failure closed the iterator's threads


@pytest.mark.parametrize("workers", [1, 2])
def test_dropping_an_iterator_stops_its_threads(tmp_path: Path, workers: int) -> None:
    path = make_images(tmp_path / "img.h5")
    cfg = config(path, mode="thread", workers=workers)
    bundle = build_data(cfg, run_dir=tmp_path / "run")
    sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=16, seed=5)
    loader = make_loader(bundle.train, sampler, cfg.data, train=True, device_type="cpu")
    before = set(threading.enumerate())
    it = iter(loader)
    next(it)
    assert len(loader_threads(before)) == loader.num_threads > 0  # it really uses threads
    del it  # what the trainer does at the end of an epoch, mid-epoch when it stops early
    gc.collect()
    assert loader_threads(before) == []
    assert len(list(loader)) == len(sampler)  # exhausting an iterator also ends its threads
    assert loader_threads(before) == []


def test_recycled_buffers_never_overwrite_a_held_batch() -> None:
    pool = RecycledBuffers(limit=2)
    a = pool.get((4, 3))
    a[:] = 1
    view = torch.from_numpy(a)[1:]  # the consumer keeps only a view of a tensor of it
    del a
    b = pool.get((4, 3))
    b[:] = 2
    assert torch.all(view == 1)
    del b
    c = pool.get((4, 3))  # b's memory is free again: reused, not a third block
    assert len(pool._blocks) == 2 and c.ctypes.data in {blk.ctypes.data for blk in pool._blocks}


@pytest.mark.parametrize("dtype", [np.float32, np.uint8, np.float64])
def test_batch_buffers_start_at_a_cache_line(dtype: type) -> None:
    """Pooled and fresh buffers alike: the hit builders' streaming stores need aligned rows."""
    pool = RecycledBuffers(limit=1, max_bytes=0)
    held = [pool.get((3, 5, 7), dtype) for _ in range(3)]  # the first pooled, the rest fresh (limit 1)
    held.append(aligned_empty((2, 4), dtype))
    for arr in held:
        assert arr.ctypes.data % CACHE_LINE == 0 and arr.flags.c_contiguous and arr.flags.writeable
        assert arr.dtype == dtype
    assert [a.shape for a in held] == [(3, 5, 7)] * 3 + [(2, 4)]
    held[0][...] = 1
    held[1][...] = 2
    assert (held[0] == 1).all(), "distinct memory"


def test_auto_mode_picks_threads_only_for_the_fast_path(tmp_path: Path) -> None:
    contiguous = make_images(tmp_path / "c.h5")
    compressed = make_images(tmp_path / "z.h5", compression="gzip")
    for path, threads in ((contiguous, True), (compressed, False)):
        cfg = config(path, mode="auto", workers=2)
        split = build_data(cfg, run_dir=tmp_path / path.stem).train
        assert use_threads(split, cfg.data) is threads
        sampler = ResumableDistributedBatchSampler(len(split), num_replicas=1, rank=0, batch_size=16, seed=5)
        loader = make_loader(split, sampler, cfg.data, train=True, device_type="cpu")
        assert isinstance(loader, PrefetchLoader if threads else DataLoader)
    cfg = config(contiguous, mode="auto", workers=2, transforms=["RandomCrop(8)"])
    # Random per-sample transforms are Python loops: worker processes, not threads.
    assert not use_threads(build_data(cfg, run_dir=tmp_path / "t").train.with_transforms(["RandomCrop(8)"]), cfg.data)


def test_unknown_worker_mode_is_a_config_error(tmp_path: Path) -> None:
    cfg = config(make_images(tmp_path / "img.h5"), mode="fibers", workers=2)
    split = build_data(cfg, run_dir=tmp_path / "run").train
    sampler = ResumableDistributedBatchSampler(len(split), num_replicas=1, rank=0, batch_size=16, seed=5)
    with pytest.raises(ConfigError, match="data.worker_mode"):
        make_loader(split, sampler, cfg.data, train=True, device_type="cpu")
