"""Tiny real artifacts for the evaluation and inference tests: toy-world held-out samples in the
curated schema, a BPE tokenizer trained on them, and random-init model / encoder / decoder dirs
written with their own ``save_pretrained``, laid out like a pipeline run root.

    python -c "from tests.unit.eval_fixtures import build_run; print(build_run('/tmp/evalrun'))"

Everything is built in about a second on one core; nothing is trained except the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from metamorph.data.schema import ImageRef, Sample, Turn
from metamorph.data.shards import ShardWriter, write_index
from metamorph.world import text as T
from metamorph.world.render import render, sample_scene, with_object
from metamorph.world.video import sample_clip
from metamorph.world.writers import png_bytes

IMG = 32


def _scene(rng, n_objects=None, image_size=IMG):
    return sample_scene(rng, image_size=image_size, n_objects=n_objects)


def make_samples(n_per_task: int = 3, seed: int = 0) -> list[tuple[Sample, list[bytes]]]:
    """Held-out samples of every task (toy-world meta as curation keeps it), n of each."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_per_task):
        sc = _scene(rng)
        qa = T.image_question(rng, sc, ["colour", "shape", "size"][i % 3], mc=i % 2 == 1)
        out.append((Sample(
            id=f"world-u{i:06d}", source="world", family="understanding", task="image_qa", split="heldout",
            conversation=[Turn(role="user", content="<image>\n" + qa.prompt), Turn(role="assistant", content=qa.answer)],
            images=[ImageRef(ext="png", role="prompt")],
            meta={"task": "image_qa", "scene": sc.to_meta(), "qa": [qa.to_meta()]},
        ), [png_bytes(render(sc))]))

        sc = _scene(rng, n_objects=1)
        cap = T.caption(rng, sc)
        out.append((Sample(
            id=f"world-g{i:06d}", source="world", family="generation", task="t2i", split="heldout",
            conversation=[Turn(role="user", content=f"Generate an image of {cap}."), Turn(role="assistant", content="<image>")],
            images=[ImageRef(ext="png", role="response")],
            meta={"task": "t2i", "scene": sc.to_meta(), "caption": cap},
        ), [png_bytes(render(sc))]))

        sc = _scene(rng, n_objects=2)
        colour = "green" if sc.objects[0].colour != "green" else "red"
        edited = with_object(sc, 0, colour=colour)
        out.append((Sample(
            id=f"world-e{i:06d}", source="world", family="image_edit", task="image_edit", split="heldout",
            conversation=[Turn(role="user", content=f"<image>\nmake the {sc.objects[0].shape} {colour}"),
                          Turn(role="assistant", content="<image>")],
            images=[ImageRef(ext="png", role="prompt"), ImageRef(ext="png", role="response")],
            meta={"task": "image_edit", "edit": {"type": "recolour"}, "original": sc.to_meta(), "edited": edited.to_meta()},
        ), [png_bytes(render(sc)), png_bytes(render(edited))]))

        sc = _scene(rng, image_size=2 * IMG)
        big = render(sc)
        crop = big.crop((0, 0, IMG, IMG))
        qa = T.small_object_question(rng, sc.objects[0])
        out.append((Sample(
            id=f"world-vt{i:06d}", source="world", family="visual_thinking", task="visual_thinking", split="heldout",
            conversation=[Turn(role="user", content="<image>\nThink visually before you answer: " + qa.question),
                          Turn(role="assistant", content="<image>\n" + qa.answer)],
            images=[ImageRef(ext="png", role="prompt"), ImageRef(ext="png", role="response")],
            meta={"task": "visual_thinking", "scene": sc.to_meta(), "qa": [qa.to_meta()], "answer": qa.answer},
        ), [png_bytes(big.resize((IMG, IMG))), png_bytes(crop)]))

        clip = sample_clip(rng, image_size=IMG, n_frames=4, max_distractors=1)
        frames = [png_bytes(render(clip.frame_scene(k))) for k in range(4)]
        label = f"Moving {clip.mover.colour} {clip.mover.shape} {clip.direction}"
        out.append((Sample(
            id=f"world-f{i:06d}", source="world", family="video", task="frame_prediction", split="heldout",
            conversation=[Turn(role="user", content="<image><image>\nWhat happens next?"),
                          Turn(role="assistant", content=label + "\n<image><image>")],
            images=[ImageRef(ext="png", role=r) for r in ("prompt", "prompt", "response", "response")],
            meta={"task": "frame_prediction", "clip": clip.to_meta(), "label": label, "prompt_frames": 2},
        ), frames))
        qa = T.video_question(rng, clip.mover, clip.direction)
        out.append((Sample(
            id=f"world-vq{i:06d}", source="world", family="understanding", task="video_qa", split="heldout",
            conversation=[Turn(role="user", content="<image>" * 4 + "\n" + qa.prompt), Turn(role="assistant", content=qa.answer)],
            images=[ImageRef(ext="png", role="prompt")] * 4,
            meta={"task": "video_qa", "clip": clip.to_meta(), "qa": [qa.to_meta()]},
        ), frames))
    return out


