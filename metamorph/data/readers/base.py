"""Shared pieces of the upstream-format readers: source config, raw records, safe line/path reading.

    python -c "from metamorph.data.readers.base import SourceConfig; print(SourceConfig(name='x', format='llava', path='a.jsonl'))"

A reader turns one upstream dataset into ``RawRecord``s in two steps so that the work spreads
over Ray tasks: ``plan(src, records_per_unit)`` lists small JSON-able *units* of at most about
``records_per_unit`` records (a byte range of a JSONL or CSV file, an element range of a JSON
array, a member range of a tar, a row range of a Parquet row group) on the driver, and
``read(src, unit, unit_idx)`` yields the records of one unit inside a worker, which also decodes
and converts them (one task per unit), so a big file is split here or it runs on one core. A file
whose structure the plan cannot walk (a truncated tar, a malformed JSON array) stays one unit and
its read reports the problem as before. Readers never decode images or videos (the curation step does, in
parallel); they only parse text, pick up inline bytes (tars, Parquet), and reject what is already
unreadable with a quarantine reason. Paths in a record are absolute, so any worker can open them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "_-" for c in self.name):
            raise ValueError(f"sources[].name={self.name!r}: use letters, digits, '_' or '-' (it prefixes sample ids)")
        if not self.path:
            raise ValueError(f"sources[{self.name}].path is empty: point it at the dataset file or directory")
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"sources[{self.name}].bbox_format={self.bbox_format!r}: use one of {BBOX_FORMATS}")


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


RAW_SCHEMA = pa.schema(
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
    return pa.Table.from_pylist([r.to_row() for r in records], schema=RAW_SCHEMA)


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


def check_text(value: Any, what: str) -> str:
    """A JSON string field, rejected when absent, not a string, or holding lone surrogates
    (JSON escapes like "\\udc80" parse fine but cannot be written back as UTF-8)."""
    if value is None:
        raise Reject("missing_field", f"{what} is missing")
    if not isinstance(value, str):
        raise Reject("malformed_json", f"{what} is {type(value).__name__}, expected a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("non_utf8_text", f"{what} holds an unpaired surrogate") from None
    return value


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


def json_array_units(path: Path, records_per_unit: int) -> list[dict[str, Any]]:
    """A JSON array file as byte ranges of ``records_per_unit`` elements (``first``: the index of
    the first). The driver parses the file once to find the element boundaries; anything that is
    not a UTF-8 JSON array, or an array of at most ``records_per_unit`` elements, is one whole-file
    unit, whose read rejects it as before."""
    whole = [{"file": str(path), "array": True}]
    try:
        text = path.read_bytes().decode("utf-8")
        dec = json.JSONDecoder()
        i = _WS.match(text, 0).end()
        if text[i : i + 1] != "[":
            return whole
        i = _WS.match(text, i + 1).end()
        spans: list[tuple[int, int]] = []  # (start, end) character offsets of each range
        n = 0
        if text[i : i + 1] != "]":
            while True:
                if n % records_per_unit == 0:
                    spans.append((i, i))
                _, i = dec.raw_decode(text, i)
                n += 1
                spans[-1] = (spans[-1][0], i)
                i = _WS.match(text, i).end()
                c = text[i : i + 1]
                if c == "]":
                    break
                if c != ",":
                    return whole
                i = _WS.match(text, i + 1).end()
        if _WS.match(text, i + 1).end() != len(text) or n <= records_per_unit:
            return whole
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return whole
    return [
        {"file": str(path), "array": True, "offset": start, "length": length, "first": k * records_per_unit}
        for k, (start, length) in enumerate(_byte_ranges(text, spans, "strict"))
    ]


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


def json_array_load(unit: dict[str, Any]) -> tuple[int, Any]:
    """(index of the first element, the parsed value) of a ``json_array_units`` unit: the whole
    file's value (raises ``Reject``/``JSONDecodeError`` as ``json.loads`` of it would) or the list
    of the range's elements."""
    f = Path(unit["file"])
    if "offset" not in unit:
        return 0, json.loads(utf8(f.read_bytes(), f.name))
    return unit["first"], json.loads("[" + read_range(unit).decode("utf-8") + "]")


def csv_units(path: Path, records_per_unit: int, header: tuple[str, ...]) -> list[dict[str, Any]]:
    """A CSV file as byte ranges of ``records_per_unit`` rows after its header row (quoted newlines
    kept whole; ``first_line``: the line number before the range). A file whose first row is not
    ``header``, or with at most ``records_per_unit`` rows, is one whole-file unit."""
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
    first = next(reader, None)
    if first is None or [h.strip() for h in first[: len(header)]] != list(header):
        return whole
    cuts = [(pos, reader.line_num)]  # (character offset, lines before it) where each range starts
    n = 0
    for _ in reader:
        n += 1
        if n % records_per_unit == 0:
            cuts.append((pos, reader.line_num))
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
    """The first of ``keys`` the record has (None when it has none): ``("question_id", "id")``
    reads Visual-CoT's own id field and falls back to the generic one."""
    return next((obj[k] for k in keys if k in obj), None)


def _quarantine_rid(obj: Any, keys: tuple[str, ...]) -> str:
    """The record's id when it has a usable one (kept on quarantine lines for humans)."""
    rid = record_id(obj, keys) if isinstance(obj, dict) else None
    return str(rid) if isinstance(rid, (str, int)) else ""


def json_record(src: SourceConfig, kind: str, obj: Any, where: str, order: str, convert: Convert, id_keys: tuple[str, ...]) -> RawRecord:
    """One parsed JSON value -> its record, or a rejected record with the reason ``convert`` gave."""
    try:
        if not isinstance(obj, dict):
            raise Reject("malformed_json", f"{where}: a JSON {type(obj).__name__}, expected an object")
        rid, payload = convert(obj, where)
    except Reject as r:
        return rejected(src, kind, where, order, r.reason, r.detail, rid=_quarantine_rid(obj, id_keys))
    return RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=kind, payload=payload)


def jsonl_plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    """Byte-range units of every ``.jsonl`` file of a source."""
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".jsonl",)):
        units += jsonl_units(f, records_per_unit)
    return units


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
    """Join a record's relative path under ``root``, refusing absolute paths and ``..`` escapes.

    Lexical on purpose: dataset roots are often symlinks to other disks, which resolving would
    reject."""
    if not isinstance(rel, str) or not rel:
        raise Reject("missing_field", f"{what} is missing or not a string")
    check_text(rel, what)
    norm = os.path.normpath(rel)
    if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep) or "\x00" in rel:
        raise Reject("unsafe_path", f"{what}={rel!r} escapes its root")
    return os.path.join(str(root), norm)


def default_root(src: SourceConfig, which: str, fallback: Path) -> Path:
    value = src.image_root if which == "image" else src.video_root
    return Path(value) if value else fallback
