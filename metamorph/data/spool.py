"""The curation spool and shard layout: what a processing task parks, and how kept samples
become size-bounded WebDataset shards written in parallel pieces. Pure Python (no Ray): the
Ray glue that schedules these functions is ``stages/_curation.py``.

    python -m pytest tests/unit/test_spool.py -q

A processing task runs ``process`` over its records: each accepted record's tar members (train
record, held-out record, images: ``_members``) and thumbnails go to one spool file, and only a
metadata row (``meta_schema()``: decide's inputs plus the spool offset and part lengths) comes back.
The driver decides (``metamorph.data.curate.decide``), then ``plan_writes`` sorts the kept samples
by id, cuts them into shards (``plan_shards``) and the shards into pieces of about equal bytes
(``pieces``); ``write_piece`` copies one piece's spooled members into its shard at its byte offset
and returns its index and image-hash rows. The same plan whatever the task scheduling was, so a
rerun writes byte-identical files.
"""

from __future__ import annotations

import collections
import hashlib
import json
import uuid
from pathlib import Path
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

from metamorph.data.curate import CurateConfig, FramePredictionConfig, process_record
from metamorph.data.imageproc import keep_image_buffers
from metamorph.data.readers import READERS, SourceConfig
from metamorph.data.readers.base import RawRecord
from metamorph.data.schema import sample_key
from metamorph.data.shards import Piece, Spool, plan_shards, read_spool, sample_members, shard_name, tar_member, tar_member_parts, write_jsonl, write_shard_piece
from metamorph.data.video import VideoConfig

if TYPE_CHECKING:
    import pyarrow as pa

HASHES_FILE = "image_hashes.parquet"
SPOOL_DIR = "_spool"  # under the attempt dir, removed before the stage returns


@functools.cache
def hashes_schema() -> pa.Schema:
    """``image_hashes.parquet``: one row per written image. Built on first use: `metamorph plan`
    imports this module (through the curation stages), and pyarrow only when a stage runs."""
    import pyarrow as pa

    return pa.schema(
        [("id", pa.string()), ("split", pa.string()), ("image", pa.int32()), ("sha", pa.string()), ("phash", pa.int64()), ("thumb", pa.binary())]
    )


