"""The Hugging Face face of a MetaMorph (VPiT) model: ``AutoModelForCausalLM`` loads exports with it.

    python -m metamorph.model.modeling_metamorph     # builds a tiny model, exports it, reloads it with the Auto class

An export (``MetaMorphForCausalLM.save_pretrained``) is an ordinary transformers model dir:
``config.json`` (``model_type: metamorph``, ``architectures``, ``auto_map``), ``model.safetensors``,
``generation_config.json`` (the tokenizer's bos/eos/pad; eos = end of turn) and the code, copied
from this package: this file, ``configuration_metamorph.py``, ``modeling.py``, ``config.py`` and
``generation.py``. They import nothing of ``metamorph`` (only torch, transformers, safetensors and
each other, relatively), so the model loads in a venv with only torch and transformers::

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(export_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Generate an image of a red circle"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=16, return_dict_in_generate=True)
    tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True); out.visual_tokens  # [n, N, D]

With ``metamorph`` installed, ``import metamorph`` registers ``MetaMorphVPiTConfig`` /
``MetaMorphVPiTForCausalLM`` with ``AutoConfig`` / ``AutoModelForCausalLM`` (no remote code).
``.vpit`` is the library's ``MetaMorphForCausalLM`` (training forward, generation); this class
only adapts it to transformers' loading and ``generate`` conventions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from .config import LLMConfig, MetaMorphConfig
from .configuration_metamorph import MetaMorphVPiTConfig
from .generation import GenerationConfig, Prompt
from .modeling import MetaMorphForCausalLM

# library-only knobs ``generate`` accepts beside transformers' own (max_new_tokens, do_sample, ...)
EXTRA_GENERATE_KWARGS = ("max_images", "force_image_end", "image_cfg_scale", "use_cache", "seed")


@dataclass
class MetaMorphCausalLMOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    text_loss: Optional[torch.Tensor] = None
    vision_loss: Optional[torch.Tensor] = None


@dataclass
class MetaMorphGenerateOutput(ModelOutput):
    """``sequences``: prompt + generated ids [1, T]; each generated image sits at N pad-id positions
    after its ``<image_start>`` (the layout training used), marked by ``visual_mask`` [1, T].
    ``visual_tokens``: [n_images, N, D] L2-normalised tokens (feed them to the decoder)."""

    sequences: Optional[torch.Tensor] = None
    visual_mask: Optional[torch.Tensor] = None
    visual_tokens: Optional[torch.Tensor] = None
    stopped: Optional[bool] = None


def library_config(config: MetaMorphVPiTConfig) -> MetaMorphConfig:
    """The library's dataclass config for an HF config (the LLM part mirrors ``text_config``)."""
    tc = config.text_config
    rope = getattr(tc, "rope_parameters", None) or {}
    llm = LLMConfig(
        path="<text_config>",  # built from text_config; skips the from-fields checks of a Llama
        hidden_size=int(tc.hidden_size),
        num_layers=int(getattr(tc, "num_hidden_layers", 1)),
        num_heads=int(getattr(tc, "num_attention_heads", 1)),
        num_kv_heads=int(getattr(tc, "num_key_value_heads", None) or getattr(tc, "num_attention_heads", 1)),
        intermediate_size=int(getattr(tc, "intermediate_size", 1)),
        vocab_size=int(tc.vocab_size),
        max_position=int(getattr(tc, "max_position_embeddings", 2048)),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(getattr(tc, "rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        attn_implementation=getattr(tc, "_attn_implementation", None) or "sdpa",
    )
    llm.path = None
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    return MetaMorphConfig(
        llm=llm,
        vision_dim=config.vision_dim,
        n_tokens=config.n_tokens,
        visual_pos_embed=bool(getattr(config, "visual_pos_embed", False)),
        image_index_embed=int(getattr(config, "image_index_embed", 0) or 0),
        image_start_id=config.image_start_token_id,
        image_end_id=config.image_end_token_id,
        pad_id=config.pad_token_id if config.pad_token_id is not None else 0,
        bos_id=config.bos_token_id if config.bos_token_id is not None else -1,
        eos_id=eos if eos is not None else -1,
    )


class MetaMorphVPiTPreTrainedModel(PreTrainedModel):
    config_class = MetaMorphVPiTConfig
    base_model_prefix = "vpit"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _no_split_modules: list[str] = []


class MetaMorphVPiTForCausalLM(MetaMorphVPiTPreTrainedModel, GenerationMixin):
    def __init__(self, config: MetaMorphVPiTConfig):
        super().__init__(config)
        llm = AutoModelForCausalLM.from_config(config.text_config)
        self.vpit = MetaMorphForCausalLM(library_config(config), llm)
        self.post_init()

    def get_input_embeddings(self):
        return self.vpit.llm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.vpit.llm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        visual_mask: Optional[torch.Tensor] = None,
        response_visual_mask: Optional[torch.Tensor] = None,
        vision_feats: Optional[torch.Tensor] = None,
        **kwargs,
    ) -> MetaMorphCausalLMOutput:
        """Teacher-forced pass (the training forward of ``MetaMorphForCausalLM``)."""
        out = self.vpit(
            input_ids=input_ids, labels=labels, position_ids=position_ids, segment_ids=segment_ids,
            visual_mask=visual_mask, response_visual_mask=response_visual_mask, vision_feats=vision_feats,
        )
        return MetaMorphCausalLMOutput(
            loss=out.loss if labels is not None else None, logits=out.logits,
            text_loss=out.text_loss, vision_loss=out.vision_loss,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        visual_mask: Optional[torch.Tensor] = None,
        vision_feats: Optional[torch.Tensor] = None,
        generation_config=None,
        uncond_input_ids: Optional[torch.Tensor] = None,
        uncond_visual_mask: Optional[torch.Tensor] = None,
        return_dict_in_generate: Optional[bool] = None,
        **kwargs,
    ):
        """Batch-1 generation of text and visual tokens (``metamorph.model.generation``).

        ``input_ids`` [1, T] (or [T]); prompt images: ``visual_mask`` [1, T] marks their N positions
        and ``vision_feats`` [K, D] holds the vision encoder's tokens for them. A prompt ending in
        ``<image_start>`` draws right away. Stops after an ``eos_token_id`` (end of turn) by default.
        Keyword arguments override the generation config: max_new_tokens, do_sample,
        temperature, top_k, top_p, eos_token_id, and the library's max_images, image_cfg_scale
        (needs ``uncond_input_ids``), force_image_end, use_cache, seed. Returns the sequences
        [1, T'] or, with ``return_dict_in_generate=True``, a ``MetaMorphGenerateOutput``.
        """
        import copy

        gc = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        extra = {k: kwargs.pop(k) for k in EXTRA_GENERATE_KWARGS if k in kwargs}
        kwargs.pop("attention_mask", None)  # batch 1, no padding: the tokenizer's mask says nothing
        unknown = [k for k in kwargs if not hasattr(gc, k)]
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {unknown}")
        for k, v in kwargs.items():
            setattr(gc, k, v)
        if return_dict_in_generate is None:
            return_dict_in_generate = bool(getattr(gc, "return_dict_in_generate", False))
        eos = gc.eos_token_id
        stops = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        cfg = GenerationConfig(
            max_new_tokens=int(gc.max_new_tokens or 64),
            do_sample=bool(gc.do_sample),
            temperature=float(gc.temperature or 1.0),
            top_k=int(gc.top_k or 0),
            top_p=float(gc.top_p if gc.top_p is not None else 1.0),
            **extra,
        )
        ids_T = torch.as_tensor(input_ids).reshape(-1) if torch.as_tensor(input_ids).ndim == 1 else None
        if ids_T is None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"generate takes one sequence at a time (batch 1), got batch {input_ids.shape[0]}")
            ids_T = input_ids[0]
        vm_T = None if visual_mask is None else torch.as_tensor(visual_mask, dtype=torch.bool).reshape(-1)
        uncond = None
        if uncond_input_ids is not None:
            uvm = None if uncond_visual_mask is None else torch.as_tensor(uncond_visual_mask, dtype=torch.bool).reshape(-1)
            uncond = Prompt(input_ids=torch.as_tensor(uncond_input_ids).reshape(-1), visual_mask=uvm, vision_feats=vision_feats)
        out = self.vpit.generate(Prompt(input_ids=ids_T, visual_mask=vm_T, vision_feats=vision_feats), cfg,
                                 stop_ids=stops, uncond_prompt=uncond)

        # sequences in the training layout: N pad positions after each <image_start> that drew
        start_id, n, pad = self.config.image_start_token_id, self.config.n_tokens, self.vpit.config.pad_id
        new, vis = [], []
        if int(ids_T[-1]) == start_id:
            new += [pad] * n
            vis += [True] * n
        for tok in out.token_ids:
            new.append(tok)
            vis.append(False)
            if tok == start_id:
                new += [pad] * n
                vis += [True] * n
        dev = ids_T.device
        seq = torch.cat([ids_T, torch.tensor(new, dtype=ids_T.dtype, device=dev)])[None]
        if not return_dict_in_generate:
            return seq
        prompt_vm = vm_T if vm_T is not None else torch.zeros_like(ids_T, dtype=torch.bool)
        mask = torch.cat([prompt_vm.to(dev), torch.tensor(vis, dtype=torch.bool, device=dev)])[None]
        D = self.config.vision_dim
        tokens = torch.stack(out.images) if out.images else torch.zeros(0, n, D)
        return MetaMorphGenerateOutput(sequences=seq, visual_mask=mask, visual_tokens=tokens, stopped=out.stopped)


