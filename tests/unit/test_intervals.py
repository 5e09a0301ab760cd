"""Wilson intervals, item counts, every-question expansion, and the tiny preset's held-out sizes."""

from __future__ import annotations

import math

import pytest

from metamorph.eval import intervals as I


def test_wilson_matches_known_values_and_stays_in_range():
    lo, hi = I.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = I.wilson(0, 13)  # where p +- 1.96 s.e. collapses to [0, 0]
    assert lo == 0.0 and 0.2 < hi < 0.25
    assert I.wilson(13, 13)[1] == pytest.approx(1.0) and I.wilson(13, 13)[0] < 0.8
    assert all(math.isnan(v) for v in I.wilson(0, 0))
    assert I.items_for_se(0.05) == 100 and I.std_error(0.5, 100) == pytest.approx(0.05)
    assert I.fmt_interval(0.5, 0.4038, 0.5962) == "0.500 [0.40, 0.60]"


def test_summarise_reports_an_interval_beside_each_accuracy():
    from metamorph.eval.understanding import summarise

    recs = [{"task": "image_qa", "attribute": "shape", "format": "open", "truth": "circle", "correct": i < 30}
            for i in range(40)]
    m = summarise(recs)
    assert m["qa_acc/image_qa/shape"] == 0.75 and m["qa_n/image_qa/shape"] == 40
    assert (m["qa_ci_lo/image_qa/shape"], m["qa_ci_hi/image_qa/shape"]) == pytest.approx(I.wilson(30, 40))
    assert m["qa_ci_lo"] < m["qa_acc"] < m["qa_ci_hi"]


def test_every_question_items_asks_each_type_with_the_scene_truth():
    import numpy as np

    from metamorph.data.schema import ImageRef, Sample, Turn
    from metamorph.eval.understanding import every_question_items
    from metamorph.world import attributes as A
    from metamorph.world.config import WorldConfig
    from metamorph.world.families import understanding_record

    cfg = WorldConfig(max_objects=1, mc_fraction=1.0)  # a multiple-choice record is asked the open questions
    rec, png = understanding_record(0, cfg, 3)
    q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    sample = Sample(id=rec["id"], source="world", family="understanding", task="image_qa", split="heldout",
                    conversation=[Turn(role="user", content=q), Turn(role="assistant", content=a)],
                    images=[ImageRef(ext="png", role="prompt")], meta=rec["meta"])
    items = every_question_items(sample, [png])
    assert [it.attribute for it in items] == list(A.QUESTION_TYPES)
    obj = rec["meta"]["scene"]["objects"][0]
    truth = {it.attribute: it.truth for it in items}
    assert truth["shape"] == obj["shape"] and truth["position"] == obj["position"] and truth["size"] == obj["size"]
    assert all(it.format == "open" and it.conversation[-1]["content"].startswith("<image>\n") for it in items)
    assert np.all([len(it.images) == 1 for it in items])


def test_tiny_preset_gives_every_reported_qa_attribute_100_items():
    """The held-out counts come from the tiny preset's world / curation / evaluate configs."""
    from pipelines.config import load_config
    from pipelines.definitions import get_pipeline

    typed = load_config(get_pipeline("vpit").stages, preset="tiny").typed.stages
    ev = typed.evaluate
    frac = {"image_qa": typed.curate_understanding.heldout_fraction,
            "video_qa": typed.curate_understanding.heldout_fraction,
            "visual_thinking": typed.curate_visual_thinking.heldout_fraction}
    caps = {"image_qa": ev.n_image_qa, "video_qa": ev.n_video_qa, "visual_thinking": ev.n_visual_thinking}
    expected = I.expected_qa_items(typed.world, frac, caps, ev.every_question)
    assert len(expected) == 5 + 3 + 2
    # 1.2 x 100: the held-out split is a hash draw (binomial), so the expectation keeps a margin of ~2 s.d.
    assert not I.short_attributes(expected, 120), expected


def test_retrieval_in_pools_ranks_within_each_block():
    import torch

    from metamorph.eval.generation import retrieval_ranks

    true = torch.zeros(10, 4, 16)
    true[torch.arange(10), :, torch.arange(10)] = 1.0  # item i's tokens all point along axis i
    pred = true.clone()
    pred[7, :, 2] = 1.0  # item 7 leans to item 2's image: wrong among all 10, right within its block of 5
    pred[7, :, 7] = 0.5
    assert retrieval_ranks(pred, true)[7] > 0
    ranks = retrieval_ranks(pred, true, pool=5)
    assert ranks[7] == 0 and (ranks == 0).all() and len(ranks) == 10
