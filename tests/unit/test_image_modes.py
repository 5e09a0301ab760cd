"""Decoded image modes end up 8-bit sRGB without damage: each mode against an independent numpy
conversion, EXIF orientation before boxes and crops, and edit pairs through one transform.

    python -m pytest tests/unit/test_image_modes.py -q
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from metamorph.data.curate import CurateConfig, process_record
from metamorph.data.imageproc import BACKGROUND, open_image, resize_pair, to_rgb
from metamorph.data.readers import RawRecord
from tests.unit.curation_fixtures import encode, png

RNG = np.random.default_rng(0)
FORMATS = ("JPEG", "PNG", "WEBP", "TIFF")


def decode(data: bytes) -> np.ndarray:
    img = open_image(data, max_pixels=10**7, min_side=1, max_aspect=100, formats=FORMATS)
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (greyscale HxW or RGB HxWx3), big-endian samples."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b"")


def grey16() -> np.ndarray:
    return RNG.integers(0, 65536, size=(20, 24), dtype=np.uint32).astype(np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped():
    arr = grey16()
    out = decode(png16(arr))
    assert (out == (arr >> 8)[..., None]).all()  # the high byte in every channel
    assert out.std() > 50  # a full-range picture, not white


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes_in_memory(mode):
    arr = grey16()
    src = {"I;16": arr.astype("<u2"), "I;16B": arr.astype(">u2"), "I": arr.astype(np.int32)}[mode]
    img = Image.fromarray(src)
    assert img.mode == mode
    assert (np.asarray(to_rgb(img)).astype(int) == (arr >> 8)[..., None]).all()
    if mode == "I;16":  # and the same through a TIFF file
        assert (decode(encode(img, "TIFF")) == (arr >> 8)[..., None]).all()


def test_16bit_rgb_png():
    arr = RNG.integers(0, 65536, size=(12, 16, 3), dtype=np.uint32).astype(np.uint16)
    assert (decode(png16(arr)) == (arr >> 8)).all()


def _composite(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(float)[..., None] / 255
    return rgb.astype(float) * a + np.array(BACKGROUND, float) * (1 - a)


def test_rgba_and_la_composited_on_the_documented_background():
    rgb = RNG.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    alpha = RNG.integers(0, 256, size=(16, 16), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    assert np.abs(decode(encode(rgba)) - _composite(rgb, alpha)).max() <= 1
    assert decode(encode(rgba))[0, 0].tolist() == list(BACKGROUND)  # fully transparent: the background
    grey = rgb[..., 0]
    la = Image.fromarray(np.dstack([grey, alpha]), "LA")
    want = _composite(np.repeat(grey[..., None], 3, axis=2), alpha)
    assert np.abs(decode(encode(la)) - want).max() <= 1


def test_palette_with_transparency():
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 200, 30, 40, 10, 220, 30] + [0] * (256 * 3 - 9))
    idx = np.array([[0, 1, 2, 1] * 2] * 8, np.uint8)
    pal.frombytes(idx.tobytes())
    pal.info["transparency"] = 0  # index 0 is see-through (black RGB underneath)
    out = decode(encode(pal))
    colours = np.array([BACKGROUND, (200, 30, 40), (10, 220, 30)])
    assert (out == colours[idx]).all()
    pal.info.pop("transparency")
    assert (decode(encode(pal)) == np.array([(0, 0, 0), (200, 30, 40), (10, 220, 30)])[idx]).all()


def test_cmyk_without_profile():
    cmyk = RNG.integers(0, 256, size=(10, 12, 4), dtype=np.uint8)
    img = Image.fromarray(cmyk, "CMYK")
    c, k = cmyk[..., :3].astype(float), cmyk[..., 3:].astype(float)
    want = (255 - c) * (255 - k) / 255
    assert np.abs(decode(encode(img, "TIFF")) - want).max() <= 1
    assert np.abs(decode(encode(img, "JPEG", quality=100)) - want).mean() < 4  # lossy, but not inverted or clipped


def test_exif_orientation_applied_before_the_box(tmp_path):
    # stored 40x20 with the red box top-left; orientation 6 (rotate 90 clockwise to display) makes
    # it 20x40 with the box top-right: a box given in display pixels must find the red
    stored = Image.new("RGB", (40, 20), (255, 255, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    path.write_bytes(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    shown = decode(path.read_bytes())
    assert shown.shape[:2] == (40, 20)  # 20 wide, 40 tall
    assert shown[2:8, 12:18].mean(axis=(0, 1)).round(-1).tolist() == [250, 0, 0]
    rec = RawRecord(source="s", rid="r", locator="t", order="0", kind="viscot", payload={
        "image": {"path": str(path), "root": str(tmp_path)}, "question": "What colour?", "answer": "red",
        "bboxes": [[10, 0, 20, 10]], "bbox_format": "xyxy", "bbox_size": None, "meta": {}})
    row = process_record(rec, CurateConfig(image_size=16, min_side=8))
    assert row["reason"] == "", row["detail"]
    crop = np.asarray(Image.open(io.BytesIO(row["images"][1])).convert("RGB")).astype(int)
    assert crop[3:13, 3:13].mean(axis=(0, 1))[0] > 200 and crop[3:13, 3:13].mean(axis=(0, 1))[1] < 60


def _edit(blobs, **cfg):
    rec = RawRecord(source="s", rid="r", locator="t", order="0", kind="edit", payload={
        "original": {"blob": 0}, "edited": {"blob": 1}, "edit_prompt": "shift nothing", "meta": {}}, blobs=blobs)
    return process_record(rec, CurateConfig(image_size=16, min_side=8, **cfg))


def test_edit_pair_gets_one_transform():
    # a non-square pair: the centre crop must take the same columns from both
    base = RNG.integers(0, 256, size=(24, 48, 3), dtype=np.uint8)
    a, b = Image.fromarray(base), Image.fromarray(255 - base)
    ra, rb = resize_pair(a, b, 16, "center_crop")
    assert (np.asarray(rb).astype(int) + np.asarray(ra) - 255).__abs__().max() <= 2  # inverse stays inverse
    row = _edit([encode(a), encode(b)])
    out = [np.asarray(Image.open(io.BytesIO(x)).convert("RGB")).astype(int) for x in row["images"]]
    assert np.abs(out[0] + out[1] - 255).max() <= 2
    with pytest.raises(ValueError):
        resize_pair(a, b.resize((40, 24)), 16, "center_crop")


def test_edit_size_mismatch_resized_or_quarantined():
    small, big = png(1, size=32), png(2, size=64)
    row = _edit([small, big])
    assert row["reason"] == "" and len(row["images"]) == 2
    assert [Image.open(io.BytesIO(x)).size for x in row["images"]] == [(16, 16), (16, 16)]
    assert _edit([small, big], edit_size_mismatch="quarantine")["reason"] == "edit_size_mismatch"
    with pytest.raises(ValueError, match="edit_size_mismatch"):
        CurateConfig(edit_size_mismatch="crop")
