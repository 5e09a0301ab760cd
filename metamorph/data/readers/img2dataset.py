"""img2dataset WebDataset tars: per key ``{key}.jpg`` (or png/webp), ``{key}.txt``, ``{key}.json``.

    python -c "from metamorph.data.readers import READERS; print(READERS['img2dataset'])"

Members are read into memory, never extracted, and still checked: a member whose name is absolute
or climbs out with ``..``, or that is a link or device, is quarantined as ``unsafe_tar_member``
(a tar built to overwrite files when someone untars it is not data to train on). A tar cut short
(mid-member, or without its end-of-archive blocks) keeps every complete key before the cut and
quarantines the partial one as ``truncated_tar``. A member header corrupt in the middle of a tar
is one ``tar_header_corrupt`` record; the walk resumes at the next valid header, so every key
before and after it is read. The ``.parquet`` and ``_stats.json`` files img2dataset writes beside
its tars are not sources (only ``.tar`` files are listed).

``plan`` walks each tar's member headers on the driver (no member data is read) and cuts it into
member ranges of ``records_per_unit`` keys, each starting at the header of a key's first member,
so one big tar spreads over many tasks. A tar the walk cannot finish cleanly (unreadable, cut
short, trailing garbage, global pax headers) stays one unit and its read reports what is wrong.

``read`` walks plain ustar/v7 member headers itself (``_Members``: a few microseconds a member,
where ``tarfile`` takes ~15) and hands the rest of the range to ``tarfile`` at the first header
that is anything else (pax or GNU extensions, links, base-256 numbers, a zero or short block), so
every irregular case keeps ``tarfile``'s exact behaviour.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import _MISSING, RawRecord, Reject, SourceConfig, check_text, list_files, order_key, rejected, utf8

KIND = "t2i"
FAMILY = "generation"
SUFFIXES = (".tar",)  # img2dataset's .parquet and _stats.json sidecars are not records
FIELDS: dict[str, str] = {}
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 256 * 2**20  # far above any real image; bounds worker memory per member
_END_BLOCKS = 2 * tarfile.BLOCKSIZE  # a well-formed tar ends with two zero blocks


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".tar",)):
        units += tar_units(f, records_per_unit)
    return units


def tar_units(path: Path, records_per_unit: int) -> list[dict[str, Any]]:
    """``{"file", "start", "stop"}`` member ranges (byte offsets of member headers; ``stop`` None:
    to the end) of about ``records_per_unit`` keys; one ``{"file"}`` unit when the tar is small or
    irregular. ``read`` of the ranges yields exactly what ``read`` of the whole tar yields."""
    whole = [{"file": str(path)}]
    try:
        scan = _scan_headers(path)
        if scan is None:  # long names, pax, links, ...: let tarfile walk it
            scan = _scan_tarfile(path)
    except (tarfile.TarError, EOFError, OSError, ValueError):
        return whole
    members, end = scan
    if _missing_end(path, end):
        return whole
    starts: list[int] = []
    key, n = None, 0
    for offset, name, is_file in members:
        if not is_file or _unsafe_name(name):  # read() never starts or ends a key on these
            continue
        k, _ = _split_key(name)
        if k != key:
            if n and n % records_per_unit == 0:
                starts.append(offset)
            key, n = k, n + 1
    if not starts:
        return whole
    bounds: list[Any] = [0, *starts, None]
    return [{"file": str(path), "start": a, "stop": b} for a, b in zip(bounds, bounds[1:])]


Scan = tuple[list[tuple[int, str, bool]], int]  # ([(header offset, name, regular file?)], end-of-members offset)
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


def _scan_headers(path: Path) -> Scan | None:
    """The member headers by plain 512-byte reads (a few us each; tarfile takes ~15 us), or None
    when a header needs tarfile's full parser (``_parse_header``: anything but plain files and
    directories in ustar/v7 headers). Checksums are verified as tarfile does."""
    members: list[tuple[int, str, bool]] = []
    offset = 0
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        while True:
            buf = os.pread(fd, tarfile.BLOCKSIZE, offset)
            if len(buf) < tarfile.BLOCKSIZE or buf == _ZERO_BLOCK:
                return members, offset  # _missing_end judges how the archive ends
            m = _parse_header(buf, offset)
            if m is None:
                return None
            members.append((offset, m.name, m.isfile()))
            offset += tarfile.BLOCKSIZE + (-(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if m.isfile() else 0)


def _scan_tarfile(path: Path) -> Scan:
    with tarfile.open(path, "r:") as tar:
        members = [(m.offset, m.name, m.isfile()) for m in tar]
        if tar.pax_headers:  # global pax headers apply to every later member: not splittable
            raise ValueError("global pax headers")
        return members, tar.offset


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    d, b = os.path.split(name) if "/" in name else ("", name)
    stem, _, ext = b.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _unsafe(m: Any) -> str:
    if not (m.isfile() or m.isdir()):
        return "link or special file"
    return _unsafe_name(m.name)


def _unsafe_name(name: str) -> str:
    if "/" not in name and "\x00" not in name and name != "..":  # a plain file name (the usual case)
        return ""
    norm = os.path.normpath(name)
    if name.startswith("/") or os.path.isabs(name) or norm == ".." or norm.startswith("../") or "\x00" in name:
        return "path escapes the archive"
    return ""


# the numeric fields tarfile parses besides the size (mode, uid, gid, mtime, devmajor, devminor): an
# octal number between spaces, then anything after a NUL (tarfile's nti); else the header is invalid
_NUMERIC = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_OCTAL = re.compile(rb"\s*[0-7]*\s*(?:\x00[\s\S]*)?")
# the numeric fields as tarfile and GNU tar write them (mode ... checksum, bytes 100-156; device
# numbers, 329-345): one match instead of eight parses
_CANONICAL = re.compile(rb"[0-7]{7}\x00[0-7]{7}\x00[0-7]{7}\x00[0-7]{11}\x00[0-7]{11}\x00[0-7]{6}\x00 ")
_CANONICAL_DEV = re.compile(rb"(?:[0-7]{7}\x00|\x00{8}){2}")


def _octal(buf: bytes, a: int, b: int) -> int | None:
    """The octal number in ``buf[a:b]`` as tarfile reads it; None when tarfile would need its
    fuller rules (base-256, signs) or find the header invalid."""
    if _OCTAL.fullmatch(buf, a, b) is None:
        return None
    return int(buf[a:b].split(b"\0", 1)[0].strip() or b"0", 8)


class _Member:
    """What ``read`` uses of a ``tarfile.TarInfo``, for a plain file or directory header."""

    __slots__ = ("name", "size", "offset", "_dir")

    def __init__(self, name: str, size: int, offset: int, is_dir: bool) -> None:
        self.name, self.size, self.offset, self._dir = name, size, offset, is_dir

    def isfile(self) -> bool:
        return not self._dir

    def isdir(self) -> bool:
        return self._dir


def _parse_header(buf: bytes, offset: int) -> _Member | None:
    """The member a plain file/directory header describes; None when tarfile must judge it."""
    if len(buf) != tarfile.BLOCKSIZE or buf[156:157] not in (b"0", b"\0", b"5"):
        return None
    if _CANONICAL.fullmatch(buf, 100, 156) and _CANONICAL_DEV.fullmatch(buf, 329, 345):
        chk, size = int(buf[148:154], 8), int(buf[124:135], 8)  # what tarfile/GNU tar write
    else:
        chk, size = _octal(buf, 148, 156), _octal(buf, 124, 136)
        if any(_OCTAL.fullmatch(buf, a, b) is None for a, b in _NUMERIC):
            return None
    if chk is None or size is None or chk != sum(buf) - sum(buf[148:156]) + 8 * 32:
        return None  # includes the all-zero end block (its checksum field reads 0)
    name = buf[:100].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape")
    if buf[345] and buf[257:263] != b"ustar\0":  # a prefix field outside ustar: tarfile's reading
        return None
    if buf[345]:
        name = buf[345:500].split(b"\0", 1)[0].decode(tarfile.ENCODING, "surrogateescape") + "/" + name
    is_dir = buf[156:157] == b"5" or (buf[156:157] == b"\0" and name.endswith("/"))
    return _Member(name.rstrip("/") if is_dir else name, size, offset, is_dir)


class _Members:
    """``tarfile.TarFile``'s ``next``/``extractfile``/``offset`` over an open tar positioned at a
    member header, parsing plain ustar/v7 file and directory headers directly. At the first header
    that is anything else (or a zero, short or unchecksummed block), the rest is ``tarfile``'s: it
    opens there, so every irregular case keeps its exact behaviour and messages. Like
    ``tarfile.open``, construction reads the first header and raises what it raises."""

    def __init__(self, fh: Any, fast: bool = True) -> None:
        self._fh = fh
        self._pos = fh.tell()
        self._tar: tarfile.TarFile | None = None
        self._fast = fast
        self._first: Any = None
        self._first = self._next(first=True)

    def _next(self, first: bool = False) -> Any:
        if self._tar is not None:
            return self._tar.next()
        pos = self._pos
        if self._fast:
            if self._fh.tell() != pos:
                self._fh.seek(pos)
            buf = self._fh.read(tarfile.BLOCKSIZE)
            m = _parse_header(buf, pos)
            if m is not None:
                self._pos = pos + tarfile.BLOCKSIZE + (-(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if m.isfile() else 0)
                return m
            if not buf and not first:  # tarfile.next's check that the previous member's blocks are all there
                self._fh.seek(pos - 1)
                if not self._fh.read(1):
                    raise tarfile.ReadError("unexpected end of data")
        self._fh.seek(pos)
        self._tar = tarfile.open(fileobj=self._fh, mode="r:")
        return self._tar.next()

    def next(self) -> Any:
        if self._first is not None:
            m, self._first = self._first, None
            return m
        return self._next()

    def extract(self, m: Any) -> bytes:
        """The member's data; a file cut inside it raises tarfile's ReadError."""
        if isinstance(m, _Member):
            self._fh.seek(m.offset + tarfile.BLOCKSIZE)
            data = self._fh.read(m.size)
            if len(data) != m.size:
                raise tarfile.ReadError("unexpected end of data")
            return data
        fobj = self._tar.extractfile(m)
        return fobj.read() if fobj is not None else b""

    @property
    def offset(self) -> int:
        """Where the walk stopped: tarfile's ``offset`` (the header it ended on)."""
        return self._tar.offset if self._tar is not None else self._pos

    def __enter__(self) -> "_Members":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._tar is not None:
            self._tar.close()


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int, fast: bool = True) -> Iterator[RawRecord]:
    """The unit's records. ``fast=False`` walks every header with ``tarfile`` (the reference the
    tests hold the fast walk to)."""
    path = Path(unit["file"])
    start, stop = unit.get("start", 0), unit.get("stop")
    with open(path, "rb") as fh:
        fh.seek(start)
        yield from _read(src, path, fh, stop, unit_idx, fast)


