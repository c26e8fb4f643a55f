"""Hit-list file -> contiguous sample file: ``dtrain data convert hits.h5 images.h5 --geometry geo.npz`` (torch-free).

Builds every event's mPMT image (or point cloud) with the same :class:`~dist_train.data.hits.HitReader`
that training uses, in blocks of events, into ``event_data`` (N, C, H, W) (or (N, C, n_points))
float32, contiguous and uncompressed: the memory-map fast path, for users who train many epochs
on one representation. Every other per-event dataset (one row per event: ``labels``,
``energies``, ``positions``, ``angles``, ...) is copied unchanged; the hit arrays and the index are
not. So a run on the converted file (``data.format = "array"``) sees the same batches as a run
on the hit-list file. Written to a temporary file and published by
:func:`dist_train.fsutil.atomic_replace` when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dist_train.data.h5io import list_datasets, open_h5
from dist_train.data.hits import HIT_COUNT_KEY, HitReader, HitSpec, check_hit_file
from dist_train.data.writers.progress import progress_bar
from dist_train.errors import DataError
from dist_train.fsutil import atomic_replace

_BLOCK_BYTES = 32 << 20


def convert_hits(
    src: Path,
    out: Path,
    spec: HitSpec,
    *,
    x_key: str = "event_data",
    progress: bool | None = None,
) -> dict[str, Any]:
    """Write the samples of every event of ``src`` to ``out``; returns a summary."""
    src, out = Path(src), Path(out)
    with open_h5(src) as f:
        info = check_hit_file(f, src, spec, scan_ids=True)
        hit_keys = {spec.index_key, spec.pmt_key, spec.time_key, spec.charge_key}
        per_event = {
            name: d
            for name, d in list_datasets(f).items()
            if name not in hit_keys and d.ndim >= 1 and d.shape[0] == info.num_events
        }
        if x_key in per_event:
            raise DataError(f"{str(src)!r} already has a dataset {x_key!r}; pass another --x-key for the samples.")
        out.parent.mkdir(parents=True, exist_ok=True)
        reader = HitReader(src, spec)
        n = info.num_events
        shape = info.sample_shape
        block = max(1, _BLOCK_BYTES // (int(np.prod(shape)) * 4))
        try:
            with atomic_replace(out, mode=0o644) as tmp, h5py.File(tmp, "w", locking=False) as g:
                x = g.create_dataset(x_key, shape=(n, *shape), dtype="float32")  # contiguous: memmap fast path
                with progress_bar(n, "convert", progress) as bar:
                    for lo in range(0, n, block):
                        hi = min(n, lo + block)
                        x[lo:hi] = reader.read(np.arange(lo, hi, dtype=np.int64))
                        bar.update(hi - lo)
                if HIT_COUNT_KEY not in per_event:
                    # The hits of each sample, as the hit-list file gives them (data.input_keys = ["n_hits"]).
                    g.create_dataset(HIT_COUNT_KEY, data=reader.hits_in_samples(np.arange(n, dtype=np.int64)))
                for name, d in per_event.items():
                    g.create_dataset(name, data=d[...])
                    for k, v in d.attrs.items():
                        g[name].attrs[k] = v
                x.attrs["built_from"] = str(src)
                x.attrs["representation"] = spec.representation
                x.attrs["channels"] = ",".join(spec.resolved_channels)
        finally:
            reader.close()
    return {
        "events": n,
        "sample_shape": list(shape),
        "copied": sorted(per_event),
        "truncated_events": info.over_n_points,
        "out": str(out),
    }
