"""Toy world: determinism, renders match attributes, every format parses with its standard tool.

    pytest tests/unit/test_world.py -q
"""

from __future__ import annotations

import io
import json
import string
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from metamorph.world import WorldConfig, write_world
from metamorph.world import attributes as A
from metamorph.world import families as F
from metamorph.world.render import Scene, render, sample_scene, scene_from_meta
from metamorph.world.video import decode_mp4, encode_mp4, render_clip, sample_clip

SMALL = dict(n_understanding=24, n_videoqa=4, n_generation=20, n_video=4, n_visual_thinking=12,
             n_image_edit=18, shard_size=8, max_turns=2, mc_fraction=0.5)
PALETTE = {**A.COLOURS, **A.BACKGROUNDS}


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, float)
    return min(PALETTE, key=lambda k: float(np.sum((rgb - np.asarray(PALETTE[k])) ** 2)))


def files_of(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, WorldConfig(**SMALL), seed=3)
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    decode_mp4((world / F.VIDEO_DIR / "1.mp4").read_bytes())  # a decode in-process must not perturb encoding
    again = tmp_path / "again"
    write_world(again, WorldConfig(**SMALL), seed=3)
    a, b = files_of(world), files_of(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    write_world(other, WorldConfig(**SMALL), seed=4)
    c = files_of(other)
    assert c[F.LLAVA_JSONL] != a[F.LLAVA_JSONL]
    assert c["video/videos/1.mp4"] != a["video/videos/1.mp4"]


def test_mp4_bytes_stable_across_decodes():
    # x264's CRF mode gave different bytes for the same frames once a yuv->rgb conversion had run
    # in the process; the encoder uses constant QP for that reason. Interleave both to check.
    rng = np.random.default_rng(2)
    clips = [render_clip(sample_clip(rng, image_size=32, n_frames=8, max_distractors=1)) for _ in range(8)]
    first = [encode_mp4(c, fps=8, quality=q) for c in clips for q in (6, 24)]
    second = []
    for c in clips:
        for q in (6, 24):
            b = encode_mp4(c, fps=8, quality=q)
            decode_mp4(b)
            second.append(b)
    assert first == second


def test_mpeg4_fallback_round_trips():
    clip = sample_clip(np.random.default_rng(9), image_size=32, n_frames=8)
    frames = render_clip(clip)
    data = encode_mp4(frames, fps=8, codec="mpeg4")
    assert data == encode_mp4(frames, fps=8, codec="mpeg4")
    out = decode_mp4(data)
    assert len(out) == 8
    assert np.abs(np.stack(out).astype(int) - np.stack([np.asarray(f) for f in frames])).mean() < 6


def test_records_do_not_depend_on_family_size(tmp_path):
    small = tmp_path / "s"
    big = tmp_path / "b"
    base = dict(SMALL, n_videoqa=0, n_video=0, n_visual_thinking=0, n_image_edit=0, n_generation=0)
    write_world(small, WorldConfig(**base), seed=1)
    write_world(big, WorldConfig(**dict(base, n_understanding=40)), seed=1)
    lines_s = (small / F.LLAVA_JSONL).read_text().splitlines()
    lines_b = (big / F.LLAVA_JSONL).read_text().splitlines()
    assert lines_b[: len(lines_s)] == lines_s


def test_question_types_listed_twice_are_asked_twice_as_often():
    """question_types is drawn uniformly, so a repeated type weights it (how tiny asks position
    more often)."""
    def share(types):
        cfg = WorldConfig(question_types=types, max_turns=1)
        kinds = [F.understanding_record(0, cfg, i)[0]["meta"]["qa"][0]["type"] for i in range(600)]
        return kinds.count("position") / len(kinds), set(kinds)

    once, kinds = share(["colour", "position"])
    twice, kinds2 = share(["colour", "position", "position"])
    assert kinds == kinds2 == {"colour", "position"}
    assert 0.42 < once < 0.58 and 0.58 < twice < 0.75


def test_render_colour_at_object_centre():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, image_size=32)
        img = np.asarray(render(scene))
        assert img.shape == (32, 32, 3)
        for o in scene.objects:
            px = img[int(o.cy), int(o.cx)]
            assert nearest_colour(px) == o.colour, (o, px)
            if o.size == "large":  # the centre pixel is fully covered: exact colour
                assert np.abs(px.astype(int) - A.COLOURS[o.colour]).max() <= 1, (o, px)
        # corners of the image are background (objects stay inside their cells, and no shape
        # reaches a cell corner)
        assert nearest_colour(img[0, 0]) == scene.background


