"""Multiple-choice benchmarks in VLMEvalKit's TSV layout, scored by the likelihood of each option letter.

    python -m metamorph.eval.tsv MMBench_DEV_EN.tsv     # reads the file, prints counts per category

The layout (what VLMEvalKit's MMBench / SEED-Bench / ScienceQA / AI2D exports look like): one row
per question, tab-separated, with columns ``index``, ``image`` (base64-encoded image bytes; a
short value is the ``index`` of another row whose image it shares, as MMBench does; a
``[...]`` list literal holds several images), ``question``, optional ``hint``, option columns
``A``, ``B``, ``C``, ``D`` (more letters allowed, empty cells are absent options), ``answer``
(the letter; absent on test splits) and optional ``category`` / ``l2-category`` / ``split``.

Scoring needs no external judge: the prompt is the question with its options in the LLaVA-1.5
format the model was trained on ("A. ...\\nB. ...\\nAnswer with the option's letter from the given
choices directly."), and the prediction is the option whose letter gets the highest next-token
logit at the start of the answer (restricted to the row's letters). MMBench's circular
evaluation (every rotation of the options must be right) is not applied: numbers are the plain
single-pass accuracy.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import math
import string
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from metamorph.data.schema import IMAGE_PLACEHOLDER

MC_SUFFIX = "Answer with the option's letter from the given choices directly."
_REF_MAX_LEN = 64  # an image cell this short is a reference to another row's index, not base64


@dataclass
class MCItem:
    index: str
    question: str
    options: dict[str, str]  # letter -> text, in letter order
    answer: Optional[str]  # the right letter, None when the file has no answers
    images: list[bytes] = field(default_factory=list)
    hint: str = ""
    category: str = ""
    l2_category: str = ""

    def conversation(self) -> list[dict[str, str]]:
        """One user turn: images, hint, question, options, the answer-format instruction."""
        parts = [IMAGE_PLACEHOLDER * len(self.images)] if self.images else []
        if self.hint:
            parts.append(self.hint)
        parts.append(self.question)
        parts.extend(f"{k}. {v}" for k, v in self.options.items())
        parts.append(MC_SUFFIX)
        return [{"role": "user", "content": "\n".join(parts)}]


def _cell(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if v is None:
        return ""
    v = str(v).strip()
    return "" if v.lower() in ("", "nan", "none") else v


def _decode_image(cell: str, where: str) -> bytes:
    try:
        return base64.b64decode(cell, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: image cell is not base64 ({e})") from None


def read_tsv(path: str | Path, limit: int = 0) -> list[MCItem]:
    """Parse a VLMEvalKit TSV into items (the first ``limit`` rows; 0 = all)."""
    path = Path(path)
    # image cells are whole base64 images, far over csv's 128 KiB default; the limit is
    # process-wide, so it is put back for the other readers (HowTo100M relies on the default)
    old_limit = csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    finally:
        csv.field_size_limit(old_limit)
    if not rows:
        return []
    cols = set(rows[0])
    missing = [c for c in ("index", "question") if c not in cols]
    if missing:
        raise ValueError(f"{path}: not a VLMEvalKit TSV, missing columns {missing} (have {sorted(cols)})")
    letters = [c for c in string.ascii_uppercase if c in cols]
    if len(letters) < 2:
        raise ValueError(f"{path}: needs option columns A, B, ... (multiple choice); have {sorted(cols)}")
    raw_images = {_cell(r, "index"): _cell(r, "image") for r in rows}
    items = []
    for i, r in enumerate(rows[: limit or None]):
        idx = _cell(r, "index") or str(i)
        where = f"{path.name} row {i + 2} (index {idx})"
        cell = _cell(r, "image")
        if cell and len(cell) <= _REF_MAX_LEN and cell in raw_images and raw_images[cell] != cell:
            cell = raw_images[cell]  # MMBench: the image is stored once, other rows point at it
        images: list[bytes] = []
        if cell.startswith("["):
            for c in ast.literal_eval(cell):
                images.append(_decode_image(str(c), where))
        elif cell:
            images.append(_decode_image(cell, where))
        options = {k: _cell(r, k) for k in letters if _cell(r, k)}
        answer = _cell(r, "answer").upper() or None
        if answer is not None and answer not in options:
            raise ValueError(f"{where}: answer {answer!r} is not one of the options {list(options)}")
        items.append(
            MCItem(
                index=idx,
                question=_cell(r, "question"),
                options=options,
                answer=answer,
                images=images,
                hint=_cell(r, "hint"),
                category=_cell(r, "category"),
                l2_category=_cell(r, "l2-category"),
            )
        )
    return items


class LetterScorer(Protocol):
    def option_logits(self, conversation: Sequence[dict[str, str]], images: Sequence[bytes], letters: Sequence[str]) -> list[float]:
        """Next-token logit of each letter at the start of the answer."""


def score_items(scorer: LetterScorer, items: Sequence[MCItem]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Accuracy overall and per category (``acc/<category>``) plus one record per item."""
    records = []
    per_cat: dict[str, list[float]] = defaultdict(list)
    for it in items:
        letters = list(it.options)
        logits = scorer.option_logits(it.conversation(), it.images, letters)
        best = max(range(len(letters)), key=lambda j: logits[j])
        pred = letters[best]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        rec = {
            "index": it.index,
            "category": it.category,
            "question": it.question,
            "options": it.options,
            "prediction": pred,
            "answer": it.answer,
            "p_letters": {k: math.exp(v - m) / z for k, v in zip(letters, logits)},
        }
        if it.answer is not None:
            rec["correct"] = pred == it.answer
            per_cat[it.category or "all"].append(float(rec["correct"]))
        records.append(rec)
    scored = [r["correct"] for r in records if "correct" in r]
    metrics = {"n": float(len(items)), "n_scored": float(len(scored))}
    if scored:
        metrics["acc"] = sum(scored) / len(scored)
        # chance = mean over items of 1 / number of options
        metrics["chance"] = sum(1 / len(it.options) for it in items if it.answer is not None) / len(scored)
        if len(per_cat) > 1 or "all" not in per_cat:
            for cat, v in sorted(per_cat.items()):
                metrics[f"acc/{cat}"] = sum(v) / len(v)
    return metrics, records


if __name__ == "__main__":
    its = read_tsv(sys.argv[1])
    cats: dict[str, int] = defaultdict(int)
    for it in its:
        cats[it.category] += 1
    print(f"{len(its)} items, {sum(1 for i in its if i.images)} with images; per category {dict(cats)}")
    if its:
        print(its[0].conversation()[0]["content"])
