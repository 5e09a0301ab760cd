"""Record curation (decode, validate, convert) and the stage-wide dedup/split/contamination rules.

    python -m pytest tests/unit/test_curate.py -q

Every bad-input reason of the issue has its own assertion here; the stage-level count check
(out + quarantined = in) is in tests/integration/test_curation_stages.py.
"""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from metamorph.data.curate import (
    NEXT_FRAME_PROMPTS,
    T2I_TEMPLATES,
    _pick,
    CurateConfig,
    FramePredictionConfig,
    decide,
    process_record,
    split_of,
)
from metamorph.data.imageproc import HammingIndex, hamming, phash
from metamorph.data.readers import RawRecord, SourceConfig, read_source
from metamorph.data.schema import Sample
from metamorph.data.video import VideoConfig, sample_frames
from tests.unit.curation_fixtures import bomb_png, encode, jpg, png, scene, truncated, webp, write_jsonl, write_tar, write_video

CFG = CurateConfig(image_size=32, min_side=16)


def raw(kind: str, payload: dict, blobs=(), rid: str = "r1", source: str = "s") -> RawRecord:
    return RawRecord(source=source, rid=rid, locator="test", order="000000:000000001", kind=kind, payload=payload, blobs=list(blobs))


def t2i(data: bytes, caption: str = "a red box", rid: str = "r1") -> RawRecord:
    return raw("t2i", {"caption": caption, "image": {"blob": 0}, "meta": {}}, [data], rid=rid)


def ok(row: dict) -> tuple[Sample, list[Image.Image]]:
    assert row["reason"] == "", f"{row['reason']}: {row['detail']}"
    sample = Sample.from_json(json.loads(row["sample"]))
    sample.validate()
    return sample, [Image.open(io.BytesIO(b)) for b in row["images"]]


def reason(row: dict) -> str:
    return row["reason"]


def llava(tmp_path, conversations, images=("a.png",), files=None) -> RawRecord:
    for name, data in (files or {"a.png": png(0)}).items():
        (tmp_path / name).write_bytes(data)
    obj = {"id": "q1", "conversations": conversations}
    if images:
        obj["image"] = list(images)
    (rec,) = read_source(SourceConfig(name="s", format="llava", path=str(write_jsonl(tmp_path / "l.jsonl", [obj]))))
    return rec


QA = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


# --- formats ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [png(3), jpg(3), webp(3)], ids=["png", "jpg", "webp"])
def test_t2i_format(data):
    sample, images = ok(process_record(t2i(data, "A red box."), CFG))
    assert sample.task == "t2i" and sample.family == "generation"
    assert sample.conversation[0].role == "user" and sample.conversation[1].content == "<image>"
    assert sample.conversation[0].content in {t.format("a red box") for t in T2I_TEMPLATES}
    assert [i.role for i in sample.images] == ["response"] and sample.images[0].ext == "png"
    assert images[0].size == (32, 32) and images[0].format == "PNG"
    assert sample.meta["caption"] == "A red box."


def test_t2i_template_is_stable_and_varies():
    prompts = {process_record(t2i(png(0), rid=f"r{i}"), CFG)["sample"] for i in range(20)}
    firsts = {json.loads(p)["conversation"][0]["content"].split(" a red box")[0] for p in prompts}
    assert len(firsts) > 1  # more than one template in use
    assert process_record(t2i(png(0), rid="r7"), CFG)["sample"] == process_record(t2i(png(0), rid="r7"), CFG)["sample"]


def test_image_qa_keeps_turns_and_marks_prompt_images(tmp_path):
    sample, images = ok(process_record(llava(tmp_path, QA), CFG))
    assert sample.task == "image_qa" and [t.role for t in sample.conversation] == ["user", "assistant"]
    assert sample.conversation[0].content == "<image>\nWhat colour?" and sample.images[0].role == "prompt"


def test_image_qa_adds_missing_placeholder(tmp_path):
    conv = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]
    sample, _ = ok(process_record(llava(tmp_path, conv), CFG))
    assert sample.conversation[0].content == "<image>\nWhat colour?"