def test_render_is_anti_aliased_and_area_exact():
    scene = sample_scene(np.random.default_rng(1), image_size=32, sizes=["large"])
    o = scene.objects[0]
    img = np.asarray(render(Scene(image_size=32, background="black", objects=(o,))), float)
    cov = img.sum(-1) / sum(A.COLOURS[o.colour])
    assert ((cov > 0.05) & (cov < 0.95)).any()  # partial-coverage edge pixels exist
    area = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9}[o.shape]
    assert abs(cov.sum() - area * o.extent**2) < 0.06 * o.extent**2


def test_understanding_llava_jsonl(world):
    recs = jsonl(world / F.LLAVA_JSONL)
    assert len(recs) == SMALL["n_understanding"]
    assert len({r["id"] for r in recs}) == len(recs)
    n_mc = 0
    for r in recs:
        img = Image.open(world / F.LLAVA_IMAGES / r["image"])
        assert img.size == (32, 32) and img.mode == "RGB"
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in conv) == 1
        scene = r["meta"]["scene"]
        objs = {o["shape"]: o for o in scene["objects"]}
        for qa, gpt in zip(r["meta"]["qa"], conv[1::2]):
            assert gpt["value"] == qa["answer"]
            if qa["format"] == "mc":
                n_mc += 1
                assert qa["answer"] in string.ascii_uppercase[:4]
                assert qa["options"][ord(qa["answer"]) - ord("A")] == qa["truth"]
            else:
                assert qa["answer"] == qa["truth"]
            # the truth follows from the scene alone
            t = qa["type"]
            if t == "colour":
                assert qa["truth"] == objs[qa["target"]]["colour"]
            elif t == "shape":
                assert qa["truth"] == qa["target"]
            elif t == "position":
                assert qa["truth"] == objs[qa["target"]]["position"]
            elif t == "size":
                assert qa["truth"] == objs[qa["target"]]["size"]
            elif t == "count":
                q = qa["question"]
                colour = next((c for c in A.COLOURS if f" {c} " in q), None)
                want = sum(o["colour"] == colour for o in scene["objects"]) if colour else len(scene["objects"])
                assert qa["truth"] == str(want)
        # the render agrees with the stored attributes
        arr = np.asarray(img)
        for o in scene["objects"]:
            assert nearest_colour(arr[int(o["cy"]), int(o["cx"])]) == o["colour"]
    assert n_mc > 0


def test_videoqa_and_ssv2_videos_decode(world):
    recs = jsonl(world / F.VIDEOQA_JSONL)
    assert len(recs) == SMALL["n_videoqa"]
    for r in recs:
        frames = decode_mp4(str(world / F.VIDEOQA_VIDEOS / r["video"]))
        assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
        qa = r["meta"]["qa"][0]
        if qa["type"] == "direction":
            assert qa["truth"] == r["meta"]["clip"]["direction"]
    labels = json.loads((world / F.SSV2_LABELS).read_text())
    assert len(labels) == SMALL["n_video"]
    classes = json.loads((world / F.SSV2_CLASSES).read_text())
    for rec in labels:
        assert set(rec) >= {"id", "label", "template", "placeholders"}
        assert rec["template"].replace("[something]", "something") in classes
        assert rec["label"] == rec["template"].replace("[something]", rec["placeholders"][0])
        frames = decode_mp4(str(world / F.VIDEO_DIR / f"{rec['id']}.mp4"))
        assert len(frames) == 8


