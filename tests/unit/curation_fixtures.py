"""Builders of tiny upstream-format fixtures (good and deliberately bad) for the curation tests.

    python -c "from tests.unit.curation_fixtures import bomb_png; print(len(bomb_png()))"

Everything is generated in the test (no downloads): images drawn with PIL, videos encoded with
PyAV, tars and Parquet written by hand so they can be broken in exactly one way each.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

COLOURS = [(220, 20, 20), (30, 170, 40), (30, 60, 230), (245, 225, 20), (140, 50, 180), (240, 125, 10)]


def scene(i: int, size: int = 32, bg: tuple[int, int, int] | None = None) -> Image.Image:
    """A distinct little picture per i < 1296: box colour, place and margin, dot colour and
    background grey all depend on i (the layout repeats every 162, the background does not)."""
    if bg is None:
        g = 255 - 24 * ((i // 162) % 8)
        bg = (g, g, g)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    c = COLOURS[i % len(COLOURS)]
    k = (i // len(COLOURS)) % 9
    s = size // 3
    x, y = (k % 3) * s, (k // 3) * s
    m = 1 + (i // 54) % 3
    d.rectangle([x + m, y + m, x + s - m, y + s - m], fill=c)
    d.ellipse([size - 9, size - 9, size - 2, size - 2], fill=COLOURS[(i // 3) % len(COLOURS)])
    return img


def encode(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(i: int = 0, size: int = 32) -> bytes:
    return encode(scene(i, size))


def jpg(i: int = 0, size: int = 32, quality: int = 95) -> bytes:
    return encode(scene(i, size), "JPEG", quality=quality)


def webp(i: int = 0, size: int = 32) -> bytes:
    return encode(scene(i, size), "WEBP", lossless=True)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@lru_cache(maxsize=2)
def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit PNG of width x height (~50 KB on disk, 400 M pixels / 1.2 GB as RGB)."""
    row = b"\x00" + bytes((width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row * 1000) for _ in range(height // 1000)) + comp.compress(row * (height % 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: max(1, int(len(data) * keep))]


def write_jsonl(path: Path, lines: Iterable[dict | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n")
    return path


def write_tar(path: Path, members: list[tuple[str, bytes] | tarfile.TarInfo]) -> Path:
    """A tar of (name, bytes) regular files; a TarInfo entry is added as-is (links, devices)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
                continue
            name, data = m
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return path


def symlink_member(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti


def img2dataset_members(keys: Iterable[int], shard: int = 0, ext: str = "jpg") -> list[tuple[str, bytes]]:
    out = []
    for i in keys:
        key = f"{shard:05d}{i:04d}"
        data = {"jpg": jpg, "png": png, "webp": webp}[ext](i)
        caption = f"a coloured box number {i}"
        out += [(f"{key}.{ext}", data), (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"key": key, "caption": caption, "width": 32, "height": 32, "status": "success"}).encode())]
    return out


def write_video(path: Path, n_frames: int = 16, fps: int = 8, size: int = 32, codec: str = "mpeg4") -> Path:
    """A clip of a box moving right: frame t differs from t-1, so sampled frames are distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=fps)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        for t in range(n_frames):
            arr = np.full((size, size, 3), 255, np.uint8)
            x = int(t * (size - 8) / max(1, n_frames - 1))
            arr[12:20, x : x + 8] = (220, 20, 20)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def hf_image(data: bytes | None, path: str | None = None) -> dict:
    return {"bytes": data, "path": path}


HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_caption_parquet(path: Path, rows: list[dict], binary_image: bool = False, text_col: str = "caption", row_group_size: int = 1000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_type = pa.binary() if binary_image else HF_IMAGE
    schema = pa.schema([("image", image_type), (text_col, pa.string())])
    table = pa.Table.from_pylist([{"image": r["image"], text_col: r["caption"]} for r in rows], schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_edit_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [("original_prompt", pa.string()), ("original_image", HF_IMAGE), ("edit_prompt", pa.string()),
         ("edited_prompt", pa.string()), ("edited_image", HF_IMAGE), ("meta", pa.string())]
    )
    full = [{"original_prompt": "a box", "edited_prompt": "a box, edited", "meta": json.dumps({"k": i}), **r} for i, r in enumerate(rows)]
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path)
    return path
