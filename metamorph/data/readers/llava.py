"""LLaVA / Cambrian conversations: a JSONL file, or a JSON array file, of records with images.

    python -c "from metamorph.data.readers import READERS; print(READERS['llava'])"

Record: ``{"id", "image": "a.png" | ["a.png", ...] (optional: text-only records exist),
"conversations": [{"from": "human"|"gpt", "value": "<image>\\n..."}, ...], "meta"?}``; image paths
are relative to the source's ``image_root`` (default: the annotation file's directory).
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    RawRecord,
    Convert,
    Reject,
    SourceConfig,
    check_text,
    default_root,
    json_array_load,
    json_array_units,
    json_record,
    jsonl_units,
    list_files,
    order_key,
    read_jsonl,
    rejected,
    safe_join,
)

KIND = "llava"
ID_KEYS = ("id",)


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    units: list[dict[str, Any]] = []
    for f in list_files(Path(src.path), (".jsonl", ".json")):
        if f.name.lower().endswith(".jsonl"):
            units += jsonl_units(f, records_per_unit)
        else:  # a JSON array: element ranges (the plan parses it once to find them)
            units += json_array_units(f, records_per_unit)
    return units


def convert(obj: dict[str, Any], where: str, image_root: Path) -> tuple[str, dict[str, Any]]:
    """(id, payload) of one record."""
    rid = obj.get("id")
    if rid is None:
        raise Reject("missing_field", f"{where}: no 'id'")
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise Reject("missing_field", f"{where}: 'conversations' missing or empty")
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict):
            raise Reject("malformed_json", f"{where}: conversations[{i}] is not an object")
        turns.append({"from": check_text(t.get("from"), f"conversations[{i}].from"), "value": check_text(t.get("value"), f"conversations[{i}].value")})
    image = obj.get("image")
    names = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(names, list):
        raise Reject("malformed_json", f"{where}: 'image' must be a string or a list of strings")
    images = [{"path": safe_join(image_root, n, f"image[{i}]")} for i, n in enumerate(names)]
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    return str(rid), {"conversations": turns, "images": images, "meta": meta}


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    conv = partial(convert, image_root=default_root(src, "image", f.parent))
    if unit.get("array"):
        yield from _read_array(src, f, unit, conv, unit_idx)
    else:
        yield from read_jsonl(src, KIND, unit, unit_idx, conv, ID_KEYS)


def _read_array(src: SourceConfig, f: Path, unit: dict[str, Any], conv: Convert, unit_idx: int) -> Iterator[RawRecord]:
    try:
        first, data = json_array_load(unit)
        if not isinstance(data, list):
            raise Reject("malformed_json", f"{f.name}: a JSON {type(data).__name__}, expected an array of records")
    except json.JSONDecodeError as e:
        # the whole file is one unreadable record: counted once, never silently dropped
        yield rejected(src, KIND, f.name, order_key(unit_idx, 0), "malformed_json", f"{e.msg} at line {e.lineno}")
        return
    except Reject as r:
        yield rejected(src, KIND, f.name, order_key(unit_idx, 0), r.reason, r.detail)
        return
    for pos, obj in enumerate(data):
        yield json_record(src, KIND, obj, f"{f.name}[{first + pos}]", order_key(unit_idx, pos), conv, ID_KEYS)
