"""Curation of one upstream record into one VPiT ``Sample``, and the stage-wide keep/split decisions.

    python -c "from metamorph.data.curate import CurateConfig, QUARANTINE_REASONS; print(CurateConfig(), QUARANTINE_REASONS)"

Two halves, both pure Python (the Ray glue is ``stages/_curation.py``):

* ``process_record(raw, cfg, video)`` (runs in parallel workers, one call per record): decode and validate the
  record's images or video frames, resize, encode, hash, and convert to the paper's instruction
  format; or reject with a quarantine reason.
* ``decide(rows, ...)`` (runs once over small metadata rows): duplicate ids and exact duplicates
  (first by id wins), the stable train/held-out split by hash of the sample id, and the
  contamination guard that drops training samples showing a held-out image (same pixels, or a
  perceptual hash within ``phash_max_distance`` bits).

Instruction formats (MetaMorph, arXiv 2412.14164, sec. 3): text-to-image "Generate an image of
{caption}." -> ``<image>``; image/video QA as the source asks, frames as prompt images; frame
prediction: first frames + "What happens next?" -> label + next frames; visual thinking:
"<image>\\nThink visually before you answer: {q}" -> "<image>\\n{answer}" (the image is the box
crop); image edit: "<image>\\n{instruction}" -> "<image>".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from metamorph.data.imageproc import (
    ENCODE_FORMATS,
    PIL_FORMATS,
    RESIZE_MODES,
    HammingIndex,
    check_size,
    encode,
    content_sha,
    open_image,
    resize,
    resize_pair,
    signature,
    thumb_max_diffs,
)
from metamorph.data.readers.base import RawRecord, Reject, check_media, read_media
from metamorph.data.schema import IMAGE_PLACEHOLDER, ImageRef, Sample, Turn, dumps_splits
from metamorph.data.video import VideoConfig, sample_frames

if TYPE_CHECKING:  # imported where used: `metamorph plan` imports this module for the configs
    import pyarrow as pa
    from PIL import Image

# Every reason a record can be quarantined with (readers, processing, decisions).
QUARANTINE_REASONS = (
    "malformed_json",  # a line/file that is not JSON, or a record that is not an object
    "malformed_csv",  # a CSV row with unusable numbers
    "missing_field",  # a required field (id, conversations, question, ...) is absent
    "non_utf8_text",  # bytes that are not UTF-8 (or JSON lone surrogates)
    "unsafe_path",  # a media path that is absolute, climbs out of its root, or resolves outside it (symlinks)
    "unsafe_tar_member",  # a tar member with an absolute/../ name, or a link/device
    "truncated_tar",  # a tar cut off mid-member or without its end blocks
    "oversized_member",  # a tar member larger than the reader's bound
    "image_missing",  # the referenced image file (or tar member) does not exist
    "image_decode_error",  # corrupt, truncated, zero-length or unsupported image bytes
    "decompression_bomb",  # more pixels than max_pixels (checked from the header, before decoding)
    "too_small",  # shorter side < min_side
    "bad_aspect",  # long/short side > max_aspect
    "video_missing",  # the referenced video file does not exist
    "video_empty",  # zero-length file or no frames in range
    "video_decode_error",  # undecodable container/stream
    "video_too_short",  # fewer frames than frame prediction needs
    "bad_bbox",  # bbox not 4 numbers, or zero area
    "bbox_out_of_bounds",  # bbox (in the configured convention) leaves the image
    "bad_conversation",  # unknown role, wrong turn order, image placeholder in an answer
    "image_placeholder_mismatch",  # number of <image> placeholders != number of images
    "empty_text",  # empty caption / question / answer / instruction
    "caption_length",  # caption (or edit instruction) outside [min_caption_chars, max_caption_chars]
    "text_too_long",  # conversation, question, answer or label text > max_text_chars (any field > 1M chars at read)
    "duplicate_id",  # the same sample id twice in the stage (later occurrence dropped)
    "duplicate",  # same content hash as an earlier (by id) sample
    "contamination",  # a training sample shows a held-out image (exact or perceptual near copy)
    "null_value",  # a required field/cell is JSON null or a Parquet null
    "nan_value",  # a number/text cell is NaN or +-inf (never the caption "nan")
    "wrong_type",  # a field/cell of another type than the format says (a number where text belongs, ...)
    "bad_id",  # an id that is a dict, list, float, bool or empty
    "csv_field_too_long",  # a CSV field over the csv module's limit
    "tar_header_corrupt",  # a corrupt member header mid-tar (the members after it are still read)
    "not_regular_file",  # a media path that is a FIFO, device or directory (never opened)
    "file_too_large",  # a media file over max_image_bytes / max_video_bytes
    "video_budget",  # decoding needed more than max_decode_frames / max_decode_seconds
    "edit_size_mismatch",  # source and target of an edit pair differ in size (edit_size_mismatch=quarantine)
    "processing_error",  # an unexpected exception while processing (a bug or an exotic file)
)

T2I_TEMPLATES = (
    "Generate an image of {}.",
    "Create an image of {}.",
    "Draw {}.",
    "Show me a picture of {}.",
)
NEXT_FRAME_PROMPTS = ("What happens next?", "Show what happens next.", "Predict the next frames.")
THINK_PROMPT = "Think visually before you answer: {}"
_ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant", "system": None}
_WS = re.compile(r"\s+")
VIDEO_PLACEHOLDER = "<video>"

EDIT_SIZE_MISMATCH = ("resize", "quarantine")


@dataclass(frozen=True)
class Converter:
    """Turns raw records of one kind (a reader's ``KIND``) into samples of one family."""

    fn: Callable[..., Any]  # (raw, cfg, video, frames, sid) -> _Work; raises Reject
    family: str


# record kind -> converter, filled by ``@converter`` where each converter is defined (below)
CONVERTERS: dict[str, Converter] = {}


def converter(kind: str, family: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as the converter of records of ``kind``."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if kind in CONVERTERS:
            raise ValueError(f"two converters for record kind {kind!r}")
        CONVERTERS[kind] = Converter(fn, family)
        return fn

    return register


@dataclass(kw_only=True)
class CurateConfig:
    """How records are validated, resized, filtered, deduplicated and split (one per curation stage)."""

    image_size: int = 32  # output side in px, square (toy world renders 32; 384 for SigLIP so400m at paper scale)
    resize: str = "center_crop"  # center_crop: fill the square (generation targets); pad: keep the whole picture
    image_format: str = "png"  # shard encoding: png (lossless, small for toy images) | jpg | webp (lossless)
    allowed_formats: list[str] = field(default_factory=lambda: ["JPEG", "PNG", "WEBP"])  # PIL decoders tried; fewer = less attack surface
    min_side: int = 16  # reject originals whose shorter side is below this (px): upscaled thumbnails teach blur
    max_aspect: float = 3.0  # reject long/short side ratios above this: a crop to square would lose most of it
    max_pixels: int = 50_000_000  # decompression-bomb guard from the header; 20000x20000 (4e8) is refused
    min_caption_chars: int = 3  # t2i captions / edit instructions shorter than this are noise
    max_caption_chars: int = 1000  # ... longer ones are usually scraped page text, not a caption
    max_text_chars: int = 16000  # conversation text cap (chars); bounds sequence length before tokenizing
    heldout_fraction: float = 0.1  # share of sample ids held out for evaluation (by hash of the id, stable)
    # contamination guard, beyond identical pixels: a train image is a near copy of a held-out one
    # when their 64-bit pHashes are within phash_max_distance bits (candidate search) AND their
    # 16x16 thumbnails differ by at most near_copy_max_diff levels everywhere (verification).
    # pHash alone is grey and coarse: on the toy world (32 px, one shape) it flags about half the
    # train images against a held-out scene that only shares the layout. Measured on toy-world
    # generation images: JPEG q50-90 re-encodes of one picture stay within 64 levels 95% of the
    # time; pHash-colliding different scenes exceed it 99.2% of the time
    phash_max_distance: int = 4  # bits of 64; 0 = identical pHash only
    near_copy_max_diff: int = 64  # 0-255 levels; lower misses more re-encodes, higher drops lookalikes
    dedup: str = "sample"  # exact dedup key: sample (images + text) | images (same picture = duplicate, for t2i)
    max_image_bytes: int = 64 * 2**20  # an image file larger than this is file_too_large (never read); 4K PNGs are ~25 MB
    # an edit pair whose source and target differ in size: "resize" the target to the source's size
    # (then both get the same crop and resize), or "quarantine" it (edit_size_mismatch)
    edit_size_mismatch: str = "resize"

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 4096:
            raise ValueError(f"image_size={self.image_size}: use 8..4096 px")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize={self.resize!r}: use one of {RESIZE_MODES}")
        if self.image_format not in ENCODE_FORMATS:
            raise ValueError(f"image_format={self.image_format!r}: use one of {sorted(ENCODE_FORMATS)}")
        bad = [f for f in self.allowed_formats if f not in PIL_FORMATS]
        if bad or not self.allowed_formats:
            raise ValueError(f"allowed_formats={self.allowed_formats}: use a non-empty subset of {PIL_FORMATS}")
        if self.min_side < 1 or not self.max_aspect >= 1:
            raise ValueError(f"min_side={self.min_side}, max_aspect={self.max_aspect}: need min_side >= 1 and max_aspect >= 1")
        if self.max_pixels < self.image_size**2:
            raise ValueError(f"max_pixels={self.max_pixels}: must be at least image_size**2")
        if not 0 <= self.min_caption_chars <= self.max_caption_chars:
            raise ValueError(f"min_caption_chars={self.min_caption_chars}, max_caption_chars={self.max_caption_chars}: need 0 <= min <= max")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}: use [0, 1)")
        if not 0 <= self.phash_max_distance <= 16:
            raise ValueError(f"phash_max_distance={self.phash_max_distance}: use 0..16 bits (of 64)")
        if not 0 <= self.near_copy_max_diff <= 255:
            raise ValueError(f"near_copy_max_diff={self.near_copy_max_diff}: use 0..255 levels")
        if self.dedup not in ("sample", "images"):
            raise ValueError(f"dedup={self.dedup!r}: use 'sample' or 'images'")
        if self.max_image_bytes < 1024:
            raise ValueError(f"max_image_bytes={self.max_image_bytes}: use at least 1024 bytes")
        if self.edit_size_mismatch not in EDIT_SIZE_MISMATCH:
            raise ValueError(f"edit_size_mismatch={self.edit_size_mismatch!r}: use one of {EDIT_SIZE_MISMATCH}")


@dataclass(kw_only=True)
class FramePredictionConfig:
    prompt_frames: int = 2  # frames shown in the prompt; the remaining sampled frames (>= 1) are the response

    def __post_init__(self) -> None:
        if self.prompt_frames < 1:
            raise ValueError(f"prompt_frames={self.prompt_frames}: must be >= 1")


# --- per-record processing -------------------------------------------------------------------------

@functools.cache
def processed_schema() -> pa.Schema:
    import pyarrow as pa  # here, not at the top: `metamorph plan` imports this module

    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("rid", pa.string()),
            ("locator", pa.string()),
            ("order", pa.string()),
            ("reason", pa.string()),
            ("detail", pa.string()),
            ("family", pa.string()),
            ("task", pa.string()),
            ("sample", pa.string()),  # Sample JSON with split "train"; "" when rejected
            ("sample_heldout", pa.string()),  # the same with split "heldout" (the split is decided later)
            ("images", pa.list_(pa.binary())),
            ("sha", pa.list_(pa.string())),
            ("phash", pa.list_(pa.int64())),
            ("thumb", pa.list_(pa.binary())),  # 16x16 RGB thumbnails: near-copy verification
            ("content_hash", pa.string()),
            ("nbytes", pa.int64()),
            ("n_decoded", pa.int32()),  # images/frames decoded (throughput), also for rejected records
        ]
    )



