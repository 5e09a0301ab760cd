"""One record generator per data family, and ``write_world`` that writes them all to disk.

    python -c "from metamorph.world import WorldConfig, write_world; print(write_world('/tmp/world', WorldConfig(), seed=0))"

Layout and formats are the "Upstream formats" section of docs/CONTRACTS.md (the curation readers
are written against it). Each record draws from its own RNG stream seeded by (pipeline seed,
seed_offset, family, index), so a record does not depend on how many came before it: raising
``n_generation`` appends records and leaves the existing ones byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from metamorph.world import attributes as A
from metamorph.world import text as T
from metamorph.world.config import WorldConfig
from metamorph.world.render import (Obj, Scene, extent_for, pick, pixel_bbox, place_in_cell, render, sample_scene,
                                    with_object)
from metamorph.world.video import Clip, encode_mp4, render_clip, sample_clip
from metamorph.world.writers import (TarShards, jpeg_bytes, png_bytes, write_edit_parquet, write_img2dataset_sidecars, write_json,
                                     write_jsonl)

FAMILIES = ("understanding", "videoqa", "generation", "video", "visual_thinking", "image_edit")
# Paths relative to the world dir (docs/CONTRACTS.md, "Upstream formats").
LLAVA_JSONL = "understanding/llava.jsonl"
LLAVA_IMAGES = "understanding/images"
VIDEOQA_JSONL = "understanding/videoqa.jsonl"
VIDEOQA_VIDEOS = "understanding/videos"
GENERATION_DIR = "generation"
VIDEO_DIR = "video/videos"
SSV2_LABELS = "video/labels/train.json"
SSV2_CLASSES = "video/labels/labels.json"
# Visual-CoT's release: metadata/<dataset>_cot_train.jsonl, images under cot/<dataset>/, and the
# converted viscot_363k.json (image paths relative to the folder holding cot/)
VISCOT_DATASET = "toyworld"
VISCOT_JSONL = f"visual_thinking/metadata/{VISCOT_DATASET}_cot_train.jsonl"
VISCOT_363K = "visual_thinking/viscot_363k.json"
VISCOT_ROOT = "visual_thinking"
VISCOT_IMAGES = f"visual_thinking/cot/{VISCOT_DATASET}"
VISCOT_BOX_PROMPT = " Please provide the bounding box coordinate of the region that can help you answer the question better."
EDIT_DIR = "image_edit"
EDIT_PARQUET_DIR = "image_edit/data"  # InstructPix2Pix on the HF hub: data/train-NNNNN-of-NNNNN.parquet
EDIT_JSONL = "image_edit/edits/edits.jsonl"  # the converted form: JSONL beside input/ and output/ folders
EDIT_JSONL_EVERY = 4  # every 4th edit record is written in the JSONL form, the rest as Parquet
WORLD_JSON = "world.json"


def record_rng(seed: int, cfg: WorldConfig, family: str, i: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed {seed}: the world needs a non-negative pipeline seed")
    return np.random.default_rng([seed, cfg.seed_offset, FAMILIES.index(family), i])


def _scene(rng: np.random.Generator, cfg: WorldConfig, *, image_size: int | None = None, **kw: Any) -> Scene:
    kw.setdefault("min_objects", cfg.min_objects)
    kw.setdefault("max_objects", cfg.max_objects)
    return sample_scene(rng, image_size=image_size or cfg.image_size, small_frac=cfg.small_frac,
                        large_frac=cfg.large_frac, jitter=cfg.jitter, **kw)


def _clip(rng: np.random.Generator, cfg: WorldConfig) -> Clip:
    return sample_clip(rng, image_size=cfg.image_size, n_frames=cfg.n_frames,
                       max_distractors=cfg.video_max_distractors, min_travel=cfg.min_travel,
                       max_travel=cfg.max_travel, small_frac=cfg.small_frac, large_frac=cfg.large_frac,
                       jitter=cfg.jitter, on_grid=cfg.video_on_grid)


def _mp4(clip: Clip, cfg: WorldConfig) -> bytes:
    return encode_mp4(render_clip(clip, cfg.supersample), cfg.fps, cfg.video_codec, cfg.video_quality)


# ---------------------------------------------------------------- understanding (LLaVA + VideoQA)

def _llava_turns(qas: list[T.QA]) -> list[dict[str, str]]:
    """LLaVA conversation turns: the media placeholder opens the first question only."""
    turns = []
    for t, qa in enumerate(qas):
        turns.append({"from": "human", "value": ("<image>\n" if t == 0 else "") + qa.prompt})
        turns.append({"from": "gpt", "value": qa.answer})
    return turns


def understanding_record(seed: int, cfg: WorldConfig, i: int) -> tuple[dict[str, Any], bytes]:
    """A LLaVA conversation about one scene (1..max_turns question turns) and its PNG."""
    rng = record_rng(seed, cfg, "understanding", i)
    scene = _scene(rng, cfg)
    rid = f"u{i:06d}"
    n_turns = int(rng.integers(1, cfg.max_turns + 1))
    qas: list[T.QA] = []
    for _ in range(8 * n_turns):  # a few retries so one conversation never repeats a question
        qa = T.image_question(rng, scene, pick(rng, cfg.question_types), mc=bool(rng.random() < cfg.mc_fraction))
        if all(qa.prompt != q.prompt for q in qas):
            qas.append(qa)
        if len(qas) == n_turns:
            break
    record = {
        "id": rid,
        "image": f"{rid}.png",
        "conversations": _llava_turns(qas),
        "meta": {"task": "image_qa", "scene": scene.to_meta(), "qa": [q.to_meta() for q in qas]},
    }
    return record, png_bytes(render(scene, cfg.supersample))


def videoqa_record(seed: int, cfg: WorldConfig, i: int) -> tuple[dict[str, Any], bytes]:
    """A LLaVA-Video-178K style record: the LLaVA conversation layout with a ``video`` key."""
    rng = record_rng(seed, cfg, "videoqa", i)
    clip = _clip(rng, cfg)
    qas = [T.video_question(rng, clip.mover, clip.direction, mc=bool(rng.random() < cfg.mc_fraction))]
    if cfg.video_turns > 1:  # the other types, in random order (1 turn draws exactly as before)
        others = [k for k in T.VIDEO_QUESTION_TYPES if k != qas[0].type]
        for k in rng.permutation(others)[: cfg.video_turns - 1]:
            qas.append(T.video_question(rng, clip.mover, clip.direction, mc=bool(rng.random() < cfg.mc_fraction),
                                        kind=str(k)))
    rid = f"vq{i:06d}"
    record = {
        "id": rid,
        "video": f"{rid}.mp4",
        "conversations": _llava_turns(qas),
        "data_source": "toyworld",
        "meta": {"task": "video_qa", "clip": clip.to_meta(), "fps": cfg.fps, "qa": [q.to_meta() for q in qas]},
    }
    return record, _mp4(clip, cfg)


# ---------------------------------------------------------------- generation (img2dataset tars)

def generation_key(cfg: WorldConfig, i: int) -> str:
    """img2dataset's key: 5-digit shard index + 4-digit index within the shard."""
    shard, j = divmod(i, cfg.shard_size)
    return f"{shard:05d}{j:04d}"


