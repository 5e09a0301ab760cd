"""sha256 taken while writing (metamorph/data/digest.py) and used by the manifest without a second read.

    python -m pytest tests/unit/test_digest.py -q
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from metamorph.data.digest import hashing_open, sha256_file
from metamorph.data.packing import PartWriter
from metamorph.data.shards import ShardWriter, tar_member, write_index, write_jsonl, write_shard_piece
from pipelines import cache


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hashing_file_matches_the_bytes_on_disk_for_parquet_and_plain_writes(tmp_path):
    t = pa.table({"a": list(range(5000)), "b": ["é" * 7] * 5000})
    with hashing_open(tmp_path / "t.parquet") as f:
        pq.write_table(t, f, compression="zstd")
    assert f.digest() == {"sha256": _sha(tmp_path / "t.parquet"), "bytes": (tmp_path / "t.parquet").stat().st_size}
    assert pq.read_table(tmp_path / "t.parquet").equals(t)
    with hashing_open(tmp_path / "b.bin") as g:
        g.write(b"abc")
        g.write(memoryview(b"\x00" * 1000))
        g.write(bytearray(b"xyz"))
    assert g.digest() == sha256_file(tmp_path / "b.bin") and g.digest()["bytes"] == 1006


def test_writers_return_digests_of_what_they_wrote(tmp_path):
    with ShardWriter(tmp_path / "s", "train", max_bytes=3000, max_samples=100) as w:
        for i in range(12):
            w.write_members({"id": f"s{i}", "key": f"s{i}", "source": "x", "family": "f", "task": "t", "split": "train"},
                            [tar_member(f"s{i}.json", json.dumps({"i": i}).encode()), tar_member(f"s{i}.0.png", bytes(700))], 1, 800)
    assert len(w.shards) > 1 and set(w.digests) == set(w.shards)
    for name, d in w.digests.items():
        assert d == sha256_file(tmp_path / "s" / name)
    assert write_index(tmp_path / "s", w.rows) == sha256_file(tmp_path / "s" / "index.parquet")
    n, d = write_jsonl(tmp_path / "q.jsonl", [{"id": "ü", "reason": "x"}, {"id": "b"}])
    assert n == 2 and d == sha256_file(tmp_path / "q.jsonl")
    assert (tmp_path / "q.jsonl").read_text(encoding="utf-8").splitlines()[0] == '{"id": "ü", "reason": "x"}'


def test_part_writer_digests_each_closed_part(tmp_path):
    row = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "position_ids": [0, 1, 2], "segment_ids": [0, 0, 0],
           "visual_mask": [False] * 3, "response_visual_mask": [False] * 3, "vision_feats": b"", "num_tokens": 3,
           "sample_ids": ["a"]}
    with PartWriter(tmp_path, row_group_size=2, rows_per_part=4) as w:
        for _ in range(10):
            w.write(dict(row))
    assert [n for _, n in w.parts] == [4, 4, 2]
    for name, _ in w.parts:
        assert w.digests[name] == sha256_file(tmp_path / name)
        assert pq.ParquetFile(tmp_path / name).metadata.num_rows > 0


def test_a_whole_shard_piece_hashes_the_shard(tmp_path):
    members = [tar_member(f"k{i}.json", b"{}" * (i + 1)) for i in range(5)]
    total = sum(len(m) for m in members)
    (tmp_path / "a.tar").write_bytes(b"")
    h = hashlib.sha256()
    write_shard_piece(tmp_path / "a.tar", 0, iter(members), total, hasher=h)
    assert h.hexdigest() == _sha(tmp_path / "a.tar")


def test_manifest_uses_writer_digests_and_hashes_the_rest_at_promote(tmp_path):
    tmp, final = tmp_path / "k.tmp", tmp_path / "k"
    (tmp / "art").mkdir(parents=True)
    with hashing_open(tmp / "art" / "ours.bin") as f:
        f.write(b"written by us")
    (tmp / "art" / "theirs.json").write_text("{}")  # a third-party writer: no digest
    (tmp / "art" / "changed.bin").write_bytes(b"12345")
    # a digest that is not the file's, with the file's size: taken as is, so promote did not read
    # the file again; verify (hashes) is what catches a file changed after its digest was taken
    bogus = {"sha256": "0" * 64, "bytes": len(b"written by us")}
    m = cache.promote(tmp, final, {"key": "0123456789abcdef"}, {},
                      {"art/ours.bin": bogus, "art/changed.bin": {"sha256": "1" * 64, "bytes": 3}})
    files = {e["path"]: e for e in m["files"]}
    assert files["art/ours.bin"]["hashed"] == "writing" and files["art/ours.bin"]["sha256"] == "0" * 64
    assert files["art/theirs.json"] == {"path": "art/theirs.json", "bytes": 2, "sha256": _sha(final / "art" / "theirs.json"),
                                        "hashed": "promote"}
    # the recorded size does not match the file: the digest is not trusted, the file is read
    assert files["art/changed.bin"]["hashed"] == "promote" and files["art/changed.bin"]["sha256"] == _sha(final / "art" / "changed.bin")
    assert cache.verify(final) == []
    problems = cache.verify(final, hashes=True)
    assert len(problems) == 1 and "ours.bin" in problems[0]


def test_honest_digests_verify(tmp_path):
    tmp, final = tmp_path / "k.tmp", tmp_path / "k"
    tmp.mkdir()
    with hashing_open(tmp / "x.bin") as f:
        f.write(b"x" * 10_000)
    m = cache.promote(tmp, final, {"key": "0123456789abcdef"}, {}, {"x.bin": f.digest()})
    assert m["files"][0]["hashed"] == "writing"
    assert cache.verify(final, hashes=True) == []
