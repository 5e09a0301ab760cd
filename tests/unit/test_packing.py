"""Packing: truncation rules, row invariants, efficiency, Parquet round trip, collate.

    pytest tests/unit/test_packing.py -q
"""

from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from metamorph.data.chat import IGNORE, ChatTemplate
from metamorph.data.packing import (
    SCHEMA,
    Packer,
    PackingStats,
    PackSample,
    PartWriter,
    collate,
    iter_rows,
    pack,
    read_metadata,
    truncate,
)
from metamorph.data.tokenizer import TokenizerConfig, special_ids, train_bpe

N, D = 4, 3  # visual positions per image, feature dim


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["What colour is the circle?", "Red.", "Draw a blue square."] * 10, TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def tpl(tok):
    return ChatTemplate(tok, n_visual=N)


def _feats(sample_no: int, n_images: int) -> bytes:
    # feature value = sample number + visual index / 100: lets tests check alignment after packing
    k = n_images * N
    vals = sample_no + np.arange(k, dtype=np.float32)[:, None] / 100 + np.zeros((k, D), np.float32)
    return vals.astype(np.float16).tobytes()


def _sample(tpl, i: int, rng: random.Random) -> PackSample:
    kind = rng.choice(["qa", "t2i", "long"])
    if kind == "qa":
        conv = [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}]
    elif kind == "t2i":
        conv = [{"role": "user", "content": "Draw a blue square."}, {"role": "assistant", "content": "<image>"}]
    else:
        conv = [{"role": "user", "content": "<image><image> What colour? " * 2}, {"role": "assistant", "content": "Red. " * 5}]
    r = tpl.render(conv)
    return PackSample.from_rendered(f"s{i}", r, _feats(i, len(r.image_starts)))


def test_truncate_never_cuts_an_image(tok, tpl):
    ids = special_ids(tok)
    conv = [
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "Red. <image> Red. <image>"},
    ]
    r = tpl.render(conv)
    (s0, e0), (s1, e1) = r.image_span(0), r.image_span(1)
    assert e0 - s0 == N + 2
    out, status = truncate(r, len(r))
    assert (status, out) == ("ok", r)
    # a cut inside image 1 moves back to just before its <image_start>
    out, status = truncate(r, s1 + 2)
    assert status == "truncated" and len(out) == s1 and out.image_starts == [s0]
    assert out.input_ids[-1] != ids.image_start and sum(out.visual_mask) == N
    # a cut right after image 0's <image_end> keeps it
    out, _ = truncate(r, e0)
    assert len(out) == e0 and out.input_ids[-1] == ids.image_end and len(out.image_starts) == 1
    # a cut inside image 0 leaves "Red. " of the answer: still a target, so truncated not dropped
    out, status = truncate(r, s0 + 1)
    assert status == "truncated" and len(out) == s0 and out.image_starts == []
    # a cut inside the prompt leaves no target: dropped
    out, status = truncate(r, 6)
    assert (out, status) == (None, "dropped_too_long")
    # no assistant turn: nothing to learn
    out, status = truncate(tpl.render([{"role": "user", "content": "Red."}]), 512)
    assert (out, status) == (None, "dropped_no_targets")


def test_packed_rows_keep_every_invariant(tok, tpl):
    ids = special_ids(tok)
    L = 128
    rng = random.Random(0)
    samples = [_sample(tpl, i, rng) for i in range(300)]
    rows = pack(samples, L, ids.pad, window=16)
    assert rows == pack(samples, L, ids.pad, window=16)  # deterministic
    seen = [sid for r in rows for sid in r["sample_ids"]]
    assert sorted(seen) == sorted(s.id for s in samples)  # every sample exactly once
    by_id = {s.id: s for s in samples}
    nonpad = 0
    for row in rows:
        for key in ("input_ids", "labels", "position_ids", "segment_ids", "visual_mask", "response_visual_mask"):
            assert len(row[key]) == L
        n = row["num_tokens"]
        nonpad += n
        seg, pos = row["segment_ids"], row["position_ids"]
        assert all(x == 0 for x in seg[n:]) and all(x == IGNORE for x in row["labels"][n:])
        assert all(x == ids.pad for x in row["input_ids"][n:]) and not any(row["visual_mask"][n:])
        start = 0
        for k, sid in enumerate(row["sample_ids"], start=1):
            s = by_id[sid]
            end = start + len(s)
            assert seg[start:end] == [k] * len(s)
            assert pos[start:end] == list(range(len(s)))  # position ids restart per sample
            assert row["input_ids"][start:end] == s.input_ids and row["labels"][start:end] == s.labels
            assert row["labels"][start] == IGNORE  # the first token of a sample is never a target
            start = end
        assert start == n
        # every visual run is exactly one whole image bracketed by its tokens
        vm = row["visual_mask"]
        t = 0
        while t < L:
            if vm[t]:
                assert row["input_ids"][t - 1] == ids.image_start and vm[t : t + N] == [True] * N
                assert row["input_ids"][t + N] == ids.image_end
                t += N
            else:
                t += 1
    eff = nonpad / (len(rows) * L)
    assert eff >= 0.9, eff