def generation_record(seed: int, cfg: WorldConfig, i: int) -> list[tuple[str, bytes]]:
    """The tar members of one key: .jpg, .txt (caption), .json (img2dataset metadata + meta)."""
    rng = record_rng(seed, cfg, "generation", i)
    scene = _scene(rng, cfg, min_objects=1, max_objects=min(cfg.generation_max_objects, len(A.SHAPES)))
    cap = T.caption(rng, scene)
    key = generation_key(cfg, i)
    jpg = jpeg_bytes(render(scene, cfg.supersample), cfg.jpeg_quality)
    n = cfg.image_size
    meta = {
        "key": key,
        "caption": cap,
        "url": f"toyworld://generation/{key}.jpg",
        "width": n,
        "height": n,
        "original_width": n,
        "original_height": n,
        "status": "success",
        "error_message": None,
        "sha256": hashlib.sha256(jpg).hexdigest(),
        "meta": {"task": "t2i", "scene": scene.to_meta(), "caption": cap},
    }
    return [(f"{key}.jpg", jpg), (f"{key}.txt", cap.encode("utf-8")),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))]


# ---------------------------------------------------------------- video (SSv2)

def video_record(seed: int, cfg: WorldConfig, i: int) -> tuple[dict[str, Any], bytes]:
    rng = record_rng(seed, cfg, "video", i)
    clip = _clip(rng, cfg)
    template = A.SSV2_TEMPLATES[clip.direction]
    placeholder = f"{clip.mover.colour} {clip.mover.shape}"
    record = {
        "id": str(i + 1),  # SSv2 ids are decimal strings
        "label": T.ssv2_label(template, placeholder),
        "template": template,
        "placeholders": [placeholder],
        "meta": {"task": "frame_prediction", "clip": clip.to_meta(), "fps": cfg.fps},
    }
    return record, _mp4(clip, cfg)


