"""LLaVA / Cambrian conversations, image or video: a JSONL file, or a JSON array file, of records.

    python -c "from metamorph.data.readers import READERS; print(READERS['llava'])"

Record (LLaVA-Instruct, Cambrian-7M, ShareGPT4V)::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}]}

``image`` is a string, a list (one ``<image>`` per entry), or absent (text-only records).
Video QA (Cambrian-7M's video part, LLaVA-Video-178K, ShareGPT4Video) is the same record with a
``video`` key instead of ``image``; its one ``<image>`` (or ``<video>``) placeholder stands for the
frames the video QA config samples. ``id`` may be a string or an integer. Media paths are relative
to the source's ``image_root`` / ``video_root`` (default: the annotation file's directory).

The older flat video QA layout ``{"id", "video", "question", "answer"}`` is read too (format
``videoqa``, kept for configs written against it).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    _MISSING,
    KIND_KEY,
    RawRecord,
    Reject,
    SourceConfig,
    check_id,
    check_text,
    default_root,
    get_text,
    json_plan,
    media_ref,
    read_json,
)

KIND = "llava"
VIDEO_KIND = "videoqa"
FAMILY = "understanding"
SUFFIXES = (".jsonl", ".json")
FIELDS: dict[str, str] = {}
ID_KEYS = ("id",)
VIDEO_PLACEHOLDERS = ("<video>", "<image>")  # how the video datasets mark where the video goes


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    return json_plan(src, records_per_unit)


def turns_of(obj: dict[str, Any], where: str) -> list[dict[str, str]]:
    convs = obj.get("conversations", _MISSING)
    if convs is _MISSING or convs is None or convs == []:
        raise Reject("missing_field", f"{where}: 'conversations' missing or empty")
    if not isinstance(convs, list):
        raise Reject("wrong_type", f"{where}: 'conversations' is {type(convs).__name__}, expected a list")
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict):
            raise Reject("malformed_json", f"{where}: conversations[{i}] is not an object")
        turns.append({"from": get_text(t, "from", f"conversations[{i}].from"), "value": get_text(t, "value", f"conversations[{i}].value")})
    return turns


def convert(obj: dict[str, Any], where: str, image_root: Path, video_root: Path) -> tuple[str, dict[str, Any]]:
    """(id, payload) of one record."""
    rid = check_id(obj.get("id", _MISSING))
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    video = obj.get("video")
    if video is not None:
        if obj.get("image") is not None:
            raise Reject("malformed_json", f"{where}: both 'image' and 'video'")
        if "conversations" in obj:
            turns = turns_of(obj, where)
        else:  # the flat layout: one question, one answer
            turns = [{"from": "human", "value": "<video>\n" + get_text(obj, "question")}, {"from": "gpt", "value": get_text(obj, "answer")}]
        return rid, {"video": media_ref(video_root, video, "video"), "conversations": turns, "meta": meta, KIND_KEY: VIDEO_KIND}
    turns = turns_of(obj, where)
    image = obj.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list):
        raise Reject("wrong_type", f"{where}: 'image' must be a string or a list of strings")
    images = [media_ref(image_root, check_text(n, f"image[{i}]", 4096), f"image[{i}]") for i, n in enumerate(names)]
    return rid, {"conversations": turns, "images": images, "meta": meta}


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    parent = Path(unit["file"]).parent
    conv = partial(convert, image_root=default_root(src, "image", parent), video_root=default_root(src, "video", parent))
    yield from read_json(src, KIND, unit, unit_idx, conv, ID_KEYS)
