"""The curation spool's shard plan, without Ray: pieces cover each shard exactly once, in order."""

from metamorph.data.spool import pieces, plan_writes


def _meta(i: int, size: int) -> dict:
    # parts: [train record, held-out record, image 0]; one image, one thumbnail
    return {"id": f"s{i:03d}", "order": "0", "sha": ["x"], "parts": [size, size + 1, 100, 10]}


def test_pieces_partition_sizes_in_order():
    sizes = [5, 1, 7, 3, 3, 9, 2]
    for target in (1, 4, 10, 100):
        got = pieces(sizes, target)
        assert got[0][0] == 0 and got[-1][1] == len(sizes)
        assert all(a < b for a, b in got) and all(b == a2 for (_, b), (a2, _) in zip(got, got[1:]))


def test_plan_writes_sorts_by_id_and_offsets_add_up():
    meta = [_meta(i, 50 + i) for i in (3, 1, 2, 0, 4)]
    keep = {(m["id"], "0"): ("heldout" if m["id"] == "s004" else "train") for m in meta}
    names, jobs = plan_writes(meta, keep, max_bytes=10**9, max_samples=3, slots=4, one_node=False)
    assert names == ["shard-train-00000.tar", "shard-train-00001.tar", "shard-heldout-00000.tar"]
    train = [m["id"] for split, _, _, ms, _ in jobs if split == "train" for m in ms]
    assert train == ["s000", "s001", "s002", "s003"]
    # one piece per shard off one node; the last piece of a shard carries the shard's bytes
    assert [(s, k, off) for s, k, off, _, _ in jobs] == [("train", 0, 0), ("train", 1, 0), ("heldout", 0, 0)]
    assert jobs[0][4] == sum(m["parts"][0] + 100 for m in jobs[0][3])
    assert jobs[2][4] == 54 + 1 + 100  # the held-out record member, not the train one