def test_window_bounds_open_rows(tok, tpl):
    ids = special_ids(tok)
    rng = random.Random(1)
    p = Packer(256, ids.pad, window=2)
    for i in range(50):
        p.add(_sample(tpl, i, rng))
        assert len(p._open) <= 2
    with pytest.raises(ValueError, match="truncate"):
        Packer(8, ids.pad).add(_sample(tpl, 0, rng))


def test_parquet_roundtrip_and_collate(tok, tpl, tmp_path):
    ids = special_ids(tok)
    L = 96
    rng = random.Random(2)
    samples = [_sample(tpl, i, rng) for i in range(60)]
    rows = pack(samples, L, ids.pad, window=8)
    stats = PackingStats(max_length=L)
    with PartWriter(tmp_path, row_group_size=4, rows_per_part=8, metadata={"max_length": L, "feature_dim": D}) as w:
        for r in rows:
            w.write(r)
            stats.add_row(r)
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert [p.name for p in parts][:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert w.parts == [(p.name, pq.ParquetFile(p).metadata.num_rows) for p in parts]
    for p in parts:
        f = pq.ParquetFile(p)
        assert f.schema_arrow.remove_metadata() == SCHEMA
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        assert all(s == 4 for s in sizes[:-1]) and sum(sizes) <= 8
    assert read_metadata(tmp_path) == {"max_length": str(L), "feature_dim": str(D)}
    back = list(iter_rows(tmp_path))
    assert back == rows
    d = stats.as_dict(n_visual=N)
    assert d["n_rows"] == len(rows) and d["nonpad_tokens"] == sum(r["num_tokens"] for r in rows)
    assert d["text_tokens"] + d["visual_tokens"] == d["nonpad_tokens"]
    assert d["n_images"] == sum(sum(s.visual_mask) for s in samples) // N

    batch = collate(back[:3])
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids", "visual_mask", "response_visual_mask", "vision_feats"}
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (3, L)
    assert batch["visual_mask"].dtype == torch.bool
    feats = batch["vision_feats"]
    assert feats.dtype == torch.float32 and feats.shape == (int(batch["visual_mask"].sum()), D)
    # features line up with visual positions in row-major order: sample number is the integer part
    seg_of = batch["segment_ids"][batch["visual_mask"]]
    rows_of = torch.nonzero(batch["visual_mask"])[:, 0]
    expect = [int(back[r]["sample_ids"][s - 1][1:]) for r, s in zip(rows_of.tolist(), seg_of.tolist())]
    assert feats[:, 0].floor().long().tolist() == expect


def test_collate_without_images(tok, tpl):
    ids = special_ids(tok)
    r = tpl.render([{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}])
    rows = pack([PackSample.from_rendered("a", r)], 64, ids.pad)
    batch = collate(rows, feature_dim=D)
    assert batch["vision_feats"].shape == (0, D) and not batch["visual_mask"].any()


def test_packed_rows_match_unpacked_samples(tok):
    """Packing changes nothing the model sees: same logits per sample, same losses."""
    from metamorph.model.config import LLMConfig, MetaMorphConfig
    from metamorph.model.modeling import MetaMorphForCausalLM

    ids = special_ids(tok)
    D8 = 8
    tpl8 = ChatTemplate(tok, n_visual=N)
    convs = [
        [{"role": "user", "content": "<image>\nWhat colour is the circle?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "user", "content": "Draw a blue square."}, {"role": "assistant", "content": "<image>"}],
        [{"role": "user", "content": "<image>\nDraw a blue square."}, {"role": "assistant", "content": "<image> Red."}],
    ]
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, conv in enumerate(convs):
        r = tpl8.render(conv)
        f = torch.nn.functional.normalize(torch.randn(sum(r.visual_mask), D8, generator=g), dim=-1)
        samples.append(PackSample.from_rendered(f"s{i}", r, f.numpy().astype(np.float16).tobytes()))
    L = 128
    packed = pack(samples, L, ids.pad, window=4)
    assert len(packed) == 1 and len(packed[0]["sample_ids"]) == 3
    single = [pack([s], L, ids.pad)[0] for s in samples]

    cfg = MetaMorphConfig(
        llm=LLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position=L),
        vision_dim=D8, n_tokens=N, image_start_id=ids.image_start, image_end_id=ids.image_end, pad_id=ids.pad,
    )
    model = MetaMorphForCausalLM.from_config(cfg, seed=0).eval()
    with torch.no_grad():
        out_p = model(**collate(packed))
        out_s = model(**collate(single))
    start = 0
    for b, s in enumerate(samples):
        n = len(s)
        torch.testing.assert_close(out_p.logits[0, start : start + n], out_s.logits[b, :n], atol=1e-5, rtol=1e-5)
        start += n
    assert (out_p.n_text_tokens, out_p.n_visual_targets) == (out_s.n_text_tokens, out_s.n_visual_targets)
    assert out_p.n_visual_targets == 2 * N  # two response images, every visual position a target
    torch.testing.assert_close(out_p.text_loss, out_s.text_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_p.vision_loss, out_s.vision_loss, atol=1e-5, rtol=1e-5)
