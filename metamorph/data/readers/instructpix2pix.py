"""InstructPix2Pix-style edit pairs in HF Parquet: (original image, instruction, edited image).

    python -c "from metamorph.data.readers import READERS; print(READERS['instructpix2pix'])"

Columns as on the HF hub (``timbrooks/instructpix2pix-clip-filtered``, ``data/train-*.parquet``):
``original_prompt``, ``original_image`` (struct ``{bytes, path}``), ``edit_prompt``,
``edited_prompt``, ``edited_image``; an image struct with null bytes is read from ``path`` under
``image_root``. Toy-world files add ``meta`` (a JSON string); an ``id`` column is used when there
is one (else ``{file stem}-{row}``). Other edit datasets on the hub name the three columns
differently: set them with the source's ``fields`` (MagicBrush: ``{source: source_img, instruction:
instruction, target: target_img}``). Units as the parquet reader plans them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, default_root, order_key, rejected
from metamorph.data.readers.parquet import _rid_or, id_cell, image_ref, meta_cell, rows, text_cell
from metamorph.data.readers.parquet import plan as plan  # same units as the parquet reader

KIND = "edit"
FAMILY = "image_edit"
SUFFIXES = (".parquet",)
# renamable per source: MagicBrush's hub Parquet is {"source": "source_img", "instruction":
# "instruction", "target": "target_img"}
FIELDS = {"source": "original_image", "instruction": "edit_prompt", "target": "edited_image", "id": "id"}


def read(src: SourceConfig, unit: dict[str, Any], unit_idx: int) -> Iterator[RawRecord]:
    f = Path(unit["file"])
    root = default_root(src, "image", f.parent)
    keys = {k: src.key_of(k, v) for k, v in FIELDS.items()}
    for pos, (row_no, row, err) in enumerate(rows(unit)):
        where = f"{f.name}:{row_no}"
        order = order_key(unit_idx, pos)
        fallback_id = f"{f.stem}-{row_no:08d}"
        if row is None:
            yield rejected(src, KIND, where, order, "non_utf8_text", err, rid=fallback_id)
            continue
        try:
            rid = id_cell(row, (keys["id"],), fallback_id)
            missing = [keys[k] for k in ("source", "instruction", "target") if keys[k] not in row]
            if missing:
                raise Reject("missing_field", f"{where}: no column {missing}")
            blobs: list[bytes] = []
            payload = {
                "original": image_ref(row[keys["source"]], root, keys["source"], blobs),
                "edited": image_ref(row[keys["target"]], root, keys["target"], blobs),
                "edit_prompt": text_cell(row[keys["instruction"]], keys["instruction"]),
                "original_prompt": text_cell(row["original_prompt"], "original_prompt") if row.get("original_prompt") is not None else "",
                "edited_prompt": text_cell(row["edited_prompt"], "edited_prompt") if row.get("edited_prompt") is not None else "",
                "meta": meta_cell(row.get("meta")),
            }
        except Reject as r:
            yield rejected(src, KIND, where, order, r.reason, r.detail, rid=_rid_or(row, fallback_id))
            continue
        yield RawRecord(source=src.name, rid=rid, locator=where, order=order, kind=KIND, payload=payload, blobs=blobs)