# ---------------------------------------------------------------- visual thinking (Visual-CoT)

def visual_thinking_record(seed: int, cfg: WorldConfig, i: int) -> tuple[dict[str, Any], bytes]:
    """A Visual-CoT metadata line: a question about the one small object among large ones, with
    the xyxy pixel box to look at (``bboxs``, in ``width`` x ``height``).

    Rendered at image_size * visual_thinking_scale, so once curation resizes the whole image to
    the model resolution the target is tiny, while a crop of the bbox shows it clearly."""
    rng = record_rng(seed, cfg, "visual_thinking", i)
    n = cfg.visual_thinking_size
    k = int(rng.integers(1, cfg.visual_thinking_max_distractors + 1))
    scene = _scene(rng, cfg, image_size=n, sizes=["small"] + ["large"] * k)
    target = scene.objects[0]
    qa = T.small_object_question(rng, target)
    bbox = pixel_bbox(target, n, cfg.bbox_pad)
    rid = f"vt{i:06d}"
    record = {
        "question_id": rid,
        "image": f"{rid}.png",
        "question": qa.question,
        "answer": qa.answer,
        "bboxs": [bbox],
        "width": n,
        "height": n,
        "dataset": VISCOT_DATASET,
        "split": "train",
        "meta": {"task": "visual_thinking", "scene": scene.to_meta(), "target": 0, "qa": [qa.to_meta()]},
    }
    return record, png_bytes(render(scene, cfg.supersample))