__all__ = ["MetaMorphVPiTForCausalLM", "MetaMorphVPiTPreTrainedModel", "MetaMorphGenerateOutput"]


def load_vpit(path, dtype: Optional[torch.dtype] = None) -> MetaMorphForCausalLM:
    """Reload an export (``MetaMorphForCausalLM.save_pretrained``) as the library model, through
    ``MetaMorphVPiTForCausalLM``, the class ``AutoModelForCausalLM`` uses for it, so the library
    reads exactly what users load."""
    import json
    from pathlib import Path

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json: not a MetaMorph save_pretrained dir")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "metamorph":
        raise ValueError(f"{path / 'config.json'} has model_type {raw.get('model_type')!r}, not 'metamorph': "
                         "re-export it with this version (MetaMorphForCausalLM.save_pretrained)")
    kw = {"dtype": dtype} if dtype is not None else {}
    return MetaMorphVPiTForCausalLM.from_pretrained(str(path), **kw).vpit


if __name__ == "__main__":
    import tempfile

    from .configuration_metamorph import MODEL_TYPE

    m = MetaMorphForCausalLM.from_config(MetaMorphConfig(llm=LLMConfig(vocab_size=100), image_start_id=98,
                                                         image_end_id=99, bos_id=0, eos_id=3))
    with tempfile.TemporaryDirectory() as d:
        m.save_pretrained(d)
        hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
        o = hf.generate(torch.tensor([[0, 5, 6, 98]]), max_new_tokens=4, return_dict_in_generate=True)
        print(MODEL_TYPE, type(hf).__name__, tuple(o.sequences.shape), tuple(o.visual_tokens.shape))
