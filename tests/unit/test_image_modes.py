"""Decoded image modes end up 8-bit sRGB without damage: each mode against an independent numpy
conversion, EXIF orientation before boxes and crops, and edit pairs through one transform.

    python -m pytest tests/unit/test_image_modes.py -q
"""

from __future__ import annotations

import io
import itertools
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


# --- CMYK with an embedded ICC profile -------------------------------------------------------------------

def _s15(v: float) -> bytes:
    return struct.pack(">i", int(round(v * 65536)))

# linear sRGB -> XYZ (D50, Bradford-adapted), as ICC profiles state sRGB
SRGB_TO_XYZ_D50 = np.array([[0.4360747, 0.3850649, 0.1430804], [0.2225045, 0.7168786, 0.0606169], [0.0139322, 0.0971045, 0.7141733]])

def cmyk_profile() -> bytes:
    """A minimal ICC v2 CMYK printer profile (header, desc, wtpt, a 2-point lut16 A2B0 to XYZ)
    whose ink corners are the sRGB primaries and their mixes: linear R = (1-c)(1-k), G =
    (1-m)(1-k), B = (1-y)(1-k) at every corner of the CMYK cube."""
    desc_text = b"Test naive CMYK\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(desc_text)) + desc_text + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + bytes(67)
    wtpt = b"XYZ " + bytes(4) + _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    clut = []
    for c, m, y, k in itertools.product((0, 1), repeat=4):  # first channel varies slowest
        rgb = np.array([(1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)], float)
        xyz = SRGB_TO_XYZ_D50 @ rgb
        clut += [min(65535, int(round(v * 32768))) for v in xyz]
    lut = (b"mft2" + bytes(4) + struct.pack(">BBBB", 4, 3, 2, 0) + b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))
           + struct.pack(">HH", 2, 2) + struct.pack(">8H", *([0, 65535] * 4)) + struct.pack(f">{len(clut)}H", *clut)
           + struct.pack(">6H", *([0, 65535] * 3)))
    tags = [(b"desc", desc), (b"wtpt", wtpt), (b"A2B0", lut)]
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags:
        while (offset + len(data)) % 4:
            data += b"\x00"
        table += sig + struct.pack(">II", offset + len(data), len(body))
        data += body
    body = struct.pack(">I", len(tags)) + table + data
    size = 128 + len(body)
    header = (struct.pack(">I", size) + b"lcms" + struct.pack(">I", 0x02100000) + b"prtr" + b"CMYK" + b"XYZ "
              + bytes(12) + b"acsp" + b"APPL" + bytes(4) + bytes(4) + bytes(4) + bytes(8) + struct.pack(">I", 0)
              + _s15(0.9642) + _s15(1.0) + _s15(0.8249) + bytes(4) + bytes(16) + bytes(28))
    assert len(header) == 128, len(header)
    return header + body


def _srgb_encode(lin: np.ndarray) -> np.ndarray:
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055) * 255


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_with_icc_profile_goes_through_the_profile(fmt):
    # littlecms interpolates the first channel linearly and the other three tetrahedrally: on
    # pixels with k = 0, or with m = y = 0, that is exact for this profile, so the output must be
    # the sRGB encoding of the corners' linear mix (the naive conversion, with no gamma, is far off)
    n = 16
    c, m, y = (RNG.integers(0, 256, size=(n, n)) for _ in range(3))
    k = RNG.integers(0, 256, size=(n, n))
    cmyk = np.stack([np.concatenate([c, c]), np.concatenate([m, 0 * m]), np.concatenate([y, 0 * y]),
                     np.concatenate([0 * k, k])], axis=-1).astype(np.uint8)
    f = cmyk.astype(float) / 255
    want = _srgb_encode((1 - f[..., :3]) * (1 - f[..., 3:]))
    data = encode(Image.fromarray(cmyk, "CMYK"), fmt, icc_profile=cmyk_profile(), **({"quality": 100} if fmt == "JPEG" else {}))
    got = decode(data)
    err = np.abs(got - want)
    # littlecms precomputes a device-space grid: a few near-black pixels, where sRGB's curve is
    # steepest, land ~15 levels off; the bulk is within a level or two
    assert err.mean() < (2 if fmt == "TIFF" else 3) and np.percentile(err, 90) <= (3 if fmt == "TIFF" else 6)
    naive = (1 - f[..., :3]) * (1 - f[..., 3:]) * 255
    assert np.abs(naive - want).mean() > 20  # the two conversions are far apart: the test tells them apart
