"""Image-edit triples as JSONL (or a JSON array) beside image folders, field names from the config.

    python -c "from metamorph.data.readers import READERS; print(READERS['edit_jsonl'].fields)"

The form edit datasets are commonly converted to (MagicBrush, HQ-Edit, UltraEdit, Aurora exports)::

    {"id": "mb-00017", "source_image": "source/00017.png", "instruction": "put a hat on the dog",
     "target_image": "target/00017.png"}

The three keys are set per source with ``fields`` (``{"source": "input", "instruction": "edit",
"target": "output"}``); ``id`` is optional (else the file and line). Image paths are relative to
``image_root`` (default: the annotation file's directory).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import (
    _MISSING,
    RawRecord,
    SourceConfig,
    check_id,
    default_root,
    get_text,
    json_plan,
    media_ref,
    read_json,
)

KIND = "edit"
FAMILY = "image_edit"
SUFFIXES = (".jsonl", ".json")
FIELDS = {"source": "source_image", "instruction": "instruction", "target": "target_image", "id": "id"}


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    return json_plan(src, records_per_unit)


def convert(obj: dict[str, Any], where: str, root: Path, keys: dict[str, str]) -> tuple[str, dict[str, Any]]:
    raw_id = obj.get(keys["id"], _MISSING)
    rid = check_id(raw_id, keys["id"]) if raw_id is not _MISSING else where.replace(":", "-").replace("[", "-").rstrip("]")
    payload = {
        "original": media_ref(root, obj.get(keys["source"], _MISSING), keys["source"]),
        "edited": media_ref(root, obj.get(keys["target"], _MISSING), keys["target"]),
        "edit_prompt": get_text(obj, keys["instruction"]),
        "original_prompt": "",
        "edited_prompt": "",
        "meta": obj.get("meta") if isinstance(obj.get("meta"), dict) else {},
    }
    return rid, payload


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    keys = {k: src.key_of(k, v) for k, v in FIELDS.items()}
    root = default_root(src, "image", Path(unit["file"]).parent)
    yield from read_json(src, KIND, unit, unit_idx, partial(convert, root=root, keys=keys), (keys["id"],))
