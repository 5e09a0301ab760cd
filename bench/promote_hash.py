"""Promote time with sha256 taken while writing vs the old second read at promote, same data, same run.

    python bench/promote_hash.py                   # 128 MiB of shards, 3 rounds
    python bench/promote_hash.py --mb 512 --rounds 5 --dir /mnt/shared/tmp

Each round writes one stage output twice into fresh attempt dirs under ``--dir``: 64 MiB tar
shards of incompressible samples (the bytes of a curation or mix output) plus their
``index.parquet``, then promotes it with ``pipelines.cache.promote`` (fsync of every file and dir,
manifest last), and times both halves:

* two-pass (before): plain writes, then promote reads every file back to hash it;
* while-writing (now): ``ShardWriter`` / ``write_index`` hash as they write
  (metamorph/data/digest.py), promote takes the digests from ``StageContext.record_digest``.

Prints the medians and the ratios two-pass / while-writing for promote, write and both. The files
were just written, so the two-pass read comes from the page cache: the best case for it (on a
network file system the read goes over the wire again).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from metamorph.data.shards import ShardWriter, sample_members, shard_name, tar_end, tar_member, write_index  # noqa: E402
from pipelines import cache  # noqa: E402

SAMPLE_BYTES = 48 * 1024  # ~ a 256 px PNG plus its JSON record


def samples(total_mb: int) -> list[tuple[dict, list[bytes], int]]:
    """(index row, tar members, bytes) of enough samples for ``total_mb``; random payloads."""
    out = []
    for i in range(total_mb * 2**20 // SAMPLE_BYTES):
        key = f"s{i:08d}"
        record = b'{"id": "%s", "conversation": []}' % key.encode()
        image = os.urandom(SAMPLE_BYTES - len(record))
        row = {"id": key, "key": key, "source": "bench", "family": "generation", "task": "t2i", "split": "train"}
        out.append((row, [tar_member(name, payload) for name, payload in sample_members(key, record, [image])], len(record) + len(image)))
    return out


def write_two_pass(out: Path, data, max_bytes: int) -> None:
    """What the stages did before: the same bytes, no hashing (promote hashes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from metamorph.data.shards import INDEX_FILE, index_schema

    out.mkdir(parents=True)
    rows, f, n_shard, nbytes, written = [], None, 0, 0, 0
    for row, members, size in data:
        if f is None or nbytes + size > max_bytes:
            if f is not None:
                f.write(tar_end(written))
                f.close()
            f = open(out / shard_name("train", n_shard), "wb")
            n_shard, nbytes, written = n_shard + 1, 0, 0
        for m in members:
            f.write(m)
            written += len(m)
        nbytes += size
        rows.append({**row, "shard": shard_name("train", n_shard - 1), "n_images": 1})
    f.write(tar_end(written))
    f.close()
    pq.write_table(pa.Table.from_pylist(rows, schema=index_schema()), out / INDEX_FILE)


def write_while_hashing(out: Path, data, max_bytes: int) -> dict[str, dict]:
    with ShardWriter(out, "train", max_bytes=max_bytes, max_samples=10**9) as w:
        for row, members, size in data:
            w.write_members(row, members, 1, size)
    digests = dict(w.digests)
    digests["index.parquet"] = write_index(out, w.rows)
    return digests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=128, help="MiB of shards per output")
    ap.add_argument("--shard-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="promote-hash-", dir=args.dir))
    data = samples(args.mb)
    max_bytes = args.shard_mb * 2**20
    times: dict[str, dict[str, list[float]]] = {m: {"write": [], "promote": []} for m in ("two-pass", "while-writing")}
    try:
        for r in range(args.rounds):
            for mode in (("two-pass", "while-writing") if r % 2 == 0 else ("while-writing", "two-pass")):
                tmp, final = base / f"{mode}-{r}.tmp", base / f"{mode}-{r}"
                t0 = time.perf_counter()
                digests = write_two_pass(tmp, data, max_bytes) if mode == "two-pass" else write_while_hashing(tmp, data, max_bytes)
                t1 = time.perf_counter()
                m = cache.promote(tmp, final, {"key": "0123456789abcdef"}, {}, digests)
                t2 = time.perf_counter()
                assert {f["hashed"] for f in m["files"]} == {"promote" if mode == "two-pass" else "writing"}
                times[mode]["write"].append(t1 - t0)
                times[mode]["promote"].append(t2 - t1)
                shutil.rmtree(final)
        med = {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}
        old, new = med["two-pass"], med["while-writing"]
        print(f"{args.mb} MiB in {args.shard_mb} MiB shards + index.parquet, {args.rounds} rounds (medians), {base}")
        print(f"{'':15s} {'write s':>9s} {'promote s':>10s} {'total s':>9s}")
        for name, t in (("two-pass", old), ("while-writing", new)):
            print(f"{name:15s} {t['write']:9.3f} {t['promote']:10.3f} {t['write'] + t['promote']:9.3f}")
        print(f"promote: two-pass / while-writing = {old['promote'] / new['promote']:.2f}x")
        print(f"write:   two-pass / while-writing = {old['write'] / new['write']:.2f}x (hashing moved into the writer)")
        print(f"total:   two-pass / while-writing = {(old['write'] + old['promote']) / (new['write'] + new['promote']):.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
