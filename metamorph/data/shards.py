"""Write and read curated-sample WebDataset shards (see metamorph/data/schema.py).

    python -c "from metamorph.data.shards import iter_samples; print(sum(1 for _ in iter_samples('runs/mix/KEY/mixture')))"

Shards are plain POSIX tars; every sample is the same two members (``sample_members``), so
``webdataset.WebDataset`` and ``ray.data.read_webdataset`` read them with default arguments:

    {key}.json        the record (``metamorph.data.schema.Sample``, UTF-8 JSON)
    {key}.images.mp   msgpack map {"images": [encoded image bytes, ...]} in the record's image
                      order; the list is empty for a text-only sample

One member per image (``{key}.0.png``, ``{key}.1.png``...) looked more natural but made the
columns sparse: Ray's reader turns each chunk of samples into a pandas frame, a sample without
``1.png`` leaves NaN in that column, and the block then fails to convert to Arrow (or falls back
to pickled objects); chunks without any second image also get a different schema. A map, not a
bare list: Ray unwraps every one-element list value to its element, so a one-image sample would
come back as bytes and the others as lists. Names are deterministic (``shard-{split}-{NNNNN}.tar``)
and a shard is closed once it would exceed ``max_bytes`` or ``max_samples``, so a rerun on the
same input writes byte-identical files. ``index.parquet`` lists every sample; readers trust it
for counts.
"""

from __future__ import annotations

import functools
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Mapping, Sequence

from metamorph.data.digest import FileDigest, HashingFile, hashing_open
from metamorph.data.schema import Sample, dumps

if TYPE_CHECKING:
    import pyarrow as pa

RECORD_MEMBER = "json"  # member suffixes of one sample (``sample_members``)
IMAGES_MEMBER = "images.mp"
INDEX_FILE = "index.parquet"
QUARANTINE_FILE = "quarantine.jsonl"


@functools.cache
def index_schema() -> pa.Schema:
    import pyarrow as pa  # here, not at the top: `metamorph plan` imports this module

    return pa.schema(
        [
            ("id", pa.string()),
            ("key", pa.string()),
            ("source", pa.string()),
            ("family", pa.string()),
            ("task", pa.string()),
            ("split", pa.string()),
            ("shard", pa.string()),
            ("n_images", pa.int32()),
        ]
    )



def sample_members(key: str, record: bytes, images: Sequence[bytes]) -> list[tuple[str, bytes]]:
    """The shard layout of one sample, in write order: [(member name, payload)]. Every writer
    of curated shards goes through here, every reader through ``sample_from_members``.

    Always the same two members whatever the image count (0, 1, several, video frames), so
    every sample has the same columns in any WebDataset reader (see the module docstring)."""
    import msgpack

    return [(f"{key}.{RECORD_MEMBER}", record), (f"{key}.{IMAGES_MEMBER}", msgpack.packb({"images": list(images)}, use_bin_type=True))]


def sample_from_members(members: Mapping[str, bytes]) -> tuple[Sample, list[bytes]]:
    """(sample, image payloads) from one sample's members keyed by suffix (``json``,
    ``images.mp``: what ``webdataset`` yields per sample without decoding)."""
    import msgpack

    sample = Sample.from_json(json.loads(members[RECORD_MEMBER]))
    images = msgpack.unpackb(members[IMAGES_MEMBER], raw=False)["images"]
    if len(images) != len(sample.images):
        raise ValueError(f"sample {sample.id}: {len(images)} images in {IMAGES_MEMBER} for {len(sample.images)} in its record")
    return sample, images


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file member header with deterministic bytes (the world's and curation's tars)."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0  # deterministic bytes across reruns
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti


def tar_member(name: str, payload: bytes) -> bytes:
    """One regular-file member as ``tarfile`` writes it in USTAR format (header, payload, NUL
    padding to the 512-byte block); a shard is its members' concatenation plus ``tar_end``, so
    parallel workers can pre-encode members (``ShardWriter.write_members``)."""
    return b"".join(tar_member_parts(name, payload))


def tar_member_parts(name: str, payload: bytes) -> tuple[bytes, bytes, bytes]:
    """``tar_member`` as (header, payload, padding), for writers that need not join them."""
    raw = name.encode("ascii", "ignore")
    if len(raw) == len(name) and len(raw) <= 100 and len(payload) < 8**11:
        # the only per-member fields (name, size, checksum) in a header otherwise constant: ~10x
        # cheaper than TarInfo.tobuf, which is the fallback for long or non-ASCII names
        head = bytearray(_HEADER)
        size = b"%011o\0" % len(payload)
        head[0 : len(raw)] = raw
        head[124:136] = size
        head[148:156] = b"%06o\0 " % (_HEADER_SUM + sum(raw) + sum(size))  # the checksum field counts as 8 spaces
        header = bytes(head)
    else:
        header = tarinfo(name, len(payload)).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    return header, payload, b"\0" * (-len(payload) % tarfile.BLOCKSIZE)


