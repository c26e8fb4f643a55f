"""In-process batch loading for splits on the memmap fast path: no worker processes, no IPC (torch).

A batch of a contiguous, uncompressed split is one ``np.take`` from the page cache into a fresh
buffer, which takes tens of microseconds; handing a batch from a DataLoader worker process to the
main process costs about a millisecond on a small shared machine (a socket round trip, a
shared-memory file and page faults). So for such splits :func:`dist_train.data.loader.make_loader`
returns a :class:`PrefetchLoader` instead of a DataLoader:

* ``num_threads == 0``: the batches are read in the calling thread, straight from the sampler
  (none of the DataLoader's per-batch machinery);
* ``num_threads > 0``: that many background threads read ahead, at most ``depth`` batches ahead of
  the consumer. The consumer's thread does each batch's bookkeeping when it queues it (positions,
  labels, buffers: ``plan``); a thread does only the reads (``gather``: ``np.take`` and torch's
  kernels release the GIL), so the read overlaps the training step. Each batch has its own slot, handed out in the sampler's order; the consumer takes the
  slots in that order, so it gets exactly the sampler's order whichever thread read what (a slot
  no thread has started when the consumer needs it is read by the consumer itself).

Random transforms (torchvision v2 draws from torch's *global* generator, which
``BatchTransforms`` seeds with ``IndexBatch.seed`` under ``fork_rng``) never run in a background
thread: that generator is shared with the training thread (dropout, ...), so seeding it from another
thread would change the training's random numbers and make batches depend on thread timing. The
threads read and apply deterministic transforms; the random transforms and the normalisation that
follows them run in the consumer's thread when it takes the batch (``finish``).

Batch buffers are recycled (:class:`RecycledBuffers`): with several batches alive at once, fresh
buffers of a few megabytes were page-faulted in on every batch.

Tiny reads are not always worth a thread: handing a batch from a reader thread to the consumer costs a
few lock and futex operations (10-30 us on a small shared machine), as much as a ``np.take`` of 64
small samples. Each pass times its reads and the consumer's time inside ``next()``; when, over the
last ``INLINE_PROBE_BATCHES`` batches, the reads averaged under ``INLINE_READ_S`` *and* the consumer
spent as long in ``next()`` as the reads took (so the threads took no work off it: it waited, or read
the batches itself), the rest of the pass is read in the consumer's thread, exactly as with
``num_threads == 0`` (same batches, same order). A consumer with a real training step finds its
batches ready and keeps the threads; so do larger reads and a cold page cache.

An exception raised while reading batch ``i`` is re-raised by the ``next()`` that would have
returned batch ``i``. Dropping the iterator (or ``close()``, or exhausting it) stops and joins its
threads; they hold no reference to the iterator, so CPython's reference counting runs its
``__del__`` as soon as the consumer lets go of it (the trainer does ``del`` at the end of an epoch).
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

import numpy as np
import torch

from dist_train.data.aligned import aligned_empty
from dist_train.data.device_feed import DevicePrep

Batch = dict[str, torch.Tensor]
# plan(index_batch, buffers) -> a job, in the consuming thread (bookkeeping, allocation);
# gather(job) -> a batch, in a reader thread (the reads; releases the GIL);
# finish(batch, index_batch) -> the batch, in the consuming thread (random transforms).
PlanFn = Callable[[Any, "RecycledBuffers"], Any]
GatherFn = Callable[[Any], Any]
FinishFn = Callable[[Any, Any], Batch]

_STOP = object()
# Over the latest INLINE_PROBE_BATCHES batches: reads under this on average, and a consumer that waited
# as long as they took, switch the rest of the pass to inline reads (see above).
INLINE_READ_S = 100e-6
INLINE_PROBE_BATCHES = 8
# Reading further ahead than this many bytes of samples gains nothing (one batch of it is a
# millisecond's read from the page cache) and costs memory: depth is cut for big batches.
AHEAD_BYTES = 64 << 20


class PrefetchLoader:
    """An iterable over the batches of ``batch_sampler``; each ``iter()`` is a new pass (epoch)."""

    def __init__(
        self,
        plan: PlanFn,
        gather: GatherFn,
        finish: FinishFn | None,
        batch_sampler: Any,
        *,
        num_threads: int,
        depth: int,
        pin_memory: bool,
        name: str = "data",
    ) -> None:
        self.plan = plan
        self.gather = gather
        self.finish = finish
        self.batch_sampler = batch_sampler
        self.num_threads = max(0, int(num_threads))
        self.depth = max(self.num_threads, int(depth)) if self.num_threads else 0
        # Kept across passes (epochs): in flight are at most ``depth`` batches, plus the one the
        # consumer holds while asking for the next, plus one it may still hold (a view, a saved tensor).
        self.buffers = RecycledBuffers(limit=self.depth + 3)
        self.pin_memory = pin_memory
        self.name = name
        self.device_prep: DevicePrep | None = None  # set by make_loader

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        if self.num_threads == 0:
            return self._serial()
        return PrefetchIterator(self)

    def _serial(self) -> Iterator[Batch]:
        return self.read_inline(iter(self.batch_sampler))

    def read_inline(self, index_batches: Iterator[Any]) -> Iterator[Batch]:
        """The batches of ``index_batches`` read in the calling thread."""
        plan, gather, finish, pin, buffers = self.plan, self.gather, self.finish, self.pin_memory, self.buffers
        try:
            for index_batch in index_batches:
                batch = gather(plan(index_batch, buffers))
                if finish is not None:
                    batch = finish(batch, index_batch)
                yield pin_batch(batch) if pin else batch
        finally:
            buffers.trim()


class _Slot:
    """One batch in flight: read by a reader thread or, if none has started it, by the consumer."""

    __slots__ = ("index_batch", "job", "done", "ok", "value", "seconds")

    def __init__(self, index_batch: Any, job: Any) -> None:
        self.index_batch = index_batch
        self.job = job
        self.done = threading.Lock()
        self.done.acquire()  # released by the reader thread once ``ok``/``value`` are set
        self.ok = False
        self.value: Any = None
        self.seconds = 0.0  # how long the read took (whoever did it)


class PrefetchIterator:
    """One pass over the sampler with ``num_threads`` reader threads (see the module docstring).

    Unstarted slots wait in a deque. The threads take the *newest* one, the consumer the *oldest*
    one when the batch it wants has not been started: it reads that batch itself instead of waiting
    for a thread to be scheduled. So the two work from opposite ends and seldom wait on each other:
    with a consumer that mostly waits for data (or on a machine with no free core for a thread)
    the loader costs about what a plain loop costs, and with a busy consumer the threads are ahead
    and every batch is ready when it is asked for. Which thread read a batch never changes it.
    """

    def __init__(self, loader: PrefetchLoader) -> None:
        self._loader = loader
        self._plan = loader.plan
        self._gather = loader.gather
        self._buffers = loader.buffers
        self._finish = loader.finish
        # A batch that is finished here gets new tensors, so it is pinned here, after finishing.
        self._pin_in_reader = loader.pin_memory and loader.finish is None
        self._pin_here = loader.pin_memory and loader.finish is not None
        self._depth = loader.depth
        self._indices: Iterator[Any] = iter(loader.batch_sampler)
        self._stop = threading.Event()
        self._tasks: deque[_Slot] = deque()  # unstarted slots, oldest on the left
        self._wakeups: queue.SimpleQueue[Any] = queue.SimpleQueue()  # one token per queued slot
        # The slots the next() calls will return, in order; an exception instead of a slot is a
        # sampler failure, raised at the position it happened.
        self._pending: deque[_Slot | BaseException] = deque()
        self._exhausted = False
        self._closed = False
        # (read seconds, consumer seconds in next()) of the latest batches, for the switch to inline reads
        self._recent: deque[tuple[float, float]] = deque(maxlen=INLINE_PROBE_BATCHES)
        self._inline: Iterator[Batch] | None = None  # the rest of the pass, once reads proved tiny
        self._threads = [
            threading.Thread(
                target=_read_loop,
                args=(self._gather, self._pin_in_reader, self._tasks, self._wakeups, self._stop),
                name=f"dtrain-{loader.name}-prefetch-{k}",
                daemon=True,  # a read stuck on a dead filesystem must not keep the process alive
            )
            for k in range(loader.num_threads)
        ]
        for t in self._threads:
            t.start()
        self._top_up()

    def __iter__(self) -> PrefetchIterator:
        return self

    def __next__(self) -> Batch:
        entered = time.perf_counter()
        if self._closed:
            raise StopIteration
        if not self._pending:
            if self._inline is not None:
                try:
                    return next(self._inline)
                except BaseException:  # the end of the pass, or a read error: either way this pass is over
                    self.close()
                    raise
            self.close()
            raise StopIteration
        slot = self._pending.popleft()
        self._top_up()
        if isinstance(slot, BaseException):
            self.close()
            raise slot
        self._wait_or_read_inline(slot)
        if not slot.ok:
            self.close()
            raise slot.value
        self._judge_threads(slot.seconds, time.perf_counter() - entered)
        if self._finish is None:
            return slot.value
        batch = self._finish(slot.value, slot.index_batch)
        return pin_batch(batch) if self._pin_here else batch

    def _wait_or_read_inline(self, wanted: _Slot) -> None:
        while not wanted.done.acquire(blocking=False):
            try:
                slot = self._tasks.popleft()  # the oldest slot no thread has started
            except IndexError:
                wanted.done.acquire()  # a thread is reading it: wait (the GIL is released)
                return
            _fill(slot, self._gather, self._pin_in_reader)

    def _judge_threads(self, read_s: float, consumer_s: float) -> None:
        """Switch the rest of the pass to inline reads when the threads save the consumer nothing."""
        if self._inline is not None:
            return
        self._recent.append((read_s, consumer_s))
        if threads_save_nothing(self._recent):
            self._stop_threads()  # already queued slots are still returned first, read by whoever has them
            self._inline = self._loader.read_inline(iter(()) if self._exhausted else self._indices)

    def _top_up(self) -> None:
        """Queue index batches until ``depth`` are in flight (or the sampler is done)."""
        while not self._exhausted and self._inline is None and len(self._pending) < self._depth_now():
            try:
                index_batch = next(self._indices)
            except StopIteration:
                self._exhausted = True
                return
            except Exception as exc:  # raised at the position it belongs to, after earlier batches
                self._exhausted = True
                self._pending.append(exc)
                return
            try:
                job = self._plan(index_batch, self._buffers)
            except Exception as exc:  # e.g. a position past the end: raised at that batch too
                self._exhausted = True
                self._pending.append(exc)
                return
            slot = _Slot(index_batch, job)
            self._pending.append(slot)
            self._tasks.append(slot)
            self._wakeups.put(None)

    def _depth_now(self) -> int:
        """``depth`` batches ahead, but not more than AHEAD_BYTES of samples (known after one batch)."""
        return min(self._depth, max(1, AHEAD_BYTES // max(1, self._buffers.last_nbytes)))

    def close(self) -> None:
        """Stop the reader threads and wait for them (a read in progress is finished first)."""
        if self._closed:
            return
        self._closed = True
        self._stop_threads()
        self._pending.clear()
        if self._inline is not None:
            self._inline.close()  # type: ignore[attr-defined]  # a generator: runs its clean-up
        self._buffers.trim()

    def _stop_threads(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for _ in self._threads:
            self._wakeups.put(_STOP)
        current = threading.current_thread()
        for t in self._threads:
            if t is not current:
                t.join()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: S110  (interpreter shutdown: threads are daemons, nothing to do)
            pass


def threads_save_nothing(recent: deque[tuple[float, float]]) -> bool:
    """Over a full probe window of (read seconds, consumer seconds in next()): tiny reads, and a consumer that waited as long."""
    if len(recent) < INLINE_PROBE_BATCHES:
        return False
    reads = sum(r for r, _ in recent)
    waits = sum(c for _, c in recent)
    return reads < len(recent) * INLINE_READ_S and waits >= reads


def _read_loop(
    gather: GatherFn, pin: bool, tasks: deque[_Slot], wakeups: queue.SimpleQueue[Any], stop: threading.Event
) -> None:
    # Takes no reference to the iterator, so dropping the iterator runs its __del__ (and close()).
    while True:
        token = wakeups.get()
        if token is _STOP or stop.is_set():
            return
        try:
            slot = tasks.pop()  # the newest: furthest from the slot the consumer will want next
        except IndexError:  # the consumer read it itself
            continue
        _fill(slot, gather, pin)


def _fill(slot: _Slot, gather: GatherFn, pin: bool) -> None:
    start = time.perf_counter()
    try:
        batch = gather(slot.job)
        slot.seconds = time.perf_counter() - start
        slot.job = None
        slot.value = pin_batch(batch) if pin else batch
        slot.ok = True
    except BaseException as exc:  # handed to the consumer, raised at this batch's position
        slot.value = exc
    slot.done.release()


class RecycledBuffers:
    """Batch buffers (float32, or a file's own dtype), handed out again once nothing uses the previous hand-out.

    Why: page faults. A fresh buffer of a few megabytes per batch is faulted in page by page
    whenever glibc has given the freed space back (it does when other batch buffers are alive in
    between, i.e. with prefetching); at ~3 us a fault on this VM that costs 3-4x the gather itself
    (measured: batch-512 MNIST-sized reads 2x slower with a thread than inline, and a pass that
    keeps every batch alive 4x slower than one reusing the buffer).

    Why it is safe: each hand-out is a new ndarray over the pool's memory made through a
    ``memoryview``, so it does not own its data and is not an ndarray view of the pool's array:
    numpy views of it keep *it* alive (as their ``base``), and so do ``torch.from_numpy`` tensors,
    their views and the tensors autograd saves for backward. The pool keeps only a weak reference
    to the hand-out and reuses the memory once that reference is dead. Pinned and device copies
    are new memory. At most ``limit`` buffers are kept, and during a pass no more than
    ``max_bytes`` unless that is fewer than three (the one being filled, the one the consumer holds
    and one it may still hold); past that, buffers are plain fresh arrays. Between passes (epochs,
    evaluations) only ``max_bytes`` (or three of the largest batches, if more) stay (:meth:`trim`).
    """

    def __init__(self, limit: int, max_bytes: int = AHEAD_BYTES) -> None:
        self.limit = limit
        self.max_bytes = max_bytes
        self.last_nbytes = 0  # of the latest request: the prefetch depth is bounded in bytes
        self.largest_nbytes = 0  # of any request: three of these may always be kept
        self._blocks: list[np.ndarray] = []
        self._handouts: list[weakref.ref[np.ndarray] | None] = []
        self._bytes = 0
        self._lock = threading.Lock()  # iterators of one loader may be consumed from different threads

    def get(self, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
        dtype = np.dtype(dtype)
        self.last_nbytes = nbytes = math.prod(shape) * dtype.itemsize
        self.largest_nbytes = max(self.largest_nbytes, nbytes)
        with self._lock:
            for i, block in enumerate(self._blocks):
                ref = self._handouts[i]
                if block.shape == shape and block.dtype == dtype and (ref is None or ref() is None):
                    return self._hand_out(i)
            fits = self._bytes + nbytes <= self._keep_bytes()
            if len(self._blocks) < self.limit and fits:
                self._blocks.append(aligned_empty(shape, dtype))
                self._handouts.append(None)
                self._bytes += nbytes
                return self._hand_out(len(self._blocks) - 1)
        return aligned_empty(shape, dtype)

    def trim(self) -> None:
        """Let go of the buffers past what a pass may keep (one still in use lives on through its hand-out).

        That is ``max_bytes``, or three of the largest batches if they are bigger: the next pass (epoch)
        needs that many again, and re-faulting 3 x 50 MB of fresh memory per pass is what trimming
        them to ``max_bytes`` used to cost.
        """
        keep = self._keep_bytes()
        with self._lock:
            while self._blocks and self._bytes > keep:
                self._bytes -= self._blocks.pop().nbytes
                self._handouts.pop()

    def _keep_bytes(self) -> int:
        # Three of the largest batches: the one being filled, the one the consumer holds and one it
        # may still hold; the short last batch of a pass fits beside two full ones.
        return max(self.max_bytes, 3 * self.largest_nbytes)

    def _hand_out(self, i: int) -> np.ndarray:
        arr = np.asarray(memoryview(cast(Any, self._blocks[i])))
        self._handouts[i] = weakref.ref(arr)
        return arr


def pin_batch(batch: Any) -> Any:
    """Page-locked copies for fast, asynchronous host-to-GPU copies (CUDA only)."""
    if isinstance(batch, dict):
        return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(pin_batch(v) for v in batch)
    return batch.pin_memory() if isinstance(batch, torch.Tensor) else batch