def test_image_qa_multi_turn_and_text_only(tmp_path):
    conv = QA + [{"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "square"}]
    sample, _ = ok(process_record(llava(tmp_path, conv), CFG))
    assert len(sample.conversation) == 4
    sample, images = ok(process_record(llava(tmp_path, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], images=()), CFG))
    assert images == [] and sample.images == []


def test_pad_keeps_whole_picture_center_crop_fills(tmp_path):
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    data = encode(wide)
    _, (padded,) = ok(process_record(t2i(data), CurateConfig(resize="pad")))
    _, (cropped,) = ok(process_record(t2i(data), CurateConfig(resize="center_crop")))
    assert padded.convert("RGB").getpixel((16, 0)) == (0, 0, 0)  # border
    assert cropped.convert("RGB").getpixel((16, 0)) == (255, 0, 0)


def _video_record(tmp_path, kind="videoqa", name="v.mp4", codec="mpeg4", n_frames=16, fps=8, **extra):
    path = tmp_path / name
    if codec:
        write_video(path, n_frames=n_frames, fps=fps, codec=codec)
    if kind == "videoqa":
        conv = [{"from": "human", "value": "<video>\nWhich way?"}, {"from": "gpt", "value": "right"}]
        return raw("videoqa", {"video": {"path": str(path)}, "conversations": conv, "meta": {}})
    return raw("clip", {"video": {"candidates": [str(path)]}, "label": "Moving box from left to right", "meta": {}, **extra})


@pytest.mark.parametrize("name,codec", [("v.mp4", "mpeg4"), ("v.webm", "libvpx")])
def test_video_qa_frames_at_fps(tmp_path, name, codec):
    rec = _video_record(tmp_path, name=name, codec=codec)  # 16 frames at 8 fps = 2 s
    sample, frames = ok(process_record(rec, CFG, VideoConfig(fps=2.0, max_frames=8)))
    assert sample.task == "video_qa" and len(frames) == 4 and sample.meta["n_frames"] == 4
    assert sample.conversation[0].content == "<image>" * 4 + "\nWhich way?"
    assert all(i.role == "prompt" for i in sample.images)


def test_video_frames_capped(tmp_path):
    rec = _video_record(tmp_path)
    _, frames = ok(process_record(rec, CFG, VideoConfig(fps=8.0, max_frames=5)))
    assert len(frames) == 5
    # sampled frames follow the moving box: distinct pictures
    assert len({f.tobytes() for f in frames}) == 5


def test_sample_frames_clip_range(tmp_path):
    path = write_video(tmp_path / "v.mp4", n_frames=24, fps=8)  # 3 s
    frames = sample_frames(str(path), fps=4, max_frames=100, start=1.0, end=2.0)
    assert len(frames) == 4


def test_frame_prediction(tmp_path):
    rec = _video_record(tmp_path, kind="clip")
    sample, frames = ok(process_record(rec, CFG, VideoConfig(fps=2.0, max_frames=8), FramePredictionConfig(prompt_frames=2)))
    assert sample.task == "frame_prediction" and len(frames) == 4
    assert [i.role for i in sample.images] == ["prompt", "prompt", "response", "response"]
    user, asst = sample.conversation
    assert user.content.startswith("<image><image>\n") and "next" in user.content.lower()
    assert asst.content == "Moving box from left to right\n<image><image>"


def test_frame_prediction_too_short(tmp_path):
    rec = _video_record(tmp_path, kind="clip", n_frames=8)  # 1 s at fps 2: 2 frames < prompt 2 + 1
    assert reason(process_record(rec, CFG, VideoConfig(fps=2.0), FramePredictionConfig(prompt_frames=2))) == "video_too_short"


def _viscot(tmp_path, bbox, fmt="xyxy", size=64):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste((255, 0, 0), (10, 20, 30, 40))  # the red region the box points at
    (tmp_path / "x.png").write_bytes(encode(img))
    return raw("viscot", {"image": {"path": str(tmp_path / "x.png")}, "question": "What colour is the small box?",
                          "answer": "red", "bboxes": [bbox], "bbox_format": fmt, "meta": {}})


@pytest.mark.parametrize("bbox,fmt", [([10, 20, 30, 40], "xyxy"), ([10, 20, 20, 20], "xywh")])
def test_visual_thinking_crop(tmp_path, bbox, fmt):
    sample, (full, crop) = ok(process_record(_viscot(tmp_path, bbox, fmt), CFG))
    assert sample.task == "visual_thinking"
    assert sample.conversation[0].content == "<image>\nThink visually before you answer: What colour is the small box?"
    assert sample.conversation[1].content == "<image>\nred"
    assert [i.role for i in sample.images] == ["prompt", "response"]
    assert full.size == crop.size == (32, 32)
    assert np.asarray(crop.convert("RGB"))[4:28, 4:28].mean(axis=(0, 1)).round().tolist() == [255, 0, 0]
    assert sample.meta["bbox_xyxy"] == [10, 20, 30, 40]


def test_image_edit(tmp_path):
    rec = raw("edit", {"original": {"blob": 0}, "edited": {"blob": 1}, "edit_prompt": "make the box blue", "meta": {"t": 1}}, [png(0), png(2)])
    sample, (before, after) = ok(process_record(rec, CFG))
    assert sample.task == "image_edit" and sample.conversation[0].content == "<image>\nmake the box blue"
    assert sample.conversation[1].content == "<image>" and [i.role for i in sample.images] == ["prompt", "response"]
    assert before.tobytes() != after.tobytes() and sample.meta["t"] == 1


# --- every bad-input reason --------------------------------------------------------------------------


def test_reason_image_decode_error_corrupt_bytes():
    assert reason(process_record(t2i(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20), CFG)) == "image_decode_error"


def test_reason_image_decode_error_truncated_bytes():
    assert reason(process_record(t2i(truncated(jpg(1, size=64), 0.6)), CFG)) == "image_decode_error"
    assert reason(process_record(t2i(truncated(png(1, size=64), 0.6)), CFG)) == "image_decode_error"


def test_reason_image_decode_error_zero_length_and_unsupported():
    assert reason(process_record(t2i(b""), CFG)) == "image_decode_error"
    assert reason(process_record(t2i(encode(scene(0), "BMP")), CFG)) == "image_decode_error"  # not in allowed_formats


def test_reason_image_missing(tmp_path):
    rec = llava(tmp_path, QA, images=("nope.png",))
    assert reason(process_record(rec, CFG)) == "image_missing"


def test_reason_decompression_bomb():
    row = process_record(t2i(bomb_png()), CFG)
    assert reason(row) == "decompression_bomb" and "pixels" in row["detail"]
    # below PIL's own hard limit, our header check (max_pixels) is what refuses it
    row = process_record(t2i(bomb_png(4000, 4000)), CurateConfig(max_pixels=10_000_000))
    assert reason(row) == "decompression_bomb" and "4000x4000" in row["detail"]


def test_reason_too_small_and_bad_aspect():
    assert reason(process_record(t2i(encode(Image.new("RGB", (8, 8)))), CFG)) == "too_small"
    assert reason(process_record(t2i(encode(Image.new("RGB", (128, 32)))), CFG)) == "bad_aspect"


def test_reason_caption_length_and_empty_text():
    assert reason(process_record(t2i(png(0), caption="ab"), CFG)) == "caption_length"
    assert reason(process_record(t2i(png(0), caption="x" * 2000), CFG)) == "caption_length"
    assert reason(process_record(t2i(png(0), caption="   "), CFG)) == "empty_text"
    rec = raw("edit", {"original": {"blob": 0}, "edited": {"blob": 1}, "edit_prompt": "", "meta": {}}, [png(0), png(1)])
    assert reason(process_record(rec, CFG)) == "empty_text"


def test_reason_non_utf8_text():
    conv = [{"from": "human", "value": "a\udc80b"}, {"from": "gpt", "value": "x"}]
    rec = raw("videoqa", {"video": {"path": "/nonexistent.mp4"}, "conversations": conv, "meta": {}})
    assert reason(process_record(rec, CFG)) == "non_utf8_text"


def test_reason_llava_conversation_problems(tmp_path):
    assert reason(process_record(llava(tmp_path, [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}]), CFG)) == "bad_conversation"
    assert reason(process_record(llava(tmp_path, [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]), CFG)) == "bad_conversation"
    two = [{"from": "human", "value": "<image><image>\nx"}, {"from": "gpt", "value": "y"}]
    assert reason(process_record(llava(tmp_path, two), CFG)) == "image_placeholder_mismatch"
    empty = [{"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": "  "}]
    assert reason(process_record(llava(tmp_path, empty), CFG)) == "empty_text"
    long = [{"from": "human", "value": "<image>\n" + "x" * 100}, {"from": "gpt", "value": "y"}]
    assert reason(process_record(llava(tmp_path, long), CurateConfig(max_text_chars=50))) == "text_too_long"