def test_clip_motion_matches_direction():
    rng = np.random.default_rng(5)
    for _ in range(12):
        clip = sample_clip(rng, image_size=32, n_frames=8, max_distractors=0)
        frames = decode_mp4(encode_mp4(render_clip(clip), fps=8))
        assert len(frames) == 8
        bg = np.asarray(A.BACKGROUNDS[clip.scene.background], float)
        cents = []
        for f in frames:  # centroid of pixels that differ from the background
            w = np.abs(f.astype(float) - bg).sum(-1) > 60
            ys, xs = np.nonzero(w)
            cents.append((xs.mean() + 0.5, ys.mean() + 0.5))
        (x0, y0), (x1, y1) = cents[0], cents[-1]
        dx, dy = A.DIRECTIONS[clip.direction]
        travel = clip.speed * 7
        assert (x1 - x0) * dx + (y1 - y0) * dy > 0.7 * travel
        m = clip.mover
        if m.size == "large":
            assert nearest_colour(frames[0][int(m.cy), int(m.cx)]) == m.colour
        for t, (cx, cy) in enumerate(clip.centres()):  # mover stays fully in frame
            assert m.extent / 2 - 1e-6 <= cx <= 32 - m.extent / 2 + 1e-6
            assert m.extent / 2 - 1e-6 <= cy <= 32 - m.extent / 2 + 1e-6


