"""Held-out question answering: exact-match accuracy per task and per attribute, against the
majority-answer baseline.

    python -c "from metamorph.eval.understanding import summarise; help(summarise)"

Items come from held-out curated samples of the understanding tasks (``image_qa``, ``video_qa``,
``visual_thinking``): every assistant turn is one question, asked with the true conversation
before it. The model answers greedily (text only, except visual thinking, where it may draw its
crop first, as it was trained to). Prediction and truth are compared after
``normalise_answer`` (lowercase, no surrounding punctuation), so "Red." == "red".

Majority baseline: within each (task, attribute, open/multiple-choice) group, always answering
that group's most common true answer; computed on the evaluated items themselves, so it is the best any
image-blind answerer that knows the question type could do on exactly these items.
Toy-world attributes come from ``Sample.meta["qa"][i]["type"]`` (colour, shape, count,
position, size, direction, mover_shape, mover_colour); other sources fall under ``other``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from metamorph.data.schema import IMAGE_PLACEHOLDER, Sample
from metamorph.eval.inference import normalise_answer

QA_TASKS = ("image_qa", "video_qa", "visual_thinking")


@dataclass
class QAItem:
    sample_id: str
    task: str
    turn: int  # index of the assistant turn asked
    conversation: list[dict[str, str]]  # ends with the user turn asked
    images: list[bytes]  # the prompt images (placeholders in the conversation, in order)
    truth: str
    attribute: str = "other"
    format: str = "open"  # "open" | "mc"
    response_images: list[bytes] = field(default_factory=list)  # visual thinking: the true crop


def qa_items(sample: Sample, images: Sequence[bytes]) -> list[QAItem]:
    """One item per assistant turn of an understanding sample (none for other tasks)."""
    if sample.task not in QA_TASKS:
        return []
    qa_meta = sample.meta.get("qa") or []
    items = []
    img_i = 0
    conv: list[dict[str, str]] = []
    prompt_imgs: list[bytes] = []
    turn_k = 0
    for t in sample.conversation:
        n_ph = t.content.count(IMAGE_PLACEHOLDER)
        these = list(images[img_i : img_i + n_ph])
        img_i += n_ph
        if t.role == "user":
            conv.append({"role": "user", "content": t.content})
            prompt_imgs.extend(these)
            continue
        text = t.content.replace(IMAGE_PLACEHOLDER, "").strip()
        m = qa_meta[turn_k] if turn_k < len(qa_meta) else {}
        truth = str(m.get("answer", "")) or (str(sample.meta.get("answer", "")) if sample.task == "visual_thinking" else "") or text
        items.append(
            QAItem(
                sample_id=sample.id,
                task=sample.task,
                turn=turn_k,
                conversation=[dict(c) for c in conv],
                images=list(prompt_imgs),
                truth=truth,
                attribute=str(m.get("type") or "other"),
                format=str(m.get("format") or ("mc" if m.get("options") else "open")),
                response_images=these,
            )
        )
        # later turns see the true answer (teacher forcing of the dialogue); response images in
        # history would need their features too, so a sample is cut at its first drawn answer
        if n_ph:
            break
        conv.append({"role": "assistant", "content": t.content})
        turn_k += 1
    return items


def majority_baseline(
    items: Sequence[dict[str, Any]], group_keys: Sequence[str] = ("task", "attribute", "format")
) -> tuple[list[float], dict[tuple, str]]:
    """Per item: 1 if its truth is its group's most common truth (ties: alphabetically first).
    Groups split open and multiple-choice questions: "red" and "B" are different guesses."""
    def group(it: dict[str, Any]) -> tuple:
        return tuple(it.get(k, "") for k in group_keys)

    groups: dict[tuple, Counter] = defaultdict(Counter)
    for it in items:
        groups[group(it)][normalise_answer(it["truth"])] += 1
    majority = {g: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for g, c in groups.items()}
    hits = [float(normalise_answer(it["truth"]) == majority[group(it)]) for it in items]
    return hits, majority


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Accuracy and majority baseline overall, per task and per task/attribute.

    ``records``: dicts with task, attribute, truth, correct (as ``evaluate_qa`` writes them).
    Keys: ``qa_acc``, ``qa_majority``, ``qa_n``, ``qa_acc/<task>``, ``qa_majority/<task>``,
    ``qa_acc/<task>/<attribute>``, ``qa_majority/<task>/<attribute>``.
    """
    if not records:
        return {}
    base, _ = majority_baseline(records)
    out = {
        "qa_n": float(len(records)),
        "qa_acc": float(np.mean([r["correct"] for r in records])),
        "qa_majority": float(np.mean(base)),
    }
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by[r["task"]].append(i)
        by[f"{r['task']}/{r['attribute']}"].append(i)
    for key, idx in sorted(by.items()):
        out[f"qa_acc/{key}"] = float(np.mean([records[i]["correct"] for i in idx]))
        out[f"qa_majority/{key}"] = float(np.mean([base[i] for i in idx]))
        out[f"qa_n/{key}"] = float(len(idx))
    return out


def evaluate_qa(
    runner,
    items: Iterable[QAItem],
    max_new_tokens: int = 16,
    on_item: Optional[Callable[[dict[str, Any]], None]] = None,
) -> list[dict[str, Any]]:
    """Ask every item; returns one record per item (prediction, truth, correct, ...)."""
    import torch.nn.functional as F

    records = []
    for it in items:
        think = it.task == "visual_thinking"
        pred = runner.answer(it.conversation, it.images, max_new_tokens=max_new_tokens, max_images=1 if think else 0)
        rec: dict[str, Any] = {
            "kind": "qa",
            "id": it.sample_id,
            "task": it.task,
            "turn": it.turn,
            "attribute": it.attribute,
            "format": it.format,
            "question": it.conversation[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip(),
            "prediction": pred.text,
            "truth": it.truth,
            "correct": normalise_answer(pred.text) == normalise_answer(it.truth),
        }
        if think:
            rec["drew_crop"] = bool(pred.tokens)
            if pred.tokens and it.response_images:
                true_ND = runner.encode_images(it.response_images[:1])[0]
                rec["crop_cosine"] = float(F.cosine_similarity(pred.tokens[0], true_ND, dim=-1).mean())
        records.append(rec)
        if on_item:
            on_item(rec)
    return records
