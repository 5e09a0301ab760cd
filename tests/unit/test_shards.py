"""Shard planning: parallel writers of planned shards write what one sequential writer would.

    python -m pytest tests/unit/test_shards.py -q
"""

from __future__ import annotations

import random

import pytest

from metamorph.data.schema import IMAGE_PLACEHOLDER, ImageRef, Sample, Turn, dumps
from metamorph.data.shards import ShardWriter, Spool, iter_samples, plan_shards, read_spool, sample_members, tar_end, tar_member


def _samples(n: int, seed: int = 0) -> list[tuple[Sample, list[bytes]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        s = Sample(
            id=f"s-{i:04d}", source="s", family="generation", task="t2i", split="train",
            conversation=[Turn(role="user", content="Draw a box."), Turn(role="assistant", content=IMAGE_PLACEHOLDER)],
            images=[ImageRef(ext="png", role="response")], meta={},
        )
        out.append((s, [rng.randbytes(rng.randint(100, 3000))]))
    return out


def test_plan_shards_bounds():
    assert plan_shards([], 100, 10) == []
    assert plan_shards([60, 60, 30, 200, 5], 100, 10) == [(0, 1), (1, 3), (3, 4), (4, 5)]  # an oversized sample gets its own shard
    assert plan_shards([1] * 7, 100, 3) == [(0, 3), (3, 6), (6, 7)]


def test_planned_parallel_writers_match_one_writer(tmp_path):
    samples = _samples(40)
    max_bytes, max_samples = 8000, 7
    with ShardWriter(tmp_path / "one", "train", max_bytes=max_bytes, max_samples=max_samples) as w:
        for s, images in samples:
            w.write(s, images)
    sizes = [len(dumps(s)) + sum(map(len, images)) for s, images in samples]
    rows = []
    for k, (a, b) in enumerate(plan_shards(sizes, max_bytes, max_samples)):
        with ShardWriter(tmp_path / "many", "train", max_bytes=max_bytes, max_samples=max_samples, first_shard=k) as pw:
            for s, images in samples[a:b]:
                row = {"id": s.id, "key": s.key, "source": s.source, "family": s.family, "task": s.task, "split": s.split}
                pw.write_encoded(row, dumps(s), images, ["png"])
        assert len(pw.shards) == 1
        rows += pw.rows
    assert rows == w.rows
    one = sorted((tmp_path / "one").iterdir())
    assert [p.name for p in one] == sorted(p.name for p in (tmp_path / "many").iterdir()) and len(one) > 2
    for p in one:
        assert p.read_bytes() == (tmp_path / "many" / p.name).read_bytes(), p.name
    assert [s.id for s, _ in iter_samples(tmp_path / "many")] == [s.id for s, _ in samples]


def test_spool_round_trip(tmp_path):
    # parts may be tuples of pieces written back to back (a tar member's header, payload, padding)
    items = [[b"rec", b"", (b"head", b"image-bytes", b"\0" * 3)], [b"x" * 5000], []]
    spool = Spool(tmp_path / "a.bin")
    assert not spool.path.exists()  # created with the first item: a task with no good record leaves none
    with spool:
        placed = [spool.append(item) for item in items]
    assert [n for _, lengths in placed for n in lengths] == [3, 0, 18, 5000]
    with open(tmp_path / "a.bin", "rb") as f:
        for item, (off, lengths) in zip(items, placed):
            assert read_spool(f, off, lengths) == [p if isinstance(p, bytes) else b"".join(p) for p in item]


def test_writer_writes_what_tarfile_writes(tmp_path):
    """ShardWriter encodes members itself (``tar_member``); its shards must be the tars
    ``tarfile`` writes (byte for byte), and webdataset must read them back."""
    import io
    import tarfile

    samples = _samples(7, seed=3)
    with ShardWriter(tmp_path / "w", "train") as w:
        for s, images in samples:
            w.write(s, images)
    with tarfile.open(tmp_path / "expected.tar", "w", format=tarfile.USTAR_FORMAT) as t:
        for s, images in samples:
            for name, payload in sample_members(s.key, dumps(s), images):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(payload), 0, 0o644, "", ""
                t.addfile(ti, io.BytesIO(payload))
    assert (tmp_path / "w" / "shard-train-00000.tar").read_bytes() == (tmp_path / "expected.tar").read_bytes()
    got = list(iter_samples(tmp_path / "w"))
    assert [(s.id, im) for s, im in got] == [(s.id, im) for s, im in samples]


def test_tar_member_header_matches_tarfile():
    import io
    import tarfile

    for name, size in [("a.json", 0), ("k" * 100, 511), ("d" * 60 + "/" + "k" * 60 + ".png", 513), ("é-1.json", 7), ("x.0.png", 10**6)]:
        payload = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = size, 0, 0o644, "", ""
            t.addfile(ti, io.BytesIO(payload))
        member = tar_member(name, payload)
        assert buf.getvalue() == member + tar_end(len(member)), name


def test_dumps_splits_equals_dumps_per_split():
    # one encoding, the split swapped in its tail: byte-equal to encoding each split, also when
    # meta holds a "split" of its own and text holds the pattern
    from dataclasses import replace

    from metamorph.data.schema import dumps_splits

    for sample, _ in _samples(3):
        for meta in ({}, {"split": "train", "note": '"split": "train", "task": "t2i"}'}, {"z": ["é", 1.5]}):
            s = replace(sample, meta=meta)
            assert dumps_splits(s) == [dumps(replace(s, split="train")), dumps(replace(s, split="heldout"))]
            assert dumps_splits(s, ("heldout",)) == [dumps(replace(s, split="heldout"))]


def test_shard_pieces_in_any_order_write_what_one_writer_writes(tmp_path):
    # a big shard written by several tasks at once: each writes its byte range of the emptied
    # file, the last one the tar end; in whatever order they land, the file is ShardWriter's
    from metamorph.data.shards import shard_name, write_shard_piece

    samples = _samples(25, seed=5)
    with ShardWriter(tmp_path / "one", "train", max_bytes=10**9) as w:
        for s, images in samples:
            w.write(s, images)
    want = (tmp_path / "one" / shard_name("train", 0)).read_bytes()
    members = [[tar_member(n, p) for n, p in sample_members(s.key, dumps(s), images)] for s, images in samples]
    sizes = [sum(map(len, m)) for m in members]
    cuts = [0, 1, 9, 10, 24, 25]  # pieces of 1, 8, 1, 14 and 1 samples
    pieces = [(sum(sizes[:a]), [b for m in members[a:b] for b in m], b == len(samples)) for a, b in zip(cuts, cuts[1:])]
    for order in (pieces, pieces[::-1], pieces[2:] + pieces[:2]):
        path = tmp_path / "pieces" / shard_name("train", 0)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")  # what the planner leaves before the pieces run
        for offset, ms, last in order:
            assert write_shard_piece(path, offset, ms, sum(sizes) if last else None) == sum(map(len, ms))
        assert path.read_bytes() == want
    with pytest.raises(ValueError, match="last piece"):
        write_shard_piece(path, 0, members[0], total=sum(sizes))


def test_every_sample_has_the_same_two_members(tmp_path):
    """Text-only, one-image and several-image samples: the same member names, so readers that
    build columns from them (Ray's read_webdataset) see no missing values; the images come
    back byte for byte, in order."""
    import tarfile

    import msgpack

    base, _ = _samples(1)[0]
    cases = {0: [], 1: [b"\x89PNG-one"], 3: [b"\x89PNG-a", b"", b"\x89PNG-c" * 100]}
    with ShardWriter(tmp_path, "train") as w:
        for n, images in cases.items():
            refs = [ImageRef(ext="png", role="prompt")] * n
            conv = [Turn(role="user", content=" ".join([IMAGE_PLACEHOLDER] * n) + " Describe."), Turn(role="assistant", content="ok")]
            w.write(Sample(**{**base.__dict__, "id": f"n{n}", "conversation": conv, "images": refs}), images)
    with tarfile.open(next(tmp_path.glob("shard-*.tar"))) as t:
        names = t.getnames()
        assert [n.split(".", 1)[1] for n in names] == ["json", "images.mp"] * 3
        assert msgpack.unpackb(t.extractfile(names[1]).read()) == {"images": []}
    assert {s.id: im for s, im in iter_samples(tmp_path)} == {f"n{n}": im for n, im in cases.items()}
