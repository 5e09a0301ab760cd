"""Something-Something-v2 labels: a JSON array of ``{"id", "label", "template", "placeholders"}``.

    python -c "from metamorph.data.readers import READERS; print(READERS['ssv2'])"

As published (``labels/train.json``, ``labels/validation.json``)::

    [{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
      "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]}]

The video of record ``id`` is ``{video_root}/{id}.webm`` (SSv2 ships webm), or ``{id}.mp4`` when
that is what exists; the default ``video_root`` is ``../videos`` next to the labels directory.
``labels/labels.json`` (the class-name map, an object) is not a record file. The plan walks each
label file in chunks and splits it into element ranges, so decoding the videos, the expensive
part, spreads over tasks.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    _MISSING,
    RawRecord,
    Reject,
    SourceConfig,
    check_id,
    check_text,
    default_root,
    get_text,
    json_array_units,
    list_files,
    read_json,
    safe_join,
)

KIND = "clip"
FAMILY = "video"
SUFFIXES = (".json",)
FIELDS: dict[str, str] = {}
VIDEO_EXTS = ("webm", "mp4")


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    files = list_files(Path(src.path), SUFFIXES)
    if Path(src.path).is_dir():  # labels.json is SSv2's class-name map, not records
        files = [f for f in files if f.name != "labels.json"]
    units: list[dict[str, Any]] = []
    for f in files:
        units += json_array_units(f, records_per_unit)
    return units


def label_of(obj: dict[str, Any]) -> str:
    """The filled-in label; older dumps only carry the template and its placeholders."""
    if obj.get("label") is not None:
        return get_text(obj, "label")
    template = get_text(obj, "template")
    placeholders = obj.get("placeholders") or []
    if not isinstance(placeholders, list):
        raise Reject("wrong_type", f"placeholders is {type(placeholders).__name__}, expected a list")
    for ph in placeholders:
        template = template.replace("[something]", check_text(ph, "placeholders[]"), 1)
    return template


def convert(obj: dict[str, Any], where: str, root: Path) -> tuple[str, dict[str, Any]]:
    rid = check_id(obj.get("id", _MISSING), "id")
    payload = {
        "video": {"candidates": [safe_join(root, f"{rid}.{ext}", "id") for ext in VIDEO_EXTS], "root": str(root)},
        "label": label_of(obj),
        "meta": {**(obj["meta"] if isinstance(obj.get("meta"), dict) else {}), **{k: obj[k] for k in ("template", "placeholders") if k in obj}},
    }
    return rid, payload


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    root = default_root(src, "video", Path(unit["file"]).parent.parent / "videos")
    yield from read_json(src, KIND, unit, unit_idx, partial(convert, root=root), ("id",))
