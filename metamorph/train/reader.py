"""A resumable, rank-sharded reader over the tokenized Parquet shards.

    python -m metamorph.train.reader runs/tokenize/<key>/tokenized --world-size 2 --batch 4

Why not Ray Data: its iterators cannot resume mid-epoch, and a run is usually under one epoch,
so the data position must be part of the checkpoint. The unit of work is a Parquet row group
(the `tokenize` stage writes fixed-size groups): every epoch the groups are put in a seeded order
(the same on every rank) and dealt round-robin to ranks; each rank reads its groups in turn,
rows optionally shuffled inside a group with a seed derived from (seed, epoch, group).

All ranks yield the same number of micro-batches per epoch (the smallest rank's row count //
micro_batch_size; the few leftover rows are dropped), so DDP/FSDP collectives stay in lockstep.
The position is therefore the same on every rank, ``(epoch, batches taken in the epoch)``,
and ``state_dict()`` from rank 0 resumes every rank (row-group metadata turns it back into a
file, group and row offset without reading any data).

``round_samples`` gives the samples in every round (one micro-batch on each rank) of the run,
from each row's sample count (the ``sample_ids`` column, one small read of every file, cached),
so every rank plans the same sample-counted optimizer steps (metamorph.train.schedule).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


@dataclass(frozen=True)
class RowGroup:
    path: str
    index: int  # row-group index inside the file
    num_rows: int


def list_row_groups(paths: Sequence[str | Path]) -> list[RowGroup]:
    """Every non-empty row group of ``paths`` (files, or dirs holding *.parquet), in sorted order."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files.extend(sorted(p.glob("*.parquet")) if p.is_dir() else [p])
    groups = []
    for f in sorted(set(files)):
        meta = pq.ParquetFile(f).metadata
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if n > 0:
                groups.append(RowGroup(str(f), i, n))
    return groups