def test_reason_video_empty_decode_error_missing(tmp_path):
    vcfg = VideoConfig(fps=2.0)
    (tmp_path / "v.mp4").write_bytes(b"")
    assert reason(process_record(_video_record(tmp_path, codec=None), CFG, vcfg)) == "video_empty"
    (tmp_path / "v.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13garbage" * 500)
    assert reason(process_record(_video_record(tmp_path, codec=None), CFG, vcfg)) == "video_decode_error"
    (tmp_path / "v.mp4").unlink()
    assert reason(process_record(_video_record(tmp_path, codec=None), CFG, vcfg)) == "video_missing"


def test_reason_bbox_out_of_bounds_and_degenerate(tmp_path):
    assert reason(process_record(_viscot(tmp_path, [10, 20, 80, 40]), CFG)) == "bbox_out_of_bounds"
    assert reason(process_record(_viscot(tmp_path, [-5, 20, 30, 40]), CFG)) == "bbox_out_of_bounds"
    # valid as xyxy, but as xywh it runs off the 64 px image: the configured convention decides
    assert reason(process_record(_viscot(tmp_path, [30, 30, 60, 60], fmt="xywh"), CFG)) == "bbox_out_of_bounds"
    assert reason(process_record(_viscot(tmp_path, [30, 30, 30, 40]), CFG)) == "bad_bbox"


