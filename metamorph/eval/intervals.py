"""Confidence intervals for accuracies, and how many held-out items a figure needs.

    python -m metamorph.eval.intervals          # Wilson intervals at a few (k, n), items per s.e.

An accuracy over n items has a binomial standard error sqrt(p(1-p)/n): at most 0.5/sqrt(n), so
100 items keep it at or under 5 points whatever p is. Reports show the Wilson 95% score interval
beside each figure (not p +- 1.96 s.e.: that interval leaves [0, 1] and collapses to a point at
0/n and n/n, exactly where a toy model's per-attribute figures often are).

``expected_items`` turns a world / curation / evaluation config into the number of held-out items
each reported attribute will get, so a preset can be checked before anything runs.
"""

from __future__ import annotations

import math
from typing import Mapping

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes of n trials; (nan, nan) when n == 0."""
    if n <= 0:
        return (math.nan, math.nan)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def std_error(p: float, n: float) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else math.nan


def items_for_se(se_max: float) -> int:
    """Items that keep the worst-case (p = 0.5) standard error at or under ``se_max``."""
    if not 0 < se_max < 0.5:
        raise ValueError(f"se_max={se_max} must be in (0, 0.5)")
    return math.ceil(0.25 / (se_max * se_max) - 1e-9)


def with_intervals(metrics: Mapping[str, float], acc_prefix: str, n_prefix: str) -> dict[str, float]:
    """``{acc_prefix}{key}`` accuracies with ``{n_prefix}{key}`` counts -> ``{acc_prefix}{key}/ci_lo``
    and ``/ci_hi`` (Wilson 95%). Keys without a count are skipped."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not k.startswith(acc_prefix) or k.endswith(("/ci_lo", "/ci_hi")):
            continue
        key = k[len(acc_prefix):]
        n = metrics.get(f"{n_prefix}{key}")
        if n is None or isinstance(v, bool) or math.isnan(float(v)):
            continue
        lo, hi = wilson(float(v) * float(n), float(n))
        out[f"{k}/ci_lo"], out[f"{k}/ci_hi"] = lo, hi
    return out


def fmt_interval(p: float, lo: float | None, hi: float | None) -> str:
    """"0.862 [0.81, 0.90]" (just the figure when no interval is known)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    if lo is None or hi is None or math.isnan(lo):
        return f"{p:.3f}"
    return f"{p:.3f} [{lo:.2f}, {hi:.2f}]"


def cell(metrics: Mapping[str, float], key: str, lo: str | None = None, hi: str | None = None) -> str | None:
    """A report cell: ``metrics[key]`` with its interval (``{key}/ci_lo``/``/ci_hi`` unless named)."""
    if key not in metrics:
        return None
    return fmt_interval(metrics[key], metrics.get(lo or f"{key}/ci_lo"), metrics.get(hi or f"{key}/ci_hi"))


def expected_items(n_records: int, heldout_fraction: float, eval_cap: int, shares: Mapping[str, float],
                   per_record: Mapping[str, float] | None = None) -> dict[str, float]:
    """Expected held-out items per attribute: records held out (capped by the evaluation's
    ``eval_cap``, 0 = all) times the attribute's share of questions (times the questions per
    record of that attribute, ``per_record``, default 1)."""
    held = n_records * heldout_fraction
    if eval_cap:
        held = min(held, eval_cap)
    per_record = per_record or {}
    return {a: held * s * per_record.get(a, 1.0) for a, s in shares.items()}


def expected_qa_items(world, heldout_fraction: Mapping[str, float], caps: Mapping[str, int],
                      every_question: bool) -> dict[str, float]:
    """Expected held-out QA items per ``task/attribute`` from a ``WorldConfig``, each task's
    curation ``heldout_fraction`` and the evaluation's ``caps`` (held-out records per task, 0 =
    all). ``every_question``: each held-out record is asked every question type of its task
    (``every_question_items``); else one question per record, drawn as the world draws it."""
    from metamorph.world import attributes as A
    from metamorph.world import text as T

    types = world.question_types  # a type listed k times is drawn k times as often
    tasks = {
        # task: (records in the world, {attribute: share of records asking it})
        "image_qa": (world.n_understanding, {a: types.count(a) / len(types) for a in types}),
        "video_qa": (world.n_videoqa, {"direction": 0.5, "mover_shape": 0.25, "mover_colour": 0.25}),
        "visual_thinking": (world.n_visual_thinking, {a: 0.5 for a in T.SMALL_OBJECT_QUESTION_TYPES}),
    }
    out: dict[str, float] = {}
    for task, (n, shares) in tasks.items():
        if every_question:
            shares = {a: 1.0 for a in (A.QUESTION_TYPES if task == "image_qa" else shares)}
        for a, v in expected_items(n, heldout_fraction.get(task, 0.0), caps.get(task, 0), shares).items():
            out[f"{task}/{a}"] = v
    return out


def short_attributes(expected: Mapping[str, float], min_items: int) -> dict[str, float]:
    """The attributes expected to get fewer than ``min_items`` items."""
    return {a: n for a, n in expected.items() if n < min_items}


if __name__ == "__main__":
    for k, n in ((0, 13), (3, 13), (50, 100), (95, 100), (100, 100)):
        lo, hi = wilson(k, n)
        print(f"{k}/{n}: {fmt_interval(k / n, lo, hi)}")
    print("items for s.e. <= 5 points:", items_for_se(0.05))
