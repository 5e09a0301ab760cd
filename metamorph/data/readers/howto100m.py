"""HowTo100M narration captions as CSV: one narrated clip per row, times in seconds.

    python -c "from metamorph.data.readers import READERS; print(READERS['howto100m'])"

Two layouts, told apart by the header:

* per video, as the HowTo100M caption release is used by its official training code (MIL-NCE):
  ``{caption_root}/{video_id}.csv`` with ``start,end,text`` (pandas may add an unnamed index
  column first); the video id is the file name::

      ,start,end,text
      0,3.19,5.8,so today we are going to make
      1,5.8,9.1,a simple tomato sauce

* one file for many videos: ``video_id,start,end,text``.

The video is ``{video_root}/{video_id}.mp4`` (or ``.webm``); the default ``video_root`` is the CSV's
directory. Each row becomes one clip record ``{video_id}-{start}`` cut to ``[start, end)``. A field
longer than the csv module's limit is quarantined (``csv_field_too_long``), not a crash.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    RawRecord,
    Reject,
    SourceConfig,
    check_id,
    check_text,
    csv_units,
    default_root,
    list_files,
    order_key,
    read_range,
    rejected,
    safe_join,
)

KIND = "clip"
FAMILY = "video"
SUFFIXES = (".csv",)
FIELDS: dict[str, str] = {}
VIDEO_EXTS = ("mp4", "webm")
REQUIRED = ("start", "end", "text")


def columns(header: list[str]) -> dict[str, int] | None:
    """Column index of video_id (absent: per-video file), start, end, text; None when the
    header is not one of the two layouts."""
    names = [h.strip().lower() for h in header]
    if not all(n in names for n in REQUIRED):
        return None
    return {n: names.index(n) for n in ("video_id", *REQUIRED) if n in names}


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    """Byte ranges of about ``records_per_unit`` rows (a file with a wrong header: one unit)."""
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), SUFFIXES):
        for u in csv_units(f, records_per_unit, lambda h: columns(h) is not None):
            units.append(u)
    return units


def _header(raw: bytes) -> list[str] | None:
    try:
        return next(csv.reader(io.StringIO(raw.decode("utf-8", errors="surrogateescape"), newline="")), None)
    except csv.Error:
        return None


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "video", f.parent)
    whole = "offset" not in unit
    if whole:
        raw, lines_before = f.read_bytes(), 0
        header_bytes = raw
    else:  # a range of rows after the header the plan checked
        raw, lines_before = read_range(unit), unit["first_line"]
        with open(f, "rb") as fh:
            header_bytes = fh.read(65536)
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = _header(header_bytes)
    cols = columns(header) if header is not None else None
    if cols is None:
        yield rejected(src, KIND, f.name, order_key(unit_idx, 0), "missing_field", f"header {str(header)[:200]}, expected [video_id,]start,end,text")
        return
    if whole:
        next(reader, None)
    width = max(cols.values()) + 1
    pos = 0
    while True:
        order = order_key(unit_idx, pos)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            yield rejected(src, KIND, f"{f.name}:{lines_before + reader.line_num}", order, "csv_field_too_long", str(e))
            pos += 1
            continue
        where = f"{f.name}:{lines_before + reader.line_num}"
        if not any(c.strip() for c in row):
            continue
        pos += 1
        try:
            if len(row) < width:
                raise Reject("missing_field", f"{where}: {len(row)} columns, expected {width}")
            vid = check_id(row[cols["video_id"]], "video_id") if "video_id" in cols else f.stem
            start, end, caption = (check_text(row[cols[n]], n) for n in REQUIRED)
            try:
                t0, t1 = float(start), float(end)
            except ValueError:
                raise Reject("malformed_csv", f"{where}: start={start[:40]!r} end={end[:40]!r} are not numbers") from None
            if not 0 <= t0 < t1 or t1 == float("inf"):
                raise Reject("malformed_csv", f"{where}: clip [{t0}, {t1}) is empty, negative or not finite")
            rid = f"{vid}-{t0:g}"
            payload = {
                "video": {"candidates": [safe_join(root, f"{vid}.{ext}", "video_id") for ext in VIDEO_EXTS], "root": str(root)},
                "label": caption,
                "start": t0,
                "end": t1,
                "meta": {},
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail)
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload)