def test_generation_tars_read_with_webdataset(world):
    tars = sorted((world / F.GENERATION_DIR).glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar"]  # 20 keys / 8 per shard
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                assert m.isfile() and m.mtime == 0 and "/" not in m.name
    ds = wds.WebDataset([str(t) for t in tars], shardshuffle=False)
    n = 0
    for s in ds:
        meta = json.loads(s["json"])
        cap = s["txt"].decode("utf-8")
        assert meta["key"] == s["__key__"] and meta["caption"] == cap and meta["status"] == "success"
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (32, 32)
        scene = meta["meta"]["scene"]
        for o in scene["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']} in the {o['position']}" in cap
            if o["size"] == "large":
                assert nearest_colour(np.asarray(img.convert("RGB"))[int(o["cy"]), int(o["cx"])]) == o["colour"]
        assert f"{scene['background']} background" in cap
        n += 1
    assert n == SMALL["n_generation"]


def test_visual_thinking_bbox_covers_target(world):
    from metamorph.data.curate import unsquare_box

    recs = jsonl(world / F.VISCOT_JSONL)
    converted = json.loads((world / F.VISCOT_363K).read_text())
    assert len(recs) + len(converted) == SMALL["n_visual_thinking"] and len(converted) == SMALL["n_visual_thinking"] // 2
    for c in converted:  # viscot_363k.json: the same records after Visual-CoT's conversion
        assert c["image"][0].startswith(f"cot/{F.VISCOT_DATASET}/") and c["conversations"][2]["value"] == "<image>"
        box = unsquare_box([float(v) for v in c["conversations"][1]["value"].strip("[]").split(",")], 64, 64)
        recs.append({"image": c["image"][0].rsplit("/", 1)[1], "bboxs": [box], "answer": c["conversations"][3]["value"], "meta": c["meta"]})
    for r in recs:
        img = Image.open(world / F.VISCOT_IMAGES / r["image"])
        n = r["meta"]["scene"]["image_size"]
        assert img.size == (n, n) == (64, 64)
        (x1, y1, x2, y2), = r["bboxs"]
        assert all(float(v).is_integer() for v in r["bboxs"][0])
        assert 0 <= x1 < x2 <= n and 0 <= y1 < y2 <= n
        scene = scene_from_meta(r["meta"]["scene"])
        target = scene.objects[r["meta"]["target"]]
        assert target.size == "small" and sum(o.size == "small" for o in scene.objects) == 1
        alone = np.asarray(render(Scene(image_size=n, background=scene.background, objects=(target,))), int)
        ink = np.abs(alone - np.asarray(A.BACKGROUNDS[scene.background])).sum(-1) > 0
        ys, xs = np.nonzero(ink)
        assert xs.min() >= x1 and xs.max() < x2 and ys.min() >= y1 and ys.max() < y2
        crop = np.asarray(img.crop((x1, y1, x2, y2)))
        assert nearest_colour(np.asarray(img)[int(target.cy), int(target.cx)]) == target.colour
        assert crop.shape[0] * crop.shape[1] < n * n / 4  # the crop is a small region to zoom into
        assert r["answer"] == r["meta"]["qa"][0]["truth"]
        assert r["answer"] in (target.colour, target.shape)


def test_image_edit_parquet(world):
    parts = sorted((world / F.EDIT_PARQUET_DIR).glob("*.parquet"))
    assert [p.name for p in parts] == [f"train-0000{i}-of-00002.parquet" for i in range(2)]
    table = pq.read_table(parts[0])
    assert table.column_names == ["original_prompt", "original_image", "edit_prompt", "edited_prompt",
                                  "edited_image", "meta"]
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    edits = world / F.EDIT_JSONL
    for e in jsonl(edits):  # every EDIT_JSONL_EVERY-th record: JSONL beside input/ and output/ folders
        rows.append({"original_image": {"bytes": (edits.parent / e["input"]).read_bytes(), "path": e["input"]}, "edit_prompt": e["edit"],
                     "edited_image": {"bytes": (edits.parent / e["output"]).read_bytes(), "path": e["output"]}, "meta": json.dumps(e["meta"])})
    assert len(rows) == SMALL["n_image_edit"] and len(jsonl(edits)) == SMALL["n_image_edit"] // F.EDIT_JSONL_EVERY
    kinds = set()
    for r in rows:
        meta = json.loads(r["meta"])
        e = meta["edit"]
        kinds.add(e["type"])
        before = Image.open(io.BytesIO(r["original_image"]["bytes"]))
        after = Image.open(io.BytesIO(r["edited_image"]["bytes"]))
        assert before.size == after.size == (32, 32)
        assert r["original_image"]["path"].endswith(".png") and r["edit_prompt"]
        assert not np.array_equal(np.asarray(before), np.asarray(after))
        o, d = meta["original"], meta["edited"]
        if e["type"] == "recolour":
            assert e["to"] in r["edit_prompt"] and e["target"] in r["edit_prompt"]
            assert next(x for x in d["objects"] if x["shape"] == e["target"])["colour"] == e["to"]
        elif e["type"] == "move":
            assert next(x for x in d["objects"] if x["shape"] == e["target"])["position"] == e["to"]
        elif e["type"] == "remove":
            assert len(d["objects"]) == len(o["objects"]) - 1
        elif e["type"] == "add":
            assert len(d["objects"]) == len(o["objects"]) + 1
        elif e["type"] == "background":
            assert d["background"] == e["to"] != o["background"]
        elif e["type"] == "resize":
            assert next(x for x in d["objects"] if x["shape"] == e["target"])["size"] == e["to"]
    assert len(kinds) >= 4


def test_world_json_and_layout(world):
    w = json.loads((world / F.WORLD_JSON).read_text())
    assert w["seed"] == 3 and w["counts"]["generation"] == SMALL["n_generation"]
    for d in ("understanding", "generation", "video", "visual_thinking", "image_edit"):
        assert (world / d).is_dir()


@pytest.mark.parametrize(
    "bad, key",
    [({"image_size": 31}, "image_size"), ({"min_objects": 4, "max_objects": 3}, "min_objects"),
     ({"question_types": ["smell"]}, "question_types"), ({"video_codec": "vp9"}, "video_codec"),
     ({"n_generation": -1}, "n_generation"), ({"shard_size": 20000}, "shard_size")],
)
def test_config_rejects_bad_values(bad, key):
    with pytest.raises(ValueError, match=f"world.{key}"):
        WorldConfig(**bad)


def test_world_stage_runs_and_presets_validate(tmp_path):
    from omegaconf import OmegaConf

    from pipelines.testing import run_stage
    from stages.world import WorldStage, WorldStageConfig

    root = Path(__file__).resolve().parents[2]
    for preset in ("smoke", "tiny"):
        y = OmegaConf.load(root / "conf" / "presets" / f"{preset}.yaml")
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(WorldStageConfig), y.stages.world))
        assert isinstance(cfg, WorldStageConfig)
    cfg = WorldStageConfig(n_understanding=5, n_videoqa=1, n_generation=5, n_video=1, n_visual_thinking=2,
                           n_image_edit=2)
    stage = WorldStage()
    stage.validate(cfg)
    out, stats = run_stage(stage, cfg, root=tmp_path, seed=7)
    assert stats["n_understanding"] == 5 and stats["n_image_edit"] == 2 and stats["seconds"] > 0
    assert (out / "world" / F.LLAVA_JSONL).is_file()
    assert len(list((out / "world" / F.VIDEO_DIR).glob("*.mp4"))) == 1


