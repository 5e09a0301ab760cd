"""Held-out QA items from curated samples, exact-match normalisation, the majority baseline.

    pytest -q tests/unit/test_eval_understanding.py
"""

from __future__ import annotations

import pytest
import torch

from metamorph.data.schema import ImageRef, Sample, Turn
from metamorph.eval.generation import gen_items, retrieval_ranks
from metamorph.eval.inference import drop_instruction, normalise_answer
from metamorph.eval.understanding import answer_prior, majority_baseline, qa_items, summarise
from tests.unit.eval_fixtures import make_samples


def test_normalise_answer():
    assert normalise_answer("  Red. ") == "red"
    assert normalise_answer("Top   Left") == "top left"
    assert normalise_answer("B") == normalise_answer("b.")


def test_qa_items_multi_turn_and_visual_thinking():
    s = Sample(
        id="x", source="world", family="understanding", task="image_qa", split="heldout",
        conversation=[Turn(role="user", content="<image>\nWhat color is the circle?"), Turn(role="assistant", content="red"),
                      Turn(role="user", content="How many objects are there?"), Turn(role="assistant", content="2")],
        images=[ImageRef(ext="png", role="prompt")],
        meta={"qa": [{"type": "colour", "answer": "red", "format": "open"}, {"type": "count", "answer": "2", "format": "open"}]},
    )
    items = qa_items(s, [b"img"])
    assert [i.truth for i in items] == ["red", "2"] and [i.attribute for i in items] == ["colour", "count"]
    # the second question sees the first answer, and the image once
    assert [t["role"] for t in items[1].conversation] == ["user", "assistant", "user"] and items[1].images == [b"img"]
    vt = next(s for s, _ in make_samples(1) if s.task == "visual_thinking")
    (it,) = qa_items(vt, [b"a", b"b"])
    assert it.images == [b"a"] and it.response_images == [b"b"] and it.truth == vt.meta["answer"]
    t2i = next(s for s, _ in make_samples(1) if s.task == "t2i")
    assert qa_items(t2i, [b"a"]) == []


def test_majority_baseline_and_summary():
    recs = [
        {"task": "image_qa", "attribute": "colour", "truth": "red", "correct": True},
        {"task": "image_qa", "attribute": "colour", "truth": "Red.", "correct": True},
        {"task": "image_qa", "attribute": "colour", "truth": "blue", "correct": False},
        {"task": "image_qa", "attribute": "size", "truth": "small", "correct": True},
        {"task": "video_qa", "attribute": "direction", "truth": "left", "correct": False},
        {"task": "video_qa", "attribute": "direction", "truth": "up", "correct": False},
    ]
    hits, majority = majority_baseline(recs)
    assert majority[("image_qa", "colour", "")] == "red" and hits[:3] == [1.0, 1.0, 0.0]
    assert majority[("video_qa", "direction", "")] == "left"  # a tie goes to the alphabetically first
    # open and multiple-choice questions are separate groups
    mixed = [{"task": "t", "attribute": "a", "format": f, "truth": x} for f, x in
             [("open", "red"), ("open", "red"), ("mc", "B"), ("mc", "C"), ("mc", "C")]]
    assert majority_baseline(mixed)[0] == [1.0, 1.0, 0.0, 1.0, 1.0]
    m = summarise(recs)
    assert m["qa_acc"] == pytest.approx(3 / 6) and m["qa_majority"] == pytest.approx(4 / 6)
    assert m["qa_acc/image_qa/colour"] == pytest.approx(2 / 3) and m["qa_majority/video_qa"] == 0.5
    assert m["qa_n/image_qa"] == 4


def test_majority_from_training_answers():
    """The headline baseline is what a blind model learns from the training answers; the
    evaluated items' own majority (an upper bound that peeks at them) is kept beside it."""
    train = [{"task": "image_qa", "attribute": "colour", "format": "open", "truth": t} for t in ("Blue", "blue", "red")]
    train.append({"task": "video_qa", "attribute": "direction", "format": "open", "truth": "up"})
    prior, n = answer_prior(train)
    assert n == 4 and prior == {("image_qa", "colour", "open"): "blue", ("video_qa", "direction", "open"): "up"}
    assert answer_prior(train, limit=2)[1] == 2
    recs = [{"task": "image_qa", "attribute": "colour", "format": "open", "truth": x, "correct": c}
            for x, c in (("red", True), ("red", True), ("blue", False))]
    recs.append({"task": "image_qa", "attribute": "size", "format": "open", "truth": "small", "correct": False})
    m = summarise(recs, prior)
    assert m["qa_majority/image_qa/colour"] == pytest.approx(1 / 3)  # training says blue; these items are mostly red
    assert m["qa_majority_heldout/image_qa/colour"] == pytest.approx(2 / 3)
    assert m["qa_majority/image_qa/size"] == 1.0  # no training group: falls back to the items' own majority
    assert m["qa_majority"] == pytest.approx(2 / 4) and m["qa_majority_heldout"] == pytest.approx(3 / 4)