def _read(src: SourceConfig, path: Path, fh: Any, stop: Any, unit_idx: int, fast: bool = True) -> Iterator[RawRecord]:
    """The records of the members from ``fh``'s position to the header at ``stop`` (None: the end
    of the archive, which is then checked for truncation). A member header that is corrupt in the
    middle of the archive is one ``tar_header_corrupt`` record, and the walk resumes at the next
    valid header, so the keys after it are read, not lost."""
    pos = 0

    def emit(key: str, parts: dict[str, bytes]) -> RawRecord:
        nonlocal pos
        rec = _record(src, path.name, key, parts, order_key(unit_idx, pos))
        pos += 1
        return rec

    def reject(where: str, reason: str, detail: str, rid: str = "") -> RawRecord:
        nonlocal pos
        rec = rejected(src, KIND, where, order_key(unit_idx, pos), reason, detail, rid=rid)
        pos += 1
        return rec

    key, parts = None, {}
    first_segment = True
    while True:  # one pass per stretch of readable headers
        segment_at = fh.tell()
        try:
            tar = _Members(fh, fast)
        except (tarfile.ReadError, EOFError, OSError) as e:
            resume = _resync(path, segment_at) if stop is None else None
            if resume is None:
                if key is not None:
                    yield reject(f"{path.name}:{key}", "truncated_tar", f"unreadable tar: {e}", key)
                elif first_segment:
                    yield reject(path.name, "truncated_tar", f"unreadable tar: {e}")
                return
            yield reject(f"{path.name}@{segment_at}", "tar_header_corrupt", f"invalid member header at byte {segment_at}; resumed at byte {resume}")
            fh.seek(resume)
            first_segment = False
            continue
        first_segment = False
        resume = None
        with tar:
            while True:
                try:
                    m = tar.next()
                except (tarfile.ReadError, EOFError) as e:
                    if key is not None:
                        yield reject(f"{path.name}:{key}", "truncated_tar", str(e), key)
                        key = None
                    else:
                        yield reject(f"{path.name}@{tar.offset}", "truncated_tar", str(e))
                    return
                if m is None or (stop is not None and m.offset >= stop):
                    break
                if m.isdir():
                    continue
                why = _unsafe(m)
                if why:
                    yield reject(f"{path.name}:{m.name}", "unsafe_tar_member", f"{m.name!r}: {why}")
                    continue
                k, ext = _split_key(m.name)
                if k != key:
                    if key is not None:
                        yield emit(key, parts)
                    key, parts = k, {}
                if m.size > MAX_MEMBER_BYTES:
                    parts["__oversized__"] = m.name.encode()
                    continue
                try:
                    data = tar.extract(m)
                    if len(data) != m.size:
                        raise tarfile.ReadError(f"member {m.name} has {len(data)} of {m.size} bytes")
                except (tarfile.ReadError, EOFError, OSError) as e:
                    yield reject(f"{path.name}:{key}", "truncated_tar", str(e), key)
                    return
                parts[ext] = data
            end = tar.offset
            if stop is None and _missing_end(path, end).startswith("garbage"):
                resume = _resync(path, end)
        if resume is not None:  # a corrupt header in the middle: count it, read on after it
            yield reject(f"{path.name}@{end}", "tar_header_corrupt", f"invalid member header at byte {end}; resumed at byte {resume}")
            fh.seek(resume)
            continue
        if key is not None:
            truncated = _missing_end(path, end) if stop is None else ""
            if truncated:
                # the last key may be missing members that were cut off
                yield reject(f"{path.name}:{key}", "truncated_tar", truncated, key)
            else:
                yield emit(key, parts)
        elif stop is None:
            truncated = _missing_end(path, end)
            if truncated and pos == 0:
                yield reject(path.name, "truncated_tar", truncated)
        return


