"""Visual generation on held-out samples: predicted vision tokens -> decoder -> judged images.

    python -c "from metamorph.eval.generation import evaluate_generation; help(evaluate_generation)"

Tasks and what is measured, per visual-token CFG scale (1 = off):

* ``t2i`` (prompt from a held-out caption): cosine between predicted and true vision tokens
  (mean over the N tokens), retrieval top-1 (is the true image's token set the nearest of all the
  evaluated targets? chance 1/M; DESIGN.md: raw cosine alone flatters a random encoder, whose
  tokens are all alike), the decoder's image judged against the caption's exact attributes, and
  the Frechet distance between generated and real images in the vision encoder's feature space
  (one mean-pooled token vector per image).
* ``image_edit``: the same, the target being the edited image; judged against the edited scene.
* ``frame_prediction``: the answer is forced to start with the true label, then the first
  predicted frame is compared with the first true response frame; judged on the mover's shape,
  colour and size and the static distractors (the mover's position depends on the frame sampling).

Decoding is done once per CFG scale for all items (batched). With ``recon`` the decoder also
renders the *true* tokens: an upper bound that separates decoder error from LLM error.
The model is forced to start drawing (``<image_start>`` appended); whether it would have started
by itself is reported as ``image_start_p`` (mean probability of ``<image_start>`` first).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metamorph.data.schema import IMAGE_PLACEHOLDER, Sample
from metamorph.eval.frechet import frechet_distance_features
from metamorph.eval.inference import open_image
from metamorph.eval.intervals import wilson
from metamorph.eval.judge import compare, mean_scores

GEN_TASKS = ("t2i", "image_edit", "frame_prediction")
JUDGED = ("shape", "colour", "size", "position", "background", "all")


@dataclass
class GenItem:
    sample_id: str
    task: str
    conversation: list[dict[str, str]]  # ends with the user turn
    prompt_images: list[bytes]
    target: bytes  # the (first) response image
    text: str  # the caption / instruction, for the report
    answer_prefix: str = ""  # forced answer text before <image_start> (frame prediction's label)
    truth: Optional[dict[str, Any]] = None  # scene meta to judge against (objects may omit keys)
    extra: dict[str, Any] = field(default_factory=dict)


def _frame_truth(meta: dict[str, Any]) -> Optional[dict[str, Any]]:
    clip = meta.get("clip")
    if not isinstance(clip, dict) or "mover" not in clip:
        return None
    m = clip["mover"]
    objs = [{k: o[k] for k in ("shape", "colour", "size", "position") if k in o} for o in clip.get("distractors", [])]
    objs.append({k: m[k] for k in ("shape", "colour", "size") if k in m})
    return {"background": clip.get("background", meta.get("background")), "objects": objs}


def gen_items(sample: Sample, images: Sequence[bytes]) -> list[GenItem]:
    """The generation item of a held-out sample (none for understanding tasks)."""
    if sample.task not in GEN_TASKS or len(sample.conversation) < 2:
        return []
    user, answer = sample.conversation[0], sample.conversation[1]
    if user.role != "user" or answer.role != "assistant" or IMAGE_PLACEHOLDER not in answer.content:
        return []
    n_prompt = user.content.count(IMAGE_PLACEHOLDER)
    if len(images) <= n_prompt:
        return []
    meta = sample.meta or {}
    text = user.content.replace(IMAGE_PLACEHOLDER, "").strip()
    prefix, truth = "", None
    if sample.task == "t2i":
        truth = meta.get("scene")
        text = meta.get("caption", text)
    elif sample.task == "image_edit":
        truth = meta.get("edited")
    else:  # frame_prediction: "label\n<image><image>..."
        prefix = answer.content.split(IMAGE_PLACEHOLDER)[0]
        truth = _frame_truth(meta)
        text = meta.get("label", prefix.strip())
    return [
        GenItem(
            sample_id=sample.id,
            task=sample.task,
            conversation=[{"role": "user", "content": user.content}],
            prompt_images=list(images[:n_prompt]),
            target=images[n_prompt],
            text=text,
            answer_prefix=prefix,
            truth=truth if isinstance(truth, dict) and truth.get("objects") else None,
        )
    ]


def retrieval_ranks(pred_MND: torch.Tensor, true_MND: torch.Tensor, pool: int = 0) -> np.ndarray:
    """Rank of each item's own target among all targets by mean per-token cosine (0 = top-1).

    ``pool`` > 0: among the targets of its own consecutive block of ``pool`` items only (the last
    block takes the remainder), so "top-1 of 64" keeps its chance level (1/64) while more items
    tighten its interval."""
    if pool and len(pred_MND) > pool:
        return np.concatenate([retrieval_ranks(pred_MND[i : i + pool], true_MND[i : i + pool])
                               for i in range(0, len(pred_MND), pool)])
    p = F.normalize(pred_MND.float(), dim=-1)
    t = F.normalize(true_MND.float(), dim=-1)
    sim_MM = torch.einsum("ind,jnd->ij", p, t) / p.shape[1]
    own = sim_MM.diagonal()[:, None]
    return (sim_MM > own).sum(dim=1).numpy()


def _pooled(runner, images) -> np.ndarray:
    return runner.encoder.encode_images(list(images)).float().mean(dim=1).cpu().numpy()


@dataclass
class _TaskOutputs:
    """One task's generations, kept until the judge is ready."""

    task: str
    items: list[GenItem]
    ref_images: list[Image.Image]
    start_p: list[float] = field(default_factory=list)
    recon_images: Optional[list[Image.Image]] = None
    scales: list[tuple[float, np.ndarray, np.ndarray, Optional[list[Image.Image]]]] = field(default_factory=list)