class ShardReader:
    """Endless iterator of micro-batches (``collate(list of row dicts)``) for one rank.

    ``epoch`` counts up past the end of the data; the training loop decides when to stop.
    """

    def __init__(
        self,
        paths: Sequence[str | Path] | str | Path,
        *,
        rank: int = 0,
        world_size: int = 1,
        micro_batch_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        collate: Callable[[list[dict[str, Any]]], Any] | None = None,
        columns: Sequence[str] | None = None,
    ):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.groups = list_row_groups(paths)
        if not self.groups:
            raise ValueError(f"no Parquet rows found under {[str(p) for p in paths]}")
        if len(self.groups) < world_size:
            raise ValueError(
                f"{len(self.groups)} row groups cannot feed {world_size} workers: use fewer "
                "train.num_workers or a smaller tokenize row-group size"
            )
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = micro_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.collate = collate or (lambda rows: rows)
        self.columns = list(columns) if columns else None
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches already yielded in `epoch`
        self._row_samples: dict[int, np.ndarray] | None = None  # group id -> samples per row
        if self.batches_per_epoch(0) == 0:
            raise ValueError(
                f"some worker gets fewer than micro_batch_size={micro_batch_size} rows per epoch: "
                "lower train.micro_batch_size or train.num_workers, or tokenize more data"
            )

    # ---- the deterministic plan: which groups each rank reads in an epoch
    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.groups)))
        if self.shuffle:
            random.Random(f"{self.seed}:order:{epoch}").shuffle(order)
        return order

    def rank_groups(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return self.epoch_order(epoch)[rank :: self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        rows = [sum(self.groups[g].num_rows for g in self.rank_groups(epoch, r)) for r in range(self.world_size)]
        return min(rows) // self.micro_batch_size

    def batches_in(self, epochs: float) -> int:
        """Micro-batches per rank in ``epochs`` passes (a fractional last epoch is truncated)."""
        full = int(epochs)
        n = sum(self.batches_per_epoch(e) for e in range(full))
        return n + int((epochs - full) * self.batches_per_epoch(full))

    # ---- samples (for optimizer steps counted in samples)
    def row_samples(self, group_id: int) -> np.ndarray:
        """Samples packed in each row of a group, in file order: the length of ``sample_ids``, or
        (older shards without it) the largest segment id of the row."""
        if self._row_samples is None:
            self._row_samples = {}
            by_file: dict[str, list[int]] = {}
            for gid, g in enumerate(self.groups):
                by_file.setdefault(g.path, []).append(gid)
            for path, gids in by_file.items():
                f = pq.ParquetFile(path)
                names = f.schema_arrow.names
                for gid in gids:
                    g = self.groups[gid]
                    if "sample_ids" in names:
                        col = f.read_row_group(g.index, columns=["sample_ids"]).column(0)
                        counts = pc.list_value_length(col)
                    else:
                        col = f.read_row_group(g.index, columns=["segment_ids"]).column(0)
                        counts = [max(v) if v else 0 for v in col.to_pylist()]
                    self._row_samples[gid] = np.asarray(counts, dtype=np.int64)
        return self._row_samples[group_id]

    def batch_samples(self, epoch: int) -> np.ndarray:
        """[world_size, batches_per_epoch(epoch)]: samples in each micro-batch of every rank."""
        n = self.batches_per_epoch(epoch)
        out = np.zeros((self.world_size, n), dtype=np.int64)
        for r in range(self.world_size):
            per_row = []
            for gid in self.rank_groups(epoch, r):
                counts = self.row_samples(gid)
                order = list(range(len(counts)))
                if self.shuffle:  # the same permutation _rows applies (it depends on the length only)
                    random.Random(f"{self.seed}:rows:{epoch}:{gid}").shuffle(order)
                per_row.append(counts[order])
            rows = np.concatenate(per_row)[: n * self.micro_batch_size]
            out[r] = rows.reshape(n, self.micro_batch_size).sum(axis=1)
        return out

    def round_samples(self, epochs: float) -> list[int]:
        """Samples in each round (one micro-batch per rank, summed over ranks) in ``epochs``
        passes from the start, truncated like ``batches_in``."""
        full = int(epochs)
        out: list[int] = []
        for e in range(full + (1 if epochs > full else 0)):
            rounds = self.batch_samples(e).sum(axis=0).tolist()
            if e == full:
                rounds = rounds[: int((epochs - full) * len(rounds))]
            out.extend(rounds)
        return out

    @property
    def rounds_done(self) -> int:
        """Micro-batches this rank (and so every rank) has taken since the start of the run."""
        return sum(self.batches_per_epoch(e) for e in range(self.epoch)) + self.batch_in_epoch

    @property
    def total_rows(self) -> int:
        return sum(g.num_rows for g in self.groups)

    # ---- position
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            # checked on load: the position means nothing for another layout
            "world_size": self.world_size,
            "micro_batch_size": self.micro_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_row_groups": len(self.groups),
            "total_rows": self.total_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("world_size", "micro_batch_size", "seed", "shuffle", "num_row_groups", "total_rows"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume the data position: the checkpoint has {key}={state[key]!r}, this run "
                    f"{mine!r}. Resume with the same train config and tokenized data, or start a fresh "
                    "checkpoint dir (--force)."
                )
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])

    # ---- iteration
    def _rows(self, group_id: int, epoch: int) -> list[dict[str, Any]]:
        g = self.groups[group_id]
        rows = pq.ParquetFile(g.path).read_row_group(g.index, columns=self.columns).to_pylist()
        if self.shuffle:
            random.Random(f"{self.seed}:rows:{epoch}:{group_id}").shuffle(rows)
        return rows

    def _epoch_batches(self) -> Iterator[list[dict[str, Any]]]:
        """Raw row batches for the rest of the current epoch, starting at ``batch_in_epoch``."""
        epoch, n_batches = self.epoch, self.batches_per_epoch(self.epoch)
        skip = self.batch_in_epoch * self.micro_batch_size
        pending: list[dict[str, Any]] = []
        made = self.batch_in_epoch
        for gid in self.rank_groups(epoch):
            if made >= n_batches:
                break
            n = self.groups[gid].num_rows
            if skip >= n:  # resumed past this group: metadata only, no read
                skip -= n
                continue
            rows = self._rows(gid, epoch)[skip:]
            skip = 0
            pending.extend(rows)
            while len(pending) >= self.micro_batch_size and made < n_batches:
                batch, pending = pending[: self.micro_batch_size], pending[self.micro_batch_size :]
                made += 1
                yield batch

    def __iter__(self) -> Iterator[Any]:
        while True:
            for rows in self._epoch_batches():
                # advance before yielding: a checkpoint taken after this batch was consumed
                # must point past it
                self.batch_in_epoch += 1
                yield self.collate(rows)
            self.epoch += 1
            self.batch_in_epoch = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    for rank in range(args.world_size):
        r = ShardReader(args.path, rank=rank, world_size=args.world_size, micro_batch_size=args.batch)
        print(f"rank {rank}: {len(r.groups)} row groups, {r.total_rows} rows, "
              f"{r.batches_per_epoch(0)} micro-batches in epoch 0")


if __name__ == "__main__":
    main()
