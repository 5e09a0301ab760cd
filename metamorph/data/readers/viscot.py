"""Visual-CoT, both published forms: the per-dataset metadata JSONL and ``viscot_363k.json``.

    python -c "from metamorph.data.readers import READERS; print(READERS['viscot'])"

Metadata JSONL (``metadata/<dataset>_cot_train.jsonl``), one line per question::

    {"question_id": 17, "image": "n01440764_1.jpg", "question": "What is the man holding?",
     "answer": "A fish.", "bboxs": [[120, 88, 260, 190]], "width": 500, "height": 375,
     "dataset": "gqa", "split": "train"}

``bboxs`` are ``[x1, y1, x2, y2]`` pixel boxes (the source's ``bbox_format``) in the coordinates
of ``width`` x ``height``; several boxes are merged into their union, as the official conversion
does, and the box is scaled when the decoded image has another size. The image is
``{image_root}/{dataset}/{image}`` (the ``cot/<dataset>/`` folders of the release; ``textcap``
questions use the ``textvqa`` images), or ``{image_root}/{image}`` for records without ``dataset``.

``viscot_363k.json`` (a JSON array of LLaVA records) is the same data after the official
conversion: ``image`` is ``["cot/gqa/x.jpg", "cot/gqa/x.jpg###[x1, y1, x2, y2]"]`` (paths relative
to ``image_root``; the ``###`` suffix, when present, is the union box in pixels) and the
conversation is question + box prompt -> the box as normalised ``[x1, y1, x2, y2]`` text -> "<image>"
-> answer. The normalised box was computed as if the image were first padded to a square (the
shorter side centred, shifted by ``(long - short) // 2`` pixels) and divided by the long side;
without the pixel suffix, curation inverts exactly that against the decoded image size.
"""

from __future__ import annotations

import re
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
    json_plan,
    media_ref,
    number,
    read_json,
    record_id,
)
from metamorph.data.readers.llava import turns_of

KIND = "viscot"
FAMILY = "visual_thinking"
SUFFIXES = (".jsonl", ".json")
FIELDS: dict[str, str] = {}
ID_KEYS = ("question_id", "id")
IMAGE_DIR = {"textcap": "textvqa"}  # the official conversion's one dataset stored under another name
# the prompts the official conversion appends to each question (removed: curation has its own)
COT_PROMPTS = (
    " Please provide the bounding box coordinate of the region that can help you answer the question better.",
    " Please think step by step and provide the bounding box coordinate of the region that can help you answer the question better.",
)
_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*"
_BOX = re.compile(r"^\s*\[" + ",".join([_NUM] * 4) + r"\]\s*$")


def plan(src: SourceConfig, records_per_unit: int) -> list[dict[str, Any]]:
    return json_plan(src, records_per_unit)


def _box(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or len(value) != 4:
        raise Reject("bad_bbox", f"{what}={str(value)[:80]}, expected 4 numbers")
    try:
        return [number(v, f"{what}[{i}]") for i, v in enumerate(value)]
    except Reject as r:
        raise Reject("bad_bbox", r.detail) from None


def _text_box(text: str, what: str) -> list[float]:
    m = _BOX.match(text)
    if m is None:
        raise Reject("bad_bbox", f"{what}={text[:80]!r}, expected '[x1, y1, x2, y2]'")
    return [float(g) for g in m.groups()]


def convert(obj: dict[str, Any], where: str, root: Path, bbox_format: str) -> tuple[str, dict[str, Any]]:
    rid = check_id(record_id(obj, ID_KEYS), "question_id")
    meta = dict(obj["meta"]) if isinstance(obj.get("meta"), dict) else {}
    meta.update({k: obj[k] for k in ("dataset", "split") if isinstance(obj.get(k), str)})
    if "conversations" in obj:
        return rid, _converted(obj, where, root, meta)
    dataset = obj.get("dataset")
    image_root = root / IMAGE_DIR.get(dataset, dataset) if isinstance(dataset, str) and dataset else root
    boxes = obj.get("bboxs", obj.get("bbox", _MISSING))
    if boxes is _MISSING or boxes is None:
        raise Reject("bad_bbox", f"{where}: no 'bboxs'")
    if isinstance(boxes, list) and boxes and not isinstance(boxes[0], list):
        boxes = [boxes]  # one bare box (the older single-box form)
    if not isinstance(boxes, list) or not boxes:
        raise Reject("bad_bbox", f"{where}: bboxs={str(boxes)[:80]}, expected a non-empty list of boxes")
    size = None
    if "width" in obj or "height" in obj:
        size = [number(obj.get("width", _MISSING), "width"), number(obj.get("height", _MISSING), "height")]
        if min(size) <= 0:
            raise Reject("bad_bbox", f"{where}: width x height {size} is empty")
    payload = {
        "image": media_ref(image_root, obj.get("image", _MISSING), "image"),
        "question": get_text(obj, "question"),
        "answer": get_text(obj, "answer"),
        "bboxes": [_box(b, f"bboxs[{i}]") for i, b in enumerate(boxes)],
        "bbox_format": bbox_format,
        "bbox_size": size,
        "meta": meta,
    }
    return rid, payload


def _converted(obj: dict[str, Any], where: str, root: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A ``viscot_363k.json`` record: question, normalised box, "<image>", answer."""
    image = obj.get("image", _MISSING)
    names = image if isinstance(image, list) else [image]
    if not names:
        raise Reject("missing_field", f"{where}: 'image' is empty")
    first = check_text(names[0], "image[0]", 4096)
    path, _, pixel = first.partition("###")
    if not pixel and len(names) > 1 and isinstance(names[1], str):
        pixel = names[1].partition("###")[2]
    turns = turns_of(obj, where)
    if len(turns) < 4 or [t["from"] for t in turns[:4]] != ["human", "gpt", "human", "gpt"]:
        raise Reject("bad_conversation", f"{where}: expected question, box, '<image>', answer turns")
    question = turns[0]["value"].replace("<image>", "").strip()
    for p in COT_PROMPTS:
        if question.endswith(p.strip()):
            question = question[: -len(p.strip())].strip()
            break
    payload: dict[str, Any] = {
        "image": media_ref(root, path, "image"),
        "question": question,
        "answer": turns[3]["value"],
        "bbox_format": "xyxy",
        "bbox_size": None,
        "meta": meta,
    }
    norm = _text_box(turns[1]["value"], "conversations[1]")
    if pixel:  # exact pixels beat 3-decimal normalised text
        payload["bboxes"] = [_text_box(pixel, "image###box")]
        payload["meta"]["bbox_norm_square"] = norm
    else:
        payload["bbox_norm_square"] = norm
    return payload


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    root = default_root(src, "image", Path(unit["file"]).parent)
    yield from read_json(src, KIND, unit, unit_idx, partial(convert, root=root, bbox_format=src.bbox_format), ID_KEYS)
