"""Batched HDF5 reads: memmap vs h5py, chunked vs contiguous, sampler order, DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dist_train.config import Config
from dist_train.data.h5io import RowReader, storage_of
from dist_train.data.loader import build_data, make_loader
from dist_train.sampler import IndexBatch, ResumableDistributedBatchSampler, ShardedEvalBatchSampler

N = 300
SHAPE = (3, 6, 5)


def make_h5(
    path: Path, *, chunks: tuple[int, ...] | None = None, compression: str | None = None, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 3, N).astype(np.int64)
    e = rng.uniform(0, 100, (N, 1)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.create_dataset("event_data", data=x, chunks=chunks, compression=compression)
        f.create_dataset("labels", data=y, chunks=(32,) if chunks else None, compression=compression)
        f.create_dataset("energies", data=e, chunks=(16, 1) if chunks else None, compression=compression)
    return path


@pytest.fixture
def contiguous(tmp_path: Path) -> Path:
    return make_h5(tmp_path / "contig.h5")


@pytest.fixture
def compressed(tmp_path: Path) -> Path:
    return make_h5(tmp_path / "gzip.h5", chunks=(7, *SHAPE), compression="gzip")


def config_for(path: Path, **data: object) -> Config:
    cfg = Config()
    cfg.data.path = str(path)
    cfg.data.extra_keys = ["energies"]
    cfg.data.num_workers = 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def naive_batch(path: Path, rows: list[int]) -> dict[str, np.ndarray]:
    """The tutorial reader: one h5py read per sample, in the given order."""
    # locking=False as in dtrain: HDF5 refuses a second open of a file with other locking flags.
    with h5py.File(path, "r", locking=False) as f:
        return {
            "x": np.stack([f["event_data"][r] for r in rows]),
            "y": np.array([f["labels"][r] for r in rows]),
            "energies": np.stack([f["energies"][r] for r in rows]),
        }


def test_storage_detection(contiguous: Path, compressed: Path) -> None:
    with h5py.File(contiguous, "r") as f:
        assert storage_of(f["event_data"]).fast_path
    with h5py.File(compressed, "r") as f:
        st = storage_of(f["event_data"])
        assert not st.fast_path and st.layout == "chunked" and st.compression == "gzip"
    assert RowReader(contiguous, "event_data").uses_memmap
    assert not RowReader(compressed, "event_data").uses_memmap


def test_memmap_and_chunked_reads_equal_h5py(contiguous: Path, compressed: Path) -> None:
    rows = np.array([5, 299, 0, 5, 150, 7, 8, 13, 14, 298], dtype=np.int64)  # unsorted, with a duplicate
    with h5py.File(contiguous, "r", locking=False) as f:
        expected = np.stack([f["event_data"][int(r)] for r in rows])
    for path in (contiguous, compressed):
        got = RowReader(path, "event_data").read(rows)
        np.testing.assert_array_equal(got, expected)


def test_chunked_read_decompresses_each_chunk_once(compressed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader = RowReader(compressed, "event_data")
    reader.sample_shape()  # open
    calls: list[tuple[int, int]] = []
    dset = reader._dset
    assert dset is not None

    class Spy:
        chunks = dset.chunks

        def __getitem__(self, key: slice) -> np.ndarray:
            calls.append((key.start, key.stop))
            return dset[key]

    reader._dset = Spy()  # type: ignore[assignment]
    rows = np.array([20, 1, 3, 22, 15, 0, 21], dtype=np.int64)  # chunks of 7 rows: ids 2, 0, 0, 3, 2, 0, 3
    reader.read(rows)
    chunk_ids = [lo // 7 for lo, _ in calls]
    assert sorted(chunk_ids) == [0, 2, 3]
    assert all((hi - 1) // 7 == lo // 7 for lo, hi in calls)


def test_batches_match_naive_reader_in_sampler_order(contiguous: Path, compressed: Path) -> None:
    for path in (contiguous, compressed):
        bundle = build_data(config_for(path), run_dir=None)
        sampler = ResumableDistributedBatchSampler(len(bundle.train), num_replicas=2, rank=1, batch_size=16, seed=3)
        loader = make_loader(bundle.train, sampler, config_for(path).data, train=True, device_type="cpu")
        seen = 0
        for indices, batch in zip(sampler, loader, strict=True):
            rows = bundle.train.rows[np.asarray(indices)].tolist()
            ref = naive_batch(path, rows)
            assert batch["index"].tolist() == rows
            np.testing.assert_array_equal(batch["x"].numpy(), ref["x"])
            np.testing.assert_array_equal(batch["y"].numpy(), ref["y"])
            np.testing.assert_array_equal(batch["energies"].numpy(), ref["energies"])
            assert batch["x"].dtype == torch.float32 and batch["y"].dtype == torch.int64
            seen += len(rows)
        assert seen == sampler.padded_total() // 2


def test_contiguous_and_compressed_give_identical_batches(contiguous: Path, compressed: Path) -> None:
    a = build_data(config_for(contiguous), run_dir=None).train
    b = build_data(config_for(compressed), run_dir=None).train
    batch = IndexBatch([9, 3, 100, 3, 57], seed=1)
    ba, bb = a[batch], b[batch]
    for key in ("x", "y", "index", "energies"):
        assert torch.equal(ba[key], bb[key])


def test_split_pickles_without_handles(contiguous: Path) -> None:
    split = build_data(config_for(contiguous), run_dir=None).train
    split[IndexBatch([0, 1])]  # opens the file in this process
    blob = pickle.dumps(split)
    assert len(blob) < 20_000 + split.rows.nbytes
    clone = pickle.loads(blob)
    assert torch.equal(clone[IndexBatch([4, 2])]["x"], split[IndexBatch([4, 2])]["x"])


def test_labels_cast_to_int64(tmp_path: Path) -> None:
    path = tmp_path / "i32.h5"
    with h5py.File(path, "w") as f:
        f["event_data"] = np.arange(40, dtype=np.float64).reshape(20, 2)
        f["labels"] = (np.arange(20) % 2).astype(np.int32)
    cfg = config_for(path, extra_keys=[], val_split=0.0, test_split=0.0)
    cfg.model.num_classes = 2
    bundle = build_data(cfg, run_dir=None)
    batch = bundle.train[IndexBatch([3, 0])]
    assert batch["y"].dtype == torch.int64 and batch["y"].tolist() == [1, 0]
    assert batch["x"].dtype == torch.float32 and batch["x"].tolist() == [[6.0, 7.0], [0.0, 1.0]]
    assert bundle.sample_shape == (2,) and bundle.val is None and bundle.test is None


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_workers_with_each_start_method(contiguous: Path, compressed: Path, method: str) -> None:
    path = compressed if method == "spawn" else contiguous
    cfg = config_for(path, num_workers=2, start_method=method, persistent_workers=True, prefetch_factor=2)
    cfg.data.worker_mode = "process"  # "auto" reads contiguous files with threads
    bundle = build_data(cfg, run_dir=None)
    assert bundle.val is not None
    sampler = ShardedEvalBatchSampler(len(bundle.val), num_replicas=1, rank=0, batch_size=8)
    loader = make_loader(bundle.val, sampler, cfg.data, train=False, device_type="cpu")
    assert loader.multiprocessing_context is not None
    assert loader.multiprocessing_context.get_start_method() == method
    expected = naive_batch(path, bundle.val.rows.tolist())
    for _epoch in range(2):  # persistent workers serve a second epoch
        batches = list(loader)
        x = torch.cat([b["x"] for b in batches]).numpy()
        np.testing.assert_array_equal(x, expected["x"])
        np.testing.assert_array_equal(torch.cat([b["y"] for b in batches]).numpy(), expected["y"])
        np.testing.assert_array_equal(torch.cat([b["energies"] for b in batches]).numpy(), expected["energies"])
        assert torch.cat([b["index"] for b in batches]).tolist() == bundle.val.rows.tolist()


def test_worker_batches_arrive_in_shared_memory(contiguous: Path) -> None:
    cfg = config_for(contiguous, num_workers=1, persistent_workers=False, start_method="fork")
    cfg.data.worker_mode = "process"
    bundle = build_data(cfg, run_dir=None)
    sampler = ShardedEvalBatchSampler(len(bundle.train), num_replicas=1, rank=0, batch_size=32)
    batch = next(iter(make_loader(bundle.train, sampler, cfg.data, train=False, device_type="cpu")))
    assert batch["x"].is_shared()
    np.testing.assert_array_equal(batch["x"].numpy(), naive_batch(contiguous, bundle.train.rows[:32].tolist())["x"])


def test_make_loader_options(contiguous: Path) -> None:
    cfg = config_for(contiguous, num_workers=0)
    cfg.data.worker_mode = "process"  # the DataLoader path
    split = build_data(cfg, run_dir=None).train
    sampler = ShardedEvalBatchSampler(len(split), num_replicas=1, rank=0, batch_size=8)
    loader = make_loader(split, sampler, cfg.data, train=True, device_type="cpu")
    assert loader.batch_size is None and not loader.pin_memory and loader.num_workers == 0
    cfg.data.num_workers = 2
    cfg.data.pin_memory = True
    loader = make_loader(split, sampler, cfg.data, train=True, device_type="cuda")
    assert loader.pin_memory and loader.persistent_workers and loader.prefetch_factor == cfg.data.prefetch_factor


def _read_in_child(reader: RowReader, rows: np.ndarray, queue: object) -> None:
    data = reader.read(rows)
    queue.put((reader._generation, data))  # type: ignore[attr-defined]


def test_reader_opened_before_fork_reopens_in_child(compressed: Path) -> None:
    import multiprocessing as mp

    reader = RowReader(compressed, "event_data")
    rows = np.array([3, 250, 17])
    expected = reader.read(rows)  # the parent now holds an open h5py handle
    parent_generation = reader._generation
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(reader, rows, queue))
    child.start()
    generation, got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert generation != parent_generation  # the child opened its own handle
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(reader.read(rows), expected)  # the parent's handle still works


def test_single_position_returns_one_sample(contiguous: Path) -> None:
    split = build_data(config_for(contiguous), run_dir=None).train
    one = split[5]
    assert one["x"].shape == SHAPE and one["y"].ndim == 0 and int(one["index"]) == int(split.rows[5])
    with pytest.raises(IndexError):
        split[IndexBatch([len(split)])]
