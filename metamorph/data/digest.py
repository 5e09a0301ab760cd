"""sha256 of a file taken while it is written, so that finishing a stage need not read it again.

    python -c "from metamorph.data.digest import hashing_open; f = hashing_open('/tmp/x'); f.write(b'hi'); f.close(); print(f.digest())"

A stage's manifest (pipelines/cache.py) records bytes and sha256 per file. A writer that owns its
file object writes through ``HashingFile`` and hands ``digest()`` to the stage context
(``StageContext.record_digest``); the manifest takes it from there. Files written by code that
takes only a path (``save_pretrained``, torch DCP, PyAV) are hashed at promote instead
(``pipelines.cache.list_files``). pyarrow writes Parquet through a Python file object too
(``pq.write_table(table, HashingFile)``, ``pq.ParquetWriter(HashingFile, schema)``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, BinaryIO, TypedDict


class FileDigest(TypedDict):
    sha256: str
    bytes: int


class HashingFile:
    """A binary file open for writing that hashes every byte written, in order (write-only,
    sequential: no seek). ``digest()`` after the last write."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._h = hashlib.sha256()
        self._n = 0

    def write(self, data: Any) -> int:
        n = self._f.write(data)
        self._h.update(data)
        self._n += len(memoryview(data).cast("B"))
        return n

    def tell(self) -> int:
        return self._n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def digest(self) -> FileDigest:
        return {"sha256": self._h.hexdigest(), "bytes": self._n}

    def __enter__(self) -> "HashingFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def hashing_open(path: str | Path) -> HashingFile:
    """``open(path, "wb")`` that hashes what is written (use as a context manager)."""
    return HashingFile(open(path, "wb"))


def sha256_file(path: str | Path) -> FileDigest:
    """The same digest read back from disk: for files written by code that cannot be wrapped."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}
