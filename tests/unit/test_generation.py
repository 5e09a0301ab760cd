"""Generation: N visual steps after <image_start>, feedback semantics, KV cache = no cache, CFG.

    pytest tests/unit/test_generation.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, Prompt
from metamorph.model.modeling import MetaMorphForCausalLM

V, D, N = 40, 8, 4
START, END, EOT = 38, 39, 2


@pytest.fixture(scope="module")
def model():
    cfg = MetaMorphConfig(
        llm=LLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=V),
        vision_dim=D, n_tokens=N, image_start_id=START, image_end_id=END,
    )
    return MetaMorphForCausalLM.from_config(cfg, seed=0)


def _bias_start(model, monkeypatch, at_step: int):
    """Script the LM head so that the `at_step`-th text token is <image_start>."""
    orig = model.lm_logits
    calls = {"n": 0}

    def patched(h):
        logits = orig(h)
        if calls["n"] == at_step:
            logits = logits.clone()
            logits[..., START] += 1e4
        calls["n"] += 1
        return logits

    monkeypatch.setattr(model, "lm_logits", patched)
    return calls


def test_prompt_ending_in_image_start_gives_exactly_n_tokens(model):
    out = model.generate(Prompt(input_ids=[1, 5, 6, START]), GenerationConfig(max_new_tokens=3))
    assert len(out.images) == 1 and out.images[0].shape == (N, D)
    assert torch.allclose(out.images[0].norm(dim=-1), torch.ones(N), atol=1e-5)
    assert len(out.token_ids) == 3 and START not in out.token_ids  # max_images=1 bans a 2nd image


def test_model_emitted_image_start_then_text_resumes(model, monkeypatch):
    calls = _bias_start(model, monkeypatch, at_step=1)
    out = model.generate(Prompt(input_ids=[1, 5, 6]), GenerationConfig(max_new_tokens=4))
    assert out.token_ids[1] == START
    assert len(out.images) == 1 and out.images[0].shape == (N, D)
    assert len(out.token_ids) == 4 and calls["n"] == 4  # one LM-head call per text token only


def test_force_image_end(model, monkeypatch):
    _bias_start(model, monkeypatch, at_step=0)
    out = model.generate(Prompt(input_ids=[1, 5, 6]), GenerationConfig(max_new_tokens=3, force_image_end=True))
    assert out.token_ids[:2] == [START, END]


def test_max_images_zero_bans_images(model, monkeypatch):
    _bias_start(model, monkeypatch, at_step=0)
    out = model.generate(Prompt(input_ids=[1, 5, 6]), GenerationConfig(max_new_tokens=3, max_images=0))
    assert START not in out.token_ids and out.images == []


def test_feedback_is_projector_of_normalised_head_output(model):
    """Recompute the visual tokens with one full forward over the fed-back sequence."""
    prompt = [1, 5, 6, START]
    out = model.generate(Prompt(input_ids=prompt), GenerationConfig(max_new_tokens=1))
    v_ND = out.images[0]
    with torch.no_grad():
        x = model.llm.get_input_embeddings()(torch.tensor([prompt]))
        x = torch.cat([x, model.project(v_ND[:-1])[None]], dim=1)  # inputs: prompt, v1..v_{N-1}
        h = model.llm.model(inputs_embeds=x).last_hidden_state[0]
        want = F.normalize(model.vision_head(h[len(prompt) - 1 :]), dim=-1)  # at <is>, v1, ..., v_{N-1}
    assert torch.allclose(v_ND, want, atol=1e-5)


def test_stop_ids(model):
    out = model.generate(Prompt(input_ids=[1, 5, 6]), GenerationConfig(max_new_tokens=5))
    first = out.token_ids[0]
    out2 = model.generate(Prompt(input_ids=[1, 5, 6]), GenerationConfig(max_new_tokens=5), stop_ids=[first])
    assert out2.token_ids == [first] and out2.stopped


@pytest.mark.parametrize("do_sample", [False, True])
def test_kv_cache_equals_no_cache(model, monkeypatch, do_sample):
    # a prompt image, then the model opens an image at step 2 and text continues after it
    feats = F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    prompt = Prompt(input_ids=[1, 5, START] + [0] * N + [END, 6], visual_mask=[False] * 3 + [True] * N + [False] * 2,
                    vision_feats=feats)
    results = []
    for use_cache in (True, False):
        with monkeypatch.context() as mp:
            _bias_start(model, mp, at_step=2)
            cfg = GenerationConfig(max_new_tokens=6, use_cache=use_cache, do_sample=do_sample, temperature=2.0,
                                   top_k=20, top_p=0.9, seed=3)
            results.append(model.generate(prompt, cfg))
    a, b = results
    assert a.token_ids == b.token_ids and a.token_ids[2] == START
    assert len(a.images) == len(b.images) == 1
    assert torch.allclose(a.images[0], b.images[0], atol=1e-5)


def test_cfg_scale_one_equals_no_cfg_and_cache_agrees(model):
    prompt = Prompt(input_ids=[1, 5, 7, 8, 9, 6, START])
    uncond = Prompt(input_ids=[1, 5, 6, START])  # the instruction (7 8 9) dropped
    plain = model.generate(prompt, GenerationConfig(max_new_tokens=2))
    one = model.generate(prompt, GenerationConfig(max_new_tokens=2, image_cfg_scale=1.0), uncond_prompt=uncond)
    assert one.token_ids == plain.token_ids
    assert torch.allclose(one.images[0], plain.images[0], atol=1e-5)
    three = model.generate(prompt, GenerationConfig(max_new_tokens=2, image_cfg_scale=3.0), uncond_prompt=uncond)
    assert not torch.allclose(three.images[0], plain.images[0], atol=1e-3)
    three_nc = model.generate(prompt, GenerationConfig(max_new_tokens=2, image_cfg_scale=3.0, use_cache=False),
                              uncond_prompt=uncond)
    assert torch.allclose(three.images[0], three_nc.images[0], atol=1e-5)
    # the first guided token is u + s (c - u) of the two head outputs, normalised
    with torch.no_grad():
        h_c = model.llm.model(input_ids=torch.tensor([prompt.input_ids])).last_hidden_state[0, -1]
        h_u = model.llm.model(input_ids=torch.tensor([uncond.input_ids])).last_hidden_state[0, -1]
        c, u = model.vision_head(h_c), model.vision_head(h_u)
    assert torch.allclose(three.images[0][0], F.normalize(u + 3.0 * (c - u), dim=-1), atol=1e-5)
    with pytest.raises(ValueError, match="uncond_prompt"):
        model.generate(prompt, GenerationConfig(image_cfg_scale=2.0))
