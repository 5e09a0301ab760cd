"""Generation for MetaMorph: text tokens, and continuous visual tokens after ``<image_start>``.

    python -m metamorph.model.modeling      # tiny random model: loss, then generate with and without KV cache

Text is greedy or sampled from the LM head. When the model emits ``<image_start>``, exactly N
continuous steps follow: the vision head's output at the last position is L2-normalised, kept as
the next visual token, and ``projector(token)`` is fed back as the next input embedding (as in the
official code). Then text resumes: the model must emit ``<image_end>`` itself
(``force_image_end`` overrides that). Unlike the official code this keeps a KV cache (transformers
``DynamicCache``); ``use_cache=False`` recomputes the whole sequence each step and exists for
equality tests and the benchmark.

Classifier-free guidance for the visual tokens (``image_cfg_scale`` s, optional): a second,
unconditional sequence (its prompt has the instruction dropped; the caller builds it) receives the
same generated inputs; at each visual step the raw head outputs mix as ``u + s * (c - u)`` before
normalisation. The unconditional stream is only advanced when a visual step needs it (its pending
inputs are fed as one chunk), so text-only generation costs nothing extra.

One sequence at a time (batch 1). Tensor names: T prompt length, d LLM width, D vision dim,
N visual tokens per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass(kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 64  # text tokens to generate at most; each image adds N visual steps on top
    # <image_start> is banned once this many images were generated (0: text-only answers, as
    # for QA evaluation, so a model that over-generates images cannot derail a text answer).
    max_images: int = 1
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    force_image_end: bool = False  # True: emit <image_end> after the N-th visual step regardless
    # Visual-token CFG scale; 1.0 = no guidance. >1 needs an unconditional prompt. The paper's
    # code has none: the evaluation compares scales.
    image_cfg_scale: float = 1.0
    use_cache: bool = True  # False: recompute the full sequence each step (tests, benchmark)
    seed: int = 0  # sampling RNG seed (torch.Generator, does not touch the global RNG)

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise ValueError(f"generation.max_new_tokens={self.max_new_tokens} must be > 0")
        if self.max_images < 0:
            raise ValueError(f"generation.max_images={self.max_images} must be >= 0")
        if self.temperature <= 0:
            raise ValueError(f"generation.temperature={self.temperature} must be > 0 (use do_sample=false for greedy)")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("generation.top_k must be >= 0 and generation.top_p in (0, 1]")
        if self.image_cfg_scale < 0:
            raise ValueError(f"generation.image_cfg_scale={self.image_cfg_scale} must be >= 0")


@dataclass
class GenerationOutput:
    # generated token ids in order, incl. <image_start>/<image_end> (visual steps are not tokens)
    token_ids: list[int]
    images: list[torch.Tensor] = field(default_factory=list)  # one [N, D] float32 unit-norm each
    stopped: bool = False  # ended on a stop id (else: max_new_tokens)


@dataclass
class Prompt:
    """One prompt: token ids, and for images in it, which positions are visual and their features."""

    input_ids: Sequence[int] | torch.Tensor
    visual_mask: Optional[Sequence[bool] | torch.Tensor] = None  # [T], true at the N positions of each image
    vision_feats: Optional[torch.Tensor] = None  # [K, D], K = sum(visual_mask), normalised encoder tokens


class _Stream:
    """One sequence being extended: inputs go in as embeddings, the last hidden state comes out."""

    def __init__(self, model, use_cache: bool):
        self.model = model
        self.cache = DynamicCache(config=model.llm.config) if use_cache else None
        self.seen: list[torch.Tensor] = []  # no-cache path: every input so far
        self.pending: list[torch.Tensor] = []
        self.length = 0

    def push(self, x_1nd: torch.Tensor) -> None:
        self.pending.append(x_1nd)

    def flush(self) -> torch.Tensor:
        x_1nd = torch.cat(self.pending, dim=1)
        self.pending = []
        n = x_1nd.shape[1]
        dev = x_1nd.device
        if self.cache is not None:
            pos_1n = torch.arange(self.length, self.length + n, device=dev)[None]
            h_1nd = self.model.decode(x_1nd, pos_1n, cache=self.cache)
        else:
            self.seen.append(x_1nd)
            full_1Ld = torch.cat(self.seen, dim=1)
            pos_1L = torch.arange(full_1Ld.shape[1], device=dev)[None]
            h_1nd = self.model.decode(full_1Ld, pos_1L)
        self.length += n
        return h_1nd[0, -1]


def prompt_embeds(model, prompt: Prompt) -> torch.Tensor:
    """[1, T, d] input embeddings of a prompt: token embeddings, visual positions projected."""
    dev = next(model.parameters()).device
    ids_T = torch.as_tensor(prompt.input_ids, dtype=torch.long, device=dev)
    x_1Td = model.embed_tokens(ids_T[None])
    if prompt.visual_mask is not None:
        vm_T = torch.as_tensor(prompt.visual_mask, dtype=torch.bool, device=dev)
        if int(vm_T.sum()):
            if prompt.vision_feats is None or prompt.vision_feats.shape[0] != int(vm_T.sum()):
                raise ValueError("prompt.vision_feats must have one row per visual_mask position")
            image_K = model.image_ordinals(ids_T[None], vm_T[None])
            proj_Kd = model.project(prompt.vision_feats.to(dev), image_K=image_K).to(x_1Td.dtype)
            x_1Td = x_1Td.masked_scatter(vm_T[None, :, None], proj_Kd)
    return x_1Td


def _pick(logits_V: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> int:
    if not cfg.do_sample:
        return int(logits_V.argmax())
    logits_V = logits_V / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits_V, min(cfg.top_k, logits_V.numel())).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs_V = logits_V.softmax(-1)
    if cfg.top_p < 1.0:
        p_sorted, idx = probs_V.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        drop = p_sorted.cumsum(0) - p_sorted >= cfg.top_p
        p_sorted[drop] = 0.0
        probs_V = torch.zeros_like(probs_V).scatter(0, idx, p_sorted)
    return int(torch.multinomial(probs_V.cpu(), 1, generator=gen))


@torch.no_grad()
def generate(
    model,
    prompt: Prompt,
    cfg: Optional[GenerationConfig] = None,
    stop_ids: Sequence[int] = (),
    uncond_prompt: Optional[Prompt] = None,
) -> GenerationOutput:
    """Continue ``prompt`` with ``model`` (a MetaMorphForCausalLM); stop after a ``stop_ids`` token."""
    cfg = cfg or GenerationConfig()
    if cfg.image_cfg_scale != 1.0 and uncond_prompt is None:
        raise ValueError("image_cfg_scale != 1 needs an uncond_prompt (the prompt with the instruction dropped)")
    start_id, end_id = model.special_ids
    n_vis = model.config.n_tokens
    stops = set(int(s) for s in stop_ids)
    gen = torch.Generator().manual_seed(cfg.seed)
    was_training = model.training
    model.eval()
    try:
        cond = _Stream(model, cfg.use_cache)
        cond.push(prompt_embeds(model, prompt))
        uncond = None
        if uncond_prompt is not None:
            uncond = _Stream(model, cfg.use_cache)
            uncond.push(prompt_embeds(model, uncond_prompt))
        dev = next(model.parameters()).device

        def feed(x_11d: torch.Tensor) -> torch.Tensor:
            cond.push(x_11d)
            if uncond is not None:
                uncond.push(x_11d)
            return cond.flush()

        def feed_token(tok: int) -> torch.Tensor:
            return feed(model.embed_tokens(torch.tensor([[tok]], device=dev)))

        out = GenerationOutput(token_ids=[])
        h_d = cond.flush()
        # a prompt that ends in <image_start> asks for an image right away (forced t2i)
        ids_T = torch.as_tensor(prompt.input_ids)
        in_image = int(ids_T[-1]) == start_id
        # the ordinal of the next image drawn in this sample (images are counted by <image_start>)
        n_prompt_images = int((ids_T == start_id).sum()) - int(in_image)
        while True:
            if in_image:
                # h_d is the state at <image_start>: it predicts the first visual token
                feats = []
                for slot in range(n_vis):
                    raw_D = model.predict_visual(h_d).float()
                    if uncond is not None:
                        raw_u_D = model.predict_visual(uncond.flush()).float()
                        raw_D = raw_u_D + cfg.image_cfg_scale * (raw_D - raw_u_D)
                    v_D = F.normalize(raw_D, dim=-1)
                    feats.append(v_D)
                    image = n_prompt_images + len(out.images)
                    h_d = feed(model.project(v_D, slot, image)[None, None].to(h_d.dtype))
                out.images.append(torch.stack(feats).cpu())
                in_image = False
                if cfg.force_image_end and len(out.token_ids) < cfg.max_new_tokens:
                    out.token_ids.append(end_id)
                    h_d = feed_token(end_id)
            if len(out.token_ids) >= cfg.max_new_tokens:
                break
            logits_V = model.lm_logits(h_d).float()
            if len(out.images) >= cfg.max_images:
                logits_V[start_id] = float("-inf")
            tok = _pick(logits_V, cfg, gen)
            out.token_ids.append(tok)
            if tok in stops:
                out.stopped = True
                break
            h_d = feed_token(tok)
            in_image = tok == start_id
        return out
    finally:
        model.train(was_training)
