"""HowTo100M-style caption CSV: ``video_id,start,end,text`` (seconds), one narrated clip per row.

    python -c "from metamorph.data.readers import READERS; print(READERS['howto100m'])"

The video is ``{video_root}/{video_id}.mp4`` (or ``.webm``); the default ``video_root`` is the CSV's
directory. Each row becomes one clip record ``{video_id}-{start}`` cut to ``[start, end)``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, check_text, csv_units, default_root, list_files, order_key, read_range, rejected, safe_join

KIND = "clip"
VIDEO_EXTS = ("mp4", "webm")
COLUMNS = ("video_id", "start", "end", "text")


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    """Byte ranges of about ``records_per_unit`` rows (a file with a wrong header: one unit)."""
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".csv",)):
        units += csv_units(f, records_per_unit, COLUMNS)
    return units


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "video", f.parent)
    if "offset" in unit:  # a range of rows after the header the plan checked
        raw, lines_before = read_range(unit), unit["first_line"]
    else:
        raw, lines_before = f.read_bytes(), 0
    # surrogateescape keeps undecodable bytes visible per row instead of failing the whole file
    text = raw.decode("utf-8", errors="surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    if "offset" not in unit:
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != list(COLUMNS):
            yield rejected(src, KIND, f.name, order_key(unit_idx, 0), "missing_field", f"header {header!r}, expected {','.join(COLUMNS)}")
            return
    for pos, row in enumerate(reader):
        where = f"{f.name}:{lines_before + reader.line_num}"
        order = order_key(unit_idx, pos)
        if not any(c.strip() for c in row):
            continue
        try:
            if len(row) < 4:
                raise Reject("missing_field", f"{where}: {len(row)} columns, expected 4")
            vid, start, end, caption = (check_text(c, name) for c, name in zip(row[:4], COLUMNS))
            try:
                t0, t1 = float(start), float(end)
            except ValueError:
                raise Reject("malformed_csv", f"{where}: start={start!r} end={end!r} are not numbers") from None
            if not 0 <= t0 < t1:
                raise Reject("malformed_csv", f"{where}: clip [{t0}, {t1}) is empty or negative")
            rid = f"{vid}-{t0:g}"
            payload = {
                "video": {"candidates": [safe_join(root, f"{vid}.{ext}", "video_id") for ext in VIDEO_EXTS]},
                "label": caption,
                "start": t0,
                "end": t1,
                "meta": {},
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail)
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload)