def sample_id(source: str, rid: str, locator: str) -> str:
    return f"{source}-{rid}" if rid else f"{source}-@{locator}"


@dataclass
class _Work:
    """What a converter produces: the sample (split unset) and its output images in order."""

    sample: Sample
    images: list[Image.Image]
    n_decoded: int
    # the record's own text for exact dedup: not the id-chosen template, so two copies of one
    # record under different ids still collide
    text_key: str


def _load(ref: dict[str, Any], blobs: list[bytes], what: str, cfg: CurateConfig) -> bytes:
    if "blob" in ref:
        if len(blobs[ref["blob"]]) > cfg.max_image_bytes:
            raise Reject("file_too_large", f"{what}: {len(blobs[ref['blob']])} bytes > max_image_bytes={cfg.max_image_bytes}")
        return blobs[ref["blob"]]
    return read_media(ref, cfg.max_image_bytes, what, "image_missing")


def _image(data: bytes, cfg: CurateConfig, draft: bool = True) -> Image.Image:
    return open_image(
        data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, max_aspect=cfg.max_aspect,
        formats=tuple(cfg.allowed_formats), draft_side=cfg.image_size if draft else None,
    )


def _pick(options: tuple[str, ...], sid: str) -> str:
    """A template chosen by the id, so a rerun phrases every sample the same way."""
    return options[int(hashlib.sha1(sid.encode()).hexdigest()[:8], 16) % len(options)]


