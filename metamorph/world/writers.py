"""Byte-deterministic writers for the upstream formats (JSONL, img2dataset tars, HF-style Parquet).

    python -c "from metamorph.world.writers import TarShards; help(TarShards)"

Determinism matters because the world is the default source: the same seed and config must give
the same bytes so downstream cache keys and content hashes (dedup, contamination) are stable.
Tar members get mtime 0, mode 0644, no owner names; JSON is written with a fixed key order.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from metamorph.data.shards import tarinfo


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # zlib level 6, no timestamps: deterministic
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 32 px, 4:2:0 would smear a small object's colour into its background
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def json_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json_line(r) + "\n")
            n += 1
    return n


def write_json(path: Path, obj: Any) -> None:
    """One JSON document (SSv2's label files are single arrays/objects, not JSONL)."""
    path.write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")


class TarShards:
    """img2dataset-style shards ``{NNNNN}.tar`` of ``shard_size`` keys each (the last may be short).

    Use as a context manager; ``add(key_files)`` takes ``[(member_name, bytes), ...]`` of one key.
    """

    def __init__(self, out_dir: Path, shard_size: int):
        self.out_dir, self.shard_size = Path(out_dir), shard_size
        self.n_keys = 0
        self.paths: list[Path] = []
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> "TarShards":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def shard_index(self) -> int:
        return self.n_keys // self.shard_size

    def add(self, files: list[tuple[str, bytes]]) -> None:
        if self.n_keys % self.shard_size == 0:
            self.close()
            path = self.out_dir / f"{self.shard_index:05d}.tar"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            self.paths.append(path)
        assert self._tar is not None
        for name, data in files:
            self._tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))
        self.n_keys += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


# InstructPix2Pix on the HF hub: two Image features and three strings. The "huggingface" schema
# metadata lets `datasets.load_dataset("parquet", ...)` decode the image structs as images.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
EDIT_SCHEMA = pa.schema(
    [
        ("original_prompt", pa.string()),
        ("original_image", IMAGE_STRUCT),
        ("edit_prompt", pa.string()),
        ("edited_prompt", pa.string()),
        ("edited_image", IMAGE_STRUCT),
        ("meta", pa.string()),
    ],
    metadata={
        b"huggingface": json.dumps(
            {
                "info": {
                    "features": {
                        "original_prompt": {"dtype": "string", "_type": "Value"},
                        "original_image": {"_type": "Image"},
                        "edit_prompt": {"dtype": "string", "_type": "Value"},
                        "edited_prompt": {"dtype": "string", "_type": "Value"},
                        "edited_image": {"_type": "Image"},
                        "meta": {"dtype": "string", "_type": "Value"},
                    }
                }
            }
        ).encode()
    },
)


def write_edit_parquet(path: Path, rows: list[dict[str, Any]]) -> int:
    table = pa.Table.from_pylist(rows, schema=EDIT_SCHEMA)
    pq.write_table(table, path, compression="zstd")
    return table.num_rows


def write_img2dataset_sidecars(out_dir: Path, shard: int, metas: list[dict[str, Any]]) -> None:
    """What img2dataset writes beside ``{shard:05d}.tar``: ``{shard:05d}.parquet`` (one row of
    download metadata per key) and ``{shard:05d}_stats.json``. Readers must not take them for records."""
    rows = [{k: v for k, v in m.items() if k != "meta"} for m in metas]
    pq.write_table(pa.Table.from_pylist(rows), Path(out_dir) / f"{shard:05d}.parquet")
    stats = {"count": len(rows), "successes": sum(r.get("status") == "success" for r in rows), "failed_to_download": 0,
             "failed_to_resize": 0, "status_dict": {"success": len(rows)}}
    write_json(Path(out_dir) / f"{shard:05d}_stats.json", stats)
