"""Shared pieces of the upstream-format readers: source config, raw records, safe line/path reading.

    python -c "from metamorph.data.readers.base import SourceConfig; print(SourceConfig(name='x', format='llava', path='a.jsonl'))"

A reader turns one upstream dataset into ``RawRecord``s in two steps so that the work spreads
over Ray tasks: ``plan(src, records_per_unit)`` lists small JSON-able *units* of at most about
``records_per_unit`` records (a byte range of a JSONL or CSV file, an element range of a JSON
array, a member range of a tar, a row range of a Parquet row group) on the driver, and
``read(src, unit, unit_idx)`` yields the records of one unit inside a worker, which also decodes
and converts them (one task per unit), so a big file is split here or it runs on one core. A JSON
array is walked in chunks, never loaded whole; where it stops being an array, the rest is one
unit that reads as one quarantined record. A tar the plan cannot walk stays one unit and its read
reports the problem. Readers never decode images or videos (the curation step does, in
parallel); they only parse text, pick up inline bytes (tars, Parquet), and reject what is already
unreadable with a quarantine reason, one ``RawRecord`` per upstream record, so every record is
counted. Media paths in a record are absolute (``media_ref``: with their root, so the worker that
opens them checks containment after symlinks).
"""

from __future__ import annotations

import codecs
import functools
import csv
import dataclasses
import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

if TYPE_CHECKING:
    import pyarrow as pa

BBOX_FORMATS = ("xyxy", "xywh")


@dataclass(kw_only=True)
class SourceConfig:
    """One upstream dataset a curation stage reads (several per family are allowed)."""

    name: str  # short, unique within the stage; prefixes every sample id ("{name}-{upstream id}")
    format: str  # reader name: llava | videoqa | img2dataset | parquet | ssv2 | howto100m | viscot | instructpix2pix
    # file or directory; "world:<relative path>" resolves inside the toy-world artifact
    path: str
    # root that relative image paths in the records resolve against; None: the annotation file's directory
    image_root: Optional[str] = None
    # same for videos (videoqa, ssv2, howto100m)
    video_root: Optional[str] = None
    # viscot only: how the source writes boxes, in pixels; never guessed from the numbers
    bbox_format: str = "xyxy"
    # the record keys a format reads under other names, {our name: the source's key}; the reader's
    # FIELDS lists the names and their defaults (edit_jsonl: source, instruction, target)
    fields: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"sources[].name={self.name!r}: use letters, digits, '_' or '-' (it prefixes sample ids)")
        if not self.path:
            raise ValueError(f"sources[{self.name}].path is empty: point it at the dataset file or directory")
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"sources[{self.name}].bbox_format={self.bbox_format!r}: use one of {BBOX_FORMATS}")
        bad = [k for k, v in self.fields.items() if not isinstance(k, str) or not isinstance(v, str) or not v]
        if bad:
            raise ValueError(f"sources[{self.name}].fields: {bad} must map a field name to a non-empty key")

    def key_of(self, name: str, default: str) -> str:
        """The source's key for our field ``name``."""
        return self.fields.get(name, default)