_REDUNDANT_PREFIX = re.compile(r"^(an image of|a picture of|an illustration of)\s+", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """One line, no final period, no "an image of" (the template says it), lower-case start."""
    text = _WS.sub(" ", text).strip().rstrip(".").strip()
    text = _REDUNDANT_PREFIX.sub("", text)
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]  # "A red circle" -> "Generate an image of a red circle."
    return text


def _nonempty(text: str, what: str, max_chars: Optional[int] = None) -> str:
    """A stripped, non-empty text field (``empty_text``), at most ``max_chars`` (``text_too_long``)."""
    text = _utf8(text, what).strip()
    if not text:
        raise Reject("empty_text", f"{what} is empty")
    if max_chars is not None and len(text) > max_chars:
        raise Reject("text_too_long", f"{what} has {len(text)} chars > max_text_chars={max_chars}")
    return text


def _utf8(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("non_utf8_text", f"{what} holds an unpaired surrogate") from None
    return text


def _frames(video: dict[str, Any], vcfg: VideoConfig, cfg: CurateConfig, start: float = 0.0, end: Optional[float] = None) -> list[Image.Image]:
    path = video.get("path")
    if path is None:  # ssv2/howto100m: the first existing candidate extension
        cands = video.get("candidates", [])
        path = next((c for c in cands if os.path.lexists(c)), cands[0] if cands else "")
    # containment, regular file and size checked before PyAV sees the path
    check_media(path, video.get("root"), vcfg.max_video_bytes, "video", "video_missing")
    frames = sample_frames(
        path, fps=vcfg.fps, max_frames=vcfg.max_frames, start=start, end=end, max_pixels=cfg.max_pixels,
        max_decode_frames=vcfg.max_decode_frames, max_decode_seconds=vcfg.max_decode_seconds,
    )
    w, h = frames[0].size
    check_size(w, h, min_side=cfg.min_side, max_aspect=cfg.max_aspect)
    return frames


def _chat(conversations: list[dict[str, str]], cfg: CurateConfig) -> list[Turn]:
    """LLaVA turns as user/assistant turns: system turns dropped (the tokenizer's template adds
    its own), roles checked to start with the user, alternate, and end with the assistant."""
    turns: list[Turn] = []
    for i, t in enumerate(conversations):
        role = _ROLE.get(t["from"].strip().lower(), "?")
        if role == "?":
            raise Reject("bad_conversation", f"turn {i}: unknown role {t['from']!r}")
        if role is not None:
            turns.append(Turn(role=role, content=_utf8(t["value"], f"turn {i}")))
    if not turns or turns[0].role != "user" or turns[-1].role != "assistant":
        raise Reject("bad_conversation", "a conversation must start with the user and end with the assistant")
    if any(a.role == b.role for a, b in zip(turns, turns[1:])):
        raise Reject("bad_conversation", "turns must alternate user/assistant")
    if any(IMAGE_PLACEHOLDER in t.content or VIDEO_PLACEHOLDER in t.content for t in turns if t.role == "assistant"):
        raise Reject("bad_conversation", "an <image>/<video> placeholder in an answer (understanding data has prompt images only)")
    if sum(len(t.content) for t in turns) > cfg.max_text_chars:
        raise Reject("text_too_long", f"conversation longer than max_text_chars={cfg.max_text_chars}")
    return turns


def _check_turn_text(turns: list[Turn]) -> None:
    for t in turns:
        text = t.content.replace(IMAGE_PLACEHOLDER, "").strip()
        if not text and (t.role == "assistant" or IMAGE_PLACEHOLDER not in t.content):
            raise Reject("empty_text", f"an empty {t.role} turn")


@converter("llava", family="understanding")
def _llava(raw: RawRecord, cfg: CurateConfig, video: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    p = raw.payload
    turns = _chat(p["conversations"], cfg)
    if any(VIDEO_PLACEHOLDER in t.content for t in turns):
        raise Reject("image_placeholder_mismatch", "a <video> placeholder in a record without a video")
    n_img = len(p["images"])
    n_ph = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
    if n_ph == 0 and n_img:
        # LLaVA's own loader does this for records that omit the placeholder
        turns[0] = Turn(role="user", content=IMAGE_PLACEHOLDER * n_img + "\n" + turns[0].content)
    elif n_ph != n_img:
        raise Reject("image_placeholder_mismatch", f"{n_ph} <image> placeholders for {n_img} images")
    _check_turn_text(turns)
    images = [resize(_image(_load(ref, raw.blobs, f"image[{i}]", cfg), cfg), cfg.image_size, cfg.resize) for i, ref in enumerate(p["images"])]
    sample = Sample(
        id=sid, source=raw.source, family="understanding", task="image_qa", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role="prompt") for _ in images], meta=dict(p.get("meta") or {}),
    )
    return _Work(sample, images, len(images), json.dumps([[t.role, t.content] for t in turns], ensure_ascii=False))