def test_video_turns_ask_distinct_types_and_one_turn_draws_as_before():
    one, default = F.videoqa_record(0, WorldConfig(video_turns=1), 3)[0], F.videoqa_record(0, WorldConfig(), 3)[0]
    assert one == default and len(one["conversations"]) == 2
    for i in range(6):
        rec = F.videoqa_record(0, WorldConfig(video_turns=3), i)[0]
        types = [q["type"] for q in rec["meta"]["qa"]]
        assert sorted(types) == ["direction", "mover_colour", "mover_shape"]
        conv = rec["conversations"]
        assert [c["from"] for c in conv] == ["human", "gpt"] * 3
        assert conv[0]["value"].startswith("<image>\n") and not any("<image>" in c["value"] for c in conv[1:])
        # the first question is the one a 1-turn record asks (same clip, same draw)
        assert rec["meta"]["qa"][0] == F.videoqa_record(0, WorldConfig(), i)[0]["meta"]["qa"][0]
    with pytest.raises(ValueError, match="video_turns"):
        WorldConfig(video_turns=4)


def test_centred_clips_start_and_end_at_cell_centres():
    cell = 32 / A.GRID
    spans = set()
    for seed in range(40):
        clip = sample_clip(np.random.default_rng(seed), image_size=32, n_frames=8, max_distractors=1, jitter=0.0, on_grid=True)
        (x0, y0), (x1, y1) = clip.centres()[0], clip.centres()[-1]
        for v in (x0, y0, x1, y1):
            assert abs(v / cell - 0.5 - round(v / cell - 0.5)) < 1e-6  # a cell centre
        dx, dy = A.DIRECTIONS[clip.direction]
        steps = ((x1 - x0) * dx + (y1 - y0) * dy) / cell
        assert round(steps) in (1, 2) and abs(steps - round(steps)) < 1e-6
        spans.add(round(steps))
        # the rendered last frame shows the mover where the clip says it ends
        assert np.asarray(render_clip(clip)[-1])[int(y1), int(x1)].tolist() != list(A.BACKGROUNDS[clip.scene.background])
        for d in clip.scene.objects[:-1]:  # the path never crosses a distractor's cell
            for t in range(round(steps) + 1):
                px, py = x0 + dx * t * cell, y0 + dy * t * cell
                assert (int(px // cell), int(py // cell)) != (int(d.cx // cell), int(d.cy // cell))
    assert spans == {1, 2}