class Reject(Exception):
    """A record cannot be used; ``reason`` is the quarantine reason (a short snake_case word)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:500]


@dataclass
class RawRecord:
    """One upstream record before decoding. ``kind`` names the converter in ``metamorph.data.curate``.

    Image/video references in ``payload`` are ``{"blob": i}`` (bytes in ``blobs[i]``, from tars and
    Parquet) or ``{"path": "/abs/file"}``. A record the reader already rejected has ``reason`` set
    (and usually an empty payload); it still counts as one record in.
    """

    source: str
    rid: str  # upstream id ("" when the record is too broken to have one)
    locator: str  # where it came from, for humans: "file:line", "shard.tar:key"
    order: str  # sortable position within the stage ("{unit:06d}:{pos:09d}"), ties broken by it
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    blobs: list[bytes] = field(default_factory=list)
    reason: str = ""
    detail: str = ""

    def to_row(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rid": self.rid,
            "locator": self.locator,
            "order": self.order,
            "kind": self.kind,
            "payload": json.dumps(self.payload, ensure_ascii=False),
            "blobs": list(self.blobs),
            "reason": self.reason,
            "detail": self.detail,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "RawRecord":
        return cls(
            source=row["source"],
            rid=row["rid"],
            locator=row["locator"],
            order=row["order"],
            kind=row["kind"],
            payload=json.loads(row["payload"]) if row["payload"] else {},
            blobs=list(row["blobs"] or []),
            reason=row["reason"] or "",
            detail=row["detail"] or "",
        )


@functools.cache
def raw_schema() -> pa.Schema:
    import pyarrow as pa  # here, not at the top: `metamorph plan` imports the readers

    return pa.schema(
        [
            ("source", pa.string()),
            ("rid", pa.string()),
            ("locator", pa.string()),
            ("order", pa.string()),
            ("kind", pa.string()),
            ("payload", pa.string()),
            ("blobs", pa.list_(pa.binary())),
            ("reason", pa.string()),
            ("detail", pa.string()),
        ]
    )



def raw_table(records: list[RawRecord]) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist([r.to_row() for r in records], schema=raw_schema())


def rejected(src: SourceConfig, kind: str, locator: str, order: str, reason: str, detail: str = "", rid: str = "") -> RawRecord:
    return RawRecord(source=src.name, rid=rid, locator=locator, order=order, kind=kind, reason=reason, detail=detail[:500])


def order_key(unit: int, pos: int) -> str:
    return f"{unit:06d}:{pos:09d}"


# --- text ---------------------------------------------------------------------------------------


def utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("non_utf8_text", f"{what}: invalid UTF-8 at byte {e.start}") from None


# a reader-side bound on any one text field: the curation step applies the configured, much
# smaller caps (max_text_chars, max_caption_chars); this one only keeps a worker from carrying
# megabytes of scraped page text through a task
MAX_FIELD_CHARS = 1_000_000


def check_text(value: Any, what: str, max_chars: int = MAX_FIELD_CHARS) -> str:
    """A string field, rejected with its own reason when absent (``missing_field``), JSON null or
    a null cell (``null_value``), NaN/inf (``nan_value``), another type (``wrong_type``), holding
    lone surrogates (JSON escapes like "\\udc80" parse fine but cannot be written back as UTF-8),
    or longer than ``max_chars`` (``text_too_long``)."""
    if value is _MISSING:
        raise Reject("missing_field", f"{what} is missing")
    if value is None:
        raise Reject("null_value", f"{what} is null")
    if isinstance(value, float) and not math.isfinite(value):
        raise Reject("nan_value", f"{what} is {value}")
    if not isinstance(value, str):
        raise Reject("wrong_type", f"{what} is {type(value).__name__}, expected a string")
    if len(value) > max_chars:
        raise Reject("text_too_long", f"{what} has {len(value)} chars > {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("non_utf8_text", f"{what} holds an unpaired surrogate") from None
    return value


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()  # ``obj.get(key, _MISSING)``: absent, as opposed to null


def get_text(obj: dict[str, Any], key: str, what: str | None = None) -> str:
    """``check_text`` of ``obj[key]`` (absent: ``missing_field``)."""
    return check_text(obj.get(key, _MISSING), what or key)


def check_id(value: Any, what: str = "id") -> str:
    """An upstream id as text: strings and integers are ids; null, NaN, floats, booleans, dicts
    and lists are not (``bad_id``, or ``missing_field`` when absent). A dict id would otherwise
    become its repr and two different records could share it."""
    if value is _MISSING:
        raise Reject("missing_field", f"no {what!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Reject("bad_id", f"{what} is {type(value).__name__} {str(value)[:60]!r}, expected a string or an integer")
    text = str(value)
    if not text.strip():
        raise Reject("bad_id", f"{what} is empty")
    return check_text(text, what, 1000)


def number(value: Any, what: str) -> float:
    """A JSON/Parquet number, finite (``nan_value``) and not a string or bool (``wrong_type``)."""
    if value is _MISSING:
        raise Reject("missing_field", f"{what} is missing")
    if value is None:
        raise Reject("null_value", f"{what} is null")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Reject("wrong_type", f"{what} is {type(value).__name__}, expected a number")
    if not math.isfinite(value):
        raise Reject("nan_value", f"{what} is {value}")
    return float(value)


def jsonl_units(path: Path, records_per_unit: int) -> list[dict[str, Any]]:
    """Split a JSONL file into byte ranges of about ``records_per_unit`` lines (one pass, no parse)."""
    units: list[dict[str, Any]] = []
    start, first_line, n, line_no = 0, 1, 0, 0
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            line_no += 1
            offset += len(line)
            n += 1
            if n >= records_per_unit:
                units.append({"file": str(path), "offset": start, "length": offset - start, "first_line": first_line})
                start, first_line, n = offset, line_no + 1, 0
    if n:
        units.append({"file": str(path), "offset": start, "length": offset - start, "first_line": first_line})
    return units


def read_range(unit: dict[str, Any]) -> bytes:
    """The bytes of a byte-range unit: ``length`` bytes of ``file`` from ``offset``."""
    with open(unit["file"], "rb") as f:
        f.seek(unit["offset"])
        return f.read(unit["length"])


def jsonl_lines(unit: dict[str, Any]) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line bytes without the newline) of one unit; blank lines are skipped."""
    data = read_range(unit)
    for i, line in enumerate(data.split(b"\n")):
        line = line.rstrip(b"\r")
        if line.strip():
            yield unit["first_line"] + i, line