@converter("videoqa", family="understanding")
def _videoqa(raw: RawRecord, cfg: CurateConfig, vcfg: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    """A LLaVA-layout conversation about a video: its one ``<video>`` (or ``<image>``) placeholder
    becomes one ``<image>`` per sampled frame (none: the frames go before the first question)."""
    p = raw.payload
    turns = _chat(p["conversations"], cfg)
    marks = [(i, ph) for i, t in enumerate(turns) for ph in (VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER) for _ in range(t.content.count(ph))]
    if len(marks) > 1:
        raise Reject("image_placeholder_mismatch", f"{len(marks)} <video>/<image> placeholders for one video")
    _check_turn_text([Turn(role=t.role, content=t.content.replace(VIDEO_PLACEHOLDER, IMAGE_PLACEHOLDER)) for t in turns])
    frames = [resize(f, cfg.image_size, cfg.resize) for f in _frames(p["video"], vcfg, cfg)]
    tokens = IMAGE_PLACEHOLDER * len(frames)
    if marks:
        i, ph = marks[0]
        turns[i] = Turn(role="user", content=turns[i].content.replace(ph, tokens, 1))
    else:
        turns[0] = Turn(role="user", content=tokens + "\n" + turns[0].content)
    meta = {**(p.get("meta") or {}), "n_frames": len(frames)}
    sample = Sample(
        id=sid, source=raw.source, family="understanding", task="video_qa", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role="prompt") for _ in frames], meta=meta,
    )
    text = [[t.role, t.content.replace(tokens, VIDEO_PLACEHOLDER)] for t in turns]
    return _Work(sample, frames, len(frames), json.dumps(text, ensure_ascii=False))


