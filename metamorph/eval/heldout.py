"""Held-out samples for evaluation: a seeded, streaming sample of at most n per task.

    python -c "from metamorph.eval.heldout import load_heldout; s = load_heldout('runs/mix/KEY/mixture', {'t2i': 8}); print({k: len(v) for k, v in s.items()})"

The ``mixture`` artifact keeps every held-out sample under ``heldout/`` (WebDataset shards of
the ``Sample`` schema; older layouts: ``shard-heldout-*`` in the mixture dir itself). At cluster
scale that is 10% of millions of samples, so it is streamed once and a uniform sample of at most
``caps[task]`` is kept per task by reservoir sampling (seeded: the same run evaluates the same
items), then sorted by id so reports line up across runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metamorph.data.schema import Sample
from metamorph.data.shards import INDEX_FILE, iter_samples, iter_shards, list_shards, read_index


def heldout_dir(mixture: str | Path) -> tuple[Path, Optional[str]]:
    """(dir, split filter) where the held-out shards of a mixture live."""
    mixture = Path(mixture)
    if list_shards(mixture / "heldout"):
        return mixture / "heldout", None
    if list_shards(mixture, "heldout"):
        return mixture, "heldout"
    raise FileNotFoundError(f"{mixture} has no held-out shards (expected {mixture / 'heldout'}/shard-heldout-*.tar)")


def load_heldout(mixture: str | Path, caps: dict[str, int], seed: int = 0) -> dict[str, list[tuple[Sample, list[bytes]]]]:
    """At most ``caps[task]`` held-out samples per task (cap 0 = all; tasks not in caps skipped)."""
    path, split = heldout_dir(mixture)
    rng = np.random.default_rng(seed)
    kept: dict[str, list[tuple[Sample, list[bytes]]]] = {t: [] for t in caps}
    seen: dict[str, int] = {t: 0 for t in caps}
    for sample, images in iter_samples(path, split):
        t = sample.task
        if t not in caps:
            continue
        seen[t] += 1
        cap = caps[t]
        if cap == 0 or len(kept[t]) < cap:
            kept[t].append((sample, images))
        else:  # reservoir: the i-th sample replaces a kept one with probability cap / i
            j = int(rng.integers(seen[t]))
            if j < cap:
                kept[t][j] = (sample, images)
    return {t: sorted(v, key=lambda si: si[0].id) for t, v in kept.items()}


def iter_train(mixture: str | Path, tasks: tuple[str, ...]) -> Iterator[tuple[Sample, list[bytes]]]:
    """The mixture's training samples of ``tasks``, streamed from only the shards that hold them
    (``index.parquet`` says which); a mixture without an index streams every training shard."""
    mixture = Path(mixture)
    shards = list_shards(mixture, "train")
    if (mixture / INDEX_FILE).exists():
        index = read_index(mixture)
        rows = pc.and_(pc.equal(index["split"], "train"), pc.is_in(index["task"], value_set=pa.array(tasks)))
        wanted = set(pc.unique(index.filter(rows)["shard"]).to_pylist())
        shards = [p for p in shards if p.name in wanted]
    for sample, images in iter_shards(shards):
        if sample.task in tasks:
            yield sample, images