# a member header with an empty name, size 0 and the checksum field as 8 spaces
_HEADER = bytearray(tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
_HEADER[148:156] = b" " * 8
_HEADER_SUM = sum(_HEADER) - sum(_HEADER[124:136])  # all but the name (empty here) and the size


def tar_end(nbytes: int) -> bytes:
    """What ``TarFile.close`` appends to ``nbytes`` of members: two zero blocks, then zeros to a
    whole 10 KiB record."""
    end = 2 * tarfile.BLOCKSIZE
    return b"\0" * (end + (-(nbytes + end) % tarfile.RECORDSIZE))


def shard_name(split: str, n: int) -> str:
    return f"shard-{split}-{n:05d}.tar"


def write_shard_piece(path: Path, offset: int, members: Iterable[bytes], total: int | None = None, hasher: Any = None) -> int:
    """Write ``members`` (``tar_member`` bytes) back to back from byte ``offset`` of the shard at
    ``path``, so that several tasks write one big shard at once, each its own byte range of the
    file the planner made (and emptied): the file is opened without truncation and must exist.
    The last piece passes ``total``, the shard's member bytes, and writes the tar end after its
    members. Returns the member bytes written. Pieces covering a shard write what ``ShardWriter``
    writes for it. ``hasher`` (a ``hashlib`` object) sees every byte written, in order: for the
    one piece that writes a whole shard (offset 0, ``total`` given) that is the shard's sha256."""
    n = 0
    with open(path, "r+b") as f:
        f.seek(offset)
        for m in members:
            f.write(m)
            n += len(m)
            if hasher is not None:
                hasher.update(m)
        if total is not None:
            if offset + n != total:
                raise ValueError(f"{path}: the last piece ends at {offset + n}, the members at {total}")
            end = tar_end(total)
            f.write(end)
            if hasher is not None:
                hasher.update(end)
    return n


def _rolls_over(count: int, nbytes: int, size: int, max_bytes: int, max_samples: int) -> bool:
    """Whether a sample of ``size`` bytes starts a new shard after ``count`` samples of ``nbytes``."""
    return count > 0 and (nbytes + size > max_bytes or count >= max_samples)


def plan_shards(sizes: list[int], max_bytes: int, max_samples: int) -> list[tuple[int, int]]:
    """[start, end) of each shard that ``ShardWriter`` would write for samples of these sizes, in
    order: lets independent writers fill shards in parallel and name them as one writer would."""
    bounds: list[tuple[int, int]] = []
    start, nbytes = 0, 0
    for i, size in enumerate(sizes):
        if _rolls_over(i - start, nbytes, size, max_bytes, max_samples):
            bounds.append((start, i))
            start, nbytes = i, 0
        nbytes += size
    if start < len(sizes):
        bounds.append((start, len(sizes)))
    return bounds


@dataclass
class ShardWriter:
    """Size-bounded, deterministic tar shards for one split. Use as a context manager.

    The tars are written member by member with ``tar_member`` (the bytes ``tarfile`` writes in
    USTAR format). ``first_shard``: the number of the first shard this writer opens (parallel
    writers of one split each fill the shards ``plan_shards`` gave them)."""

    out_dir: Path
    split: str
    max_bytes: int = 64 * 2**20  # ~64 MB shards: large enough for streaming, small for retries
    max_samples: int = 10_000
    first_shard: int = 0
    _file: HashingFile | None = None
    _n_shard: int = 0
    _bytes: int = 0  # what counts toward max_bytes in the open shard
    _written: int = 0  # member bytes in the open shard file
    _count: int = 0
    rows: list[dict] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)
    digests: dict[str, FileDigest] = field(default_factory=dict)  # shard name -> sha256, taken while writing

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._n_shard = self.first_shard

    def _open(self) -> None:
        name = shard_name(self.split, self._n_shard)
        self._file = hashing_open(self.out_dir / name)
        self.shards.append(name)
        self._n_shard += 1
        self._bytes = self._written = self._count = 0

    def write(self, sample: Sample, images: list[bytes]) -> None:
        sample.validate()
        if len(images) != len(sample.images):
            raise ValueError(f"sample {sample.id}: {len(images)} image payloads for {len(sample.images)} refs")
        row = {"id": sample.id, "key": sample.key, "source": sample.source, "family": sample.family, "task": sample.task, "split": sample.split}
        self.write_encoded(row, dumps(sample), images, [ref.ext for ref in sample.images])

    def write_encoded(self, row: dict, record: bytes, images: list[bytes], exts: list[str]) -> None:
        """``write`` for a sample already serialised (``dumps``) and validated; ``row`` holds the
        index fields id, key, source, family, task, split (``exts``: the images' formats, as
        the record lists them; the layout itself does not name them)."""
        members = [tar_member(name, payload) for name, payload in sample_members(row["key"], record, images)]
        self.write_members(row, members, len(images), size=len(record) + sum(len(b) for b in images))

    def write_members(self, row: dict, members: list[bytes], n_images: int, size: int) -> None:
        """One sample as its tar members, already encoded (``tar_member`` of each of
        ``sample_members``); ``size`` is what it counts toward ``max_bytes``."""
        if self._file is None or _rolls_over(self._count, self._bytes, size, self.max_bytes, self.max_samples):
            self.close_shard()
            self._open()
        assert self._file is not None
        for m in members:
            self._file.write(m)
            self._written += len(m)
        self._bytes += size
        self._count += 1
        self.rows.append({**{k: row[k] for k in ("id", "key", "source", "family", "task", "split")}, "shard": self.shards[-1], "n_images": n_images})

    def close_shard(self) -> None:
        if self._file is not None:
            self._file.write(tar_end(self._written))
            self._file.close()
            self.digests[self.shards[-1]] = self._file.digest()
            self._file = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close_shard()


