"""Image decode/validate/resize/encode and the hashes curation dedups and guards with.

    python -c "from metamorph.data.imageproc import phash; from PIL import Image; print(hex(phash(Image.new('RGB', (32, 32)))))"

Decoding is defensive: only the configured formats' decoders are tried, the pixel count is
checked from the header before any pixel is decoded (a 20000x20000 PNG is ~50 KB on disk and
1.2 GB in memory), and truncated files fail instead of being padded with grey.
"""

from __future__ import annotations

import ctypes
import logging
import ctypes.util
import hashlib
import io
import sys
import warnings
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from metamorph.data.readers.base import Reject

if TYPE_CHECKING:  # numpy and PIL are imported where they are used: `metamorph plan` imports this module
    import numpy as np
    from PIL import Image

logger = logging.getLogger(__name__)
RESIZE_MODES = ("center_crop", "pad")
ENCODE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def open_image(
    data: bytes, *, max_pixels: int, min_side: int, max_aspect: float, formats: tuple[str, ...], draft_side: int | None = None
) -> Image.Image:
    """Decode ``data`` to RGB after the header checks; raise ``Reject`` with the reason.

    ``draft_side``: the caller only needs the shorter side at this many px, so a JPEG may be
    decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (several times faster on photos; never
    below ``draft_side``). Leave None when pixel coordinates matter (bbox crops)."""
    from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off file is an error, not a half-grey image
    if not data:
        raise Reject("image_decode_error", "zero-length image")
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below decides; PIL still refuses > 2x its MAX_IMAGE_PIXELS
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as e:
        raise Reject("decompression_bomb", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise Reject("image_decode_error", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:
        raise Reject("decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    check_size(w, h, min_side=min_side, max_aspect=max_aspect)
    try:
        if draft_side is not None and img.format == "JPEG" and min(w, h) >= 2 * draft_side:
            scale = draft_side / min(w, h)
            img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        if "exif" in img.info:
            # phone photos store rotation in EXIF: applied here, before any crop, box or resize
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise Reject("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise Reject("image_decode_error", f"{type(e).__name__}: {e}") from None


@lru_cache(maxsize=1)
def keep_image_buffers(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 128 * 2**20) -> bool:
    """Let this process reuse freed image and zlib buffers instead of returning them to the OS.

    A decoded 384-512 px picture (0.4-0.8 MB) and each PNG encoder's zlib state (~0.3 MB) are
    above glibc's default mmap threshold (128 KiB, adaptive), and the heap is trimmed whenever
    64 KiB sit free at its top: so every image was mapped, page-faulted in (zeroed by the
    kernel) and unmapped again. Measured on a decode-resize-PNG loop of 512 -> 384 px JPEGs:
    1.9M minor faults for 3000 images and 23% of the run; with these thresholds, 10K faults.
    Big allocations (above ``mmap_threshold``) still get their own mapping, and at most
    ``trim_threshold`` bytes stay cached. Once per process; False where there is no glibc
    ``mallopt`` (macOS, musl), which changes nothing but speed."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def check_size(w: int, h: int, *, min_side: int, max_aspect: float) -> None:
    if min(w, h) < min_side:
        raise Reject("too_small", f"{w}x{h}: shorter side < min_side={min_side}")
    if max(w, h) > max_aspect * min(w, h):
        raise Reject("bad_aspect", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > max_aspect={max_aspect}")


# transparent pixels are composited on white, as image viewers and browsers show them (the RGB
# under alpha 0 is often black or garbage, which would otherwise show through)
BACKGROUND = (255, 255, 255)
HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit sRGB of any decoded mode, without losing the picture:

    * 16-bit greyscale (``I;16``, ``I;16B``, and ``I``, read as 16-bit) keeps its high byte
      (``v >> 8``, the rule Pillow applies to 16-bit RGB PNGs), never clipped to 255 (white);
    * palette, LA, PA and RGBA (and premultiplied La/RGBa) are composited on ``BACKGROUND``;
    * an embedded ICC profile that is not sRGB (CMYK press profiles, Display P3, Adobe RGB) is
      converted to sRGB with littlecms; CMYK without one uses the naive
      ``(255 - c) * (255 - k) / 255`` (Adobe-inverted JPEGs are un-inverted by the decoder).
    """
    import numpy as np
    from PIL import Image

    icc = img.info.get("icc_profile")
    if icc and img.mode in ("RGB", "RGBA", "CMYK", "L", "LA") and not _is_srgb(icc):
        img = _icc_to_srgb(img, icc)
    if img.mode == "RGB":
        return img
    if img.mode in HIGH_DEPTH_MODES:
        arr = np.asarray(img)
        grey = (np.clip(arr, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info) or (
        img.mode in ("L", "RGB", "I;16") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


@lru_cache(maxsize=64)
def _is_srgb(icc: bytes) -> bool:
    try:
        from PIL import ImageCms

        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc)))
    except (OSError, ValueError, TypeError, ImportError):
        return True  # unreadable profile: treat the numbers as sRGB (what a viewer without CMS does)
    return "srgb" in desc.lower().replace(" ", "").replace("-", "")


def _icc_to_srgb(img: Image.Image, icc: bytes) -> Image.Image:
    from PIL import ImageCms

    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
        base = img.convert("RGB" if img.mode == "RGBA" else "L") if alpha is not None else img
        out = ImageCms.profileToProfile(base, src, _srgb(), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as e:
        logger.debug("ICC profile not applied (%s): converting the numbers as they are", e)
        return img
    if alpha is not None:
        out.putalpha(alpha)
    out.info.pop("icc_profile", None)
    return out


@lru_cache(maxsize=1)
def _srgb() -> Any:
    from PIL import ImageCms

    return ImageCms.createProfile("sRGB")


def resize_pair(a: Image.Image, b: Image.Image, size: int, mode: str) -> tuple[Image.Image, Image.Image]:
    """Two same-size images through one geometric transform (edit source and target): the crop
    box or padding is a function of the size alone, computed once here for both."""
    if a.size != b.size:
        raise ValueError(f"resize_pair: sizes differ, {a.size} vs {b.size}")
    return resize(a, size, mode), resize(b, size, mode)


def resize(img: Image.Image, size: int, mode: str) -> Image.Image:
    """Square ``size`` x ``size``: ``center_crop`` fills the frame (generation targets),
    ``pad`` keeps the whole picture on a black border (questions about the edges stay answerable)."""
    from PIL import Image, ImageOps

    if img.size == (size, size):
        return img
    if mode == "center_crop":
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        # reducing_gap: a box pre-shrink for big downscales, bicubic for the last factor of 2
        return img.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)
    if mode == "pad":
        return ImageOps.pad(img, (size, size), Image.Resampling.BICUBIC, color=(0, 0, 0))
    raise ValueError(f"resize mode {mode!r}: use one of {RESIZE_MODES}")


def encode(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    fmt = ENCODE_FORMATS[ext]
    if fmt == "PNG":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt == "WEBP":
        img.save(buf, format="WEBP", lossless=True)
    else:
        img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def content_sha(encoded: bytes) -> str:
    """sha256 of an image as written to the shard. The encoder is deterministic for given
    settings, so equal pixels give equal bytes; hashing the (small) encoded file is ~10x cheaper
    than hashing raw pixels of a 384 px image."""
    return hashlib.sha256(encoded).hexdigest()


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the decoded pixels (and size): equal for two encodings of the same picture."""
    h = hashlib.sha256(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def signature(img: Image.Image) -> tuple[int, bytes]:
    """(pHash, 16x16 thumbnail) from one shared 32x32 box reduction of the image."""
    return _signature32(_box32(img))


def _box32(img: Image.Image) -> Image.Image:
    """The image as 32x32 RGB box means. A square image whose side is a multiple of 32 (every
    curated image) is reduced in steps of Pillow's specialised 2-5x kernels (4x then 2x for 256
    px: 1.5x faster than one 8x step, and within one grey level of it); anything else is box-resized."""
    from PIL import Image

    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    if w != h or w % 32:
        return rgb.resize((32, 32), Image.Resampling.BOX)
    f = w // 32
    while f > 1:
        k = next((k for k in (4, 3, 2, 5) if f % k == 0), f)
        rgb, f = rgb.reduce(k), f // k
    return rgb


def _signature32(small: Image.Image) -> tuple[int, bytes]:
    from PIL import Image

    return _phash32(small.convert("L")), small.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX).tobytes()


@lru_cache(maxsize=1)
def _dct_matrix(n: int = 32) -> np.ndarray:
    import numpy as np

    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float64)


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (pHash): low 8x8 frequencies of the 32x32 grey image vs their median.

    Returned as a signed int64 (Arrow has no uint64-friendly path everywhere); compare with
    ``hamming``. Near copies (re-encoded, slightly resized) land within a few bits."""
    return _phash32(_box32(img).convert("L"))


def _phash32(grey_img: Image.Image) -> int:
    import numpy as np

    grey = np.asarray(grey_img, dtype=np.float64)
    d = _dct_matrix()[:8]  # only the low 8x8 frequencies are kept
    low = (d @ grey @ d.T).ravel()
    ac = low[1:]  # the DC term would skew the median
    bits = low > np.partition(ac, 31)[31]  # median of the 63 AC terms (np.median costs 4x more)
    return int.from_bytes(np.packbits(bits).tobytes(), "big", signed=True)


def hamming(a: int, b: int) -> int:
    import numpy as np

    return int(np.bitwise_count(np.array(a, dtype=np.int64).view(np.uint64) ^ np.array(b, dtype=np.int64).view(np.uint64)))


THUMB_SIDE = 16  # verification thumbnail side: 2x2 px blocks of a 32 px toy image, 24x24 of a 384 px one


def thumbnail(img: Image.Image) -> bytes:
    """16x16 RGB box-filtered thumbnail (768 bytes): the near-copy check after a pHash match."""
    return signature(img)[1]


def thumb_max_diff(a: bytes, b: bytes) -> int:
    """Largest per-channel difference (0-255) between two thumbnails: small for re-encodes and
    resizes of one picture, large somewhere for a different picture whose pHash collides (a toy
    scene with another colour, a shape swapped). See CurateConfig.near_copy_max_diff."""
    return thumb_max_diffs([(a, b)])[0]


_U64 = (1 << 64) - 1  # a signed int64 hash as its unsigned bit pattern: value & _U64


def thumb_max_diffs(pairs: list[tuple[bytes, bytes]]) -> list[int]:
    """``thumb_max_diff`` of each pair, in one array pass."""
    import numpy as np

    if not pairs:
        return []
    a = np.frombuffer(b"".join(p for p, _ in pairs), np.uint8).reshape(len(pairs), -1)
    b = np.frombuffer(b"".join(q for _, q in pairs), np.uint8).reshape(len(pairs), -1)
    return (np.maximum(a, b) - np.minimum(a, b)).max(axis=1).tolist()


class HammingIndex:
    """Find stored 64-bit hashes within ``max_distance`` bits of a query without a full scan.

    Pigeonhole: split the 64 bits into ``max_distance + 1`` bands; two hashes within the distance
    agree exactly on at least one band, so only same-band candidates are compared (held-out sets
    of 10^5 against training sets of 10^7 stay cheap)."""

    def __init__(self, max_distance: int) -> None:
        import numpy as np

        if not 0 <= max_distance < 32:
            raise ValueError(f"max_distance={max_distance}: use 0..31")
        self.max_distance = max_distance
        n = max_distance + 1
        edges = np.linspace(0, 64, n + 1).astype(int)
        self._bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]  # (shift, mask)
        self._tables: list[dict[int, list[int]]] = [dict() for _ in self._bands]
        self._values: list[int] = []  # as unsigned 64-bit ints
        self._labels: list[Any] = []

    def _band_keys(self, u: int) -> list[int]:
        return [(u >> lo) & mask for lo, mask in self._bands]

    def add(self, value: int, label: Any) -> None:
        idx = len(self._values)
        u = value & _U64
        self._values.append(u)
        self._labels.append(label)
        for table, key in zip(self._tables, self._band_keys(u)):
            table.setdefault(key, []).append(idx)

    def __len__(self) -> int:
        return len(self._values)

    def query(self, value: int) -> list[tuple[Any, int]]:
        """(label, distance) of every stored hash within the distance, closest first (ties in
        the order they were added)."""
        u = value & _U64
        cands: set[int] = set()
        for table, key in zip(self._tables, self._band_keys(u)):
            cands.update(table.get(key, ()))
        near = []
        for j in cands:  # a few per query in real data: plain ints beat building arrays
            d = (self._values[j] ^ u).bit_count()
            if d <= self.max_distance:
                near.append((d, j))
        near.sort()
        return [(self._labels[j], d) for d, j in near]

    def query_many(self, values: list[int], brute_force_max: int = 4096) -> list[list[tuple[Any, int]]]:
        """``query`` of each value. While the index holds at most ``brute_force_max`` hashes, all
        distances come from array XOR + popcount (a few microseconds a query, where near-duplicate
        images give the bands' Python loops many candidates); beyond that, the bands."""
        import numpy as np

        if not values or not self._values or len(self._values) > brute_force_max:
            return [self.query(v) for v in values]
        stored = np.array(self._values, dtype=np.uint64)
        out: list[list[tuple[Any, int]]] = [[] for _ in values]
        step = max(1, 2**20 // len(stored))  # ~8 MiB of XORs at a time
        for lo in range(0, len(values), step):
            q = np.array([v & _U64 for v in values[lo : lo + step]], dtype=np.uint64)
            dist = np.bitwise_count(q[:, None] ^ stored[None, :])
            r, c = np.nonzero(dist <= self.max_distance)
            d = dist[r, c]
            order = np.lexsort((c, d, r))  # per query: closest first, ties in the order added
            for ri, ci, di in zip((r[order] + lo).tolist(), c[order].tolist(), d[order].tolist()):
                out[ri].append((self._labels[ci], di))
        return out
