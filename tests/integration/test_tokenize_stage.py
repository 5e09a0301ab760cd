"""The `tokenize` stage on local Ray: a small hand-written mixture -> tokenizer + Parquet rows.

    pytest tests/integration/test_tokenize_stage.py -q
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from metamorph.data.packing import SCHEMA, collate, iter_rows, read_metadata, row_features
from metamorph.data.schema import ImageRef, Sample, Turn
from metamorph.data.shards import ShardWriter, write_index
from metamorph.data.tokenizer import TokenizerConfig, special_ids
from metamorph.model.vision import VisionConfig, VisionEncoder
from pipelines.testing import run_stage
from stages.tokenize import TokenizeConfig, TokenizeStage

N = 4  # visual tokens per image: small so a 128-position row holds several samples
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _samples() -> list[tuple[Sample, list[bytes]]]:
    out = []
    for i in range(36):
        c, s = COLOURS[i % 4], SHAPES[i % 3]
        if i % 3 == 0:  # understanding: prompt image
            conv = [Turn(role="user", content=f"<image>\nWhat colour is the {s}?"), Turn(role="assistant", content=f"{c.title()}.")]
            refs, task = [ImageRef(ext="png", role="prompt")], "image_qa"
        elif i % 3 == 1:  # generation: response image
            conv = [Turn(role="user", content=f"Generate an image of a {c} {s}."), Turn(role="assistant", content="<image>")]
            refs, task = [ImageRef(ext="png", role="response")], "t2i"
        else:  # edit: prompt image -> response image
            conv = [Turn(role="user", content=f"<image>\nMake the {s} {c}."), Turn(role="assistant", content="<image>")]
            refs, task = [ImageRef(ext="png", role="prompt"), ImageRef(ext="png", role="response")], "image_edit"
        out.append((Sample(id=f"toy-{i:03d}", source="toy", family="x", task=task, split="train", conversation=conv, images=refs),
                    [_png(COLOURS[(i + k) % 4]) for k in range(len(refs))]))
    # too long for 128 positions (20 prompt frames x 6): the answer comes after the frames, so
    # any cut that keeps frames whole leaves no target and the sample is dropped
    frames = [ImageRef(ext="png", role="prompt")] * 20
    out.append((Sample(id="toy-video", source="toy", family="video", task="video_qa", split="train",
                       conversation=[Turn(role="user", content="<image>" * 20 + "What moved?"), Turn(role="assistant", content="The circle.")],
                       images=frames), [_png("red")] * 20))
    # long answer with a response image at the end: truncated before the image, answer kept
    out.append((Sample(id="toy-long", source="toy", family="generation", task="t2i", split="train",
                       conversation=[Turn(role="user", content="Describe, then draw."),
                                     Turn(role="assistant", content="a red circle " * 40 + "<image>")],
                       images=[ImageRef(ext="png", role="response")]), [_png("red")]))
    # no assistant turn: nothing to learn, dropped
    out.append((Sample(id="toy-empty", source="toy", family="x", task="image_qa", split="train",
                       conversation=[Turn(role="user", content="Hello?")]), []))
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok_inputs")
    mix = root / "mixture"
    with ShardWriter(mix, "train", max_samples=15) as w:
        for sample, images in _samples():
            w.write(sample, images)
    write_index(mix, w.rows)
    enc = VisionEncoder.from_config(VisionConfig(n_tokens=N, hidden_size=32, intermediate_size=64, seed=1))
    enc.save_pretrained(root / "vision_encoder")
    return {"mixture": mix, "vision_encoder": root / "vision_encoder"}, enc


def _cfg(**kw) -> TokenizeConfig:
    base = dict(max_length=128, pack_window=8, row_group_size=2, rows_per_part=4, encode_batch_size=8)
    return TokenizeConfig(tokenizer=TokenizerConfig(vocab_size=320), **{**base, **kw})


@pytest.fixture(scope="module")
def first_run(ray_session, inputs, tmp_path_factory):
    ins, _ = inputs
    return run_stage(TokenizeStage(), _cfg(), inputs=ins, root=tmp_path_factory.mktemp("tok_run"), key="a")


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_tokenize_stage_end_to_end(inputs, first_run):
    _, enc = inputs
    out, stats = first_run

    # tokenizer: a normal HF dir with every special token
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    ids = special_ids(tok)
    assert len(tok) <= 320

    # counts: 39 read, 1 truncated, 2 dropped, 37 packed
    assert stats["n_samples"] == 39
    assert (stats["n_truncated"], stats["n_dropped_too_long"], stats["n_dropped_no_targets"]) == (1, 1, 1)
    assert stats["n_samples_packed"] == 37
    assert stats["total_tokens"] == stats["n_rows"] * 128
    assert stats["text_tokens"] + stats["visual_tokens"] == stats["nonpad_tokens"]
    assert stats["packing_efficiency"] == pytest.approx(stats["nonpad_tokens"] / stats["total_tokens"])
    assert stats["packing_efficiency"] > 0.8
    # 12 QA + 12 t2i + 2x12 edit images; toy-long lost its image to truncation
    assert stats["n_images"] == 48 and stats["visual_tokens"] == 48 * N

    # Parquet: pyarrow reads it back, fixed row groups, contract schema
    parts = sorted((out / "tokenized").glob("part-*.parquet"))
    assert parts[0].name == "part-00000.parquet" and stats["n_parts"] == len(parts)
    n_rows = 0
    for p in parts:
        f = pq.ParquetFile(p)
        assert f.schema_arrow.remove_metadata() == SCHEMA
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        assert all(s == 2 for s in sizes[:-1]) and sum(sizes) <= 4
        n_rows += sum(sizes)
    assert n_rows == stats["n_rows"]
    meta = read_metadata(out / "tokenized")
    assert (int(meta["n_visual"]), int(meta["feature_dim"]), int(meta["pad_id"])) == (N, 32, ids.pad)
    info = json.loads((out / "tokenized/info.json").read_text())
    assert info["stats"]["n_rows"] == n_rows

    # features: the stored fp16 tokens equal the encoder's on the same image
    rows = list(iter_rows(out / "tokenized"))
    by_id = {s.id: (s, imgs) for s, imgs in _samples()}
    checked = 0
    for row in rows:
        feats = row_features(row, 32)
        assert feats.shape == (sum(row["visual_mask"]), 32)
        k = 0
        seg = np.asarray(row["segment_ids"])
        vm = np.asarray(row["visual_mask"])
        for j, sid in enumerate(row["sample_ids"], start=1):
            n_vis = int(vm[seg == j].sum())
            sample, imgs = by_id[sid]
            if n_vis and sid != "toy-long":
                want = enc.encode_images([Image.open(io.BytesIO(b)) for b in imgs]).reshape(-1, 32)
                torch.testing.assert_close(torch.from_numpy(feats[k : k + n_vis].astype(np.float32)), want, atol=2e-3, rtol=0)
                checked += 1
            k += n_vis
    assert checked == 36
    batch = collate(rows[:2])
    assert batch["vision_feats"].shape == (int(batch["visual_mask"].sum()), 32)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_tokenize_stage_is_deterministic(inputs, first_run, tmp_path):
    """Same input, different operational knobs (batching, actor count): byte-identical output."""
    ins, _ = inputs
    a, _ = first_run
    b, _ = run_stage(TokenizeStage(), _cfg(encode_batch_size=3, num_encoders=2, render_batch_size=5), inputs=ins, root=tmp_path, key="b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="rows_per_part"):
        TokenizeConfig(row_group_size=16, rows_per_part=20)
    with pytest.raises(ValueError, match="max_length"):
        TokenizeConfig(max_length=8)
    with pytest.raises(ValueError, match="encoder_gpus"):
        TokenizeConfig(encoder_gpus=-1)


def test_render_block_of_only_dropped_samples_keeps_types(tmp_path):
    """A shard whose samples are all dropped still yields a typed block (Ray concatenates blocks)."""
    import pyarrow as pa

    from metamorph.data.tokenizer import train_bpe
    from metamorph.data.render import render_shards, rendered_schema

    with ShardWriter(tmp_path / "mix", "train") as w:
        w.write(Sample(id="x", source="toy", family="x", task="image_qa", split="train",
                       conversation=[Turn(role="user", content="Hello?")]), [])
    train_bpe(["Hello?"] * 4, TokenizerConfig(vocab_size=300)).save_pretrained(tmp_path / "tok")
    t = render_shards(pa.table({"shard": [str(tmp_path / "mix" / w.shards[0])]}),
                       tokenizer_dir=str(tmp_path / "tok"), n_visual=N, max_length=64, system_prompt=None, batch_size=8)
    assert t.schema == rendered_schema()
    assert t.to_pylist() == [{"id": "x", "status": "dropped_no_targets", "input_ids": [], "labels": [],
                              "visual_mask": [], "response_visual_mask": [], "images": []}]
