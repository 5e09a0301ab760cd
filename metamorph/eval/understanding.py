"""Held-out question answering: exact-match accuracy per task and per attribute, against the
majority-answer baseline.

    python -c "from metamorph.eval.understanding import summarise; help(summarise)"

Items come from held-out curated samples of the understanding tasks (``image_qa``, ``video_qa``,
``visual_thinking``): every assistant turn is one question, asked with the true conversation
before it. The model answers greedily (text only, except visual thinking, where it may draw its
crop first, as it was trained to; each visual-thinking item is asked again with the true crop
drawn instead, ``qa_acc_true_crop``, which tells reading a crop apart from drawing it).
Prediction and truth are compared after ``normalise_answer`` (lowercase, no surrounding
punctuation), so "Red." == "red".

Majority baseline: within each (task, attribute, open/multiple-choice) group, always answering
that group's most common answer in the *training* data (``answer_prior``), which is what a model
that ignores the image converges to. Also reported (``qa_majority_heldout``): the most common
answer of the evaluated items themselves, the best any image-blind answerer could do on exactly
these items; it peeks at their answers, so in small groups it sits well above chance.
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
from metamorph.eval.intervals import wilson
from metamorph.world import attributes as A

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


def every_question_items(sample: Sample, images: Sequence[bytes]) -> list[QAItem]:
    """Every question type about one held-out toy-world sample, asked open-ended, each its own item.

    A held-out image carries its exact scene in ``meta``, so it can be asked about each attribute
    (image QA: colour, shape, count, position, size; video QA: direction, mover shape, mover
    colour; visual thinking: colour, shape of the small object) instead of the one its record
    happens to ask: ``k`` types per image multiply the items per attribute by ``k`` for the same
    held-out set (k x fewer held-out records for the same standard error). Each question replaces
    the record's first one (a multi-turn record is cut to that turn); samples without toy meta
    keep their own questions (``qa_items``). A multiple-choice record is asked the open questions."""
    from metamorph.world import text as T
    from metamorph.world.render import Obj, scene_from_meta

    own = qa_items(sample, images)
    qa_meta = sample.meta.get("qa") or []
    if not own or not qa_meta:
        return own
    it0, q0 = own[0], qa_meta[0]
    content = it0.conversation[-1]["content"]
    if q0.get("question", "") not in content:
        return own
    prefix = content[: content.index(q0["question"])]
    rng = np.random.default_rng(list(sample.id.encode("utf-8")) or [0])  # same questions every run
    if sample.task == "image_qa" and "scene" in sample.meta:
        scene = scene_from_meta(sample.meta["scene"])
        qas = [T.image_question(rng, scene, t) for t in A.QUESTION_TYPES]
    elif sample.task == "video_qa" and "clip" in sample.meta:
        m = sample.meta["clip"]["mover"]
        mover = Obj(shape=m["shape"], colour=m["colour"], size=m["size"], cx=0.0, cy=0.0, extent=m["extent"])
        qas = [T.video_question(rng, mover, sample.meta["clip"]["direction"], kind=t) for t in T.VIDEO_QUESTION_TYPES]
    elif sample.task == "visual_thinking" and "scene" in sample.meta:
        scene = scene_from_meta(sample.meta["scene"])
        target = scene.objects[int(sample.meta.get("target", 0))]
        qas = [T.small_object_question(rng, target, kind=t) for t in T.SMALL_OBJECT_QUESTION_TYPES]
    else:
        return own
    think = sample.task == "visual_thinking"  # its prompt has no answer-format suffix
    out = []
    for qa in qas:
        conv = [dict(c) for c in it0.conversation]
        conv[-1]["content"] = prefix + (qa.question if think else qa.prompt)
        out.append(QAItem(sample_id=sample.id, task=sample.task, turn=0, conversation=conv, images=list(it0.images),
                          truth=qa.answer, attribute=qa.type, format="open", response_images=list(it0.response_images)))
    return out


GROUP_KEYS = ("task", "attribute", "format")


def _group(it: dict[str, Any]) -> tuple:
    return tuple(it.get(k, "") for k in GROUP_KEYS)


def _most_common(c: Counter) -> str:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]  # ties: alphabetically first


def answer_prior(items: Iterable[dict[str, Any]], limit: int = 0) -> tuple[dict[tuple, str], int]:
    """({(task, attribute, format): most common answer}, items counted) over training QA items
    (dicts with task, attribute, format, truth; ``limit`` > 0 stops after that many): what a
    model that never looks at the image learns to answer for each question type."""
    groups: dict[tuple, Counter] = defaultdict(Counter)
    n = 0
    for it in items:
        groups[_group(it)][normalise_answer(it["truth"])] += 1
        n += 1
        if limit and n >= limit:
            break
    return {g: _most_common(c) for g, c in groups.items()}, n


def majority_baseline(
    items: Sequence[dict[str, Any]], prior: Optional[dict[tuple, str]] = None
) -> tuple[list[float], dict[tuple, str]]:
    """Per item: 1 if its truth is its group's majority answer. Groups split open and
    multiple-choice questions: "red" and "B" are different guesses.

    ``prior`` (from ``answer_prior`` over the training items): the majority answer is the
    training one; a group the training data lacks falls back to the evaluated items' own
    majority. Without ``prior``: the evaluated items' own majority, i.e. the best any image-blind
    answerer could do knowing these items' answers (an upper bound: in a group of a few items
    it is well above chance)."""
    groups: dict[tuple, Counter] = defaultdict(Counter)
    for it in items:
        groups[_group(it)][normalise_answer(it["truth"])] += 1
    majority = {g: _most_common(c) for g, c in groups.items()}
    if prior:
        majority = {g: prior.get(g, m) for g, m in majority.items()}
    hits = [float(normalise_answer(it["truth"]) == majority[_group(it)]) for it in items]
    return hits, majority


def summarise(records: Sequence[dict[str, Any]], prior: Optional[dict[tuple, str]] = None) -> dict[str, float]:
    """Accuracy and majority baselines overall, per task and per task/attribute.

    ``records``: dicts with task, attribute, format, truth, correct (as ``evaluate_qa`` writes
    them). Keys: ``qa_acc``, ``qa_majority`` (the training answers' majority when ``prior`` is
    given, see ``majority_baseline``), ``qa_majority_heldout`` (the evaluated items' own
    majority, an upper bound for blind answering), ``qa_n``, and each of them per
    ``<task>`` and ``<task>/<attribute>``; ``qa_ci_lo`` / ``qa_ci_hi`` (and per key): the
    accuracy's Wilson 95% interval.
    """
    if not records:
        return {}
    base, _ = majority_baseline(records, prior)
    upper, _ = majority_baseline(records)
    out = {"qa_n": float(len(records)), "qa_acc": float(np.mean([r["correct"] for r in records])),
           "qa_majority": float(np.mean(base)), "qa_majority_heldout": float(np.mean(upper))}
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by[r["task"]].append(i)
        by[f"{r['task']}/{r['attribute']}"].append(i)
    for key, idx in sorted(by.items()):
        out[f"qa_acc/{key}"] = float(np.mean([records[i]["correct"] for i in idx]))
        out[f"qa_majority/{key}"] = float(np.mean([base[i] for i in idx]))
        out[f"qa_majority_heldout/{key}"] = float(np.mean([upper[i] for i in idx]))
        out[f"qa_n/{key}"] = float(len(idx))
        # visual thinking asked again with the true crop drawn (evaluate_qa's correct_true_crop),
        # beside qa_acc, whose answers follow the model's own crop
        given = [records[i]["correct_true_crop"] for i in idx if "correct_true_crop" in records[i]]
        if given:
            out[f"qa_acc_true_crop/{key}"] = float(np.mean(given))
    # Wilson 95% intervals beside every accuracy: qa_ci_lo / qa_ci_hi (overall and per key)
    for key in ["", *sorted(by)]:
        sfx = f"/{key}" if key else ""
        n = out[f"qa_n{sfx}"]
        out[f"qa_ci_lo{sfx}"], out[f"qa_ci_hi{sfx}"] = wilson(out[f"qa_acc{sfx}"] * n, n)
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
            if it.response_images:
                true_ND = runner.encode_images(it.response_images[:1])[0]
                if pred.tokens:
                    rec["crop_cosine"] = float(F.cosine_similarity(pred.tokens[0], true_ND, dim=-1).mean())
                # the same question once the true crop is drawn: reading a crop, apart from drawing it
                given = runner.answer_after_image(it.conversation, it.images, true_ND, max_new_tokens=max_new_tokens)
                rec["prediction_true_crop"] = given.text
                rec["correct_true_crop"] = normalise_answer(given.text) == normalise_answer(it.truth)
        records.append(rec)
        if on_item:
            on_item(rec)
    return records