@functools.cache
def meta_schema() -> pa.Schema:
    """What a processing task returns per record (``decide``'s inputs and where the bytes are
    parked); ``parts``: byte lengths of [train record member, held-out record member, images
    member, thumbnail 0..n-1] (members: tar header + payload + padding, see ``_members``)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("order", pa.string()),
            ("reason", pa.string()), ("detail", pa.string()), ("family", pa.string()), ("task", pa.string()),
            ("content_hash", pa.string()), ("sha", pa.list_(pa.string())), ("phash", pa.list_(pa.int64())),
            ("n_decoded", pa.int32()),
            ("spool", pa.string()), ("offset", pa.int64()), ("parts", pa.list_(pa.int64())),
        ]
    )


def read_process(batch: pa.Table, sources: list[dict[str, Any]], cfg: CurateConfig, video: Optional[VideoConfig],
                 frames: Optional[FramePredictionConfig], spool_dir: str) -> pa.Table:
    """A processing task's body (one Ray Data batch: one planned read unit): read the unit's
    records and process them as they are read, spooling the accepted ones; the ``meta_schema()`` rows."""

    keep_image_buffers()

    def records() -> Iterator[RawRecord]:
        for row in batch.to_pylist():
            src = SourceConfig(**sources[row["source"]])
            yield from READERS[src.format].read(src, json.loads(row["unit"]), row["unit_idx"])

    return process(records(), cfg, video, frames, spool_dir)


def process(records: Iterable[RawRecord], cfg: CurateConfig, video: Optional[VideoConfig], frames: Optional[FramePredictionConfig], spool_dir: str) -> pa.Table:
    # a fresh name per attempt: a retried task never appends to what a failed one left
    spool = Spool(Path(spool_dir) / f"{uuid.uuid4().hex}.bin")
    rows = []
    with spool:
        for rec in records:
            r = process_record(rec, cfg, video, frames)
            if r["reason"]:
                r.update(spool="", offset=0, parts=[])
            else:  # spooled now: the task holds one record's bytes at a time
                offset, parts = spool.append(_members(r))
                r.update(spool=str(spool.path), offset=offset, parts=parts, images=None, thumb=None, sample=None, sample_heldout=None)
            rows.append(r)
    # column by column: 10x cheaper than from_pylist's per-row dict walk
    import pyarrow as pa

    schema = meta_schema()
    return pa.Table.from_pydict({name: [r[name] for r in rows] for name in schema.names}, schema=schema)


def _members(r: dict[str, Any]) -> list[Piece]:
    """A processed record as the spool keeps it: its tar members (``sample_members``: the
    record, here twice, as the train and as the held-out split, then the images member), already
    encoded, then the raw thumbnails. Encoding the tar headers here, in parallel, leaves the
    shard writers a plain byte copy."""
    (rec_name, train_rec), (img_name, images) = sample_members(sample_key(r["id"]), r["sample"].encode(), r["images"])
    return [
        tar_member(rec_name, train_rec),
        tar_member(rec_name, r["sample_heldout"].encode()),
        tar_member_parts(img_name, images),
        *r["thumb"],
    ]


def _spooled(f: Any, m: dict[str, Any]) -> tuple[bytes, bytes, bytes, list[bytes]]:
    """(train record member, held-out record member, images member, thumbnails) of one meta row
    from its open spool."""
    parts = read_spool(f, m["offset"], m["parts"])
    return parts[0], parts[1], parts[2], parts[3:]


def spooled_thumbs(f: Any, m: dict[str, Any]) -> list[bytes]:
    """Only the thumbnails of one meta row (the item's last parts) from its open spool."""
    return read_spool(f, m["offset"] + sum(m["parts"][:3]), m["parts"][3:])


def shard_bytes(m: dict[str, Any], split: str) -> int:
    """Bytes a meta row's sample takes in a ``split`` shard (its record and images members)."""
    return m["parts"][0 if split == "train" else 1] + m["parts"][2]


def write_piece(out: str, split: str, shard: int, offset: int, metas: list[dict[str, Any]], total: int | None) -> tuple[list[dict[str, Any]], pa.Table, Optional[str]]:
    """Samples ``metas`` (in id order) of one planned shard, from byte ``offset`` of it: their
    spooled members copied into the tar (``total``: the shard's member bytes, for its last
    piece), their index and image-hash rows, and the shard's sha256 when this piece is the whole
    shard (else None: the caller hashes a shard written in several pieces once all are done)."""
    files: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    hashes: list[dict[str, Any]] = []
    name = shard_name(split, shard)

    def members() -> Iterator[bytes]:
        for m in metas:
            f = files.get(m["spool"]) or files.setdefault(m["spool"], open(m["spool"], "rb"))
            train_rec, held_rec, images, thumbs = _spooled(f, m)
            rows.append({"id": m["id"], "key": sample_key(m["id"]), "source": m["source"], "family": m["family"], "task": m["task"],
                         "split": split, "shard": name, "n_images": len(m["sha"])})
            hashes.extend({"id": m["id"], "split": split, "image": i, "sha": s, "phash": p, "thumb": t}
                          for i, (s, p, t) in enumerate(zip(m["sha"], m["phash"], thumbs)))
            yield train_rec if split == "train" else held_rec
            yield images

    whole = hashlib.sha256() if offset == 0 and total is not None else None
    try:
        write_shard_piece(Path(out) / name, offset, members(), total, hasher=whole)
    finally:
        for f in files.values():
            f.close()
    import pyarrow as pa

    return rows, pa.Table.from_pylist(hashes, schema=hashes_schema()), whole.hexdigest() if whole else None


class ShardDigests:
    """The whole-file sha256 of every shard ``plan_writes`` planned, as its pieces finish.

    A shard written by one task is hashed by that task as it writes (``write_piece`` returns
    it). SHA-256 runs strictly in byte order and its state cannot be combined from parts, so a
    shard split into byte ranges written at once has no whole-file digest in any one task: it is
    read back as soon as its last piece is done, while the other shards are still being written
    (its pages are still in the page cache). Only a shard larger than a piece (1/(2 x CPUs) of
    the stage's bytes, on one node) is split, so at most 2 x CPUs shards are read back; a big
    stage writes one piece per shard and reads nothing back."""

    def __init__(self, out: Path, jobs: list[tuple[str, int, int, list[dict[str, Any]], Optional[int]]]):
        self.out, self.jobs = Path(out), jobs
        self.left = collections.Counter((split, k) for split, k, *_ in jobs)
        self.split = {s for s, n in self.left.items() if n > 1}

    def piece_done(self, job: int, sha: Optional[str]) -> Optional[tuple[str, dict[str, Any]]]:
        """Job ``job`` finished (``sha``: what ``write_piece`` returned): (shard name, digest)
        when that completes a shard's digest, else None."""
        from metamorph.data.digest import sha256_file

        split, k = self.jobs[job][:2]
        name = shard_name(split, k)
        self.left[(split, k)] -= 1
        if sha is not None:
            return name, {"sha256": sha, "bytes": (self.out / name).stat().st_size}
        if (split, k) in self.split and self.left[(split, k)] == 0:
            return name, sha256_file(self.out / name)
        return None


def pieces(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive ranges of ``sizes`` of about equal bytes, each near ``target`` (the count is
    rounded up, so none is a small remainder); at least one sample each."""
    total = sum(sizes)
    n = max(1, -(-total // max(1, target)))
    out, a, acc = [], 0, 0
    for i, z in enumerate(sizes):
        acc += z
        if acc * n >= total * (len(out) + 1) and i + 1 < len(sizes):
            out.append((a, i + 1))
            a = i + 1
    out.append((a, len(sizes)))
    return out



def source_counts(meta: list[dict[str, Any]], written: list[dict[str, Any]], rejects: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """``source/{name}/records_in``, ``/samples_out``, ``/quarantined`` and ``/quarantine/{reason}``
    for every configured source (a source with no records reports zeros), after checking that
    each one's records in equal its samples out plus its quarantined records."""
    n_in = collections.Counter(m["source"] for m in meta)
    n_out = collections.Counter(r["source"] for r in written)
    n_q = collections.Counter(q["source"] for q in rejects)
    out: dict[str, float] = {}
    for name in names:
        if n_out[name] + n_q[name] != n_in[name]:
            raise RuntimeError(f"source {name}: {n_out[name]} written + {n_q[name]} quarantined != {n_in[name]} records in")
        out.update({f"source/{name}/records_in": n_in[name], f"source/{name}/samples_out": n_out[name], f"source/{name}/quarantined": n_q[name]})
    for (name, reason), n in sorted(collections.Counter((q["source"], q["reason"]) for q in rejects).items()):
        out[f"source/{name}/quarantine/{reason}"] = n
    return out


def first_accepted(meta: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """id -> its accepted row with the smallest order (``decide``'s pick among duplicate ids)."""
    first: dict[str, dict[str, Any]] = {}
    for m in meta:
        if not m["reason"] and (m["id"] not in first or m["order"] < first[m["id"]]["order"]):
            first[m["id"]] = m
    return first


def thumbs_reader(first: dict[str, dict[str, Any]]) -> Callable[[set[str]], dict[str, list[bytes]]]:
    """``decide``'s ``thumbs``: the spooled thumbnails of the given ids (``first``'s rows)."""

    def thumbs(ids: set[str]) -> dict[str, list[bytes]]:
        got: dict[str, list[bytes]] = {}
        by_spool: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for sid in ids:
            by_spool[first[sid]["spool"]].append(first[sid])
        for path, ms in by_spool.items():  # each spool opened once, read in offset order
            with open(path, "rb") as f:
                for m in sorted(ms, key=lambda m: m["offset"]):
                    got[m["id"]] = spooled_thumbs(f, m)
        return got

    return thumbs


# one piece to write: (split, shard number, byte offset in the shard, its samples in id order,
# the shard's member bytes when this is the shard's last piece, else None)
WriteJob = tuple[str, int, int, list[dict[str, Any]], Optional[int]]


def plan_writes(meta: list[dict[str, Any]], keep: dict[tuple[str, str], str], max_bytes: int, max_samples: int,
                slots: int, one_node: bool) -> tuple[list[str], list[WriteJob]]:
    """(shard file names, pieces to write) for the kept samples (``keep``: (id, order) -> split).

    Kept samples are sorted by id and cut into size-bounded shards, train shards first. Pieces
    are about 1/(2 x ``slots``) of all the bytes (>= 4 MiB): a stage with fewer shards than CPUs
    still writes on every CPU; a big stage keeps one task per shard. Only on one node: disjoint
    writes into one file from several hosts are not safe on every shared file system."""
    shards = []  # (split, shard number, its samples, their bytes in the tar), train shards first
    for split in ("train", "heldout"):
        kept = sorted((m for m in meta if keep.get((m["id"], m["order"])) == split), key=lambda m: m["id"])
        sizes = [shard_bytes(m, split) for m in kept]
        for k, (a, b) in enumerate(plan_shards(sizes, max_bytes, max_samples)):
            shards.append((split, k, kept[a:b], sizes[a:b]))
    target = max(4 * 2**20, sum(sum(z) for *_, z in shards) // (2 * slots)) if one_node else max_bytes + 1
    jobs: list[WriteJob] = []
    for split, k, ms, sizes in shards:
        total, offset = sum(sizes), 0
        for a, b in pieces(sizes, target):
            jobs.append((split, k, offset, ms[a:b], total if b == len(sizes) else None))
            offset += sum(sizes[a:b])
    return [shard_name(split, k) for split, k, *_ in shards], jobs


def write_quarantine(path: Path, rejects: list[dict[str, Any]]) -> tuple[int, Any]:
    """One JSON line per rejected record: source, id, locator, reason, detail; returns the line
    count and the file's digest (taken while writing)."""
    keys = ("source", "id", "locator", "reason", "detail")
    return write_jsonl(path, ({k: q[k] for k in keys} for q in rejects))


def curation_stats(meta: list[dict[str, Any]], index_rows: list[dict[str, Any]], rejects: list[dict[str, Any]],
                   decide_stats: dict[str, float], source_names: list[str], n_units: int,
                   times: dict[str, float]) -> dict[str, float]:
    """The stage's stats: records in/out, quarantine reasons, splits, tasks, per-source counts;
    ``times``: seconds (process, decide, write, total). Checks every record is either written or
    quarantined."""
    records_in = len(meta)
    n_out = len(index_rows)
    if n_out + len(rejects) != records_in:  # every record is either written or quarantined
        raise RuntimeError(f"{n_out} written + {len(rejects)} quarantined != {records_in} records in")
    per_source = source_counts(meta, index_rows, rejects, source_names)
    seconds = times["seconds"]
    decoded = sum(m["n_decoded"] for m in meta)
    n_split = collections.Counter(r["split"] for r in index_rows)
    stats: dict[str, float] = {
        "records_in": records_in,
        "samples_out": n_out,
        "quarantined": len(rejects),
        "read_units": n_units,
        "images_decoded": decoded,
        "images_out": sum(r["n_images"] for r in index_rows),
        "images_per_s": decoded / seconds if seconds > 0 else 0.0,
        "seconds_process": times["seconds_process"],  # read + decode + convert + spool, in parallel
        "seconds_decide": times["seconds_decide"],  # dedup, split, contamination, shard plan on the driver
        "seconds_write": times["seconds_write"],  # shards (parallel), index, hashes, quarantine
        "seconds": seconds,
        **decide_stats,
    }
    for split in ("train", "heldout"):
        stats[f"split/{split}"] = n_split[split]
    for task, n in sorted(collections.Counter(r["task"] for r in index_rows).items()):
        stats[f"task/{task}"] = n
    for reason, n in sorted(collections.Counter(q["reason"] for q in rejects).items()):
        stats[f"quarantine/{reason}"] = n
    stats.update(per_source)
    return stats