def _resync(path: Path, offset: int, chunk: int = 1 << 20) -> int | None:
    """The offset of the first valid member header after the block at ``offset`` (None: none).
    Candidates are blocks with the ustar magic (every tar writer img2dataset and webdataset use
    sets it), then checked as tarfile checks a header (checksum, fields)."""
    with open(path, "rb") as f:
        at = offset + tarfile.BLOCKSIZE
        while True:
            f.seek(at)
            buf = f.read(chunk + tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                return None
            i = buf.find(b"ustar", 257)
            while i != -1:
                start = i - 257
                if start % tarfile.BLOCKSIZE == 0 and start + tarfile.BLOCKSIZE <= len(buf):
                    try:
                        tarfile.TarInfo.frombuf(buf[start : start + tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
                        return at + start
                    except tarfile.HeaderError:
                        pass
                i = buf.find(b"ustar", i + 1)
            at += chunk


def _missing_end(path: Path, offset: int) -> str:
    """Why the archive ends without its zero blocks ('' when it ends properly)."""
    size = path.stat().st_size
    if size - offset < _END_BLOCKS:
        return f"archive ends at byte {size} without its end-of-archive blocks"
    with open(path, "rb") as f:
        f.seek(offset)
        if f.read(_END_BLOCKS).strip(b"\0"):
            return f"garbage after the last member at byte {offset}"
    return ""


def _record(src: SourceConfig, tar_name: str, key: str, parts: dict[str, bytes], order: str) -> RawRecord:
    where = f"{tar_name}:{key}"
    rid = key.rsplit("/", 1)[-1]
    try:
        if "__oversized__" in parts:
            raise Reject("oversized_member", f"{parts['__oversized__'].decode(errors='replace')} exceeds {MAX_MEMBER_BYTES} bytes")
        meta: dict[str, Any] = {}
        if "json" in parts:
            try:
                meta = json.loads(utf8(parts["json"], f"{key}.json"))
            except json.JSONDecodeError as e:
                raise Reject("malformed_json", f"{key}.json: {e.msg}") from None
            if not isinstance(meta, dict):
                raise Reject("malformed_json", f"{key}.json is not an object")
        if "txt" in parts:
            caption = check_text(utf8(parts["txt"], f"{key}.txt"), f"{key}.txt")
        else:
            caption = check_text(meta.get("caption", _MISSING), f"{key} caption (.txt or json 'caption')")
        ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if ext is None:
            raise Reject("image_missing", f"{key}: no .jpg/.png/.webp member")
    except Reject as r:
        return RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, reason=r.reason, detail=r.detail)
    payload = {"caption": caption, "image": {"blob": 0}, "meta": meta.get("meta") if isinstance(meta.get("meta"), dict) else {}}
    return RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload, blobs=[parts[ext]])