def viscot_363k_record(record: dict[str, Any]) -> dict[str, Any]:
    """A metadata line as Visual-CoT's official conversion writes it into ``viscot_363k.json``:
    the box shifted as if the image were padded to a square, divided by the long side, as text."""
    (x1, y1, x2, y2), w, h = record["bboxs"][0], record["width"], record["height"]
    if w > h:
        box = [x1, y1 + (w - h) // 2, x2, y2 + (w - h) // 2]
    else:
        box = [x1 + (h - w) // 2, y1, x2 + (h - w) // 2, y2]
    box_text = "[%0.3f, %0.3f, %0.3f, %0.3f]" % tuple(v / max(w, h) for v in box)
    return {
        "dataset": record["dataset"],
        "split": record["split"],
        "question_id": record["question_id"],
        "image": [f"cot/{record['dataset']}/{record['image']}"],
        "conversations": [
            {"from": "human", "value": "<image>\n" + record["question"] + VISCOT_BOX_PROMPT},
            {"from": "gpt", "value": box_text},
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": record["answer"]},
        ],
        "meta": record["meta"],
    }


# ---------------------------------------------------------------- image edit (InstructPix2Pix)

def _free_cells(scene: Scene) -> list[tuple[int, int]]:
    taken = {o.position(scene.image_size) for o in scene.objects}
    return [divmod(c, A.GRID) for c in range(A.GRID * A.GRID) if A.POSITIONS[c] not in taken]


def _edit_options(scene: Scene, kind: str) -> list[dict[str, Any]]:
    """Every concrete edit of ``kind`` that applies to ``scene`` (empty: the kind does not apply)."""
    n = scene.image_size
    opts: list[dict[str, Any]] = []
    free = set(_free_cells(scene))
    for idx, o in enumerate(scene.objects):
        if kind == "recolour":
            opts += [{"idx": idx, "to": c} for c in A.COLOURS if c != o.colour]
        elif kind == "move":
            row, col = divmod(A.POSITIONS.index(o.position(n)), A.GRID)
            for d, (dc, dr) in A.DIRECTIONS.items():
                if (row + dr, col + dc) in free:
                    opts.append({"idx": idx, "to": d, "dr": dr, "dc": dc})
        elif kind == "resize":
            opts.append({"idx": idx, "to": "large" if o.size == "small" else "small"})
        elif kind == "remove" and len(scene.objects) >= 2:
            opts.append({"idx": idx})
    if kind == "add":
        used = {o.shape for o in scene.objects}
        opts = [{"shape": s, "cell": c} for s in A.SHAPES if s not in used for c in sorted(free)]
    elif kind == "background":
        opts = [{"to": b} for b in A.BACKGROUNDS if b != scene.background]
    return opts


def _apply_edit(rng: np.random.Generator, cfg: WorldConfig, scene: Scene, kind: str,
                e: dict[str, Any]) -> tuple[Scene, str, dict[str, Any]]:
    """(edited scene, instruction, edit facts for meta)."""
    n, cell = scene.image_size, scene.image_size / A.GRID
    if kind == "background":
        return (Scene(image_size=n, background=e["to"], objects=scene.objects),
                T.edit_instruction(rng, "background", background=e["to"]),
                {"type": kind, "from": scene.background, "to": e["to"]})
    if kind == "add":
        size, colour = pick(rng, A.SIZES), pick(rng, list(A.COLOURS))
        extent = extent_for(size, n, cfg.small_frac, cfg.large_frac)
        cx, cy = place_in_cell(rng, *e["cell"], extent, n, cfg.jitter)
        new = Obj(shape=e["shape"], colour=colour, size=size, cx=cx, cy=cy, extent=extent)
        edited = Scene(image_size=n, background=scene.background, objects=scene.objects + (new,))
        return (edited, T.edit_instruction(rng, "add", obj=new.phrase(n)),
                {"type": kind, "target": new.shape, "to": f"{size} {colour} {new.shape} in the {new.position(n)}"})
    o = scene.objects[e["idx"]]
    facts: dict[str, Any] = {"type": kind, "target": o.shape}
    if kind == "recolour":
        edited = with_object(scene, e["idx"], colour=e["to"])
        instr = T.edit_instruction(rng, "recolour", shape=o.shape, colour=e["to"])
        facts.update({"from": o.colour, "to": e["to"]})
    elif kind == "move":
        edited = with_object(scene, e["idx"], cx=o.cx + e["dc"] * cell, cy=o.cy + e["dr"] * cell)
        new_pos = edited.objects[e["idx"]].position(n)
        instr = T.edit_instruction(rng, "move", shape=o.shape, direction=e["to"], position=new_pos)
        facts.update({"from": o.position(n), "to": new_pos, "direction": e["to"]})
    elif kind == "resize":
        extent = cell * (cfg.large_frac if e["to"] == "large" else cfg.small_frac)
        edited = with_object(scene, e["idx"], size=e["to"], extent=extent)
        instr = T.edit_instruction(rng, "grow" if e["to"] == "large" else "shrink", shape=o.shape)
        facts.update({"from": o.size, "to": e["to"]})
    elif kind == "remove":
        edited = Scene(image_size=n, background=scene.background,
                       objects=tuple(x for j, x in enumerate(scene.objects) if j != e["idx"]))
        instr = T.edit_instruction(rng, "remove", shape=o.shape)
    else:
        raise ValueError(f"unknown edit type {kind!r}; known: {A.EDIT_TYPES}")
    return edited, instr, facts


def image_edit_record(seed: int, cfg: WorldConfig, i: int) -> dict[str, Any]:
    """One InstructPix2Pix row: captions and PNGs of the scene before and after one edit."""
    rng = record_rng(seed, cfg, "image_edit", i)
    for _ in range(100):  # a scene where no configured edit applies (rare) is redrawn
        scene = _scene(rng, cfg)
        kinds = [k for k in cfg.edit_types if _edit_options(scene, k)]
        if kinds:
            break
    else:
        raise ValueError(f"world.edit_types={cfg.edit_types}: no edit applies to scenes of "
                         f"{cfg.min_objects}..{cfg.max_objects} objects; add 'recolour' or 'background'")
    kind = pick(rng, kinds)
    edited, instruction, facts = _apply_edit(rng, cfg, scene, kind, pick(rng, _edit_options(scene, kind)))
    rid = f"e{i:06d}"
    meta = {"id": rid, "task": "image_edit", "edit": facts, "original": scene.to_meta(), "edited": edited.to_meta()}
    return {
        "original_prompt": T.caption(rng, scene),
        "original_image": {"bytes": png_bytes(render(scene, cfg.supersample)), "path": f"{rid}_original.png"},
        "edit_prompt": instruction,
        "edited_prompt": T.caption(rng, edited),
        "edited_image": {"bytes": png_bytes(render(edited, cfg.supersample)), "path": f"{rid}_edited.png"},
        "meta": json.dumps(meta, ensure_ascii=False),
    }


# ---------------------------------------------------------------- the whole world

def _write_files_and_jsonl(out: Path, jsonl: str, media_dir: str, media_key: str, records: Any) -> int:
    media = out / media_dir
    media.mkdir(parents=True, exist_ok=True)
    rows = []
    for record, data in records:
        (media / record[media_key]).write_bytes(data)
        rows.append(record)
    return write_jsonl(out / jsonl, rows)


def write_world(out_dir: str | Path, cfg: WorldConfig | None = None, seed: int = 0) -> dict[str, float]:
    """Write every family in its upstream format under ``out_dir``; return counts and timings.

    Stats keys: ``n_<family>``, ``seconds_<family>``, ``seconds``, ``bytes``. Same (cfg, seed)
    gives byte-identical files."""
    cfg = cfg or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for d in ("understanding", "generation", "video/labels", VIDEO_DIR, "visual_thinking", EDIT_DIR, EDIT_PARQUET_DIR):
        (out / d).mkdir(parents=True, exist_ok=True)
    stats: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    stats["n_understanding"] = _write_files_and_jsonl(
        out, LLAVA_JSONL, LLAVA_IMAGES, "image",
        (understanding_record(seed, cfg, i) for i in range(cfg.n_understanding)))
    stats["seconds_understanding"] = time.perf_counter() - t

    t = time.perf_counter()
    stats["n_videoqa"] = _write_files_and_jsonl(
        out, VIDEOQA_JSONL, VIDEOQA_VIDEOS, "video", (videoqa_record(seed, cfg, i) for i in range(cfg.n_videoqa)))
    stats["seconds_videoqa"] = time.perf_counter() - t

    t = time.perf_counter()
    sidecars: list[list[dict[str, Any]]] = []
    with TarShards(out / GENERATION_DIR, cfg.shard_size) as tars:
        for i in range(cfg.n_generation):
            members = generation_record(seed, cfg, i)
            if i % cfg.shard_size == 0:
                sidecars.append([])
            sidecars[-1].append(json.loads(members[-1][1]))
            tars.add(members)
    for shard, metas in enumerate(sidecars):  # what img2dataset writes beside each tar (not records)
        write_img2dataset_sidecars(out / GENERATION_DIR, shard, metas)
    stats["n_generation"] = tars.n_keys
    stats["seconds_generation"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = []
    for i in range(cfg.n_video):
        record, data = video_record(seed, cfg, i)
        (out / VIDEO_DIR / f"{record['id']}.mp4").write_bytes(data)
        labels.append(record)
    write_json(out / SSV2_LABELS, labels)
    # SSv2's class list: template with plain "something" -> class index (a string, as SSv2 has it)
    templates = sorted(A.SSV2_TEMPLATES.values())
    classes = {tpl.replace("[something]", "something"): str(j) for j, tpl in enumerate(templates)}
    write_json(out / SSV2_CLASSES, classes)
    stats["n_video"] = len(labels)
    stats["seconds_video"] = time.perf_counter() - t

    t = time.perf_counter()
    # Visual-CoT's two published forms: even records as metadata lines, odd ones converted into
    # viscot_363k.json (one image folder for both, as in the release)
    (out / VISCOT_IMAGES).mkdir(parents=True, exist_ok=True)
    (out / VISCOT_JSONL).parent.mkdir(parents=True, exist_ok=True)
    meta_lines, converted = [], []
    for i in range(cfg.n_visual_thinking):
        record, data = visual_thinking_record(seed, cfg, i)
        (out / VISCOT_IMAGES / record["image"]).write_bytes(data)
        (meta_lines if i % 2 == 0 else converted).append(record)
    write_jsonl(out / VISCOT_JSONL, meta_lines)
    write_json(out / VISCOT_363K, [viscot_363k_record(r) for r in converted])
    stats["n_visual_thinking"] = len(meta_lines) + len(converted)
    stats["n_viscot_metadata"], stats["n_viscot_363k"] = len(meta_lines), len(converted)
    stats["seconds_visual_thinking"] = time.perf_counter() - t

    t = time.perf_counter()
    # InstructPix2Pix's hub Parquet, and every EDIT_JSONL_EVERY-th record in the converted form
    # (JSONL + input/ and output/ image folders, keys renamed in the stage's source config)
    parquet_rows, jsonl_rows = [], []
    edits = out / EDIT_JSONL
    for d in ("input", "output"):
        (edits.parent / d).mkdir(parents=True, exist_ok=True)
    for i in range(cfg.n_image_edit):
        row = image_edit_record(seed, cfg, i)
        if i % EDIT_JSONL_EVERY != EDIT_JSONL_EVERY - 1:
            parquet_rows.append(row)
            continue
        meta = json.loads(row["meta"])
        (edits.parent / "input" / f"{meta['id']}.png").write_bytes(row["original_image"]["bytes"])
        (edits.parent / "output" / f"{meta['id']}.png").write_bytes(row["edited_image"]["bytes"])
        jsonl_rows.append({"id": meta["id"], "input": f"input/{meta['id']}.png", "edit": row["edit_prompt"],
                           "output": f"output/{meta['id']}.png", "meta": meta})
    write_jsonl(edits, jsonl_rows)
    n_parts = max(1, -(-len(parquet_rows) // cfg.shard_size))
    n_edit = len(jsonl_rows)
    for part in range(n_parts):
        rows = parquet_rows[part * cfg.shard_size : (part + 1) * cfg.shard_size]
        n_edit += write_edit_parquet(out / EDIT_PARQUET_DIR / f"train-{part:05d}-of-{n_parts:05d}.parquet", rows)
    stats["n_image_edit"] = n_edit
    stats["n_edit_jsonl"] = len(jsonl_rows)
    stats["seconds_image_edit"] = time.perf_counter() - t

    counts = {f: int(stats[f"n_{f}"]) for f in FAMILIES}
    world_json = {
        "seed": seed,
        "config": asdict(cfg),
        "counts": counts,
        "vocabulary": {"shapes": list(A.SHAPES), "colours": A.COLOURS, "backgrounds": A.BACKGROUNDS,
                       "sizes": list(A.SIZES), "positions": list(A.POSITIONS), "directions": list(A.DIRECTIONS),
                       "edit_types": list(A.EDIT_TYPES), "question_types": list(A.QUESTION_TYPES)},
    }
    write_json(out / WORLD_JSON, world_json)
    stats["seconds"] = time.perf_counter() - t_all
    stats["bytes"] = float(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()))
    return {k: float(v) for k, v in stats.items()}