def _caption_ok(text: str, cfg: CurateConfig, what: str) -> str:
    text = _nonempty(text, what)
    if not cfg.min_caption_chars <= len(text) <= cfg.max_caption_chars:
        raise Reject("caption_length", f"{what} has {len(text)} chars, outside [{cfg.min_caption_chars}, {cfg.max_caption_chars}]")
    return text


@converter("t2i", family="generation")
def _t2i(raw: RawRecord, cfg: CurateConfig, video: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    p = raw.payload
    caption = _caption_ok(clean_caption(_utf8(p["caption"], "caption")), cfg, "caption")
    img = resize(_image(_load(p["image"], raw.blobs, "image", cfg), cfg), cfg.image_size, cfg.resize)
    turns = [Turn(role="user", content=_pick(T2I_TEMPLATES, sid).format(caption)), Turn(role="assistant", content=IMAGE_PLACEHOLDER)]
    meta = {**(p.get("meta") or {}), "caption": p["caption"].strip()}
    sample = Sample(
        id=sid, source=raw.source, family="generation", task="t2i", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role="response")], meta=meta,
    )
    return _Work(sample, [img], 1, caption)


@converter("clip", family="video")
def _clip(raw: RawRecord, cfg: CurateConfig, vcfg: VideoConfig, fp: FramePredictionConfig, sid: str) -> _Work:
    p = raw.payload
    label = _nonempty(p["label"], "label", cfg.max_text_chars)
    frames = _frames(p["video"], vcfg, cfg, start=p.get("start", 0.0), end=p.get("end"))
    if len(frames) < fp.prompt_frames + 1:
        raise Reject("video_too_short", f"{len(frames)} frames at fps={vcfg.fps}; frame prediction needs prompt_frames+1={fp.prompt_frames + 1}")
    frames = [resize(f, cfg.image_size, cfg.resize) for f in frames]
    k = fp.prompt_frames
    turns = [
        Turn(role="user", content=IMAGE_PLACEHOLDER * k + "\n" + _pick(NEXT_FRAME_PROMPTS, sid)),
        Turn(role="assistant", content=label + "\n" + IMAGE_PLACEHOLDER * (len(frames) - k)),
    ]
    meta = {**(p.get("meta") or {}), "label": label, "prompt_frames": k, "n_frames": len(frames)}
    roles = ["prompt"] * k + ["response"] * (len(frames) - k)
    sample = Sample(
        id=sid, source=raw.source, family="video", task="frame_prediction", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role=r) for r in roles], meta=meta,
    )
    return _Work(sample, frames, len(frames), json.dumps([label, k], ensure_ascii=False))


def bbox_xyxy(bbox: list[float], fmt: str, width: int, height: int) -> tuple[float, float, float, float]:
    """The box as (x1, y1, x2, y2) pixels, checked against the image; 0.5 px slack for rounding."""
    x1, y1, x2, y2 = _xyxy(bbox, fmt)
    if not (x2 > x1 and y2 > y1):
        raise Reject("bad_bbox", f"bbox {bbox} ({fmt}) has no area")
    slack = 0.5
    if x1 < -slack or y1 < -slack or x2 > width + slack or y2 > height + slack:
        raise Reject("bbox_out_of_bounds", f"bbox {bbox} ({fmt}) outside the {width}x{height} image")
    return max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))


