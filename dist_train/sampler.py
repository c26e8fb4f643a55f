"""Batch samplers: a resumable DistributedSampler for training and a non-padding one for evaluation.

Both yield :class:`IndexBatch` objects (a list of split-local positions plus a seed), which the
dataset reads in one go. The training order is exactly ``torch.utils.data.DistributedSampler``'s
(same permutation, same padding, same rank interleave), so a run with dtrain sees the same
samples as the textbook DDP loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler


class IndexBatch(list):  # type: ignore[type-arg]
    """Positions of one batch, in the order the sampler decided, plus a seed for augmentation.

    The seed is derived from (run seed, epoch, batch number, rank), so random transforms give the
    same result whichever loader worker reads the batch and after a resume.
    """

    def __init__(self, positions: list[int], seed: int = 0) -> None:
        super().__init__(positions)
        self.seed = seed

    def __reduce__(self) -> tuple[Any, ...]:
        return (IndexBatch, (list(self), self.seed))


class ResumableDistributedBatchSampler(Sampler[IndexBatch]):
    """Per-rank batches of a seeded global permutation, able to start in the middle of an epoch.

    The position in an epoch is stored as the number of *global* samples already consumed, which
    does not depend on the world size: a resume with a different number of ranks re-shards the
    remaining samples of the epoch instead of repeating or skipping any.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        num_replicas: int,
        rank: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError("cannot sample from an empty split")
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0  # global samples consumed before this iteration began (after a resume)
        self.consumed_batches = 0  # batches of this rank consumed since _start (the trainer counts)

    # ------------------------------------------------------------------ epoch and position
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._start = 0
            self.consumed_batches = 0
        self.epoch = epoch

    def record_consumed(self, batches: int = 1) -> None:
        """Called by the trainer once per micro-batch it has fully processed."""
        self.consumed_batches += batches

    @property
    def consumed_samples(self) -> int:
        """Global samples consumed in this epoch (all ranks together, padding included)."""
        return min(self._start + self.consumed_batches * self.batch_size * self.num_replicas, self.padded_total())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed_samples": self.consumed_samples,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"the checkpoint's training split has {state['num_samples']} samples, this run has "
                f"{self.num_samples}: the data or split settings changed, so the position cannot be restored"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self._start = int(state["consumed_samples"])
        self.consumed_batches = 0

    # ------------------------------------------------------------------ order
    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)  # the same seeding as DistributedSampler
        return torch.randperm(self.num_samples, generator=g).tolist()

    def padded_total(self) -> int:
        """Samples in one full epoch over all ranks, DistributedSampler's padding included."""
        if self.drop_last:
            return (self.num_samples // self.num_replicas) * self.num_replicas
        return math.ceil(self.num_samples / self.num_replicas) * self.num_replicas

    def _remaining_for_rank(self) -> list[int]:
        order = self._permutation()
        total = self.padded_total()
        if not self.drop_last and total > len(order):
            pad = total - len(order)
            order = order + (order * math.ceil(pad / len(order)))[:pad]
        order = order[:total]
        remaining = order[self._start :]
        if not remaining:
            return []
        # After a world-size change the remainder may not split evenly: pad it the same way.
        if len(remaining) % self.num_replicas:
            extra = self.num_replicas - len(remaining) % self.num_replicas
            remaining = remaining + (remaining * math.ceil(extra / len(remaining)))[:extra]
        return remaining[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[IndexBatch]:
        mine = self._remaining_for_rank()
        first_batch = self._start // (self.batch_size * self.num_replicas)
        for i, lo in enumerate(range(0, len(mine), self.batch_size)):
            seed = hash((self.seed, self.epoch, first_batch + i, self.rank)) & 0x7FFFFFFF
            yield IndexBatch(mine[lo : lo + self.batch_size], seed)

    def __len__(self) -> int:
        per_rank = len(self._remaining_for_rank()) if self._start else self.padded_total() // self.num_replicas
        return math.ceil(per_rank / self.batch_size)


class ShardedEvalBatchSampler(Sampler[IndexBatch]):
    """Contiguous, non-padded shards: every evaluation sample is seen exactly once across ranks.

    ``DistributedSampler`` pads the last shard with duplicates, which biases distributed metrics
    (pytorch#25162); here rank shards differ in size by at most one sample instead.
    """

    def __init__(self, num_samples: int, *, num_replicas: int, rank: int, batch_size: int) -> None:
        self.num_samples = num_samples
        self.num_replicas = num_replicas
        self.rank = rank
        self.batch_size = batch_size
        base, extra = divmod(num_samples, num_replicas)
        self.lo = rank * base + min(rank, extra)
        self.hi = self.lo + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[IndexBatch]:
        for lo in range(self.lo, self.hi, self.batch_size):
            yield IndexBatch(list(range(lo, min(lo + self.batch_size, self.hi))), 0)

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)