def test_unsafe_tar_member_and_truncated_tar_reasons(tmp_path):
    # the reader quarantines them; a reader-rejected record passes through processing unchanged
    write_tar(tmp_path / "00000.tar", [("../x.jpg", jpg(0))])
    (rec,) = read_source(SourceConfig(name="s", format="img2dataset", path=str(tmp_path / "00000.tar")))
    assert reason(process_record(rec, CFG)) == "unsafe_tar_member"


# --- split / dedup / contamination ---------------------------------------------------------------------


def test_split_is_stable_and_near_fraction():
    ids = [f"src-{i}" for i in range(4000)]
    held = [i for i in ids if split_of(i, 0.1) == "heldout"]
    assert 0.08 < len(held) / len(ids) < 0.12
    assert held == [i for i in ids if split_of(i, 0.1) == "heldout"]
    assert all(split_of(i, 0.0) == "train" for i in ids[:100])


def _ids(split: str, n: int, fraction: float = 0.5) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if split_of(f"s-r{i}", fraction) == split:
            out.append(f"r{i}")
        i += 1
    return out


def _decide(rows, fraction=0.5, **kw):
    by_id = {r["id"]: r for r in rows}
    calls = []

    def thumbs(ids):
        calls.append(set(ids))
        return {i: by_id[i]["thumb"] for i in ids}

    params = dict(heldout_fraction=fraction, phash_max_distance=4, near_copy_max_diff=64) | kw
    return decide(rows, thumbs=thumbs, **params), calls


def _with_order(row, k):
    return dict(row, order=f"000000:{k:09d}")


def test_dedup_keeps_first_id_and_flags_duplicate_ids():
    cfg = CurateConfig(dedup="images")
    a, b = _ids("train", 2)
    rows = [
        _with_order(process_record(t2i(png(1), "one caption", rid=b), cfg), 0),
        _with_order(process_record(t2i(png(1), "another caption", rid=a), cfg), 1),  # same picture
        _with_order(process_record(t2i(png(2), rid=a), cfg), 2),  # same id again
    ]
    dec, _ = _decide(rows)
    first = min(a, b)
    assert list(dec.keep) == [(f"s-{first}", rows[0 if first == b else 1]["order"])]
    got = {(q["id"], q["reason"]) for q in dec.rejects}
    assert (f"s-{max(a, b)}", "duplicate") in got and (f"s-{a}", "duplicate_id") in got