def test_gen_items_and_retrieval():
    samples = make_samples(1)
    by = {s.task: (s, ims) for s, ims in samples}
    (t2i,) = gen_items(*by["t2i"])
    assert t2i.truth["objects"] and t2i.prompt_images == [] and t2i.target == by["t2i"][1][0]
    assert t2i.text == by["t2i"][0].meta["caption"]
    (edit,) = gen_items(*by["image_edit"])
    assert edit.truth == by["image_edit"][0].meta["edited"] and len(edit.prompt_images) == 1
    assert gen_items(*by["image_qa"]) == []
    assert drop_instruction(edit.conversation)[0]["content"] == "<image>"
    true = torch.nn.functional.normalize(torch.randn(5, 4, 8), dim=-1)
    assert retrieval_ranks(true, true).tolist() == [0] * 5
    assert retrieval_ranks(true.roll(1, dims=0), true).max() > 0


def test_visual_thinking_asked_again_with_the_true_crop(tmp_path):
    """Each visual-thinking item is also answered after the true crop is drawn, laid out as in
    training (the answer's first token is the teacher-forced argmax after <image_end>), and
    summarised as qa_acc_true_crop beside qa_acc."""
    from metamorph.eval.inference import VPiTRunner
    from metamorph.eval.understanding import evaluate_qa
    from tests.unit.eval_fixtures import build_models, build_tokenizer

    samples = make_samples(2)
    tok = build_tokenizer(samples, tmp_path / "tok")
    dirs = build_models(tok, tmp_path)
    runner = VPiTRunner.from_dirs(dirs["vpit_model"], dirs["vpit_model"], dirs["vision_encoder"])
    vt = [it for s, ims in samples if s.task == "visual_thinking" for it in qa_items(s, ims)]
    assert vt and all(it.response_images for it in vt)
    recs = evaluate_qa(runner, vt, max_new_tokens=4)
    for it, r in zip(vt, recs):
        assert isinstance(r["prediction_true_crop"], str)
        assert r["correct_true_crop"] == (normalise_answer(r["prediction_true_crop"]) == normalise_answer(it.truth))
        crop_ND = runner.encode_images(it.response_images[:1])[0]
        first = runner.answer_after_image(it.conversation, it.images, crop_ND, max_new_tokens=1).output.token_ids
        # teacher-forced: the whole conversation rendered as training renders it, crop in place
        rd = runner.template.render([*it.conversation, {"role": "assistant", "content": "<image>\n" + it.truth}])
        feats = runner.encode_images([*it.images, it.response_images[0]])
        m = runner.model
        with torch.no_grad():
            ids = torch.tensor(rd.input_ids)[None]
            x = m.embed_tokens(ids).masked_scatter(torch.tensor(rd.visual_mask)[None, :, None],
                                                   m.project(feats.reshape(-1, feats.shape[-1])))
            logits = m.lm_logits(m.decode(x, torch.arange(ids.shape[1])[None]))[0, rd.image_span(1)[1] - 1]
        logits[runner.ids.image_start] = float("-inf")  # no second drawing (max_images=0)
        assert first[0] == int(logits.argmax())
    with pytest.raises(ValueError, match="response image"):
        runner.answer_after_image(vt[0].conversation, vt[0].images, torch.zeros(3, 16))
    m = summarise(recs)
    got = [r["correct_true_crop"] for r in recs]
    assert m["qa_acc_true_crop/visual_thinking"] == pytest.approx(sum(got) / len(got))
    assert all(k.startswith("qa_acc_true_crop/visual_thinking") for k in m if "true_crop" in k)
    # items that drew nothing get no true-crop figure
    assert not any("true_crop" in k for k in summarise([{"task": "image_qa", "attribute": "colour", "truth": "red",
                                                          "correct": True}]))
