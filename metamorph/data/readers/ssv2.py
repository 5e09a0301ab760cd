"""Something-Something-v2 labels: a JSON array of ``{"id", "label", "template", "placeholders"}``.

    python -c "from metamorph.data.readers import READERS; print(READERS['ssv2'])"

The video of record ``id`` is ``{video_root}/{id}.webm`` (SSv2 ships webm) or ``.mp4``; the
default ``video_root`` is ``../videos`` next to the labels directory (SSv2's own layout:
``labels/train.json``, ``videos/``). The plan parses each label file once on the driver and
splits it into element ranges, so decoding the videos, the expensive part, spreads over tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, check_text, default_root, json_array_load, json_array_units, list_files, order_key, rejected, safe_join

KIND = "clip"
VIDEO_EXTS = ("webm", "mp4")


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    files = list_files(Path(src.path), (".json",))
    if Path(src.path).is_dir():  # labels.json is SSv2's class-name map, not records
        files = [f for f in files if f.name != "labels.json"]
    units: list[dict[str, Any]] = []
    for f in files:
        units += json_array_units(f, records_per_unit)
    return units


def label_of(obj: dict[str, Any]) -> str:
    """The filled-in label; older dumps only carry the template and its placeholders."""
    if obj.get("label") is not None:
        return check_text(obj.get("label"), "label")
    template = check_text(obj.get("template"), "template")
    for ph in obj.get("placeholders") or []:
        template = template.replace("[something]", check_text(ph, "placeholders[]"), 1)
    return template


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "video", f.parent.parent / "videos")
    try:
        first, data = json_array_load(unit)
        if not isinstance(data, list):
            raise Reject("malformed_json", f"{f.name}: expected a JSON array of label records")
    except json.JSONDecodeError as e:
        yield rejected(src, KIND, f.name, order_key(unit_idx, 0), "malformed_json", f"{e.msg} at line {e.lineno}")
        return
    except Reject as r:
        yield rejected(src, KIND, f.name, order_key(unit_idx, 0), r.reason, r.detail)
        return
    for pos, obj in enumerate(data):
        where = f"{f.name}[{first + pos}]"
        order = order_key(unit_idx, pos)
        try:
            if not isinstance(obj, dict):
                raise Reject("malformed_json", f"{where}: expected an object")
            rid = check_text(None if obj.get("id") is None else str(obj["id"]), "id")
            payload = {
                "video": {"candidates": [safe_join(root, f"{rid}.{ext}", "id") for ext in VIDEO_EXTS]},
                "label": label_of(obj),
                "meta": {**(obj["meta"] if isinstance(obj.get("meta"), dict) else {}), **{k: obj[k] for k in ("template", "placeholders") if k in obj}},
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail)
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload)