def test_sample_dedup_keeps_same_image_with_other_text():
    a, b = _ids("train", 2)
    rows = [_with_order(process_record(t2i(png(1), "one caption", rid=a), CFG), 0),
            _with_order(process_record(t2i(png(1), "other caption", rid=b), CFG), 1)]
    dec, _ = _decide(rows)
    assert len(dec.keep) == 2 and not dec.rejects


def test_sample_dedup_ignores_id_chosen_templates(tmp_path):
    # one clip listed twice under two ids: the prompt template differs by id, the content does not
    rec = _video_record(tmp_path, kind="clip")
    ids = _ids("train", 10)
    a = ids[0]
    b = next(i for i in ids if _pick(NEXT_FRAME_PROMPTS, f"s-{i}") != _pick(NEXT_FRAME_PROMPTS, f"s-{a}"))
    rows = [_with_order(process_record(dataclasses.replace(rec, rid=r), CFG, VideoConfig(fps=4.0)), k) for k, r in enumerate((a, b))]
    dec, _ = _decide(rows)
    assert [q["reason"] for q in dec.rejects] == ["duplicate"] and len(dec.keep) == 1


def test_contamination_exact_near_copy_and_not_lookalike():
    (h,) = _ids("heldout", 1)
    t_exact, t_near, t_other, t_clean = _ids("train", 4)
    held = scene(0, 64)
    other_colour = Image.new("RGB", (64, 64), (255, 255, 255))
    other_colour.paste(COLOUR_SWAP, (0, 0, 21, 21))
    rows = [
        process_record(t2i(encode(held), rid=h), CFG),
        process_record(t2i(encode(held), "another caption", rid=t_exact), CFG),  # same pixels
        process_record(t2i(encode(held, "JPEG", quality=70), "a third caption", rid=t_near), CFG),  # re-encoded
        process_record(t2i(encode(_recolour(held)), rid=t_other), CFG),  # same layout, other colours
        process_record(t2i(png(17, 64), rid=t_clean), CFG),
    ]
    rows = [_with_order(r, k) for k, r in enumerate(rows)]
    dec, calls = _decide(rows)
    got = {q["id"]: q["reason"] for q in dec.rejects}
    assert got == {f"s-{t_exact}": "contamination", f"s-{t_near}": "contamination"}
    assert {i for (i, _), s in dec.keep.items()} == {f"s-{h}", f"s-{t_other}", f"s-{t_clean}"}
    assert dec.stats["contamination/heldout_images"] == 1 and dec.stats["contamination/checked_images"] == 4
    assert len(calls) == 1  # thumbnails fetched once, for pHash candidates only
    # the pHash alone could not tell the recoloured scene apart: the thumbnail check did
    assert hamming(rows[3]["phash"][0], rows[0]["phash"][0]) <= 4


COLOUR_SWAP = (30, 60, 230)


def _recolour(img: Image.Image) -> Image.Image:
    arr = np.asarray(img.convert("RGB")).copy()
    red = (arr == [220, 20, 20]).all(axis=2)
    arr[red] = [90, 80, 60]  # a darker colour of similar luminance keeps the grey layout
    return Image.fromarray(arr)


def test_phash_robust_to_reencode_and_far_for_other_scenes():
    a = scene(5, 64)
    b = Image.open(io.BytesIO(encode(a, "JPEG", quality=60)))
    assert hamming(phash(a), phash(b)) <= 2
    far = [hamming(phash(scene(i, 64)), phash(scene(j, 64))) for i, j in [(0, 7), (3, 30), (10, 50)]]
    assert min(far) > 4


@pytest.mark.parametrize("d", [0, 2, 5])
def test_hamming_index_matches_brute_force(d):
    rng = np.random.default_rng(d)
    base = rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)
    idx = HammingIndex(d)
    for i, v in enumerate(base):
        idx.add(int(v), i)
    for q in range(300):
        v = int(base[q % 200])
        for bit in rng.choice(64, size=int(rng.integers(0, d + 3)), replace=False):
            v ^= 1 << int(bit)
        v = int(np.array(v & (2**64 - 1), dtype=np.uint64).view(np.int64))
        want = sorted((i, hamming(v, int(b))) for i, b in enumerate(base) if hamming(v, int(b)) <= d)
        assert sorted(idx.query(v)) == want