def _xyxy(bbox: list[float], fmt: str) -> tuple[float, float, float, float]:
    if fmt == "xywh":
        x, y, w, h = bbox
        return x, y, x + w, y + h
    x1, y1, x2, y2 = bbox
    return x1, y1, x2, y2


def union_box(boxes: list[list[float]], fmt: str) -> list[float]:
    """The union of several boxes as xyxy, as Visual-CoT's conversion merges them."""
    xy = [_xyxy(b, fmt) for b in boxes]
    return [min(b[0] for b in xy), min(b[1] for b in xy), max(b[2] for b in xy), max(b[3] for b in xy)]


def unsquare_box(norm: list[float], width: int, height: int) -> list[float]:
    """Invert Visual-CoT's normalisation of a pixel box: the official conversion shifts the box as
    if the image were padded to a square (the short axis by ``(long - short) // 2`` px, integer
    division), divides by the long side and prints ``%0.3f``."""
    side = max(width, height)
    # the official boxes are whole pixels printed with 3 decimals: a value within that rounding
    # (0.0005 x side) of a whole pixel is that pixel, so the text inverts to the exact box
    tol = 0.0005 * side + 1e-9
    x1, y1, x2, y2 = (float(round(v * side)) if abs(v * side - round(v * side)) <= tol else v * side for v in norm)
    if width > height:
        shift = (width - height) // 2
        return [x1, y1 - shift, x2, y2 - shift]
    shift = (height - width) // 2
    return [x1 - shift, y1, x2 - shift, y2]


@converter("viscot", family="visual_thinking")
def _viscot(raw: RawRecord, cfg: CurateConfig, video: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    p = raw.payload
    question = _nonempty(p["question"], "question", cfg.max_text_chars)
    answer = _nonempty(p["answer"], "answer", cfg.max_text_chars)
    original = _image(_load(p["image"], raw.blobs, "image", cfg), cfg, draft=False)  # bbox is in original pixels
    w, h = original.size
    if p.get("bbox_norm_square") is not None:
        box = unsquare_box(p["bbox_norm_square"], w, h)
    else:
        box = union_box(p["bboxes"], p["bbox_format"])
        if p.get("bbox_size"):  # boxes are in width x height pixels: scale to the decoded image
            sx, sy = w / p["bbox_size"][0], h / p["bbox_size"][1]
            box = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    x1, y1, x2, y2 = bbox_xyxy(box, "xyxy", w, h)
    crop = original.crop((int(x1), int(y1), max(int(x1) + 1, round(x2)), max(int(y1) + 1, round(y2))))
    # pad, not crop-to-fill: the box is the evidence, none of it may be cut away
    images = [resize(original, cfg.image_size, cfg.resize), resize(crop, cfg.image_size, "pad")]
    turns = [
        Turn(role="user", content=IMAGE_PLACEHOLDER + "\n" + THINK_PROMPT.format(question)),
        Turn(role="assistant", content=IMAGE_PLACEHOLDER + "\n" + answer),
    ]
    meta = {**(p.get("meta") or {}), "bbox_xyxy": [x1, y1, x2, y2], "bbox_norm": [x1 / w, y1 / h, x2 / w, y2 / h], "answer": answer}
    sample = Sample(
        id=sid, source=raw.source, family="visual_thinking", task="visual_thinking", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role="prompt"), ImageRef(ext=cfg.image_format, role="response")], meta=meta,
    )
    return _Work(sample, images, 1, json.dumps([question, answer, [x1, y1, x2, y2]], ensure_ascii=False))


