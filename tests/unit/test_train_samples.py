"""Optimizer steps counted in samples over packed rows (the paper's batch units): the step plan
from a packed dataset of known sample counts, LR and warmup in samples, and the loop on it.

    python -m pytest tests/unit/test_train_samples.py -q
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from metamorph.train.config import TrainConfig
from metamorph.train.loop import plan_steps, train_loop
from metamorph.train.reader import ShardReader
from metamorph.train.schedule import steps_from_samples, warmup_steps_in_samples
from tests.unit.train_fixtures import SCHEMA, ToyVPiT, collate, make_row

LENGTH = 24
# samples packed in each row, by row index: a known, uneven pattern (1..4 samples per row)
PATTERN = [1, 3, 2, 4, 2, 1, 3, 4]


def _split(row: dict, k: int, sample_ids: list[str]) -> dict:
    """Re-segment a fixture row's used positions into k packed samples (segment ids 1..k,
    positions restarting at 0 for each), as metamorph.data.packing.build_row lays them out."""
    n = row["num_tokens"]
    bounds = np.linspace(0, n, k + 1).astype(int)
    seg = np.zeros(LENGTH, np.int32)
    pos = np.zeros(LENGTH, np.int32)
    for i in range(k):
        seg[bounds[i] : bounds[i + 1]] = i + 1
        pos[bounds[i] : bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    return {**row, "segment_ids": seg.tolist(), "position_ids": pos.tolist(), "sample_ids": sample_ids}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> tuple[Path, list[int]]:
    """64 rows in 2 files of 4 row groups of 8, samples per row cycling through PATTERN."""
    out = tmp_path_factory.mktemp("tok") / "tokenized"
    out.mkdir()
    rng = np.random.default_rng(0)
    rows, counts = [], []
    for i in range(64):
        k = PATTERN[i % len(PATTERN)]
        rows.append(_split(make_row(rng, LENGTH), k, [f"r{i}s{j}" for j in range(k)]))
        counts.append(k)
    schema = SCHEMA.append(pa.field("sample_ids", pa.list_(pa.string())))
    for f in range(2):
        table = pa.Table.from_pylist(rows[f * 32 : (f + 1) * 32], schema=schema)
        pq.write_table(table, out / f"part-{f:05d}.parquet", row_group_size=8)
    return out, counts


def test_steps_from_samples_by_hand():
    # running counts 3, 6 | 9, 12 | 15: step k closes when the count reaches 5k
    assert steps_from_samples([3, 3, 3, 3, 3], 5) == [2, 2, 1]
    # a round bigger than the batch still makes one step; leftover rounds (no full step) are dropped
    assert steps_from_samples([7, 1, 1, 1, 1], 5) == [1, 3]  # 7 | 8, 9, 10
    assert steps_from_samples([1, 1], 5) == []
    with pytest.raises(ValueError):
        steps_from_samples([1], 0)


def test_warmup_in_samples():
    # 3% of 1000 samples = 30: reached after the 2nd step (20 + 20)
    assert warmup_steps_in_samples([20] * 50, 0.03) == 2
    assert warmup_steps_in_samples([20] * 50, 0.0) == 0
    # uneven steps: the warmup ends at the step where the samples seen reach the ratio
    assert warmup_steps_in_samples([1, 1, 1, 97], 0.03) == 3
    assert warmup_steps_in_samples([100] + [1] * 100, 0.03) == 1


def test_lr_scales_with_the_sample_batch():
    cfg = TrainConfig(global_batch_samples=4 * 448, lr=3.74e-5, lr_base_batch=448, micro_batch_size=2)
    assert cfg.peak_lr(4) == pytest.approx(2 * 3.74e-5)  # samples, not the 8 rows of a round
    rows = TrainConfig(lr=1.0, lr_base_batch=2, micro_batch_size=2, grad_accum=2)
    assert rows.peak_lr(2) == pytest.approx(2.0)  # the row rule: 8 rows vs 2
    with pytest.raises(ValueError, match="train.grad_accum"):
        TrainConfig(global_batch_samples=64, grad_accum=2)


@pytest.mark.parametrize("world", [1, 2])
def test_samples_per_step_and_steps_per_epoch_from_packed_rows(packed, world):
    shards, counts = packed
    total = sum(counts)  # 8 rows of PATTERN = 20 samples, x 8 = 160
    assert total == 160
    readers = [ShardReader(shards, rank=r, world_size=world, micro_batch_size=2, seed=3, collate=collate)
               for r in range(world)]
    rounds = readers[0].round_samples(1.0)
    # every row is read once per epoch (no leftovers: 64 rows split evenly), so rounds add up to it
    assert sum(rounds) == total and len(rounds) == 64 // (2 * world)
    # ... and the rounds are what each rank's batches really hold
    for r, reader in enumerate(readers):
        got = [int(b["segment_ids"].amax(dim=1).sum()) for _, b in zip(range(len(rounds)), reader)]
        assert got == readers[0].batch_samples(0)[r].tolist()
    cfg = TrainConfig(global_batch_samples=16, micro_batch_size=2, epochs=1.0, warmup_ratio=0.1)
    plan = plan_steps(cfg, readers[0])
    # one epoch of 160 samples at 16 per step: 10 steps, every step within one round of 16
    assert plan.total_steps == total // 16
    assert sum(plan.samples) <= total and all(s >= 16 - max(rounds) for s in plan.samples)
    cum = np.cumsum(plan.samples)
    assert all(cum[k] >= 16 * (k + 1) for k in range(len(cum)))  # running count reaches k x B
    assert sum(plan.rounds) <= len(rounds)
    assert plan.warmup_steps == 1  # 10% of 160 samples = 16: the first step
    # two epochs: twice the steps (the shuffle differs per epoch, the totals do not)
    plan2 = plan_steps(TrainConfig(global_batch_samples=16, micro_batch_size=2, epochs=2.0), readers[0])
    assert plan2.total_steps == 2 * total // 16


def test_rounds_bigger_than_the_batch_are_refused(packed):
    reader = ShardReader(packed[0], micro_batch_size=8, collate=collate)
    with pytest.raises(ValueError, match="train.global_batch_samples=8.*micro_batch_size"):
        plan_steps(TrainConfig(global_batch_samples=8, micro_batch_size=8), reader)


def _cfg(**kw) -> TrainConfig:
    base = dict(micro_batch_size=2, global_batch_samples=12, max_steps=0, epochs=1.0, lr=1e-2,
                warmup_ratio=0.1, checkpoint_every=4, keep_last=2, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def _run(shards, cfg, root: Path, export: Path | None = None, on_log=None):
    torch.manual_seed(cfg.seed)
    reader = ShardReader(shards, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed, collate=collate)
    stats = train_loop(ToyVPiT(dropout=0.1), cfg, reader, checkpoint_root=root, export_dir=export, on_log=on_log)
    return stats, reader


class _Crash(Exception):
    pass


def test_loop_takes_the_planned_rows_and_resumes_exactly(packed, tmp_path):
    shards, counts = packed
    ref, reader = _run(shards, _cfg(), tmp_path / "ref", export=tmp_path / "ref_out")
    plan = plan_steps(_cfg(), ShardReader(shards, micro_batch_size=2, seed=0, collate=collate))
    assert ref["steps"] == plan.total_steps == sum(counts) // 12
    assert reader.rounds_done == sum(plan.rounds)  # the loop read exactly the planned micro-batches
    assert ref["mean_samples_per_step"] == pytest.approx(sum(plan.samples) / plan.total_steps)
    assert abs(ref["mean_samples_per_step"] - 12) < 1.0  # rows per step vary, samples do not drift
    assert ref["warmup_steps"] == plan.warmup_steps == math.ceil(0.1 * plan.total_steps)

    def crash_after_6(step, metrics):
        if step == 6:
            raise _Crash

    with pytest.raises(_Crash):
        _run(shards, _cfg(), tmp_path / "ck", export=tmp_path / "out", on_log=crash_after_6)
    resumed, _ = _run(shards, _cfg(), tmp_path / "ck", export=tmp_path / "out")
    assert resumed["start_step"] == 4
    want, got = load_file(tmp_path / "ref_out" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    for k in want:
        assert torch.equal(want[k], got[k]), k
