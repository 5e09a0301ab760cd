"""Parquet of (image, caption) rows, as HF datasets and LAION/COYO exports ship them.

    python -c "from metamorph.data.readers import READERS; print(READERS['parquet'])"

Columns: ``image`` (struct ``{bytes, path}`` as HF ``Image`` writes it, or plain binary) and
``caption`` (or ``text``/``TEXT``); optional ``key``/``id`` (else ``{file stem}-{row}``) and ``meta``
(JSON string). Null, NaN and wrongly typed cells and dict/list ids are quarantined with their own
reasons (``null_value``, ``nan_value``, ``wrong_type``, ``bad_id``). One unit per row group, or per ``records_per_unit`` rows of a bigger one (each such unit
reads its row group and keeps its slice: row groups are the smallest Parquet read), so a big file
spreads over many tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, check_id, check_text, default_root, list_files, media_ref, order_key, rejected, utf8

KIND = "t2i"
FAMILY = "generation"
SUFFIXES = (".parquet",)
FIELDS: dict[str, str] = {}


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # here, not at the top: `metamorph plan` imports every reader

    units = []
    for f in list_files(Path(src.path), (".parquet",)):
        md = pq.ParquetFile(f).metadata
        first = 0
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if n <= records_per_unit:
                units.append({"file": str(f), "row_group": g, "first_row": first})
            else:  # "start"/"stop": the slice of the row group
                for a in range(0, n, records_per_unit):
                    units.append({"file": str(f), "row_group": g, "first_row": first + a, "start": a, "stop": min(a + records_per_unit, n)})
            first += n
    return units


def image_ref(value: Any, root: Path, what: str, blobs: list[bytes]) -> dict[str, Any]:
    """Turn an HF-style image cell (struct {bytes, path} or binary) into a payload reference."""
    if value is None:
        raise Reject("null_value", f"{what} is null")
    if isinstance(value, (bytes, bytearray)):
        blobs.append(bytes(value))
        return {"blob": len(blobs) - 1}
    if not isinstance(value, dict):
        raise Reject("wrong_type", f"{what} is {type(value).__name__}, expected an image struct or bytes")
    if value.get("bytes"):
        blobs.append(bytes(value["bytes"]))
        return {"blob": len(blobs) - 1}
    if value.get("path"):
        return media_ref(root, value["path"], f"{what}.path")
    raise Reject("image_missing", f"{what}: neither bytes nor a path")


def text_cell(value: Any, what: str) -> str:
    """A text cell: null (``null_value``), NaN/inf (``nan_value``: a float NaN never becomes the
    caption "nan"), another type (``wrong_type``), invalid UTF-8 in a binary column."""
    if isinstance(value, (bytes, bytearray)):  # binary columns: decode strictly
        value = utf8(bytes(value), what)
    return check_text(value, what)


def id_cell(row: dict[str, Any], columns: tuple[str, ...], fallback: str) -> str:
    """The record id from the first of ``columns`` the table has (else ``fallback``, the file
    and row): a dict, list, float or null id is ``bad_id``."""
    for c in columns:
        if c in row:
            return check_id(row[c], c)
    return fallback


def meta_cell(value: Any) -> dict[str, Any]:
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and value:
        try:
            out = json.loads(value)
        except json.JSONDecodeError:
            raise Reject("malformed_json", "meta is not valid JSON") from None
        return out if isinstance(out, dict) else {}
    return value if isinstance(value, dict) else {}


def rows(unit: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(row number, row or None, error) of one row group; a row Arrow cannot convert is an error."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(unit["file"]).read_row_group(unit["row_group"])
    if "start" in unit:
        table = table.slice(unit["start"], unit["stop"] - unit["start"])
    cols = {name: table.column(name) for name in table.column_names}
    for i in range(table.num_rows):
        try:
            yield unit["first_row"] + i, {k: c[i].as_py() for k, c in cols.items()}, ""
        except UnicodeDecodeError as e:  # a string column holding invalid UTF-8
            yield unit["first_row"] + i, None, f"invalid UTF-8 at byte {e.start}"


def _rid_or(row: dict[str, Any], fallback: str) -> str:
    rid = row.get("key", row.get("id"))
    return str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else fallback


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "image", f.parent)
    for pos, (row_no, row, err) in enumerate(rows(unit)):
        where = f"{f.name}:{row_no}"
        order = order_key(unit_idx, pos)
        fallback_id = f"{f.stem}-{row_no:08d}"
        if row is None:
            yield rejected(src, KIND, where, order, "non_utf8_text", err, rid=fallback_id)
            continue
        try:
            rid = id_cell(row, ("key", "id"), fallback_id)
            text_col = next((c for c in ("caption", "text", "TEXT") if c in row), None)
            if text_col is None:
                raise Reject("missing_field", f"{where}: no caption/text column")
            caption = text_cell(row[text_col], text_col)
            if "image" not in row:
                raise Reject("missing_field", f"{where}: no image column")
            blobs: list[bytes] = []
            ref = image_ref(row["image"], root, "image", blobs)
            payload = {"caption": caption, "image": ref, "meta": meta_cell(row.get("meta"))}
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail, rid=_rid_or(row, fallback_id))
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload, blobs=blobs)