def write_index(out_dir: Path, rows: list[dict]) -> FileDigest:
    """``index.parquet`` of these rows; returns its sha256, taken while writing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows, schema=index_schema())
    with hashing_open(Path(out_dir) / INDEX_FILE) as f:
        pq.write_table(table, f)
    return f.digest()


def write_jsonl(path: Path, rows: Iterable[dict]) -> tuple[int, FileDigest]:
    """One JSON object per line (UTF-8, non-ASCII kept); returns (lines, sha256 taken while writing)."""
    n = 0
    with hashing_open(path) as f:
        for r in rows:
            f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            n += 1
    return n, f.digest()


def read_index(out_dir: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(Path(out_dir) / INDEX_FILE)


def list_shards(out_dir: Path, split: str | None = None) -> list[Path]:
    pattern = f"shard-{split}-*.tar" if split else "shard-*.tar"
    return sorted(Path(out_dir).glob(pattern))


def iter_samples(out_dir: Path | str, split: str | None = None) -> Iterator[tuple[Sample, list[bytes]]]:
    """Yield (sample, image payloads) from the shards under ``out_dir`` (via ``webdataset``)."""
    yield from iter_shards(list_shards(Path(out_dir), split))


def iter_shards(paths: list[Path]) -> Iterator[tuple[Sample, list[bytes]]]:
    """Yield (sample, image payloads) from these shard files, in order (via ``webdataset``)."""
    import webdataset as wds

    urls = [str(p) for p in paths]
    if not urls:
        return
    for rec in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield sample_from_members(rec)


# --- spool: encoded samples parked between processing and shard writing -------------------------------


Piece = bytes | tuple[bytes, ...]  # one spooled part: bytes, or consecutive byte strings


class Spool:
    """A spool file written item by item: processing tasks park each record's encoded parts here
    as soon as it is done (only small metadata travels to the driver, and a task holds one record's
    bytes at a time); shard writers then copy byte ranges (``read_spool``). A part may be a tuple
    of byte strings written back to back (a tar member's header, payload and padding: no copy
    joins them). The file is created with the first item."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: BinaryIO | None = None
        self._pos = 0

    def append(self, item: list[Piece]) -> tuple[int, list[int]]:
        """Write one item; return its start offset and the length of each part."""
        if self._f is None:
            self._f = open(self.path, "wb")
        start, lengths = self._pos, []
        for part in item:
            n = 0
            for b in (part,) if isinstance(part, bytes) else part:
                self._f.write(b)
                n += len(b)
            lengths.append(n)
            self._pos += n
        return start, lengths

    def close(self) -> None:
        if self._f is not None:
            self._f.close()

    def __enter__(self) -> "Spool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_spool(f: BinaryIO, offset: int, lengths: list[int]) -> list[bytes]:
    """The byte strings of one item: ``lengths`` consecutive pieces from ``offset`` of an open spool."""
    f.seek(offset)
    data = f.read(sum(lengths))
    out, pos = [], 0
    for n in lengths:
        out.append(data[pos : pos + n])
        pos += n
    return out
