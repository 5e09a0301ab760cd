"""VideoQA JSONL (VideoStar / ShareVideo style): one question about one video per line.

    python -c "from metamorph.data.readers import READERS; print(READERS['videoqa'])"

Record: ``{"id", "video": "v1.mp4" (relative to ``video_root``, default: the file's directory),
"question", "answer", "meta"?}``.
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

KIND = "videoqa"


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".jsonl",)):
        units += jsonl_units(f, records_per_unit)
    return units


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "video", f.parent)
    for pos, (line_no, line) in enumerate(jsonl_lines(unit)):
        where = f"{f.name}:{line_no}"
        order = order_key(unit_idx, pos)
        obj = None
        try:
            obj = parse_json_line(line, where)
            if obj.get("id") is None:
                raise Reject("missing_field", f"{where}: no 'id'")
            payload = {
                "video": {"path": safe_join(root, obj.get("video"), "video")},
                "question": check_text(obj.get("question"), "question"),
                "answer": check_text(obj.get("answer"), "answer"),
                "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail, rid=_rid(obj))
            continue
        yield RawRecord(source=src.name, rid=str(obj["id"]), locator=where, order=order, kind=KIND, payload=payload)


def _rid(obj: Any) -> str:
    rid = obj.get("id") if isinstance(obj, dict) else None
    return str(rid) if isinstance(rid, (str, int)) else ""
