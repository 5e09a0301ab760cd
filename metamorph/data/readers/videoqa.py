"""VideoQA JSONL (VideoStar / ShareVideo style): one question about one video per line.

    python -c "from metamorph.data.readers import READERS; print(READERS['videoqa'])"

Record: ``{"id", "video": "v1.mp4" (relative to ``video_root``, default: the file's directory),
"question", "answer", "meta"?}``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, check_text, default_root, jsonl_plan, read_jsonl, safe_join

KIND = "videoqa"
ID_KEYS = ("id",)
plan = jsonl_plan


def convert(obj: dict[str, Any], where: str, root: Path) -> tuple[str, dict[str, Any]]:
    if obj.get("id") is None:
        raise Reject("missing_field", f"{where}: no 'id'")
    payload = {
        "video": {"path": safe_join(root, obj.get("video"), "video")},
        "question": check_text(obj.get("question"), "question"),
        "answer": check_text(obj.get("answer"), "answer"),
        "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
    }
    return str(obj["id"]), payload


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    root = default_root(src, "video", Path(unit["file"]).parent)
    yield from read_jsonl(src, KIND, unit, unit_idx, partial(convert, root=root), ID_KEYS)
