"""InstructPix2Pix-style edit pairs in HF Parquet: (original image, instruction, edited image).

    python -c "from metamorph.data.readers import READERS; print(READERS['instructpix2pix'])"

Columns: ``original_prompt``, ``original_image`` (struct ``{bytes, path}``), ``edit_prompt``,
``edited_prompt``, ``edited_image``; toy-world files add ``meta`` (a JSON string) and may add
``id``. Units as the parquet reader plans them (row groups, or row ranges of big ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, default_root, order_key, rejected
from metamorph.data.readers.parquet import image_ref, meta_cell, rows, text_cell
from metamorph.data.readers.parquet import plan as plan  # same units as the parquet reader

KIND = "edit"


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "image", f.parent)
    for pos, (row_no, row, err) in enumerate(rows(unit)):
        where = f"{f.name}:{row_no}"
        order = order_key(unit_idx, pos)
        fallback_id = f"{f.stem}-{row_no:08d}"
        if row is None:
            yield rejected(src, KIND, where, order, "non_utf8_text", err, rid=fallback_id)
            continue
        rid = str(row.get("id") or fallback_id)
        try:
            blobs: list[bytes] = []
            payload = {
                "original": image_ref(row.get("original_image"), root, "original_image", blobs),
                "edited": image_ref(row.get("edited_image"), root, "edited_image", blobs),
                "edit_prompt": text_cell(row.get("edit_prompt"), "edit_prompt"),
                "original_prompt": text_cell(row.get("original_prompt"), "original_prompt"),
                "edited_prompt": text_cell(row.get("edited_prompt"), "edited_prompt"),
                "meta": meta_cell(row.get("meta")),
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail, rid=rid)
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload, blobs=blobs)