def test_config_validation_names_the_key():
    for kw, key in [({"image_size": 4}, "image_size"), ({"resize": "stretch"}, "resize"), ({"heldout_fraction": 1.0}, "heldout_fraction"),
                    ({"dedup": "text"}, "dedup"), ({"allowed_formats": ["PSD"]}, "allowed_formats"), ({"near_copy_max_diff": 300}, "near_copy_max_diff")]:
        with pytest.raises(ValueError, match=key):
            CurateConfig(**kw)
    with pytest.raises(ValueError, match="fps"):
        VideoConfig(fps=0)


@pytest.mark.parametrize("d", [0, 3])
def test_hamming_index_query_many_equals_query(d):
    # the array path (small index) and the bands give the same neighbours in the same order
    rng = np.random.default_rng(10 + d)
    base = [int(v) for v in rng.integers(-(2**63), 2**63 - 1, size=60, dtype=np.int64)]
    base += [b ^ (1 << int(rng.integers(64))) for b in base[:30]]  # near copies: ties and close pairs
    idx = HammingIndex(d)
    for i, v in enumerate(base):
        idx.add(v, i)
    queries = base[::3] + [v ^ 3 for v in base[:20]] + [int(rng.integers(-(2**63), 2**63 - 1))]
    want = [idx.query(v) for v in queries]
    assert idx.query_many(queries) == want == idx.query_many(queries, brute_force_max=0)
    assert sum(map(len, want)) >= len(base[::3]) + (30 if d else 0)  # every stored value finds itself; near copies at d=3


def test_thumb_max_diffs_equals_pairwise():
    from metamorph.data.imageproc import thumb_max_diff, thumb_max_diffs

    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, 768, dtype=np.uint8).tobytes(), rng.integers(0, 256, 768, dtype=np.uint8).tobytes()) for _ in range(5)]
    pairs.append((pairs[0][0], pairs[0][0]))
    want = [int(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8).astype(np.int16)).max()) for a, b in pairs]
    assert thumb_max_diffs(pairs) == want == [thumb_max_diff(a, b) for a, b in pairs] and thumb_max_diffs([]) == []


def test_video_opened_with_file_protocol_only_and_within_budget(tmp_path):
    from metamorph.data.readers.base import Reject

    # a playlist posing as a video: FFmpeg may not follow it to another protocol or file
    (tmp_path / "list.m3u8").write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nhttp://127.0.0.1:9/seg.ts\n#EXT-X-ENDLIST\n")
    (tmp_path / "concat.mp4").write_text(f"ffconcat version 1.0\nfile '{write_video(tmp_path / 'real.mp4')}'\n")
    for name in ("list.m3u8", "concat.mp4"):
        with pytest.raises(Reject) as e:
            sample_frames(str(tmp_path / name), fps=2, max_frames=4)
        assert e.value.reason == "video_decode_error", name
    path = write_video(tmp_path / "long.mp4", n_frames=40, fps=8)
    assert len(sample_frames(str(path), fps=1, max_frames=4)) == 4
    with pytest.raises(Reject) as e:  # the last sampled frame is the 25th decoded: past a budget of 20
        sample_frames(str(path), fps=1, max_frames=4, max_decode_frames=20)
    assert e.value.reason == "video_budget"
    rec = _video_record(tmp_path, name="v.mp4")
    assert reason(process_record(rec, CFG, VideoConfig(fps=2.0, max_video_bytes=1024))) == "file_too_large"


def test_text_caps_apply_to_questions_answers_labels(tmp_path):
    long = "w" * 300
    cfg = CurateConfig(image_size=32, min_side=16, max_text_chars=200)
    rec = _video_record(tmp_path, kind="clip")
    rec.payload["label"] = long
    assert reason(process_record(rec, cfg, VideoConfig(fps=2.0))) == "text_too_long"
    vt = _viscot(tmp_path, [10, 20, 30, 40])
    vt.payload["answer"] = long
    assert reason(process_record(vt, cfg)) == "text_too_long"
    edit = raw("edit", {"original": {"blob": 0}, "edited": {"blob": 1}, "edit_prompt": long, "meta": {}}, [png(0), png(2)])
    assert reason(process_record(edit, dataclasses.replace(cfg, max_caption_chars=100))) == "caption_length"
