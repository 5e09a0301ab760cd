"""MetaMorph / VPiT: a Hugging Face causal LM that reads and predicts continuous visual tokens.

    python -m metamorph.model.modeling     # builds a tiny model, runs one forward on a toy batch

Architecture (MetaMorph paper, official code): any HF causal LM + a projector
``Linear(D_v, d) - GELU - Linear(d, d)`` that maps the frozen encoder's L2-normalised visual
tokens into the LLM's input space (for prompt images, teacher-forced response images and, at
generation, fed-back predictions) + a vision head ``Linear(d, d) - GELU - Linear(d, D_v)`` on the
final post-norm hidden state whose L2-normalised output predicts the next visual token.

Loss = CE on labelled tokens (response text incl. ``<image_start>``/``<image_end>``; labels are
unshifted, position t predicts labels[t+1]) + vision_coef * (-mean cosine) between the head at t
and the feature of t+1 for every t+1 in a response image. A batch with no response image adds an
exact zero (the official code returns NaN there). Nothing is predicted across a packed-segment
boundary, and attention never crosses one.

Tensor names: B batch, L sequence, d LLM width, V vocab, D vision feature dim, K visual positions
in the batch, T selected targets.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .config import LLMConfig, MetaMorphConfig  # relative: saved as remote code too

IGNORE_INDEX = -100
TRAIN_STAGES = ("connector", "vpit")
WEIGHTS_FILE = "model.safetensors"
HF_PREFIX = "vpit."  # the weights' prefix under MetaMorphVPiTForCausalLM
HF_ARCHITECTURE = "MetaMorphVPiTForCausalLM"
# Init std of the slot embedding: about the projector's output scale at init (tiny: ~0.47 per dim),
# not a ViT's 0.02. Measured (tiny, 9 tokens, in-process trainer, 100 held-out items each): at 0.02
# the model reads position from RoPE distances instead (rows right, columns at chance; position
# 0.38-0.70 over runs), at 0.5 position 0.92, shape 0.81.
VISUAL_POS_INIT_STD = 0.5
# Saved beside the weights as the model's remote code: copies of this package's own files (they
# import only torch / transformers / safetensors and each other), never a second copy of the model.
REMOTE_CODE_FILES = ("configuration_metamorph.py", "modeling_metamorph.py", "modeling.py", "config.py", "generation.py")


# ---- attention over packed rows
#
# A packed row holds several samples; attention must stay inside each one. With "sdpa" the model
# runs under this name instead: the same kernel, called once per sample span (causal inside it),
# rather than once per row with a block-diagonal [L, L] mask that computes every cross-sample
# score only to mask it out. Same result (up to float summation order); on the tiny preset's
# 512-position rows of ~10 samples, one CPU thread: forward 0.54x, a training step 0.86x the masked
# one (bench/packed_attention.py, both in one run). Without spans (plain
# or generation forwards) it is transformers' sdpa, mask creation included. Set in memory only:
# a config's ``_attn_implementation`` is never written to config.json, so exports say "sdpa".
PACKED_SDPA = "metamorph_packed_sdpa"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    segment_spans: Optional[tuple[tuple[tuple[int, int], ...], ...]] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature: q [B, H, L, hd], k / v [B, Hkv, L, hd] ->
    ([B, L, H, hd], None). ``segment_spans[b]``: the (start, end) runs that tile row b; each
    attends causally to itself only (``attention_mask`` is then unused: it would be that mask)."""
    if segment_spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:  # sdpa refuses it too: never drop it silently
        raise ValueError("attention logit softcapping is not supported by sdpa; use attn_implementation 'eager'")
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for b, spans in enumerate(segment_spans):
        # split, not slices: its backward is one cat, a slice's a zero-filled row per span
        sizes = [e - s for s, e in spans]
        q_S, k_S, v_S = (t[b : b + 1].split(sizes, dim=2) for t in (query, key, value))
        rows.append(torch.cat([
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling, is_causal=n > 1)
            for q, k, v, n in zip(q_S, k_S, v_S, sizes)
        ], dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # unpacked forwards: sdpa's own masks


def segment_changes(segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a run of equal segment id starts (a packed sample, or padding)."""
    change_BL = torch.ones_like(segment_ids_BL, dtype=torch.bool)
    change_BL[:, 1:] = segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]
    return change_BL


def segment_starts(segment_ids_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] long: for each position, the position where its run of equal segment id starts."""
    L = segment_ids_BL.shape[1]
    at_L = torch.arange(L, device=segment_ids_BL.device)
    return torch.where(segment_changes(segment_ids_BL), at_L, 0).cummax(1).values


def segment_spans(segment_ids_BL: torch.Tensor) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, the (start, end) runs of equal segment id (packed samples, then padding)."""
    L = segment_ids_BL.shape[1]
    starts = [row.nonzero().flatten().tolist() for row in segment_changes(segment_ids_BL).cpu()]
    return tuple(tuple(zip(st, st[1:] + [L])) for st in starts)


SELF_FEED_SCOPES = ("all", "read")


def _feature_rows(visual_mask_BL: torch.Tensor) -> torch.Tensor:
    """[B, L] row of vision_feats for each visual position (row-major order over visual_mask)."""
    return visual_mask_BL.flatten().long().cumsum(0).view(visual_mask_BL.shape) - 1


@dataclass
class MetaMorphOutput:
    loss: torch.Tensor  # text_loss + coef * vision_loss (coef = 0 in the connector stage)
    text_loss: torch.Tensor  # mean CE over the n_text_tokens targets (0 when there are none)
    vision_loss: torch.Tensor  # -mean cosine over n_visual_targets, unweighted (0 when none)
    logits: Optional[torch.Tensor]  # [B, L, V]; None with return_logits=False
    n_text_tokens: int
    n_visual_targets: int


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    # exact GELU as in the official projector ("mlp2x_gelu")
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


class MetaMorphForCausalLM(nn.Module):
    def __init__(self, config: MetaMorphConfig, llm: PreTrainedModel):
        super().__init__()
        self.config = config
        self.llm = llm
        d = llm.get_input_embeddings().embedding_dim
        self.projector = _mlp(config.vision_dim, d, d)
        self.vision_head = _mlp(d, d, config.vision_dim)
        # learned per-slot embedding added after the projector (config.visual_pos_embed)
        self.visual_pos_embed = (
            nn.Parameter(torch.randn(config.n_tokens, d) * VISUAL_POS_INIT_STD) if config.visual_pos_embed else None
        )
        # learned per-image-ordinal embedding (config.image_index_embed rows), the same init scale
        self.image_index_embed = (
            nn.Parameter(torch.randn(config.image_index_embed, d) * VISUAL_POS_INIT_STD)
            if config.image_index_embed else None
        )
        self.train_stage = "vpit"  # see set_trainable
        if llm.config._attn_implementation == "sdpa":
            llm.config._attn_implementation = PACKED_SDPA  # sdpa, per sample on packed rows (above)
        self._decoder_cache_kw = (
            "cache" if "cache" in inspect.signature(llm.get_decoder().forward).parameters else "past_key_values"
        )

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: MetaMorphConfig, dtype: Optional[torch.dtype] = None, seed: int = 0) -> "MetaMorphForCausalLM":
        """Load ``config.llm.path`` (resizing its vocab to ``llm.vocab_size``) or build a Llama.

        The special-token rows (and any rows added by the resize) of the input embedding and the
        LM head start at the mean of the pre-existing rows. Random inits are seeded by ``seed``
        without touching the caller's RNG.
        """
        config.check_buildable()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if config.llm.path is not None:
                llm = AutoModelForCausalLM.from_pretrained(
                    config.llm.path, dtype=dtype, attn_implementation=config.llm.attn_implementation
                )
                old_v = llm.get_input_embeddings().num_embeddings
                new_v = max(config.llm.vocab_size, old_v)
                if new_v > old_v:
                    llm.resize_token_embeddings(new_v, mean_resizing=False)
            else:
                llm = LlamaForCausalLM(_llama_config(config.llm))
                if dtype is not None:
                    llm.to(dtype)
                old_v = new_v = config.llm.vocab_size
            new_rows = sorted(set(range(old_v, new_v)) | {config.image_start_id, config.image_end_id})
            _init_rows_to_mean(llm, new_rows)
            config = _synced_config(config, llm)
            model = cls(config, llm)
            if dtype is not None:
                model.projector.to(dtype)
                model.vision_head.to(dtype)
                for p in (model.visual_pos_embed, model.image_index_embed):
                    if p is not None:
                        p.data = p.data.to(dtype)
        return model

    def save_pretrained(self, path: str | Path, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Write a transformers model dir: ``config.json`` (model_type ``metamorph``, ``auto_map``),
        ``generation_config.json``, ``model.safetensors`` and the modeling code (see
        ``modeling_metamorph``), loadable by ``AutoModelForCausalLM`` with or without ``metamorph``.

        ``state_dict``: a full (gathered) state dict of this module, e.g. from FSDP2's
        ``get_model_state_dict(..., full_state_dict=True)``; default ``self.state_dict()``.
        """
        import shutil

        from transformers import GenerationConfig as HFGenerationConfig

        from .configuration_metamorph import MetaMorphVPiTConfig

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        tensors, seen = {}, {}
        for k, v in sd.items():
            v = v.detach().contiguous().cpu()
            if v.data_ptr() in seen:  # tied weights: safetensors stores no shared storage
                v = v.clone()
            seen[v.data_ptr()] = k
            tensors[f"{HF_PREFIX}{k}"] = v
        save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})

        c = self.config
        ids = {"bos_token_id": c.bos_id, "eos_token_id": c.eos_id, "pad_token_id": c.pad_id}
        ids = {k: v for k, v in ids.items() if v is not None and v >= 0}
        text = self.llm.config.to_dict()
        text.update(ids)
        text.pop("_name_or_path", None)
        text["architectures"] = [type(self.llm).__name__]
        hf = MetaMorphVPiTConfig(
            text_config=text,
            vision_dim=c.vision_dim,
            n_tokens=c.n_tokens,
            visual_pos_embed=c.visual_pos_embed,
            image_index_embed=c.image_index_embed,
            image_start_token_id=c.image_start_id,
            image_end_token_id=c.image_end_id,
            tie_word_embeddings=bool(getattr(self.llm.config, "tie_word_embeddings", False)),
            **ids,
        )
        hf.architectures = [HF_ARCHITECTURE]
        hf.auto_map = {"AutoConfig": f"configuration_metamorph.{type(hf).__name__}",
                       "AutoModelForCausalLM": f"modeling_metamorph.{HF_ARCHITECTURE}"}
        hf.dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None
        hf.save_pretrained(str(path))
        # greedy, stop at end of turn: what evaluation and `metamorph chat` use
        HFGenerationConfig(max_new_tokens=64, do_sample=False, **ids).save_pretrained(str(path))
        here = Path(__file__).resolve().parent
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(here / name, path / name)

    # --- trainable sets -----------------------------------------------------------------------

    def set_trainable(self, stage: str) -> list[str]:
        """Switch between the paper's two stages; returns the names of trainable parameters.

        ``connector`` (stage 1): the projector + the ``<image_start>``/``<image_end>`` rows of the
        input embedding, as the official code (LLaVA's ``tune_mm_mlp_adapter`` with new image
        tokens: input embeddings trainable, output embeddings frozen); the LM head stays frozen
        and the visual term is left out of the loss. Only two rows must learn, but a row of a
        weight cannot carry its own requires_grad, so the embedding weight is marked trainable
        and ``forward`` lets gradient reach only the special rows (non-special embedding outputs
        are ``detach``ed, and the head is applied with a detached weight, which also covers a
        head tied to the embedding). That masks in the graph itself, so it holds under DDP and
        FSDP alike, with no hooks. The other rows get an exact-zero gradient: with AdamW they
        stay put only with weight decay 0 on this weight (the paper uses 0 everywhere).
        The slot and image-ordinal embeddings (``config.visual_pos_embed``, ``image_index_embed``)
        belong to the connector and train in both.
        ``vpit`` (stage 2): everything in this module (the vision encoder is not part of it).
        """
        if stage not in TRAIN_STAGES:
            raise ValueError(f"train stage {stage!r}: use one of {TRAIN_STAGES}")
        self.train_stage = stage
        if stage == "vpit":
            self.requires_grad_(True)
        else:
            self.requires_grad_(False)
            self.projector.requires_grad_(True)
            for p in (self.visual_pos_embed, self.image_index_embed):  # part of the connector
                if p is not None:
                    p.requires_grad_(True)
            self.llm.get_input_embeddings().weight.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW must not decay (``metamorph.train.loop.param_groups``): the slot
        and image-ordinal tables. They carry where a visual token sits and which image it is in,
        from a deliberately large init (``VISUAL_POS_INIT_STD``); decay pulled them toward zero
        over a run. Measured (tiny preset, train_vpit wd 0.1, train seeds 1 / 3 / 5 on copies of one
        run root): image position 0.63 / 0.57 / 0.71 -> 0.98 / 0.62 / 0.91 with these undecayed."""
        return {n for n in ("visual_pos_embed", "image_index_embed") if getattr(self, n) is not None}

    # --- pieces shared with generation --------------------------------------------------------

    @property
    def special_ids(self) -> tuple[int, int]:
        return (self.config.image_start_id, self.config.image_end_id)

    def embed_tokens(self, input_ids_BL: torch.Tensor) -> torch.Tensor:
        x_BLd = self.llm.get_input_embeddings()(input_ids_BL)
        if self.train_stage == "connector" and torch.is_grad_enabled():
            special_BL = (input_ids_BL == self.config.image_start_id) | (input_ids_BL == self.config.image_end_id)
            x_BLd = torch.where(special_BL[..., None], x_BLd, x_BLd.detach())
        return x_BLd

    def project(self, feats_KD: torch.Tensor, slot_K: Optional[torch.Tensor | int] = None,
                image_K: Optional[torch.Tensor | int] = None) -> torch.Tensor:
        """Visual tokens (L2-normalised, [..., D]) -> LLM input embeddings [..., d].

        With ``config.visual_pos_embed`` the embedding of each token's slot in its image is added:
        ``slot_K`` gives the slots (an int for one fed-back token at generation); None means
        ``feats_KD`` [K, D] is whole images, N rows each in slot order (how visual_mask lays them out).
        With ``config.image_index_embed`` the embedding of each token's image ordinal in its sample
        is added too: ``image_K`` (an int for one image; see ``image_ordinals``), required then."""
        x_Kd = self._project_slots(feats_KD, slot_K)
        if self.image_index_embed is None:
            return x_Kd
        if image_K is None:
            raise ValueError("project: this model embeds image ordinals (config.image_index_embed); pass image_K")
        image_K = torch.as_tensor(image_K, device=x_Kd.device).clamp(max=self.image_index_embed.shape[0] - 1)
        return x_Kd + self.image_index_embed[image_K].to(x_Kd.dtype)

    def image_ordinals(self, input_ids_BL: torch.Tensor, visual_mask_BL: torch.Tensor,
                       segment_ids_BL: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """[K]: for each visual position (in visual_mask's row-major order), the ordinal of its
        image in its sample (0 for the first), counted by ``<image_start>`` tokens since the
        sample's start; None without ``config.image_index_embed``."""
        if self.image_index_embed is None:
            return None
        starts_BL = (input_ids_BL == self.config.image_start_id).long()
        seen_BL = starts_BL.cumsum(1)  # <image_start>s up to and including each position
        if segment_ids_BL is not None:  # minus those before the sample's first position
            seen_BL = seen_BL - (seen_BL - starts_BL).gather(1, segment_starts(segment_ids_BL))
        return (seen_BL - 1)[visual_mask_BL]

    def _project_slots(self, feats_KD: torch.Tensor, slot_K: Optional[torch.Tensor | int] = None) -> torch.Tensor:
        w = self.projector[0].weight
        x_Kd = self.projector(feats_KD.to(w.dtype))
        if self.visual_pos_embed is None:
            return x_Kd
        if slot_K is None:
            N = self.config.n_tokens
            if feats_KD.ndim != 2 or feats_KD.shape[0] % N:
                raise ValueError(f"project: {tuple(feats_KD.shape)} is not whole images of {N} tokens; pass slot_K")
            slot_K = torch.arange(feats_KD.shape[0], device=x_Kd.device) % N
        return x_Kd + self.visual_pos_embed[slot_K].to(x_Kd.dtype)

    def predict_visual(self, h_Td: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) vision-head output; callers normalise (after CFG mixing, if any)."""
        return self.vision_head(h_Td)

    def lm_logits(self, h_Td: torch.Tensor) -> torch.Tensor:
        head = self.llm.get_output_embeddings()
        if self.train_stage == "connector" and torch.is_grad_enabled():
            # frozen in stage 1 (also when tied to the embedding, whose two new rows do learn)
            bias = head.bias.detach() if getattr(head, "bias", None) is not None else None
            return F.linear(h_Td, head.weight.detach(), bias)
        return head(h_Td)

    def decode(
        self,
        inputs_embeds_BLd: torch.Tensor,
        position_ids_BL: Optional[torch.Tensor] = None,
        attention_mask=None,
        cache=None,
        **attn_kwargs,
    ) -> torch.Tensor:
        """Run the LLM body; returns the final post-norm hidden states [B, L, d]. ``attn_kwargs``
        reach every attention call (``segment_spans`` for packed rows, see ``_packing``)."""
        kw = {self._decoder_cache_kw: cache} if cache is not None else {}
        out = self.llm.get_decoder()(
            inputs_embeds=inputs_embeds_BLd,
            attention_mask=attention_mask,
            position_ids=position_ids_BL,
            use_cache=cache is not None,
            **kw,
            **attn_kwargs,
        )
        return out.last_hidden_state

    def _packing(self, segment_ids_BL: torch.Tensor, dtype: torch.dtype) -> tuple[Optional[torch.Tensor], dict]:
        """How attention stays inside each packed sample: (attention_mask, decode's attn_kwargs).

        Sdpa (as ``PACKED_SDPA``): no mask, the sample spans. Eager: a block-diagonal causal mask.
        Flash / flex: nothing (transformers detects packing from the restarting position_ids).
        Plain causal attention when that is exact (one sample per row, padding at the end: padding
        never precedes a real token, so letting it attend causally changes nothing)."""
        B, L = segment_ids_BL.shape
        single = (segment_ids_BL <= 1).all() and (segment_ids_BL[:, 1:] <= segment_ids_BL[:, :-1]).all()
        if bool(single):
            return None, {}
        impl = self.llm.config._attn_implementation
        if impl == PACKED_SDPA:
            return None, {"segment_spans": segment_spans(segment_ids_BL)}
        if impl not in ("sdpa", "eager"):
            return None, {}
        causal_LL = torch.ones(L, L, dtype=torch.bool, device=segment_ids_BL.device).tril()
        allow_B1LL = ((segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]) & causal_LL)[:, None]
        if impl == "sdpa":  # only when set after construction: sdpa with the mask
            return allow_B1LL, {}  # bool: True = may attend
        return torch.zeros(allow_B1LL.shape, dtype=dtype, device=allow_B1LL.device).masked_fill(
            ~allow_B1LL, torch.finfo(dtype).min
        ), {}

    # --- training forward ---------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        segment_ids: Optional[torch.Tensor] = None,
        visual_mask: Optional[torch.Tensor] = None,
        response_visual_mask: Optional[torch.Tensor] = None,
        vision_feats: Optional[torch.Tensor] = None,
        num_tokens: Optional[torch.Tensor] = None,  # a collate column; unused here
        return_logits: bool = True,
        vision_coef: float = 1.0,
        self_feed: float = 0.0,
        self_feed_scope: str = "all",
    ) -> MetaMorphOutput:
        """One teacher-forced pass over the batch dict of docs/CONTRACTS.md ("Tokenized rows").

        ``vision_coef``: weight of the visual term (-mean cosine) in the loss, passed by the stage
        that trains with it (train_vpit; the paper uses 1.0). In stage 1
        (``set_trainable("connector")``) the visual term is never added, whatever it says.

        ``self_feed``: the fraction of response images whose *inputs* are the model's own
        predictions instead of the true features (see ``_self_fed``); targets stay the true ones.
        0 (the paper): every response image is teacher-forced. ``self_feed_scope``: which response
        images may be fed back: "all", or "read": only those an answer reads, i.e. followed in
        their sample by answer text (a visual-thinking crop), not those followed only by image
        and turn ends (a generated image, an edit, a predicted frame)."""
        if self_feed_scope not in SELF_FEED_SCOPES:
            raise ValueError(f"self_feed_scope={self_feed_scope!r}: one of {SELF_FEED_SCOPES}")
        B, L = input_ids.shape
        dev = input_ids.device
        if segment_ids is None:
            segment_ids = torch.ones(B, L, dtype=torch.long, device=dev)
        if position_ids is None:
            position_ids = torch.arange(L, device=dev).expand(B, L)
        if visual_mask is None:
            visual_mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        if response_visual_mask is None:
            response_visual_mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        if bool((response_visual_mask & ~visual_mask).any()):
            raise ValueError("response_visual_mask marks positions that visual_mask does not")
        K = int(visual_mask.sum())
        if (vision_feats.shape[0] if vision_feats is not None else 0) != K:
            got = None if vision_feats is None else tuple(vision_feats.shape)
            raise ValueError(f"visual_mask has {K} positions but vision_feats is {got}")

        # Inputs: token embeddings, with every visual position (prompt images and, teacher-forced,
        # response images) replaced by the projected ground-truth feature (with self_feed, some
        # response images by the model's own predictions instead).
        x_BLd = self.embed_tokens(input_ids)
        attn, attn_kwargs = self._packing(segment_ids, x_BLd.dtype)
        proj_Kd = None
        if vision_feats is not None:
            image_K = self.image_ordinals(input_ids, visual_mask, segment_ids)
            feats_in_KD = vision_feats
            if self_feed > 0 and self.train_stage != "connector" and torch.is_grad_enabled() and bool(response_visual_mask.any()):
                candidates_BL = response_visual_mask
                if self_feed_scope == "read":
                    candidates_BL = self._read_images(input_ids, labels, segment_ids, visual_mask, response_visual_mask)
                feats_in_KD = self._self_fed(x_BLd, vision_feats, visual_mask, response_visual_mask, position_ids,
                                             segment_ids, self_feed, candidates_BL, image_K)
            proj_Kd = self.project(feats_in_KD, image_K=image_K)
            x_BLd = x_BLd.masked_scatter(visual_mask[..., None], proj_Kd.to(x_BLd.dtype))

        h_BLd = self.decode(x_BLd, position_ids, attention_mask=attn, **attn_kwargs)

        # position t predicts t+1, never across a packed-segment boundary
        same_next_BL = torch.zeros(B, L, dtype=torch.bool, device=dev)
        same_next_BL[:, :-1] = segment_ids[:, :-1] == segment_ids[:, 1:]

        # Text: CE on every labelled next token (labels are -100 outside assistant content).
        text_tgt_BL = torch.full_like(input_ids, IGNORE_INDEX)
        if labels is not None:
            text_tgt_BL[:, :-1] = labels[:, 1:]
        text_sel_BL = (text_tgt_BL != IGNORE_INDEX) & same_next_BL
        n_text = int(text_sel_BL.sum())
        logits_BLV = None
        if return_logits:
            logits_BLV = self.lm_logits(h_BLd)
            text_logits_TV = logits_BLV[text_sel_BL]
        else:
            text_logits_TV = self.lm_logits(h_BLd[text_sel_BL])
        # sum / max(n, 1): an exact 0 with a graph (not NaN) when nothing is labelled
        text_loss = F.cross_entropy(text_logits_TV.float(), text_tgt_BL[text_sel_BL], reduction="sum") / max(n_text, 1)

        # Vision: the head at t regresses the feature of t+1 for each t+1 in a response image;
        # the position before the first visual token is <image_start>.
        vis_sel_BL = torch.zeros(B, L, dtype=torch.bool, device=dev)
        vis_sel_BL[:, :-1] = response_visual_mask[:, 1:]
        vis_sel_BL &= same_next_BL
        n_vis = int(vis_sel_BL.sum())
        coef = 0.0 if self.train_stage == "connector" else float(vision_coef)
        h_vis_Td = h_BLd[vis_sel_BL]
        if coef == 0.0:
            h_vis_Td = h_vis_Td.detach()  # reported only: keep it out of the graph
        pred_TD = F.normalize(self.predict_visual(h_vis_Td).float(), dim=-1)
        if n_vis:
            feat_row_BL = _feature_rows(visual_mask)
            tgt_row_T = feat_row_BL[:, 1:][vis_sel_BL[:, :-1]]
            tgt_TD = F.normalize(vision_feats[tgt_row_T].float(), dim=-1)
            vision_loss = -(pred_TD * tgt_TD).sum(-1).mean()
        else:
            # an exact 0 that still touches the head, so DDP sees every parameter used
            vision_loss = pred_TD.sum() * 0.0

        if coef:
            loss = text_loss + coef * vision_loss
        else:
            loss = text_loss
            vision_loss = vision_loss.detach()
        if proj_Kd is not None and K == 0 and torch.is_grad_enabled():
            loss = loss + proj_Kd.sum() * 0.0  # no images in this batch: keep the projector used
        return MetaMorphOutput(
            loss=loss,
            text_loss=text_loss,
            vision_loss=vision_loss,
            logits=logits_BLV,
            n_text_tokens=n_text,
            n_visual_targets=n_vis,
        )

    @torch.no_grad()
    def _self_fed(self, x_BLd, vision_feats_KD, visual_mask_BL, response_visual_mask_BL, position_ids_BL,
                  segment_ids_BL, fraction: float, candidates_BL: torch.Tensor,
                  image_K: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``vision_feats_KD`` with a random ``fraction`` of the response images replaced, as
        inputs, by what the model predicts for them in a teacher-forced pass (no gradient). Only
        images whose positions ``candidates_BL`` marks are drawn from.

        At generation the model reads its own drawn tokens back (a visual-thinking crop before
        its answer, a generated image's later tokens); teacher forcing only ever shows it true
        ones. Fed its own one-step predictions, it learns to read and continue drawings of its
        own quality (scheduled sampling, in one parallel pass). Images are chosen with the torch
        RNG (train_loop seeds it per rank).

        The pass runs only over what the drawn images need: each packed sample holding one, from
        its start up to the position before its last drawn token, one sample per row (padding at
        the end, plain causal attention). Attention never crosses samples, so these prefixes give
        the predictions a pass over the whole rows would, at a fraction of its positions."""
        row_R = _feature_rows(visual_mask_BL)[response_visual_mask_BL]
        N = self.config.n_tokens
        n_img = -(-row_R.numel() // N)  # response images are N contiguous tokens each
        keep_R = (torch.rand(n_img, device=row_R.device) < fraction).repeat_interleave(N)[: row_R.numel()]
        keep_R &= candidates_BL[response_visual_mask_BL]
        if not bool(keep_R.any()):
            return vision_feats_KD  # nothing drawn this step: no second pass
        L = visual_mask_BL.shape[1]
        dev = visual_mask_BL.device
        # the head at t predicts the response token at t + 1 (an image's first token from its
        # <image_start>): the positions whose hidden states the drawn tokens need
        b_T, t_T = response_visual_mask_BL.nonzero(as_tuple=True)  # row-major: the order of row_R
        b_T, t_T = b_T[keep_R], t_T[keep_R] - 1
        # the sample (packed segment) each of them sits in, by its first position
        s_T = segment_starts(segment_ids_BL)[b_T, t_T]
        key_G, g_T = torch.unique(b_T * L + s_T, return_inverse=True)
        b_G, s_G = key_G // L, key_G % L
        end_G = torch.zeros_like(key_G).scatter_reduce(0, g_T, t_T + 1, reduce="amax")
        len_G = end_G - s_G
        j_J = torch.arange(int(len_G.max()), device=dev)
        valid_GJ = j_J < len_G[:, None]
        at_GJ = torch.where(valid_GJ, s_G[:, None] + j_J, s_G[:, None])  # padding repeats the start
        x0_BLd = x_BLd.masked_scatter(visual_mask_BL[..., None], self.project(vision_feats_KD, image_K=image_K).to(x_BLd.dtype))
        x_GJd = x0_BLd[b_G[:, None], at_GJ]
        pos_GJ = position_ids_BL[b_G[:, None], at_GJ]
        attn, attn_kwargs = self._packing(valid_GJ.long(), x_GJd.dtype)  # one sample per row: plain causal
        h_GJd = self.decode(x_GJd, pos_GJ, attention_mask=attn, **attn_kwargs)
        pred_TD = F.normalize(self.predict_visual(h_GJd[g_T, t_T - s_T]).float(), dim=-1)
        out_KD = vision_feats_KD.clone()
        out_KD[row_R[keep_R]] = pred_TD.to(out_KD.dtype)
        return out_KD

    def _read_images(self, input_ids_BL, labels_BL, segment_ids_BL, visual_mask_BL, response_visual_mask_BL):
        """[B, L]: the response-image positions of images that answer text follows in their sample
        (a labelled token that is not visual, ``<image_start>``, ``<image_end>`` or eos)."""
        if labels_BL is None:
            return torch.zeros_like(response_visual_mask_BL)
        c = self.config
        answer_BL = (labels_BL != IGNORE_INDEX) & ~visual_mask_BL
        for i in (c.image_start_id, c.image_end_id, c.eos_id):
            if i is not None and i >= 0:
                answer_BL &= input_ids_BL != i
        # the first answer position after each position (L where none): between an image token and
        # the image's end there are only visual tokens, so every token of an image sees the same one
        L = answer_BL.shape[1]
        at_BL = torch.where(answer_BL, torch.arange(L, device=answer_BL.device), L)
        next_BL = torch.full_like(at_BL, L)
        next_BL[:, :-1] = at_BL.flip(1).cummin(1).values.flip(1)[:, 1:]
        seg_next_BL = torch.cat([segment_ids_BL, segment_ids_BL.new_full((answer_BL.shape[0], 1), -1)], 1).gather(1, next_BL)
        return response_visual_mask_BL & (next_BL < L) & (seg_next_BL == segment_ids_BL)

    # --- generation ---------------------------------------------------------------------------

    def generate(self, *args, **kwargs):
        """See ``metamorph.model.generation.generate``."""
        from .generation import generate

        return generate(self, *args, **kwargs)


def _llama_config(c: LLMConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_word_embeddings,
        attn_implementation=c.attn_implementation,
    )


@torch.no_grad()
def _init_rows_to_mean(llm: PreTrainedModel, rows: list[int]) -> None:
    """Set ``rows`` of the input embedding and LM head to the mean of the other rows."""
    weights = {id(m.weight): m.weight for m in (llm.get_input_embeddings(), llm.get_output_embeddings())}
    for W in weights.values():
        keep = torch.ones(W.shape[0], dtype=torch.bool, device=W.device)
        keep[rows] = False
        W[rows] = W[keep].float().mean(0).to(W.dtype)


def _synced_config(config: MetaMorphConfig, llm: PreTrainedModel) -> MetaMorphConfig:
    """Record the LLM's real architecture (a checkpoint decides it) in the config we save."""
    hc = llm.config
    d = llm.get_input_embeddings().embedding_dim
    llm_cfg = dataclasses.replace(
        config.llm,
        vocab_size=llm.get_input_embeddings().num_embeddings,
        hidden_size=d,
        num_layers=int(getattr(hc, "num_hidden_layers", config.llm.num_layers)),
        num_heads=int(getattr(hc, "num_attention_heads", config.llm.num_heads)),
        num_kv_heads=int(getattr(hc, "num_key_value_heads", None) or getattr(hc, "num_attention_heads", 1)),
        intermediate_size=int(getattr(hc, "intermediate_size", config.llm.intermediate_size)),
        max_position=int(getattr(hc, "max_position_embeddings", config.llm.max_position)),
        tie_word_embeddings=bool(getattr(hc, "tie_word_embeddings", False)),
    )
    return dataclasses.replace(config, llm=llm_cfg)


if __name__ == "__main__":
    cfg = MetaMorphConfig(llm=LLMConfig(vocab_size=100), image_start_id=98, image_end_id=99)
    m = MetaMorphForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in m.parameters())
    ids = torch.tensor([[1, 2, 98] + [0] * 16 + [99, 3]])
    vm = torch.zeros_like(ids, dtype=torch.bool)
    vm[0, 3:19] = True
    out = m(input_ids=ids, labels=ids.masked_fill(vm, -100), visual_mask=vm, response_visual_mask=vm,
            vision_feats=F.normalize(torch.randn(16, 64), dim=-1))
    print(f"params {n/1e6:.2f}M loss {out.loss.item():.3f} text {out.text_loss.item():.3f} "
          f"vision {out.vision_loss.item():.3f} n_text {out.n_text_tokens} n_vis {out.n_visual_targets}")
    import time

    from .generation import GenerationConfig, Prompt

    for use_cache in (True, False):
        t = time.perf_counter()
        # the prompt ends in <image_start>: an image first, then text
        o = m.generate(Prompt(input_ids=[1, 2, 3, 98]), GenerationConfig(max_new_tokens=8, use_cache=use_cache))
        print(f"generate use_cache={use_cache}: ids {o.token_ids} images {[tuple(i.shape) for i in o.images]} "
              f"{time.perf_counter() - t:.3f}s")
