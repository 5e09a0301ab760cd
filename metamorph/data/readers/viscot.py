"""Visual-CoT / VStar-style JSONL: a question about an image, its answer, and the box to look at.

    python -c "from metamorph.data.readers import READERS; print(READERS['viscot'])"

Record: ``{"question_id", "image": "x.png" (relative to ``image_root``), "question", "answer",
"bbox": [4 numbers], "meta"?}``. The box convention is the source's ``bbox_format`` (``xyxy`` or
``xywh``, pixels of the original image), passed along and checked against the decoded image size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    RawRecord,
    Reject,
    SourceConfig,
    check_text,
    default_root,
    jsonl_lines,
    jsonl_units,
    list_files,
    order_key,
    parse_json_line,
    rejected,
    safe_join,
)

KIND = "viscot"


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".jsonl",)):
        units += jsonl_units(f, records_per_unit)
    return units


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "image", f.parent)
    for pos, (line_no, line) in enumerate(jsonl_lines(unit)):
        where = f"{f.name}:{line_no}"
        order = order_key(unit_idx, pos)
        obj = None
        try:
            obj = parse_json_line(line, where)
            rid = obj.get("question_id", obj.get("id"))
            if rid is None:
                raise Reject("missing_field", f"{where}: no 'question_id'")
            bbox = obj.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
                raise Reject("bad_bbox", f"{where}: bbox={bbox!r}, expected 4 numbers")
            payload = {
                "image": {"path": safe_join(root, obj.get("image"), "image")},
                "question": check_text(obj.get("question"), "question"),
                "answer": check_text(obj.get("answer"), "answer"),
                "bbox": [float(v) for v in bbox],
                "bbox_format": src.bbox_format,
                "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail, rid=_rid(obj))
            continue
        yield RawRecord(source=src.name, rid=str(rid), locator=where, order=order, kind=KIND, payload=payload)


def _rid(obj: Any) -> str:
    rid = obj.get("question_id", obj.get("id")) if isinstance(obj, dict) else None
    return str(rid) if isinstance(rid, (str, int)) else ""
