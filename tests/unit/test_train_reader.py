"""The resumable rank-sharded reader: disjoint equal shares per rank, exact resume.

    python -m pytest tests/unit/test_train_reader.py -q
"""

from __future__ import annotations

import itertools

import pytest

from metamorph.train.reader import ShardReader
from tests.unit.train_fixtures import write_shards


def _ids(batch):  # rows identify themselves by their token ids
    return [tuple(r["input_ids"]) + (r["num_tokens"],) for r in batch]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 3 files of 24, 24, 12 rows in groups of 8 (two short groups of 4 rows at file ends)
    return write_shards(tmp_path_factory.mktemp("tok") / "tokenized", n_rows=60, per_file=24, row_group=8)


def test_ranks_get_disjoint_equal_shares(shards):
    readers = [ShardReader(shards, rank=r, world_size=2, micro_batch_size=3, seed=1) for r in range(2)]
    n = readers[0].batches_per_epoch(0)
    assert n == readers[1].batches_per_epoch(0) > 0
    seen = []
    for rd in readers:
        batches = list(itertools.islice(iter(rd), n))
        assert all(len(b) == 3 for b in batches)
        seen.append({row for b in batches for row in _ids(b)})
    assert not seen[0] & seen[1]
    assert len(seen[0]) + len(seen[1]) == 2 * n * 3 <= 60


def test_order_is_seeded_and_changes_per_epoch(shards):
    a = ShardReader(shards, micro_batch_size=4, seed=3)
    b = ShardReader(shards, micro_batch_size=4, seed=3)
    n = a.batches_per_epoch(0)
    ea = [_ids(x) for x in itertools.islice(iter(a), 2 * n)]
    eb = [_ids(x) for x in itertools.islice(iter(b), 2 * n)]
    assert ea == eb
    assert ea[:n] != ea[n:]  # epoch 1 is reshuffled
    assert sorted(sum(ea[:n], [])) == sorted(sum(ea[n:], []))  # same rows (one rank: none dropped)
    plain = ShardReader(shards, micro_batch_size=4, shuffle=False)
    first = next(iter(plain))
    assert _ids(first) == _ids(next(iter(ShardReader(shards, micro_batch_size=4, shuffle=False))))


@pytest.mark.parametrize("stop", [1, 4, 7, 9])  # mid-group, group boundary, across the epoch end
def test_resume_continues_exactly(shards, stop):
    ref = ShardReader(shards, rank=1, world_size=2, micro_batch_size=3, seed=5)
    n = ref.batches_per_epoch(0)
    want = [_ids(b) for b in itertools.islice(iter(ref), n + 3)]

    first = ShardReader(shards, rank=1, world_size=2, micro_batch_size=3, seed=5)
    it = iter(first)
    got = [_ids(next(it)) for _ in range(stop)]
    state = first.state_dict()
    again = ShardReader(shards, rank=1, world_size=2, micro_batch_size=3, seed=5)
    again.load_state_dict(state)
    got += [_ids(b) for b in itertools.islice(iter(again), n + 3 - stop)]
    assert got == want


def test_resume_refuses_another_layout(shards):
    state = ShardReader(shards, world_size=2, micro_batch_size=3).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShardReader(shards, world_size=3, micro_batch_size=3).load_state_dict(state)


def test_too_many_workers_is_explained(shards):
    with pytest.raises(ValueError, match="num_workers"):
        ShardReader(shards, world_size=64, rank=0, micro_batch_size=1)


def test_batches_in_fractional_epochs(shards):
    r = ShardReader(shards, micro_batch_size=4)
    assert r.batches_in(1.0) == r.batches_per_epoch(0) == 15
    assert r.batches_in(1.5) == 15 + 7
