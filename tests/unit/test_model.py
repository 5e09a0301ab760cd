"""MetaMorph model: loss positions and values by hand, trainable sets, packing mask, persistence.

    pytest tests/unit/test_model.py -q
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, Prompt
from metamorph.model.modeling import PACKED_SDPA, MetaMorphForCausalLM, _feature_rows, packed_sdpa_attention
from metamorph.model.modeling_metamorph import load_vpit

V, D, N = 40, 8, 4
BOS, USER, ASSIST, EOT, PAD = 1, 5, 6, 2, 0
START, END = 38, 39


def _cfg(visual_pos_embed: bool = False, image_index_embed: int = 0, **llm_kw) -> MetaMorphConfig:
    llm = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=V)
    llm.update(llm_kw)
    return MetaMorphConfig(llm=LLMConfig(**llm), vision_dim=D, n_tokens=N, image_start_id=START, image_end_id=END,
                           visual_pos_embed=visual_pos_embed, image_index_embed=image_index_embed)


def _model(visual_pos_embed: bool = False, image_index_embed: int = 0, **llm_kw) -> MetaMorphForCausalLM:
    return MetaMorphForCausalLM.from_config(_cfg(visual_pos_embed, image_index_embed, **llm_kw), seed=0)


def _example():
    """One row: prompt image (unsupervised), response text + response image, eot, padding.

    pos: 0 BOS | 1 USER | 2 <is> | 3-6 prompt image | 7 <ie> | 8 ASSIST | 9 '7' | 10 <is> |
         11-14 response image | 15 <ie> | 16 EOT | 17-19 pad
    """
    ids = [BOS, USER, START] + [PAD] * N + [END, ASSIST, 7, START] + [PAD] * N + [END, EOT] + [PAD] * 3
    labels = [-100] * 9 + [7, START] + [-100] * N + [END, EOT] + [-100] * 3
    L = len(ids)
    vm = [False] * L
    rvm = [False] * L
    for p in range(3, 7):
        vm[p] = True
    for p in range(11, 15):
        vm[p] = rvm[p] = True
    seg = [1] * 17 + [0] * 3
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(2 * N, D, generator=g), dim=-1)
    return dict(
        input_ids=torch.tensor([ids]),
        labels=torch.tensor([labels]),
        position_ids=torch.arange(L)[None],
        segment_ids=torch.tensor([seg]),
        visual_mask=torch.tensor([vm]),
        response_visual_mask=torch.tensor([rvm]),
        vision_feats=feats,
    )


def _by_hand(model, batch, ce_pos, ce_tgt, vis_pos, vis_rows):
    """The loss recomputed with plain torch ops from the weights (the LLM body is HF's)."""
    ids, feats = batch["input_ids"][0], batch["vision_feats"]
    E = model.llm.get_input_embeddings().weight
    x = E[ids].clone()
    p0, p2 = model.projector[0], model.projector[2]
    proj = F.gelu(feats @ p0.weight.T + p0.bias) @ p2.weight.T + p2.bias
    x[batch["visual_mask"][0]] = proj
    h = model.llm.model(inputs_embeds=x[None], position_ids=batch["position_ids"]).last_hidden_state[0]
    logits = h @ model.llm.lm_head.weight.T
    logp = torch.log_softmax(logits, -1)
    text = -torch.stack([logp[t, y] for t, y in zip(ce_pos, ce_tgt)]).mean()
    h0, h2 = model.vision_head[0], model.vision_head[2]
    cos = []
    for t, r in zip(vis_pos, vis_rows):
        pred = F.gelu(h[t] @ h0.weight.T + h0.bias) @ h2.weight.T + h2.bias
        pred = pred / pred.norm()
        cos.append((pred * feats[r]).sum() / feats[r].norm())
    vision = -torch.stack(cos).mean() if cos else torch.tensor(0.0)
    return text, vision


def test_config_validation():
    with pytest.raises(ValueError, match="n_tokens"):
        MetaMorphConfig(n_tokens=5)
    with pytest.raises(ValueError, match="num_kv_heads"):
        LLMConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        MetaMorphForCausalLM.from_config(MetaMorphConfig(image_start_id=1, image_end_id=2))
    with pytest.raises(ValueError, match="image_start_id"):
        MetaMorphForCausalLM.from_config(MetaMorphConfig(llm=LLMConfig(vocab_size=10)))


def test_loss_positions_and_value_by_hand():
    torch.manual_seed(0)
    model = _model()
    batch = _example()
    out = model(**batch)
    # CE: t predicts labels[t+1]: '7' (t=8), <image_start> (t=9), <image_end> from the LAST
    # visual token (t=14), EOT (t=15). Prompt, prompt image and image positions: none.
    ce_pos, ce_tgt = [8, 9, 14, 15], [7, START, END, EOT]
    # Visual: the head at t regresses the feature at t+1 for t+1 in 11..14 -> t = 10..13, so
    # <image_start> (t=10) predicts the first visual token; feature rows 4..7 (the prompt
    # image's rows 0..3 come first) and the prompt image gets no visual loss.
    vis_pos, vis_rows = [10, 11, 12, 13], [4, 5, 6, 7]
    assert out.n_text_tokens == 4 and out.n_visual_targets == 4
    text, vision = _by_hand(model, batch, ce_pos, ce_tgt, vis_pos, vis_rows)
    assert torch.allclose(out.text_loss, text, atol=1e-5)
    assert torch.allclose(out.vision_loss, vision, atol=1e-5)
    assert torch.allclose(out.loss, text + 1.0 * vision, atol=1e-5)
    # the CE gradient reaches exactly the logits of the CE positions
    out.logits.retain_grad()
    out.text_loss.backward()
    rows = out.logits.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert rows == ce_pos


def test_vision_coef_scales_visual_term():
    model = _model()
    out = model(**_example(), vision_coef=0.25)
    assert torch.allclose(out.loss, out.text_loss + 0.25 * out.vision_loss, atol=1e-6)


def test_no_response_image_gives_exact_zero_and_a_clean_graph():
    model = _model()
    batch = _example()
    batch["response_visual_mask"] = torch.zeros_like(batch["response_visual_mask"])
    batch["labels"][0, 10] = -100  # now an input image: no <image_start> target either
    out = model(**batch)
    assert out.n_visual_targets == 0
    assert out.vision_loss.item() == 0.0 and not torch.isnan(out.loss)
    assert torch.equal(out.loss, out.text_loss)
    out.loss.backward()
    # every trainable parameter got a (possibly zero) gradient: DDP would not complain
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.vision_head[2].weight.grad.abs().sum() == 0

    # a text-only batch (no images at all, empty feature tensor) is fine too
    model.zero_grad()
    ids = torch.tensor([[BOS, USER, ASSIST, 7, EOT]])
    out = model(input_ids=ids, labels=torch.tensor([[-100, -100, -100, 7, EOT]]), vision_feats=torch.zeros(0, D))
    out.loss.backward()
    assert out.vision_loss.item() == 0.0 and out.n_text_tokens == 2
    assert all(p.grad is not None for p in model.parameters())


def _grad_report(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_trainable_sets():
    model = _model()
    batch = _example()
    names = model.set_trainable("connector")
    grads = _grad_report(model, batch)
    emb = "llm.model.embed_tokens.weight"
    head = "llm.lm_head.weight"
    # the official stage 1: projector + the two new input-embedding rows; lm_head stays frozen
    assert set(names) == {emb} | {n for n in grads if n.startswith("projector.")}
    assert head not in names
    for n, g in grads.items():
        if n.startswith("projector."):
            assert g is not None and g.abs().sum() > 0, n
        elif n == emb:
            nonzero = g.abs().sum(-1).nonzero().flatten().tolist()
            assert nonzero == [START, END], (n, nonzero)  # only the new special-token rows
        else:
            assert g is None, n
    # stage 1 has no visual term: loss is the text CE alone
    out = model(**batch)
    assert torch.equal(out.loss, out.text_loss) and out.vision_loss.item() != 0.0

    names = model.set_trainable("vpit")
    grads = _grad_report(model, batch)
    assert set(names) == set(grads)
    for n, g in grads.items():
        assert g is not None and g.abs().sum() > 0, n
    with pytest.raises(ValueError, match="connector"):
        model.set_trainable("decoder")


def test_stage1_with_a_tied_head_still_moves_only_the_new_rows():
    model = _model(tie_word_embeddings=True)
    model.set_trainable("connector")
    g = _grad_report(model, _example())["llm.model.embed_tokens.weight"]
    assert g.abs().sum(-1).nonzero().flatten().tolist() == [START, END]


@pytest.mark.parametrize("attn", ["sdpa", "sdpa-mask", "eager"])
def test_packed_rows_match_unpacked(attn):
    """Two samples in one row (positions restart, segments 1/2, padding 0) = each alone.
    sdpa runs per sample span (PACKED_SDPA); sdpa-mask with the row's block-diagonal mask."""
    model = _model(attn_implementation=attn.removesuffix("-mask"))
    if attn == "sdpa-mask":
        model.llm.config._attn_implementation = "sdpa"
    a_ids = [BOS, USER, START] + [PAD] * N + [END, ASSIST, 7, EOT]
    b_ids = [BOS, USER, ASSIST, 9, 10, EOT]
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    vm_a = [False, False, False] + [True] * N + [False] * 4

    def lab(ids):
        return [-100] * (len(ids) - 2) + ids[-2:]

    packed = dict(
        input_ids=torch.tensor([a_ids + b_ids + [PAD] * 2]),
        labels=torch.tensor([lab(a_ids) + lab(b_ids) + [-100] * 2]),
        position_ids=torch.tensor([list(range(len(a_ids))) + list(range(len(b_ids))) + [0, 1]]),
        segment_ids=torch.tensor([[1] * len(a_ids) + [2] * len(b_ids) + [0] * 2]),
        visual_mask=torch.tensor([vm_a + [False] * (len(b_ids) + 2)]),
        vision_feats=feats,
    )
    out = model(**packed)
    alone_a = model(input_ids=torch.tensor([a_ids]), labels=torch.tensor([lab(a_ids)]),
                    visual_mask=torch.tensor([vm_a]), vision_feats=feats)
    alone_b = model(input_ids=torch.tensor([b_ids]), labels=torch.tensor([lab(b_ids)]))
    la = len(a_ids)
    assert torch.allclose(out.logits[0, :la], alone_a.logits[0], atol=1e-5)
    assert torch.allclose(out.logits[0, la : la + len(b_ids)], alone_b.logits[0], atol=1e-5)
    # token-mean over both samples' targets (2 each); nothing predicted across the boundary
    assert out.n_text_tokens == 4
    assert torch.allclose(out.text_loss, (alone_a.text_loss + alone_b.text_loss) / 2, atol=1e-5)


def test_per_span_attention_trains_as_the_mask_does(tmp_path):
    """Two packed rows of 3 and 2 samples (GQA: 2 heads over 1 kv head): the per-span path gives
    the block-diagonal mask's loss and gradients; exports still say sdpa, and load back into it."""
    model = _model(visual_pos_embed=True)
    assert model.llm.config._attn_implementation == PACKED_SDPA
    g = torch.Generator().manual_seed(3)
    L = 24
    seg = torch.tensor([[1] * 7 + [2] * 9 + [3] * 6 + [0] * 2, [1] * 12 + [2] * 12])
    pos = torch.cat([torch.arange(int((r == k).sum())) for r in seg for k in r.unique_consecutive()]).view(2, L)
    vm = torch.zeros(2, L, dtype=torch.bool)
    vm[0, 1 : 1 + N] = vm[0, 17 : 17 + N] = vm[1, 14 : 14 + N] = True
    rvm = torch.zeros(2, L, dtype=torch.bool)
    rvm[1, 14 : 14 + N] = True
    batch = dict(input_ids=torch.randint(7, 30, (2, L), generator=g), position_ids=pos, segment_ids=seg,
                 labels=torch.randint(7, 30, (2, L), generator=g), visual_mask=vm, response_visual_mask=rvm,
                 vision_feats=F.normalize(torch.randn(int(vm.sum()), D, generator=g), dim=-1))
    got = {}
    for impl in (PACKED_SDPA, "sdpa"):
        model.zero_grad(set_to_none=True)
        model.llm.config._attn_implementation = impl
        out = model(**batch, vision_coef=2.0)
        out.loss.backward()
        got[impl] = (out.loss.detach(), out.logits.detach(), [p.grad.clone() for p in model.parameters()])
    (l1, z1, g1), (l2, z2, g2) = got[PACKED_SDPA], got["sdpa"]
    assert torch.allclose(l1, l2, atol=1e-6) and torch.allclose(z1, z2, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    assert out.n_visual_targets == N  # the response image: each token predicted from the one before
    model.llm.config._attn_implementation = PACKED_SDPA
    with pytest.raises(ValueError, match="softcap"):  # an LLM that caps its logits: refused, not dropped
        packed_sdpa_attention(model.llm.model.layers[0].self_attn, *(torch.zeros(1, 2, 4, 16),) * 3, None,
                              segment_spans=(((0, 4),),), softcap=30.0)
    model.save_pretrained(tmp_path / "m")
    assert PACKED_SDPA not in (tmp_path / "m" / "config.json").read_text()
    assert load_vpit(tmp_path / "m").llm.config._attn_implementation == PACKED_SDPA


def test_self_feed_gives_the_model_its_own_drawing_as_input():
    """self_feed 1: the response image's inputs are the model's teacher-forced predictions (the
    prompt image stays true), the targets stay the true features; 0: plain teacher forcing."""
    model = _model(visual_pos_embed=True)
    batch = _example()
    seen = []
    orig = model.project
    model.project = lambda feats, *a, **k: (seen.append(feats.detach().clone()), orig(feats, *a, **k))[1]
    torch.manual_seed(0)
    fed = model(**batch, vision_coef=1.0, self_feed=1.0)
    tf_inputs = seen[0]  # the teacher-forced pass inside _self_fed
    fed_inputs = seen[-1]
    model.project = orig
    plain = model(**batch, vision_coef=1.0)
    assert torch.equal(model(**batch, vision_coef=1.0, self_feed=0.0).loss, plain.loss)
    assert torch.equal(tf_inputs, batch["vision_feats"])
    assert torch.equal(fed_inputs[:N], batch["vision_feats"][:N])  # the prompt image
    # the response image's inputs: the head's predictions from the teacher-forced pass (unit norm)
    with torch.no_grad():
        h = model.decode(model.embed_tokens(batch["input_ids"]).masked_scatter(
            batch["visual_mask"][..., None], model.project(batch["vision_feats"])), batch["position_ids"])
        want = F.normalize(model.predict_visual(h[0, 10:14]), dim=-1)
    assert torch.allclose(fed_inputs[N:], want, atol=1e-5)
    assert fed.n_visual_targets == plain.n_visual_targets == N
    assert not torch.allclose(fed.vision_loss, plain.vision_loss)
    fed.loss.backward()  # trains through the fed inputs' second pass
    assert model.projector[0].weight.grad is not None
    with pytest.raises(ValueError, match="self_feed"):
        from stages.train_vpit import TrainVPiTConfig
        TrainVPiTConfig(self_feed=1.5)


def test_self_feed_scope_read_feeds_back_only_images_an_answer_reads():
    """scope "read": a crop followed by its answer ('7' after <image_end>) is fed back; an image
    followed only by <image_end> and the turn's end (a generated image) stays teacher-forced."""
    model = dataclasses.replace(_cfg(visual_pos_embed=True), eos_id=EOT)
    model = MetaMorphForCausalLM.from_config(model, seed=0)
    generated = _example()  # ... <is> image <ie> EOT
    crop = {k: v.clone() for k, v in generated.items()}
    crop["input_ids"][0, 16] = 7  # ... <is> image <ie> '7' (the answer), then EOT
    crop["input_ids"][0, 17] = EOT
    crop["labels"][0, 16:18] = torch.tensor([7, EOT])
    crop["segment_ids"][0, 17] = 1
    seen = []
    orig = model.project
    model.project = lambda feats, *a, **k: (seen.append(feats.detach().clone()), orig(feats, *a, **k))[1]
    for batch, fed_back in ((generated, False), (crop, True)):
        seen.clear()
        model(**batch, vision_coef=1.0, self_feed=1.0, self_feed_scope="read")
        assert torch.equal(seen[-1][N:], batch["vision_feats"][N:]) != fed_back
        seen.clear()
        model(**batch, vision_coef=1.0, self_feed=1.0, self_feed_scope="all")
        assert not torch.equal(seen[-1][N:], batch["vision_feats"][N:])  # "all" feeds either back
    model.project = orig
    with pytest.raises(ValueError, match="self_feed_scope"):
        model(**crop, self_feed=1.0, self_feed_scope="crops")
    from stages.train_vpit import TrainVPiTConfig
    with pytest.raises(ValueError, match="self_feed_scope"):
        TrainVPiTConfig(self_feed_scope="crops")


def test_self_feed_pass_over_sample_prefixes_predicts_as_a_pass_over_whole_packed_rows():
    """The self-fed pass runs only over the samples holding a drawn image, up to it. On two packed
    rows (the example sample second and third in row 0, first in row 1, padding between), every
    response image's fed inputs are what a teacher-forced pass over the whole rows predicts."""
    model = _model(visual_pos_embed=True)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from init: predictions that differ from position to position
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    ex = _example()
    n = 17  # the example's real positions; its row ends in padding
    filler = dict(input_ids=[BOS, USER, ASSIST, 9, 10, EOT], labels=[-100, -100, -100, 9, 10, EOT])

    def row(parts):
        cols = {k: [] for k in ("input_ids", "labels", "position_ids", "segment_ids", "visual_mask", "response_visual_mask")}
        for seg, part in enumerate(parts, 1):
            if part == "ex":
                for k in cols:
                    cols[k] += ex[k][0, :n].tolist() if k != "segment_ids" else [seg] * n
            else:
                m = len(filler["input_ids"])
                cols["input_ids"] += filler["input_ids"]; cols["labels"] += filler["labels"]
                cols["position_ids"] += list(range(m)); cols["segment_ids"] += [seg] * m
                cols["visual_mask"] += [False] * m; cols["response_visual_mask"] += [False] * m
        return cols

    rows = [row(["filler", "ex", "ex"]), row(["ex"])]
    L = max(len(r["input_ids"]) for r in rows)
    for r in rows:  # pad to L (segment 0, after the samples)
        k = L - len(r["input_ids"])
        for key, v in (("input_ids", PAD), ("labels", -100), ("position_ids", 0), ("segment_ids", 0),
                       ("visual_mask", False), ("response_visual_mask", False)):
            r[key] += [v] * k
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    batch["vision_feats"] = F.normalize(torch.randn(int(batch["visual_mask"].sum()), D, generator=g), dim=-1)
    seen = []
    orig = model.project
    model.project = lambda feats, *a, **k: (seen.append(feats.detach().clone()), orig(feats, *a, **k))[1]
    model(**batch, vision_coef=1.0, self_feed=1.0)
    model.project = orig
    fed = seen[-1]
    with torch.no_grad():
        x = model.embed_tokens(batch["input_ids"]).masked_scatter(batch["visual_mask"][..., None], model.project(batch["vision_feats"]))
        attn, kw = model._packing(batch["segment_ids"], x.dtype)
        h = model.decode(x, batch["position_ids"], attention_mask=attn, **kw)
        before = torch.zeros_like(batch["response_visual_mask"])
        before[:, :-1] = batch["response_visual_mask"][:, 1:]
        want = F.normalize(model.predict_visual(h[before]), dim=-1)
    resp = _feature_rows(batch["visual_mask"])[batch["response_visual_mask"]]
    assert resp.numel() == 3 * N
    print("DIFF", (fed[resp] - want).abs().max()); assert torch.allclose(fed[resp], want, atol=1e-5)
    prompt = _feature_rows(batch["visual_mask"])[batch["visual_mask"] & ~batch["response_visual_mask"]]
    assert torch.equal(fed[prompt], batch["vision_feats"][prompt])  # prompt images stay true


def test_special_rows_start_at_mean_and_checkpoint_resize(tmp_path):
    model = _model()
    for W in (model.llm.get_input_embeddings().weight, model.llm.get_output_embeddings().weight):
        mean = W[:START].mean(0)
        assert torch.allclose(W[START], mean) and torch.allclose(W[END], mean)
    # an HF checkpoint with a smaller vocab: resized, new rows at the mean of the old ones
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=36, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    hf.save_pretrained(tmp_path / "hf")
    cfg = dataclasses.replace(_cfg(), llm=LLMConfig(path=str(tmp_path / "hf"), vocab_size=V))
    m = MetaMorphForCausalLM.from_config(cfg)
    W = m.llm.get_input_embeddings().weight
    assert W.shape == (V, 32) and m.config.llm.vocab_size == V and m.config.llm.num_layers == 1
    old = hf.get_input_embeddings().weight
    assert torch.equal(W[:36], old)
    assert torch.allclose(W[36:], old.mean(0).expand(4, -1), atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = _model(tie_word_embeddings=tie)
    with torch.no_grad():  # make the heads differ from any fresh init
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _example()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()  # one HF checkpoint (see test_hf_export)
    back = load_vpit(tmp_path / "m")
    assert back.config == model.config
    with torch.no_grad():
        a, b = model(**batch), back(**batch)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.loss, b.loss)


def test_visual_pos_embed_tells_the_slots_apart():
    """The same feature in every slot of an image: the plain connector gives the LLM N identical
    inputs; with visual_pos_embed each slot's input (and so the logits) depends on its slot."""
    feat_D = F.normalize(torch.randn(D, generator=torch.Generator().manual_seed(1)), dim=-1)
    same_KD = feat_D.expand(N, D)
    with torch.no_grad():
        plain = _model().project(same_KD)
        assert torch.equal(plain, plain[:1].expand(N, -1))
        model = _model(visual_pos_embed=True)
        x_Kd = model.project(same_KD)
        assert model.visual_pos_embed.shape == (N, 32)
        assert torch.allclose(x_Kd, model.projector(same_KD) + model.visual_pos_embed)
        assert len({tuple(r.tolist()) for r in x_Kd}) == N
        # generation feeds one token at a time with its slot: the same inputs as a whole image
        for k in range(N):
            assert torch.allclose(model.project(same_KD[k], k), x_Kd[k], atol=1e-6)
        with pytest.raises(ValueError, match="slot_K"):
            model.project(same_KD[:N - 1])
        # the logits follow the slot embedding: permuting the table changes them
        batch = _example()
        batch["vision_feats"] = feat_D.expand(2 * N, D).clone()
        before = model(**batch).logits
        model.visual_pos_embed.copy_(model.visual_pos_embed.flip(0))
        assert not torch.allclose(model(**batch).logits, before)
    # it is part of the connector: it trains in stage 1 and stage 2
    assert "visual_pos_embed" in model.set_trainable("connector")
    g = _grad_report(model, _example())["visual_pos_embed"]
    assert g is not None and (g.abs().sum(-1) > 0).all()
    assert "visual_pos_embed" in model.set_trainable("vpit")


def test_visual_pos_embed_round_trip(tmp_path):
    model = _model(visual_pos_embed=True)
    with torch.no_grad():
        model.visual_pos_embed.add_(torch.randn_like(model.visual_pos_embed))
    model.save_pretrained(tmp_path / "m")
    back = load_vpit(tmp_path / "m")
    assert back.config == model.config and back.config.visual_pos_embed
    assert torch.equal(back.visual_pos_embed, model.visual_pos_embed)
    with torch.no_grad():
        assert torch.equal(model(**_example()).logits, back(**_example()).logits)


def _clip(n_frames: int, feats_KD: torch.Tensor) -> dict:
    """One sample: n_frames prompt images in a row, a question, an answer ('7')."""
    ids = [BOS, USER] + ([START] + [PAD] * N + [END]) * n_frames + [9, ASSIST, 7, EOT]
    vm = [i >= 2 and ids[i] == PAD for i in range(len(ids))]
    return dict(ids=ids, labels=[-100] * (len(ids) - 2) + [7, EOT], vm=vm, feats=feats_KD[: n_frames * N])


def test_image_index_embed_tells_the_frames_of_a_sample_apart(tmp_path):
    """Frames that look the same get different inputs by their ordinal in their own sample (the
    first image 0, later ones past the table share its last row); a sample packed after another
    is embedded as it is alone; generation feeds a drawn image back with the ordinal training gives it."""
    model = _model(visual_pos_embed=True, image_index_embed=2)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        model.image_index_embed.add_(torch.randn(model.image_index_embed.shape, generator=g))
    frame_ND = F.normalize(torch.randn(N, D, generator=g), dim=-1)
    same_KD = frame_ND.repeat(3, 1)  # three identical frames
    a, b = _clip(3, same_KD), _clip(1, same_KD)
    L = len(a["ids"]) + len(b["ids"])
    packed = dict(
        input_ids=torch.tensor([a["ids"] + b["ids"]]), labels=torch.tensor([a["labels"] + b["labels"]]),
        position_ids=torch.tensor([list(range(len(a["ids"]))) + list(range(len(b["ids"])))]),
        segment_ids=torch.tensor([[1] * len(a["ids"]) + [2] * len(b["ids"])]),
        visual_mask=torch.tensor([a["vm"] + b["vm"]]), vision_feats=torch.cat([a["feats"], b["feats"]]))
    assert model.image_ordinals(packed["input_ids"], packed["visual_mask"], packed["segment_ids"]).tolist() == \
        [0] * N + [1] * N + [2] * N + [0] * N
    with torch.no_grad():
        x_Kd = model.project(packed["vision_feats"], image_K=torch.tensor([0] * N + [1] * N + [2] * N + [0] * N))
        assert not torch.allclose(x_Kd[:N], x_Kd[N : 2 * N])  # frame 0 and frame 1 differ
        assert torch.equal(x_Kd[N : 2 * N], x_Kd[2 * N : 3 * N])  # ordinals past the table share its last row
        assert torch.equal(x_Kd[:N], x_Kd[3 * N :])  # every sample starts at 0
        fwd = model(**packed)
        alone = model(input_ids=torch.tensor([b["ids"]]), labels=torch.tensor([b["labels"]]),
                      visual_mask=torch.tensor([b["vm"]]), vision_feats=b["feats"])
        assert torch.allclose(fwd.logits[0, len(a["ids"]) :], alone.logits[0], atol=1e-5)
        assert L == fwd.logits.shape[1]
    with pytest.raises(ValueError, match="image_K"):
        model.project(frame_ND)
    # generation: after a prompt image, the drawn image is image 1, as teacher forcing embeds it
    prompt = [BOS, USER, START] + [PAD] * N + [END, ASSIST, START]
    vm = [False] * 3 + [True] * N + [False] * 3
    out = model.generate(Prompt(input_ids=prompt, visual_mask=vm, vision_feats=frame_ND), GenerationConfig(max_new_tokens=1))
    drawn_ND = out.images[0]
    ids = prompt + [PAD] * N + [END]
    vm_full = vm + [True] * N + [False]
    rvm = [False] * len(prompt) + [True] * N + [False]
    with torch.no_grad():
        h = model.decode(model.embed_tokens(torch.tensor([ids])).masked_scatter(
            torch.tensor([vm_full])[..., None],
            model.project(torch.cat([frame_ND, drawn_ND]), image_K=torch.tensor([0] * N + [1] * N))),
            torch.arange(len(ids))[None])
        want = F.normalize(model.predict_visual(h[0, len(prompt) - 1 : len(prompt) + N - 1]), dim=-1)
    assert torch.allclose(drawn_ND, want, atol=1e-5)
    assert model.image_ordinals(torch.tensor([ids]), torch.tensor([rvm])).tolist() == [1] * N
    # part of the connector, saved and loaded with the model
    assert "image_index_embed" in model.set_trainable("connector")
    model.set_trainable("vpit")
    model.save_pretrained(tmp_path / "m")
    back = load_vpit(tmp_path / "m")
    assert back.config == model.config and back.config.image_index_embed == 2
    with torch.no_grad():
        assert torch.equal(back(**packed).logits, fwd.logits)


def test_weight_decay_spares_the_position_tables():
    """AdamW with weight decay shrinks the LLM's matrices but not the slot / image-ordinal tables
    (they carry where a token sits and which image it is in), nor norms and biases."""
    from metamorph.train.loop import param_groups

    model = _model(visual_pos_embed=True, image_index_embed=2)
    model.set_trainable("vpit")
    groups = param_groups(model, 0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert {"visual_pos_embed", "image_index_embed"} <= spared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves anything
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["visual_pos_embed"], before["visual_pos_embed"])
    assert torch.equal(after["image_index_embed"], before["image_index_embed"])
    decayed = [n for n in before if n not in spared]
    assert decayed and all(after[n].norm() < before[n].norm() for n in decayed)
    # without the tables the model names nothing to spare
    assert _model().no_weight_decay() == set()