def write_train(mixture: Path, samples) -> None:
    """Training shards and index beside ``heldout/`` (the evaluate stage reads their answers)."""
    with ShardWriter(mixture, "train") as w:
        for s, ims in samples:
            s.split = "train"
            w.write(s, ims)
    write_index(mixture, w.rows)


def write_heldout(mixture: Path, samples) -> Path:
    with ShardWriter(mixture / "heldout", "heldout") as w:
        for s, ims in samples:
            w.write(s, ims)
    write_index(mixture / "heldout", w.rows)
    return mixture


def build_tokenizer(samples, out: Path):
    from metamorph.data.tokenizer import TokenizerConfig, train_bpe

    texts = [t.content.replace("<image>", "") for s, _ in samples for t in s.conversation]
    texts += ["What colour is the square?", "Generate an image of a red circle", "A", "B", "C", "D"]
    tok = train_bpe(texts, TokenizerConfig(vocab_size=400))
    tok.save_pretrained(out)
    return tok


def build_models(tok, root: Path) -> dict[str, Path]:
    """Random-init encoder, VPiT model (tokenizer beside it) and decoder dirs under ``root``."""
    from metamorph.data.tokenizer import special_ids
    from metamorph.decoder.config import DecoderConfig, SamplingConfig
    from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
    from metamorph.model.config import LLMConfig, MetaMorphConfig
    from metamorph.model.modeling import MetaMorphForCausalLM
    from metamorph.model.vision import VisionConfig, VisionEncoder

    enc = VisionEncoder.from_config(VisionConfig(image_size=IMG, patch_size=8, hidden_size=16, num_layers=1,
                                                 num_heads=2, intermediate_size=32, n_tokens=4))
    ids = special_ids(tok)
    mcfg = MetaMorphConfig(
        llm=LLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_position=512),
        vision_dim=16, n_tokens=4, image_start_id=ids.image_start, image_end_id=ids.image_end, pad_id=ids.pad,
    )
    model = MetaMorphForCausalLM.from_config(mcfg)
    dcfg = DecoderConfig(image_size=IMG, pixel_patch=2, block_out_channels=[16, 16], cross_attention_dim=16,
                         attention_heads=2, norm_num_groups=4)
    dec = MetaMorphDecoderPipeline.from_decoder_config(dcfg, feature_dim=16, n_tokens=4,
                                                       sampling=SamplingConfig(num_inference_steps=2))
    paths = {
        "vision_encoder": root / "vision_encoder",
        "vpit_model": root / "vpit_model",
        "decoder": root / "decoder",
    }
    enc.save_pretrained(paths["vision_encoder"])
    model.save_pretrained(paths["vpit_model"])
    tok.save_pretrained(paths["vpit_model"])
    dec.save_pretrained(str(paths["decoder"]))
    return paths


def _manifest(stage_dir: Path, key: str, upstream: dict[str, str]) -> None:
    (stage_dir / "_SUCCESS.json").write_text(json.dumps({"key": key, "upstream": upstream, "finished_at": 1.0}))


def _fake_key(stage: str) -> str:
    return hashlib.sha256(stage.encode()).hexdigest()[:16]


def build_run(root: str | Path, n_per_task: int = 3) -> dict[str, Path]:
    """A run root shaped like the pipeline's: {root}/{stage}/{key}/{artifact} + manifests."""
    root = Path(root)
    samples = make_samples(n_per_task)
    # keys shaped like real ones (16 hex chars): the resolver refuses anything else as a path part
    dirs = {s: root / s / _fake_key(s) for s in ("mix", "vision_encoder", "tokenize", "train_vpit", "train_decoder")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    write_heldout(dirs["mix"] / "mixture", samples)
    write_train(dirs["mix"] / "mixture", make_samples(n_per_task, seed=1))
    tok = build_tokenizer(samples, dirs["tokenize"] / "tokenizer")
    tmp = build_models(tok, root / "_build")
    paths = {
        "mixture": dirs["mix"] / "mixture",
        "tokenizer": dirs["tokenize"] / "tokenizer",
        "vision_encoder": dirs["vision_encoder"] / "vision_encoder",
        "vpit_model": dirs["train_vpit"] / "vpit_model",
        "decoder": dirs["train_decoder"] / "decoder",
    }
    for a in ("vision_encoder", "vpit_model", "decoder"):
        tmp[a].rename(paths[a])
    (root / "_build").rmdir()
    key = {s: d.name for s, d in dirs.items()}
    _manifest(dirs["mix"], key["mix"], {})
    _manifest(dirs["vision_encoder"], key["vision_encoder"], {})
    _manifest(dirs["tokenize"], key["tokenize"], {"mixture": key["mix"], "vision_encoder": key["vision_encoder"]})
    _manifest(dirs["train_vpit"], key["train_vpit"], {"tokenized": key["tokenize"], "connector_model": _fake_key("train_connector")})
    _manifest(dirs["train_decoder"], key["train_decoder"], {"curated_generation": _fake_key("curate_generation"), "vision_encoder": key["vision_encoder"]})
    return paths


def red_square_png(path: Path) -> Path:
    im = Image.new("RGB", (IMG, IMG), (255, 255, 255))
    im.paste((220, 20, 20), (4, 4, 14, 14))
    im.save(path)
    return path
