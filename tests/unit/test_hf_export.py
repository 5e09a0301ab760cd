"""Exports open in the tools people use: the VPiT model with transformers' Auto classes (registered
on ``import metamorph``, or as remote code), its tokenizer's chat template equals our renderer,
and the decoder as a diffusers pipeline (with or without remote code).

    pytest -q tests/unit/test_hf_export.py

The fresh-venv check (only torch + transformers + diffusers installed) is
tests/integration/test_exports_mlflow.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metamorph.data.chat import ChatTemplate, jinja_chat_template
from metamorph.data.tokenizer import TokenizerConfig, special_ids, train_bpe
from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, Prompt
from metamorph.model.modeling import REMOTE_CODE_FILES, MetaMorphForCausalLM

METAMORPH_IMPORT = re.compile(r"^\s*(from|import)\s+metamorph\b", re.M)


@pytest.fixture(scope="module")
def tok():
    texts = ["What colour is the square?", "red", "Generate an image of a red circle.", "A blue one.",
             "yes\n\nno 123", "Is it big? It is small."] * 5
    return train_bpe(texts, TokenizerConfig(vocab_size=400))


def _model(tok, eos_id=None, visual_pos_embed=False, image_index_embed=0):
    ids = special_ids(tok)
    cfg = MetaMorphConfig(
        llm=LLMConfig(vocab_size=len(tok), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=64, max_position=256),
        vision_dim=16, n_tokens=4, image_start_id=ids.image_start, image_end_id=ids.image_end, pad_id=ids.pad,
        bos_id=ids.bos, eos_id=ids.eot if eos_id is None else eos_id, visual_pos_embed=visual_pos_embed,
        image_index_embed=image_index_embed,
    )
    return MetaMorphForCausalLM.from_config(cfg, seed=3)


def _export(model, tok, d: Path) -> Path:
    model.save_pretrained(d)
    tok.chat_template = jinja_chat_template(tok, model.config.n_tokens)
    tok.save_pretrained(d)
    return d


EMBEDS = [(False, 0), (True, 0), (True, 3)]  # (visual_pos_embed, image_index_embed)


@pytest.mark.parametrize("visual_pos_embed,image_index_embed", EMBEDS)
def test_vpit_export_is_a_transformers_model(tok, tmp_path, visual_pos_embed, image_index_embed):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = _model(tok, visual_pos_embed=visual_pos_embed, image_index_embed=image_index_embed)
    d = _export(model, tok, tmp_path / "m")
    ids = special_ids(tok)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "metamorph"
    assert cfg["architectures"] == ["MetaMorphVPiTForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_metamorph.MetaMorphVPiTConfig",
                               "AutoModelForCausalLM": "modeling_metamorph.MetaMorphVPiTForCausalLM"}
    # the tokenizer's real ids, not Llama's defaults (1/2), in both configs and the LLM's own
    for c in (cfg, cfg["text_config"], json.loads((d / "generation_config.json").read_text())):
        assert (c["bos_token_id"], c["eos_token_id"], c["pad_token_id"]) == (ids.bos, ids.eot, ids.pad)
    assert (cfg["image_start_token_id"], cfg["image_end_token_id"]) == (ids.image_start, ids.image_end)
    assert cfg["visual_pos_embed"] is visual_pos_embed and cfg["image_index_embed"] == image_index_embed
    # the remote code: copies of the library's own files, importing nothing of metamorph
    for name in REMOTE_CODE_FILES:
        src = (Path(__import__("metamorph.model").model.__file__).parent / name).read_text()
        saved = (d / name).read_text()
        assert saved == src, name
        assert not METAMORPH_IMPORT.search(saved), f"{name} imports metamorph"

    # registered on import: no remote code needed, and the library's classes come back
    assert type(AutoConfig.from_pretrained(d)).__module__ == "metamorph.model.configuration_metamorph"
    local = AutoModelForCausalLM.from_pretrained(d)
    assert type(local).__module__ == "metamorph.model.modeling_metamorph"
    # the saved code itself (what a venv without metamorph runs; transformers prefers the
    # registered class when both exist): the class auto_map names, loaded from the export
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    remote_cls = get_class_from_dynamic_module(cfg["auto_map"]["AutoModelForCausalLM"], str(d))
    assert remote_cls.__module__.startswith("transformers_modules")
    remote = remote_cls.from_pretrained(d)
    for hf in (local, remote):
        sd = hf.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(sd[f"vpit.{k}"], v), k
    assert AutoTokenizer.from_pretrained(d).chat_template == tok.chat_template


@pytest.mark.parametrize("visual_pos_embed,image_index_embed", EMBEDS)
def test_generate_through_the_auto_class_matches_the_library(tok, tmp_path, visual_pos_embed, image_index_embed):
    from transformers import AutoModelForCausalLM

    model = _model(tok, visual_pos_embed=visual_pos_embed, image_index_embed=image_index_embed)
    d = _export(model, tok, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
    ids = special_ids(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Generate an image of a red circle."}],
                                     add_generation_prompt=True, return_dict=False) + [ids.image_start]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=5, return_dict_in_generate=True, force_image_end=True)
    ref = model.generate(Prompt(input_ids=prompt), GenerationConfig(max_new_tokens=5, force_image_end=True),
                         stop_ids=[ids.eot])
    N, T = model.config.n_tokens, len(prompt)
    assert out.visual_tokens.shape == (1, N, 16)
    assert torch.allclose(out.visual_tokens[0], ref.images[0])
    assert torch.allclose(out.visual_tokens.norm(dim=-1), torch.ones(1, N))
    # the image sits at N pad positions right after the prompt's <image_start>, then the text
    seq = out.sequences[0].tolist()
    assert seq[:T] == prompt and seq[T : T + N] == [ids.pad] * N and seq[T + N :] == ref.token_ids
    assert out.visual_mask[0].tolist() == [False] * T + [True] * N + [False] * len(ref.token_ids)
    assert torch.equal(hf.generate(torch.tensor([prompt]), max_new_tokens=5, force_image_end=True), out.sequences)


def test_generate_stops_at_end_of_turn_by_default(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = special_ids(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Is it big?"}], add_generation_prompt=True,
                                     return_dict=False)
    free = _model(tok).generate(Prompt(input_ids=prompt), GenerationConfig(max_new_tokens=6, max_images=0))
    stop = free.token_ids[2]  # a token the greedy model emits third: make it this model's end of turn
    d = _export(_model(tok, eos_id=stop), tok, tmp_path / "m")
    out = AutoModelForCausalLM.from_pretrained(d).generate(torch.tensor([prompt]), max_new_tokens=6, max_images=0,
                                                           return_dict_in_generate=True)
    assert out.stopped and out.sequences[0, len(prompt):].tolist() == free.token_ids[: free.token_ids.index(stop) + 1]


CONVERSATIONS = {
    "text_only": [{"role": "user", "content": "What colour is the square?"}, {"role": "assistant", "content": "red"}],
    "image": [{"role": "user", "content": "<image>\nWhat colour is the square?"}, {"role": "assistant", "content": "red"}],
    "multi_turn": [
        {"role": "user", "content": "<image>\nIs it big?"}, {"role": "assistant", "content": "It is small."},
        {"role": "user", "content": "Generate an image of a red circle."}, {"role": "assistant", "content": "A blue one. <image>"},
        {"role": "user", "content": " yes\n\nno 123 'q' \\ <image>"}, {"role": "assistant", "content": "no"},
    ],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_renders_what_training_renders(tok, name):
    conv = CONVERSATIONS[name]
    tpl = ChatTemplate(tok, 4)
    tok.chat_template = jinja_chat_template(tok, 4)
    assert tok.apply_chat_template(conv, return_dict=False) == tpl.render(conv).input_ids
    prompt = conv[:-1]
    assert tok.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False) == tpl.render_prompt(prompt).input_ids
    # the HF multimodal content form renders the same as the <image> placeholder
    parts = [{**t, "content": [{"type": "image"} if p == "<image>" else {"type": "text", "text": p}
                               for p in re.split(r"(<image>)", t["content"]) if p]} for t in conv]
    assert tok.apply_chat_template(parts, return_dict=False) == tpl.render(conv).input_ids


def test_chat_template_with_system_prompt(tok):
    conv = CONVERSATIONS["image"]
    tpl = ChatTemplate(tok, 4, system_prompt="Answer briefly.")
    tok.chat_template = jinja_chat_template(tok, 4, system_prompt="Answer briefly.")
    assert tok.apply_chat_template(conv, return_dict=False) == tpl.render(conv).input_ids


def test_decoder_export_is_a_diffusers_pipeline(tmp_path):
    from diffusers import DiffusionPipeline

    from metamorph.decoder import conditioning, pipeline
    from metamorph.decoder.config import DecoderConfig, SamplingConfig
    from metamorph.decoder.pipeline import MetaMorphDecoderPipeline

    cfg = DecoderConfig(image_size=16, pixel_patch=2, block_out_channels=[16, 16], cross_attention_dim=16,
                        attention_heads=2, norm_num_groups=4)
    pipe = MetaMorphDecoderPipeline.from_decoder_config(cfg, feature_dim=8, n_tokens=4,
                                                        sampling=SamplingConfig(num_inference_steps=2))
    pipe.save_pretrained(tmp_path / "first")
    pipe = MetaMorphDecoderPipeline.from_pretrained(tmp_path / "first")  # records _name_or_path
    d = tmp_path / "dec"
    pipe.save_pretrained(d)
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "MetaMorphDecoderPipeline"]
    assert index["conditioner"] == ["conditioning", "VisionConditioner"]
    # the saved code is the library's own modules, importing nothing of metamorph
    for saved, src in (("pipeline.py", pipeline), ("conditioning.py", conditioning),
                       ("conditioner/conditioning.py", conditioning)):
        text = (d / saved).read_text()
        assert text == Path(src.__file__).read_text() and not METAMORPH_IMPORT.search(text), saved
    for f in d.rglob("*.json"):  # no temporary (or any) local paths recorded
        assert "_name_or_path" not in f.read_text() and str(tmp_path) not in f.read_text(), f

    tokens = F.normalize(torch.randn(2, 4, 8), dim=-1)
    local = MetaMorphDecoderPipeline.from_pretrained(d)  # metamorph installed: no remote code
    assert type(local) is MetaMorphDecoderPipeline and type(local.conditioner) is conditioning.VisionConditioner
    remote = DiffusionPipeline.from_pretrained(d, trust_remote_code=True)
    assert type(remote).__module__.startswith("diffusers_modules")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(d)
    a, b = (p(tokens, generator=torch.Generator().manual_seed(0), output_type="pt").images for p in (local, remote))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)