def parse_json_line(line: bytes, where: str) -> dict[str, Any]:
    text = utf8(line, where)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("malformed_json", f"{where}: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise Reject("malformed_json", f"{where}: a JSON {type(obj).__name__}, expected an object")
    return obj


_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
JSON_CHUNK = 1 << 20  # bytes read at a time when planning a JSON array
MAX_JSON_ELEMENT = 256 * 2**20  # an array element longer than this ends the plan (bounds driver memory)


class _Broken(Exception):
    def __init__(self, offset: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.offset, self.reason, self.detail = offset, reason, detail


def scan_json_array(path: Path) -> Iterator[tuple[int, int]]:
    """(byte start, byte end) of each element of the JSON array in ``path``, walking the file in
    ``JSON_CHUNK`` pieces: each element is parsed once (to find where it ends) and dropped, so a
    file of several GB never sits in memory. Raises ``_Broken`` (byte offset, reason, detail) where
    the file stops being a UTF-8 JSON array; the elements before it were already yielded."""
    dec = json.JSONDecoder()
    udec = codecs.getincrementaldecoder("utf-8")("strict")
    with open(path, "rb") as f:
        buf, i, byte_i, eof = "", 0, 0, False  # byte_i: the file offset of buf[i]
        read_total = 0
        bad: list[_Broken] = []  # invalid UTF-8 ahead: raised once the walk gets there

        def more(n: int = JSON_CHUNK) -> bool:
            nonlocal buf, i, eof, read_total
            if bad:
                bad[0].offset = byte_i
                raise bad[0]
            if eof:
                return False
            if i > len(buf) // 2:  # drop what was consumed (amortised: at most one copy per chunk)
                buf, i = buf[i:], 0
            data = f.read(n)
            try:
                buf += udec.decode(data, final=not data)
            except UnicodeDecodeError as e:  # keep the valid text before it: the elements there are fine
                buf += codecs.decode(data[: e.start], "utf-8", "ignore") if e.start else ""
                bad.append(_Broken(byte_i, "non_utf8_text", f"invalid UTF-8 at byte {read_total + e.start}"))
            read_total += len(data)
            eof = not data
            return True

        def skip_ws() -> str:
            nonlocal i, byte_i
            while True:
                j = _WS.match(buf, i).end()
                byte_i += j - i  # JSON whitespace is ASCII
                i = j
                if i < len(buf) or not more():
                    return buf[i : i + 1]

        if skip_ws() != "[":
            raise _Broken(byte_i, "malformed_json", "not a JSON array (the file must start with '[')")
        i, byte_i = i + 1, byte_i + 1
        if skip_ws() == "]":
            i, byte_i = i + 1, byte_i + 1
        else:
            while True:
                start_byte = byte_i
                size = JSON_CHUNK
                while True:
                    try:
                        _, j = dec.raw_decode(buf, i)
                        if j < len(buf) or eof:  # a number at the buffer's end may go on
                            break
                    except json.JSONDecodeError as e:
                        if eof:
                            raise _Broken(start_byte, "malformed_json", f"element at byte {start_byte}: {e.msg}") from None
                    if len(buf) - i > MAX_JSON_ELEMENT:
                        raise _Broken(start_byte, "malformed_json", f"element at byte {start_byte} is over {MAX_JSON_ELEMENT} bytes")
                    more(size)
                    size = min(2 * size, MAX_JSON_ELEMENT)  # a long element: read ahead in bigger steps
                byte_i += len(buf[i:j].encode("utf-8"))
                i = j
                yield start_byte, byte_i
                c = skip_ws()
                if c == "]":
                    i, byte_i = i + 1, byte_i + 1
                    break
                if c != ",":
                    raise _Broken(byte_i, "malformed_json", f"expected ',' or ']' at byte {byte_i}")
                i, byte_i = i + 1, byte_i + 1
                skip_ws()
        if skip_ws() != "":
            raise _Broken(byte_i, "malformed_json", f"data after the array at byte {byte_i}")


def json_array_units(path: Path, records_per_unit: int) -> list[dict[str, Any]]:
    """A JSON array file as byte ranges of ``records_per_unit`` elements (``first``: the index of
    the first), found by ``scan_json_array`` without loading the file. Where the file stops being
    a JSON array, the rest is one ``broken`` unit that reads as one quarantined record: the
    elements before it still come out, and nothing after it goes uncounted."""
    units: list[dict[str, Any]] = []
    n, start, end = 0, None, 0
    try:
        for a, b in scan_json_array(path):
            if start is None:
                start = a
            n, end = n + 1, b
            if n % records_per_unit == 0:
                units.append({"file": str(path), "array": True, "offset": start, "length": end - start, "first": n - records_per_unit})
                start = None
    except _Broken as e:
        if start is not None:
            units.append({"file": str(path), "array": True, "offset": start, "length": end - start, "first": n - n % records_per_unit})
        units.append({"file": str(path), "array": True, "broken": e.offset, "reason": e.reason, "detail": e.detail, "first": n})
        return units
    except OSError as e:
        return [{"file": str(path), "array": True, "broken": 0, "reason": "malformed_json", "detail": f"unreadable: {e}", "first": 0}]
    if start is not None:
        units.append({"file": str(path), "array": True, "offset": start, "length": end - start, "first": n - n % records_per_unit})
    return units


def _byte_ranges(text: str, spans: list[tuple[int, int]], errors: str) -> list[tuple[int, int]]:
    """(byte offset, byte length) in the UTF-8 file of each increasing (start, end) character span of
    its decoded ``text`` (``errors``: the decode's error handler, so the re-encoding is exact)."""
    out, char, byte = [], 0, 0
    for a, b in spans:
        start = byte + len(text[char:a].encode("utf-8", errors))
        end = start + len(text[a:b].encode("utf-8", errors))
        char, byte = b, end
        out.append((start, end - start))
    return out


def json_array_load(unit: dict[str, Any]) -> tuple[int, list[Any]]:
    """(index of the first element, the elements) of a ``json_array_units`` unit; a ``broken``
    unit raises ``Reject`` with the reason the plan found."""
    if "broken" in unit:
        raise Reject(unit["reason"], f"{Path(unit['file']).name} from byte {unit['broken']} (after {unit['first']} elements): {unit['detail']}")
    return unit["first"], json.loads("[" + read_range(unit).decode("utf-8") + "]")


def csv_units(path: Path, records_per_unit: int, header_ok: Callable[[list[str]], bool]) -> list[dict[str, Any]]:
    """A CSV file as byte ranges of ``records_per_unit`` rows after its header row (quoted newlines
    kept whole; ``first_line``: the line number before the range). A file whose first row fails
    ``header_ok``, with a field the csv module refuses, or with at most ``records_per_unit`` rows,
    is one whole-file unit."""
    whole = [{"file": str(path)}]
    # surrogateescape keeps every byte: the offsets below are exact
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    lines = io.StringIO(text, newline="")
    pos = 0

    def tracked() -> Iterator[str]:
        nonlocal pos
        for line in lines:
            pos += len(line)
            yield line

    reader = csv.reader(tracked())
    try:
        first = next(reader, None)
        if first is None or not header_ok([h.strip() for h in first]):
            return whole
        cuts = [(pos, reader.line_num)]  # (character offset, lines before it) where each range starts
        n = 0
        for _ in reader:
            n += 1
            if n % records_per_unit == 0:
                cuts.append((pos, reader.line_num))
    except csv.Error:  # a field over the csv module's limit: the read quarantines it, row by row
        return whole
    if n <= records_per_unit:
        return whole
    if cuts[-1][0] == len(text):
        cuts.pop()
    ends = [c for c, _ in cuts[1:]] + [len(text)]
    spans = [(a, b) for (a, _), b in zip(cuts, ends)]
    return [
        {"file": str(path), "offset": start, "length": length, "first_line": line}
        for (start, length), (_, line) in zip(_byte_ranges(text, spans, "surrogateescape"), cuts)
    ]


# --- JSON records (llava, videoqa, viscot) -------------------------------------------------------

# (parsed object, locator) -> (upstream id, payload); raises Reject with the quarantine reason
Convert = Callable[[dict[str, Any], str], tuple[str, dict[str, Any]]]


def record_id(obj: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` the record has (``_MISSING`` when it has none): ``("question_id", "id")``
    reads Visual-CoT's own id field and falls back to the generic one."""
    return next((obj[k] for k in keys if k in obj), _MISSING)


def _quarantine_rid(obj: Any, keys: tuple[str, ...]) -> str:
    """The record's id when it has a usable one (kept on quarantine lines for humans)."""
    rid = record_id(obj, keys) if isinstance(obj, dict) else None
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else ""


def json_record(src: SourceConfig, kind: str, obj: Any, where: str, order: str, convert: Convert, id_keys: tuple[str, ...]) -> RawRecord:
    """One parsed JSON value -> its record, or a rejected record with the reason ``convert`` gave."""
    try:
        if not isinstance(obj, dict):
            raise Reject("malformed_json", f"{where}: a JSON {type(obj).__name__}, expected an object")
        rid, payload = convert(obj, where)
    except Reject as r:
        return rejected(src, kind, where, order, r.reason, r.detail, rid=_quarantine_rid(obj, id_keys))
    kind = payload.pop(KIND_KEY, kind)  # a reader whose records are of several kinds says which
    return RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=kind, payload=payload)


KIND_KEY = "__kind__"


def json_plan(src: SourceConfig, records_per_unit: int, suffixes: tuple[str, ...] = (".jsonl", ".json")) -> list[dict[str, Any]]:
    """Units of every JSONL (byte ranges of lines) and JSON array (element ranges) file of a source."""
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), suffixes):
        units += jsonl_units(f, records_per_unit) if f.name.lower().endswith(".jsonl") else json_array_units(f, records_per_unit)
    return units


def read_json(src: SourceConfig, kind: str, unit: dict[str, Any], unit_idx: int, convert: Convert, id_keys: tuple[str, ...]) -> Iterator[RawRecord]:
    """The records of one ``json_plan`` unit: JSONL lines or JSON array elements."""
    if not unit.get("array"):
        yield from read_jsonl(src, kind, unit, unit_idx, convert, id_keys)
        return
    name = Path(unit["file"]).name
    try:
        first, data = json_array_load(unit)
    except Reject as r:  # the rest of a file that stopped being an array: one record, counted
        yield rejected(src, kind, f"{name}@{unit.get('broken', 0)}", order_key(unit_idx, 0), r.reason, r.detail)
        return
    for pos, obj in enumerate(data):
        yield json_record(src, kind, obj, f"{name}[{first + pos}]", order_key(unit_idx, pos), convert, id_keys)


def read_jsonl(src: SourceConfig, kind: str, unit: dict[str, Any], unit_idx: int, convert: Convert, id_keys: tuple[str, ...]) -> Iterator[RawRecord]:
    """The records of one JSONL unit; a line that is not UTF-8 JSON of an object is quarantined."""
    name = Path(unit["file"]).name
    for pos, (line_no, line) in enumerate(jsonl_lines(unit)):
        where = f"{name}:{line_no}"
        order = order_key(unit_idx, pos)
        try:
            obj = parse_json_line(line, where)
        except Reject as r:
            yield rejected(src, kind, where, order, r.reason, r.detail)
            continue
        yield json_record(src, kind, obj, where, order, convert, id_keys)


def list_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``path`` itself if it is a file, else its files (recursively) with one of ``suffixes``, sorted."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"source path {path} does not exist")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))


# --- paths ----------------------------------------------------------------------------------------


def safe_join(root: str | Path, rel: Any, what: str) -> str:
    """Join a record's relative path under ``root``, refusing absolute paths and ``..`` escapes
    (lexically; ``check_media`` then checks where the file really is, after symlinks)."""
    if rel is _MISSING or rel is None:
        raise Reject("missing_field", f"{what} is missing")
    check_text(rel, what, 4096)
    if not rel:
        raise Reject("missing_field", f"{what} is empty")
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep) or "\x00" in rel:
        raise Reject("unsafe_path", f"{what}={rel!r} escapes its root")
    return os.path.join(str(root), norm)


def media_ref(root: str | Path, rel: Any, what: str) -> dict[str, str]:
    """A payload reference to a file under ``root``: ``{"path", "root"}`` (the root goes along so
    the worker that opens the file can check it really lies inside, after symlinks)."""
    return {"path": safe_join(root, rel, what), "root": str(root)}


def default_root(src: SourceConfig, which: str, fallback: Path) -> Path:
    value = src.image_root if which == "image" else src.video_root
    return Path(value) if value else fallback


# --- opening media files ---------------------------------------------------------------------------


def check_media(path: Any, root: Any, max_bytes: int, what: str, missing: str) -> int:
    """Size of the media file ``path`` after the checks that need no read: it must resolve (after
    symlinks) inside ``root`` (``unsafe_path``; a dataset root that is itself a symlink to another
    disk is fine), exist (``missing``: image_missing / video_missing), be a regular file, so a
    FIFO, device or directory is never opened (``not_regular_file``), and hold at most
    ``max_bytes`` (``file_too_large``)."""
    if not isinstance(path, str) or not path:
        raise Reject(missing, f"{what}: no path")
    if root:
        real_root, real = os.path.realpath(root), os.path.realpath(path)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise Reject("unsafe_path", f"{what}: {os.path.basename(path)} resolves to {real}, outside {root}")
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise Reject(missing, f"{what}: {os.path.basename(path)} not found") from None
    except OSError as e:
        raise Reject(missing, f"{what}: {os.path.basename(path)}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else "device or socket"
        raise Reject("not_regular_file", f"{what}: {os.path.basename(path)} is a {kind}, not a regular file")
    if st.st_size > max_bytes:
        raise Reject("file_too_large", f"{what}: {os.path.basename(path)} has {st.st_size} bytes > {max_bytes}")
    return st.st_size


def read_media(ref: dict[str, Any], max_bytes: int, what: str, missing: str = "image_missing") -> bytes:
    """The bytes of a ``media_ref`` after ``check_media`` (never more than ``max_bytes``: a file
    that grows between the check and the read is still refused)."""
    path = ref.get("path")
    check_media(path, ref.get("root"), max_bytes, what, missing)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise Reject(missing, f"{what}: {os.path.basename(path)} not found") from None
    if len(data) > max_bytes:
        raise Reject("file_too_large", f"{what}: {os.path.basename(path)} has more than {max_bytes} bytes")
    return data


# --- source paths: ``world:rel`` names a file inside the toy world's artifact --------------------

WORLD_PREFIX = "world:"


def uses_world(src: SourceConfig) -> bool:
    return any(v is not None and v.startswith(WORLD_PREFIX) for v in (src.path, src.image_root, src.video_root))


def resolve_path(value: Optional[str], world: Optional[Path]) -> Optional[str]:
    """``world:rel`` -> inside the world artifact; anything else -> an absolute local path."""
    if value is None:
        return None
    if value.startswith(WORLD_PREFIX):
        if world is None:
            raise ValueError(f"{value!r} needs the 'world' artifact, which this run did not provide")
        rel = value[len(WORLD_PREFIX) :].lstrip("/")
        return str(Path(world) / rel)
    return str(Path(value).expanduser().absolute())


def resolve_source(src: SourceConfig, world: Optional[Path]) -> SourceConfig:
    return dataclasses.replace(
        src,
        path=resolve_path(src.path, world),
        image_root=resolve_path(src.image_root, world),
        video_root=resolve_path(src.video_root, world),
    )
