"""The Hugging Face config of an exported MetaMorph (VPiT) model: ``model_type = "metamorph"``.

    python -c "from metamorph.model.configuration_metamorph import MetaMorphVPiTConfig; print(MetaMorphVPiTConfig())"

This file is copied verbatim beside the weights of every export (``config.json``'s ``auto_map``
points at it), so it imports only transformers / huggingface_hub and, relatively, its siblings:
``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` works where ``metamorph`` is not
installed. The LLM's own config is the nested ``text_config`` (any causal LM transformers knows;
Llama in every preset); the fields here are the VPiT parts and the tokenizer's special ids.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec

MODEL_TYPE = "metamorph"


@strict
class MetaMorphVPiTConfig(PreTrainedConfig):
    model_type = MODEL_TYPE
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_dim: int = 64  # D: the vision encoder's token width (1152 for SigLIP so400m)
    n_tokens: int = 16  # N visual positions per image (64 at paper scale)
    visual_pos_embed: bool = False  # a learned per-slot embedding added after the projector
    image_index_embed: int = 0  # rows of a learned per-image-ordinal embedding (0: none)
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    # the tokenizer's ids: pad also fills visual positions in input_ids; eos = end of turn
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config is not None and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True


__all__ = ["MetaMorphVPiTConfig"]
