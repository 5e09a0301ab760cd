"""Configs of the VPiT model: the LLM (checkpoint path or a Llama built from fields) and the heads.

    python -c "from metamorph.model.config import MetaMorphConfig; print(MetaMorphConfig())"

Defaults are the `tiny` preset's model (a ~0.5M-parameter Llama with a ~2k-token BPE vocab:
DESIGN.md measured that size learning QA and generation on the toy world in 2 minutes on 2
cores). `vocab_size` and the special-token ids come from the tokenizer at build time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(kw_only=True)
class LLMConfig:
    # HF causal-LM checkpoint dir (cluster: Llama-3.1-8B). None: build a Llama from the fields
    # below with random init (smoke/tiny). With a path, the architecture fields are ignored.
    path: Optional[str] = None
    hidden_size: int = 64  # d; 4096 for Llama-3.1-8B
    num_layers: int = 4
    num_heads: int = 4  # head dim = hidden_size / num_heads
    num_kv_heads: int = 2  # grouped-query attention (8 in Llama-3.1-8B); must divide num_heads
    intermediate_size: int = 176  # SwiGLU width, ~2.7x hidden as in Llama
    # Set from len(tokenizer) at build time (0 = not set yet). A checkpoint's embedding is
    # resized to it; rows past the checkpoint's vocab start at the mean of the existing rows.
    vocab_size: int = 0
    max_position: int = 2048  # >= the tokenize stage's max_length (RoPE has no learned table)
    rope_theta: float = 10000.0  # 500000 in Llama-3
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # Llama-3.1-8B is untied
    # Attention kernel. sdpa/eager get an explicit block-diagonal causal mask from segment_ids;
    # flash/flex rely on transformers' packed-sequence detection from restarting position_ids.
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"llm.attn_implementation={self.attn_implementation!r}: use one of {ATTN_IMPLEMENTATIONS}")
        if self.vocab_size < 0:
            raise ValueError(f"llm.vocab_size={self.vocab_size} must be >= 0 (0: set from the tokenizer)")
        if self.path is not None:
            return
        for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "max_position"):
            if getattr(self, key) <= 0:
                raise ValueError(f"llm.{key}={getattr(self, key)} must be > 0")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"llm.hidden_size={self.hidden_size} must be divisible by llm.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"llm.num_kv_heads={self.num_kv_heads} must divide llm.num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("llm.hidden_size / llm.num_heads must be even (RoPE rotates pairs)")


@dataclass(kw_only=True)
class MetaMorphConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision_dim: int = 64  # D_v, the vision encoder's feature dim (1152 for SigLIP so400m)
    n_tokens: int = 16  # N visual positions per image (64 at paper scale); a square
    # Add a learned embedding per image slot (0..N-1, [N, d]) to the projected visual tokens.
    # False = the paper's plain MLP connector. The LLM's RoPE sees only relative distances, so in
    # a short image (tiny: 9 tokens, one per grid cell) "which cell holds the object" is hard to
    # read from a question token at a variable distance; the slot embedding names the cell.
    visual_pos_embed: bool = False
    # Add a learned embedding per image ordinal in its sample ([image_index_embed, d]: the first
    # image 0, the second 1, ...; later ones share the last row) to the projected visual tokens.
    # 0 = off (the paper: frames are images in a row, told apart by RoPE alone). A video's frames
    # differ only by where they sit; from an answer at a variable distance RoPE does not say which
    # frame came first, and "left" vs "right" is exactly that.
    image_index_embed: int = 0
    # Token ids, from the tokenizer (-1 = not set yet). pad_id fills visual positions in
    # input_ids (their embeddings come from the projector) and padding.
    image_start_id: int = -1
    image_end_id: int = -1
    pad_id: int = 0
    # Written into the export's config.json / generation_config.json (generation stops at eos =
    # end of turn). -1: not known (a model built without a tokenizer); the export then omits them.
    bos_id: int = -1
    eos_id: int = -1

    def __post_init__(self) -> None:
        if self.vision_dim <= 0:
            raise ValueError(f"model.vision_dim={self.vision_dim} must be > 0 (the encoder's feature dim)")
        r = int(round(self.n_tokens**0.5)) if self.n_tokens > 0 else 0
        if r * r != self.n_tokens or self.n_tokens <= 0:
            raise ValueError(f"model.n_tokens={self.n_tokens} must be a positive perfect square")
        if self.image_index_embed < 0:
            raise ValueError(f"model.image_index_embed={self.image_index_embed} must be >= 0 (0: off)")

    def check_buildable(self) -> None:
        """Raise unless the tokenizer-derived fields are filled in (called by from_config)."""
        if self.llm.path is None and self.llm.vocab_size <= 0:
            raise ValueError("model.llm.vocab_size is 0: set it to len(tokenizer) before building the model")
        ids = {"image_start_id": self.image_start_id, "image_end_id": self.image_end_id, "pad_id": self.pad_id}
        for k, v in ids.items():
            if v < 0:
                raise ValueError(f"model.{k}={v}: set it from the tokenizer before building the model")
            if self.llm.vocab_size and v >= self.llm.vocab_size:
                raise ValueError(f"model.{k}={v} is outside the vocabulary (llm.vocab_size={self.llm.vocab_size})")
        if self.image_start_id == self.image_end_id:
            raise ValueError("model.image_start_id and model.image_end_id must differ")


def _default_probe_floors() -> dict[str, float]:
    return {}


@dataclass(kw_only=True)
class VisionPretrainConfig:
    """Pretraining of a config-built encoder on toy-world image-caption pairs (metamorph/model/
    vision_pretrain.py) and its linear probes. steps=0: keep the random init (smoke)."""

    steps: int = 0  # optimizer steps of the SigLIP sigmoid loss; 0 = no pretraining
    batch_size: int = 256  # image-caption pairs per step (sigmoid loss: every pair is a binary example)
    lr: float = 2.0e-3
    weight_decay: float = 0.0
    n_images: int = 4096  # rendered once, sampled with replacement per step
    max_objects: int = 3  # objects per pretraining scene are 1..this (captions bind attributes)
    # scenes come in groups that differ in one attribute of one object (hard negatives in every
    # batch); 1 = independent scenes
    group_size: int = 4
    embed_dim: int = 128  # joint image-text embedding width (thrown away after pretraining)
    text_dim: int = 64  # the throw-away text tower's width
    # rendering, as the world stage's defaults (metamorph/world/config.py)
    small_frac: float = 0.5
    large_frac: float = 0.85
    jitter: float = 1.0
    supersample: int = 4
    seed: int = 0
    # linear probes (held-out): images to fit each probe on / to score it on; 0 = no probes
    probe_train: int = 0
    probe_test: int = 0
    # attribute -> minimum held-out probe accuracy (colour, shape, size, position, count); the
    # stage fails naming the attribute below its floor
    probe_floors: dict[str, float] = field(default_factory=_default_probe_floors)

    def __post_init__(self) -> None:
        for key in ("steps", "n_images", "probe_train", "probe_test"):
            if getattr(self, key) < 0:
                raise ValueError(f"vision_encoder.pretrain.{key}={getattr(self, key)} must be >= 0")
        for key in ("batch_size", "embed_dim", "text_dim", "max_objects", "supersample", "group_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"vision_encoder.pretrain.{key}={getattr(self, key)} must be > 0")
        if self.steps and self.n_images < self.batch_size:
            raise ValueError(f"vision_encoder.pretrain.n_images={self.n_images} must be >= batch_size={self.batch_size}")
        if self.batch_size % self.group_size:
            raise ValueError(f"vision_encoder.pretrain.batch_size={self.batch_size} must be a multiple of group_size={self.group_size}")
        if not 1 <= self.max_objects <= 5:
            raise ValueError(f"vision_encoder.pretrain.max_objects={self.max_objects} must be in 1..5 (unique shapes)")
        known = ("colour", "shape", "size", "position", "count")
        bad = sorted(set(self.probe_floors) - set(known))
        if bad:
            raise ValueError(f"vision_encoder.pretrain.probe_floors: unknown attributes {bad}; use {list(known)}")
        if self.probe_floors and not (self.probe_train and self.probe_test):
            raise ValueError("vision_encoder.pretrain.probe_floors need probe_train > 0 and probe_test > 0")


@dataclass(kw_only=True)
class VisionConfig:
    # SigLIP checkpoint dir (cluster: google/siglip-so400m-patch14-384 downloaded beforehand, or a
    # dir written by VisionEncoder.save_pretrained). None: build a random-init encoder from the
    # fields below. With a path, image_size/patch_size/hidden_size/... come from the checkpoint.
    path: Optional[str] = None
    image_size: int = 32  # encoder input side in px (384 at paper scale)
    patch_size: int = 4  # px per patch side (14 at paper scale); the grid is image_size/patch_size
    hidden_size: int = 64  # feature dim D (1152 at paper scale); also the vision head's output
    num_layers: int = 2  # encoder depth (27 at paper scale)
    num_heads: int = 2
    intermediate_size: int = 128
    # N tokens per image, a perfect square (64 at paper scale). Each image costs N sequence
    # positions in the LLM, so N trades generation detail for context length and step time.
    n_tokens: int = 16
    seed: int = 0  # init seed for the random-init encoder (same seed -> identical weights)
    # SigLIP's pixel normalisation ((x/255 - mean) / std per channel); so400m uses 0.5/0.5.
    image_mean: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = dataclasses.field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self) -> None:
        root = math.isqrt(self.n_tokens) if self.n_tokens > 0 else 0
        if self.n_tokens <= 0 or root * root != self.n_tokens:
            raise ValueError(f"vision.n_tokens={self.n_tokens} must be a positive perfect square (16, 64, ...)")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("vision.image_mean / vision.image_std must be 3 numbers, std > 0")
        if self.path is not None:
            return  # architecture comes from the checkpoint
        for key in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"vision.{key}={getattr(self, key)} must be > 0")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vision.image_size={self.image_size} must be a multiple of vision.patch_size={self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"vision.hidden_size={self.hidden_size} must be divisible by vision.num_heads={self.num_heads}"
            )

    def siglip_config(self):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_use_head=False,  # the pooled head is never used: features come before it
        )