@converter("edit", family="image_edit")
def _edit(raw: RawRecord, cfg: CurateConfig, video: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    """Source and target get one geometric transform: the crop box and resize are computed once,
    from the source's size, and applied to both, so a pixel of one lands where it does in the other."""
    from PIL import Image

    p = raw.payload
    instruction = _caption_ok(_WS.sub(" ", p["edit_prompt"]).strip(), cfg, "edit_prompt")
    # no draft decode: a JPEG source and a PNG target must come out at the same size
    before = _image(_load(p["original"], raw.blobs, "original_image", cfg), cfg, draft=False)
    after = _image(_load(p["edited"], raw.blobs, "edited_image", cfg), cfg, draft=False)
    if after.size != before.size:
        if cfg.edit_size_mismatch == "quarantine":
            raise Reject("edit_size_mismatch", f"source {before.size[0]}x{before.size[1]}, target {after.size[0]}x{after.size[1]}")
        after = after.resize(before.size, Image.Resampling.BICUBIC, reducing_gap=2.0)
    before, after = resize_pair(before, after, cfg.image_size, cfg.resize)
    turns = [Turn(role="user", content=IMAGE_PLACEHOLDER + "\n" + instruction), Turn(role="assistant", content=IMAGE_PLACEHOLDER)]
    meta = {**(p.get("meta") or {}), "original_prompt": p.get("original_prompt", ""), "edited_prompt": p.get("edited_prompt", "")}
    sample = Sample(
        id=sid, source=raw.source, family="image_edit", task="image_edit", split="train", conversation=turns,
        images=[ImageRef(ext=cfg.image_format, role="prompt"), ImageRef(ext=cfg.image_format, role="response")], meta=meta,
    )
    return _Work(sample, [before, after], 2, instruction)


def _convert(raw: RawRecord, cfg: CurateConfig, video: VideoConfig, frames: FramePredictionConfig, sid: str) -> _Work:
    conv = CONVERTERS.get(raw.kind)
    if conv is None:
        raise ValueError(f"no converter for record kind {raw.kind!r} (known: {sorted(CONVERTERS)})")
    return conv.fn(raw, cfg, video, frames, sid)


def process_record(
    raw: RawRecord,
    cfg: CurateConfig,
    video: Optional[VideoConfig] = None,
    frames: Optional[FramePredictionConfig] = None,
) -> dict[str, Any]:
    """One row of ``processed_schema()``: a curated sample with encoded images, or a rejection."""
    sid = sample_id(raw.source, raw.rid, raw.locator)
    row: dict[str, Any] = {
        "id": sid, "source": raw.source, "rid": raw.rid, "locator": raw.locator, "order": raw.order,
        "reason": raw.reason, "detail": raw.detail, "family": CONVERTERS[raw.kind].family if raw.kind in CONVERTERS else "", "task": "",
        "sample": "", "sample_heldout": "", "images": [], "sha": [], "phash": [], "thumb": [], "content_hash": "", "nbytes": 0, "n_decoded": 0,
    }
    if raw.reason:
        return row
    try:
        work = _convert(raw, cfg, video or VideoConfig(), frames or FramePredictionConfig(), sid)
        work.sample.validate()
        for t in work.sample.conversation:
            t.content.encode("utf-8")  # lone surrogates from JSON escapes fail here, not in the writer
    except Reject as r:
        row.update(reason=r.reason, detail=r.detail)
        return row
    except UnicodeEncodeError:
        row.update(reason="non_utf8_text", detail="text holds an unpaired surrogate")
        return row
    except Exception as e:  # noqa: BLE001 - one exotic file must not fail a multi-hour stage
        row.update(reason="processing_error", detail=f"{type(e).__name__}: {e}"[:500])
        return row
    payloads = [encode(img, cfg.image_format) for img in work.images]
    shas = [content_sha(b) for b in payloads]
    sigs = [signature(img) for img in work.images]
    # both encodings now: the shard writers then copy bytes, never re-parse
    record, record_heldout = dumps_splits(work.sample, ("train", "heldout"))
    content = hashlib.sha256()
    if cfg.dedup == "sample":
        content.update(f"{work.sample.task}\n{work.text_key}\n".encode())
    for s in shas:
        content.update(s.encode())
    row.update(
        task=work.sample.task,
        sample=record.decode("utf-8"),
        sample_heldout=record_heldout.decode("utf-8"),
        images=payloads,
        sha=shas,
        phash=[p for p, _ in sigs],
        thumb=[t for _, t in sigs],
        content_hash=content.hexdigest(),
        nbytes=len(record) + sum(len(b) for b in payloads),
        n_decoded=work.n_decoded,
    )
    return row


# --- stage-wide decisions ----------------------------------------------------------------------------


def split_of(sid: str, heldout_fraction: float) -> str:
    """Stable split by hash of the sample id: the same id lands in the same split in every run."""
    u = int(hashlib.sha256(sid.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64
    return "heldout" if u < heldout_fraction else "train"


@dataclass
class Decisions:
    keep: dict[tuple[str, str], str]  # (id, order) -> split, for samples to write
    rejects: list[dict[str, Any]]  # quarantine rows: source, id, locator, order, reason, detail
    stats: dict[str, float]


ThumbFetcher = Callable[[set[str]], dict[str, list[bytes]]]


def decide(
    rows: list[dict[str, Any]],
    *,
    heldout_fraction: float,
    phash_max_distance: int,
    near_copy_max_diff: int,
    thumbs: ThumbFetcher,
) -> Decisions:
    """Dedup, split and contamination-guard the processed rows (metadata only, no image bytes).

    ``rows`` carry: id, source, locator, order, reason, detail, content_hash, sha, phash.
    ``thumbs(ids)`` returns the thumbnails of those sample ids; it is called once, only for the
    few pHash candidates, so the driver never holds every thumbnail. Ties resolve by
    (id, order), so the result does not depend on worker scheduling."""
    rejects = [_reject(r, r["reason"], r["detail"]) for r in rows if r["reason"]]
    ok = sorted((r for r in rows if not r["reason"]), key=lambda r: (r["id"], r["order"]))
    first_of: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    last_id = None
    for r in ok:
        if r["id"] == last_id:
            rejects.append(_reject(r, "duplicate_id", f"id {r['id']} seen earlier in the stage"))
            continue
        last_id = r["id"]
        if r["content_hash"] in first_of:
            rejects.append(_reject(r, "duplicate", f"same content as {first_of[r['content_hash']]}"))
            continue
        first_of[r["content_hash"]] = r["id"]
        kept.append(r)
    split = {r["id"]: split_of(r["id"], heldout_fraction) for r in kept}
    held = [r for r in kept if split[r["id"]] == "heldout"]
    train = [r for r in kept if split[r["id"]] == "train"]
    guard = ContaminationGuard(phash_max_distance=phash_max_distance, near_copy_max_diff=near_copy_max_diff)
    for r in held:
        guard.add_heldout(r["id"], r["sha"], r["phash"])
    hits = guard.check([(r["id"], r["sha"], r["phash"]) for r in train], thumbs)
    keep: dict[tuple[str, str], str] = {}
    for r in kept:
        if r["id"] in hits:
            rejects.append(_reject(r, "contamination", hits[r["id"]]))
        else:
            keep[(r["id"], r["order"])] = split[r["id"]]
    rejects.sort(key=lambda q: (q["order"], q["id"]))
    return Decisions(keep=keep, rejects=rejects, stats=guard.stats())


class ContaminationGuard:
    """Held-out images in, training samples checked: exact pixels, then pHash + thumbnail near copies.

    Used per stage (``decide``) and across families by ``mix``."""

    def __init__(self, *, phash_max_distance: int, near_copy_max_diff: int) -> None:
        self.near_copy_max_diff = near_copy_max_diff
        self._sha: dict[str, str] = {}
        self._index = HammingIndex(phash_max_distance)
        self._n_heldout = 0
        self._checked = 0
        self._candidates = 0

    def add_heldout(self, sid: str, shas: list[str], phashes: list[int]) -> None:
        for i, (s, p) in enumerate(zip(shas, phashes)):
            self._sha.setdefault(s, sid)
            self._index.add(p, (sid, i))
            self._n_heldout += 1

    def check(self, train: list[tuple[str, list[str], list[int]]], thumbs: ThumbFetcher) -> dict[str, str]:
        """{train id: why} for every contaminated training sample."""
        hits: dict[str, str] = {}
        pending: dict[str, list[tuple[int, str, int, int]]] = {}  # id -> (image, held id, held image, bits)
        near = self._index.query_many([p for _, _, phashes in train for p in phashes])
        k = 0
        for sid, shas, phashes in train:
            for i, s in enumerate(shas):
                self._checked += 1
                if s in self._sha:
                    hits[sid] = f"image {i} has the pixels of held-out {self._sha[s]}"
                    break
                for (hid, hi), bits in near[k + i]:
                    pending.setdefault(sid, []).append((i, hid, hi, bits))
            k += len(phashes)
        pending = {k: v for k, v in pending.items() if k not in hits}
        self._candidates = sum(len(v) for v in pending.values())
        if pending:
            need = set(pending) | {hid for v in pending.values() for _, hid, _, _ in v}
            th = thumbs(need)
            order = sorted(pending.items())
            pairs = [(th[sid][i], th[hid][hi]) for sid, cands in order for i, hid, hi, _ in cands]
            diffs = iter(thumb_max_diffs(pairs))
            for sid, cands in order:
                for (i, hid, hi, bits), diff in zip(cands, diffs):
                    if diff <= self.near_copy_max_diff and sid not in hits:
                        hits[sid] = f"image {i} is a near copy of held-out {hid} image {hi} (pHash {bits} bits, thumbnail max diff {diff})"
        return hits

    def stats(self) -> dict[str, float]:
        return {
            "contamination/heldout_images": self._n_heldout,
            "contamination/checked_images": self._checked,
            "contamination/phash_candidates": self._candidates,
        }


def _reject(r: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    return {"source": r["source"], "id": r["id"], "locator": r["locator"], "order": r["order"], "reason": reason, "detail": detail}
