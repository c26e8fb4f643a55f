"""MetricSums: the per-rank metric accumulator and its checkpointed partial sums."""

from __future__ import annotations

import numpy as np
import torch

from dist_train.metrics import MetricSums, add_sums


def test_restored_sums_keep_adding_where_they_left_off() -> None:
    batches = [{"loss": torch.tensor(1.5), "err": torch.tensor([1.0, 2.0]), "count": 4} for _ in range(3)]
    straight = MetricSums(torch.device("cpu"))
    for b in batches:
        straight.add(b)
    first = MetricSums(torch.device("cpu"))
    first.add(batches[0])
    resumed = MetricSums(torch.device("cpu"))
    resumed.load_sums({k: np.asarray(v).tolist() for k, v in first.local_sums().items()})
    for b in batches[1:]:
        resumed.add(b)
    a, b = straight.local_sums(), resumed.local_sums()
    assert set(a) == set(b) == {"loss", "err", "count"}
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert float(a["loss"]) == 4.5 and float(a["count"]) == 12


def test_rank_sums_add_in_rank_order_and_missing_keys_count_as_zero() -> None:
    total = add_sums(
        [{"loss": np.float64(1.0), "count": np.float64(2)}, {}, {"loss": np.float64(0.5), "count": np.float64(1)}]
    )
    assert float(total["loss"]) == 1.5 and float(total["count"]) == 3
    assert float(add_sums([{}])["count"]) == 0.0