def _judge_and_record(out: _TaskOutputs, judge, metrics: dict[str, float], records: list[dict[str, Any]],
                      gallery: dict[str, list[dict[str, Any]]], keep_images: int) -> None:
    """The judged metrics of one task's generations, its per-item records and its gallery rows."""
    task, its, M = out.task, out.items, len(out.items)
    truths = [it.truth for it in its]
    judged_idx = [i for i, t in enumerate(truths) if t is not None]
    base = [
        {"kind": "generation", "id": it.sample_id, "task": task, "prompt": it.text, "truth": it.truth}
        for it in its
    ]
    if judge is not None and judged_idx:
        ref_j = judge.predict([out.ref_images[i] for i in judged_idx])
        for k, v in mean_scores([compare(j, truths[i]) for j, i in zip(ref_j, judged_idx)]).items():
            metrics[f"{task}/reference/judge/{k}"] = v
        if out.recon_images is not None:
            rj = judge.predict([out.recon_images[i] for i in judged_idx])
            for k, v in mean_scores([compare(j, truths[i]) for j, i in zip(rj, judged_idx)]).items():
                metrics[f"{task}/recon/judge/{k}"] = v
    for s, cos_M, ranks, gen_images in out.scales:
        tag = f"{task}/cfg{s:g}"
        judged: list[Optional[dict]] = [None] * M
        scores: list[Optional[dict]] = [None] * M
        if gen_images is not None and judge is not None and judged_idx:
            jj = judge.predict([gen_images[i] for i in judged_idx])
            for j, i in zip(jj, judged_idx):
                judged[i] = j
                scores[i] = compare(j, truths[i])
            metrics[f"{tag}/judge_n"] = float(len(judged_idx))
            for k, v in mean_scores([scores[i] for i in judged_idx]).items():
                metrics[f"{tag}/judge/{k}"] = v
                # Wilson 95% (per-item scores are 0/1 for one-object captions)
                metrics[f"{tag}/judge/{k}/ci_lo"], metrics[f"{tag}/judge/{k}/ci_hi"] = wilson(v * len(judged_idx), len(judged_idx))
        for i, it in enumerate(its):
            rec = dict(base[i], cfg_scale=s, cosine=float(cos_M[i]), retrieval_rank=int(ranks[i]))
            if np.isfinite(out.start_p[i]):
                rec["image_start_p"] = out.start_p[i]
            if judged[i] is not None:
                rec["judged"] = {"shapes": judged[i]["shapes"], "background": judged[i]["background"],
                                 "slots": judged[i]["slots"]}
                rec["scores"] = scores[i]
            records.append(rec)
            if i < keep_images:
                entry = next((g for g in gallery[task] if g["id"] == it.sample_id), None)
                if entry is None:
                    entry = {"id": it.sample_id, "text": it.text, "reference": out.ref_images[i], "generated": {},
                             "inputs": [open_image(b) for b in it.prompt_images][:4], "scores": {},
                             "recon": out.recon_images[i] if out.recon_images is not None else None}
                    gallery[task].append(entry)
                if gen_images is not None:
                    entry["generated"][f"{s:g}"] = gen_images[i]
                if scores[i] is not None:
                    entry["scores"][f"{s:g}"] = scores[i]


