"""Visual-CoT / VStar-style JSONL: a question about an image, its answer, and the box to look at.

    python -c "from metamorph.data.readers import READERS; print(READERS['viscot'])"

Record: ``{"question_id", "image": "x.png" (relative to ``image_root``), "question", "answer",
"bbox": [4 numbers], "meta"?}``. The box convention is the source's ``bbox_format`` (``xyxy`` or
``xywh``, pixels of the original image), passed along and checked against the decoded image size.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    RawRecord,
    Reject,
    SourceConfig,
    check_text,
    default_root,
    jsonl_plan,
    read_jsonl,
    record_id,
    safe_join,
)

KIND = "viscot"
ID_KEYS = ("question_id", "id")
plan = jsonl_plan


def convert(obj: dict[str, Any], where: str, root: Path, bbox_format: str) -> tuple[str, dict[str, Any]]:
    rid = record_id(obj, ID_KEYS)
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
        "bbox_format": bbox_format,
        "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
    }
    return str(rid), payload


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    root = default_root(src, "image", Path(unit["file"]).parent)
    yield from read_jsonl(src, KIND, unit, unit_idx, partial(convert, root=root, bbox_format=src.bbox_format), ID_KEYS)