def evaluate_generation(
    runner,
    items: Sequence[GenItem],
    cfg_scales: Sequence[float] = (1.0,),
    judge=None,
    decoder_guidance: Optional[float] = None,
    decoder_steps: Optional[int] = None,
    recon: bool = True,
    seed: int = 0,
    keep_images: int = 8,
    collect: Optional[dict[str, dict[str, list]]] = None,
    log: Optional[Callable[[str], None]] = None,
    retrieval_pool: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Score ``items``; returns (metrics, per-item records, gallery per task for the report).
    ``collect``: a dict that receives every generated image, as ``collect["{task}/{scale}"] =
    {"generated", "reference", "text"}`` (for FID / CLIP score).

    ``judge``: a ``Judge``, or a zero-argument callable returning one, called once after every
    image is generated (so the judge can be training meanwhile); None: nothing is judged.

    Metric keys: ``{task}/cfg{s}/cosine``, ``.../retrieval_top1``, ``.../judge/{attr}``,
    ``{task}/cfg{s}/fd_encoder``, ``{task}/image_start_p``, ``{task}/recon/judge/{attr}``,
    ``{task}/reference/judge/{attr}`` (the judge on the real held-out images), ``{task}/n``.
    Judged metrics are returned only when ``judge`` is given.
    """
    log = log or (lambda m: None)
    metrics: dict[str, float] = {}
    by_task: dict[str, list[GenItem]] = defaultdict(list)
    for it in items:
        by_task[it.task].append(it)
    have_decoder = runner.decoder is not None
    generated: list[_TaskOutputs] = []
    for task, its in by_task.items():
        t0 = time.perf_counter()
        M = len(its)
        metrics[f"{task}/n"] = float(M)
        prompt_feats = [runner.encode_images(it.prompt_images) for it in its]
        true_MND = runner.encode_images([it.target for it in its])
        out = _TaskOutputs(task=task, items=its, ref_images=[open_image(it.target) for it in its])
        out.start_p = [
            runner.image_start_prob(it.conversation, image_feats=pf) if not it.answer_prefix else float("nan")
            for it, pf in zip(its, prompt_feats)
        ]
        if not any(it.answer_prefix for it in its):
            metrics[f"{task}/image_start_p"] = float(np.mean(out.start_p))
        if have_decoder and recon:
            out.recon_images = runner.render(true_MND, decoder_guidance, decoder_steps, seed=seed)
        for s in cfg_scales:
            tag = f"{task}/cfg{s:g}"
            preds = [
                # max_new_tokens=1: stop right after the (forced) <image_end>; the text after it is not scored
                runner.predict_tokens(it.conversation, cfg_scale=s, image_feats=pf, answer_prefix=it.answer_prefix,
                                      seed=seed, max_new_tokens=1)
                for it, pf in zip(its, prompt_feats)
            ]
            pred_MND = torch.stack([p.tokens[0] for p in preds])
            cos_M = F.cosine_similarity(pred_MND, true_MND, dim=-1).mean(dim=1).numpy()
            ranks = retrieval_ranks(pred_MND, true_MND, retrieval_pool)
            metrics[f"{tag}/cosine"] = float(cos_M.mean())
            metrics[f"{tag}/retrieval_top1"] = float((ranks == 0).mean())
            lo_hi = wilson(float((ranks == 0).sum()), M)
            metrics[f"{tag}/retrieval_top1/ci_lo"], metrics[f"{tag}/retrieval_top1/ci_hi"] = lo_hi
            metrics[f"{task}/retrieval_chance"] = float(np.mean([1.0 / min(M - i, retrieval_pool or M)
                                                                 for i in range(0, M, retrieval_pool or M)
                                                                 for _ in range(min(M - i, retrieval_pool or M))]))
            gen_images = runner.render(pred_MND, decoder_guidance, decoder_steps, seed=seed) if have_decoder else None
            if collect is not None and gen_images is not None:
                collect[f"{task}/{s:g}"] = {"generated": gen_images, "reference": out.ref_images, "text": [it.text for it in its]}
            if gen_images is not None and M >= 2:
                metrics[f"{tag}/fd_encoder"] = frechet_distance_features(_pooled(runner, gen_images), _pooled(runner, out.ref_images))
            out.scales.append((s, cos_M, ranks, gen_images))
        generated.append(out)
        log(f"generation {task}: {M} items x {len(cfg_scales)} cfg scales in {time.perf_counter() - t0:.1f}s")

    if callable(judge):
        judge = judge()
    records: list[dict[str, Any]] = []
    gallery: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for out in generated:
        _judge_and_record(out, judge, metrics, records, gallery, keep_images)
    return metrics, records, dict(gallery)
