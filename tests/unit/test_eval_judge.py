"""The attribute judge: training on fresh renders, its own accuracy, the threshold gate, scoring.

    pytest -q tests/unit/test_eval_judge.py
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metamorph.eval.judge import (
    ATTRIBUTES,
    Judge,
    JudgeConfig,
    compare,
    gate,
    infer_geometry,
    scene_labels,
)
from metamorph.world.render import render, sample_scene

# a small budget (~1/6 of the default), enough to show learning in a few seconds
SMALL = dict(n_train=800, n_test=200, epochs=4, min_objects=1, max_objects=1)


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    return Judge.train(JudgeConfig(**SMALL, threshold=0.5))


def test_judge_learns_and_reports_its_accuracy(trained):
    judge, stats = trained
    for a in ATTRIBUTES:
        assert 0.0 <= stats[f"judge_acc_{a}"] <= 1.0
    # chance on one-object scenes: colour 1/6, background 1/3, position 1/9, shape 1/5
    assert stats["judge_acc_colour"] > 0.8 and stats["judge_acc_background"] > 0.9
    assert stats["judge_acc_position"] > 0.8 and stats["judge_acc_shape"] > 0.4
    assert stats["judge_acc_min"] == min(stats[f"judge_acc_{a}"] for a in ATTRIBUTES)
    assert stats["judge_ok"] == float(stats["judge_acc_min"] >= 0.5)
    # it reads fresh renders it never saw (PIL in, judged scene out)
    rng = np.random.default_rng(123)
    scenes = [sample_scene(rng, image_size=32, n_objects=1) for _ in range(40)]
    judged = judge.predict([render(s) for s in scenes])
    colour_ok = np.mean([j["slots"][j["shapes"][0]]["colour"] == s.objects[0].colour for j, s in zip(judged, scenes)])
    assert colour_ok > 0.75


def test_threshold_gate():
    acc = {"shape": 0.95, "colour": 0.99, "size": 0.97, "position": 0.93, "background": 1.0, "all": 0.9}
    assert gate(acc, 0.9)["judge_ok"] == 1.0
    st = gate(acc, 0.94)  # position 0.93 fails it, whatever "all" says
    assert st["judge_ok"] == 0.0 and st["judge_acc_min"] == 0.93
    with pytest.raises(ValueError, match="lacks"):
        gate({"shape": 1.0}, 0.5)
    with pytest.raises(ValueError, match="threshold"):
        JudgeConfig(threshold=1.5)


def test_untrained_judge_fails_the_gate():
    _, stats = Judge.train(JudgeConfig(n_train=20, n_test=100, epochs=1, threshold=0.9))
    assert stats["judge_ok"] == 0.0


def _judged(objs, background="white"):
    slots = {o["shape"]: {"p": o.get("p", 0.9), "colour": o["colour"], "size": o["size"], "position": o["position"]} for o in objs}
    return {"shapes": list(slots), "slots": slots, "background": background}


def test_compare_semantics():
    truth = {"background": "white", "objects": [{"shape": "circle", "colour": "red", "size": "large", "position": "center"}]}
    exact = compare(_judged([dict(truth["objects"][0])]), truth)
    assert exact == {"shape": 1.0, "colour": 1.0, "size": 1.0, "position": 1.0, "background": 1.0, "all": 1.0}
    # a red square where a red circle was asked: shape wrong, colour/size/position still read
    wrong_shape = compare(_judged([dict(truth["objects"][0], shape="square")]), truth)
    assert wrong_shape["shape"] == 0.0 and wrong_shape["colour"] == 1.0 and wrong_shape["all"] == 0.0
    # an extra object breaks the exact shape set
    extra = compare(_judged([dict(truth["objects"][0]), {"shape": "cross", "colour": "blue", "size": "small",
                                                          "position": "top left"}], "black"), truth)
    assert extra["shape"] == 0.0 and extra["colour"] == 1.0 and extra["background"] == 0.0
    # truth objects may omit attributes (a moving object has no fixed position)
    partial = {"background": "white", "objects": [{"shape": "circle", "colour": "red"}]}
    assert compare(_judged([dict(truth["objects"][0], size="small")]), partial)["all"] == 1.0


def test_geometry_and_labels():
    rng = np.random.default_rng(0)
    scene = sample_scene(rng, image_size=48, n_objects=2, small_frac=0.4, large_frac=0.9)
    meta = scene.to_meta()
    geo = infer_geometry(JudgeConfig(), [{"scene": meta}, {"caption": "no scene"}])
    assert geo["image_size"] == 48
    sizes = {o["size"] for o in meta["objects"]}
    if "small" in sizes:
        assert geo["small_frac"] == pytest.approx(0.4, abs=1e-3)
    if "large" in sizes:
        assert geo["large_frac"] == pytest.approx(0.9, abs=1e-3)
    assert infer_geometry(JudgeConfig(image_size=64), [])["image_size"] == 64
    lab = scene_labels(meta)
    assert lab[1:10].sum() == 2  # two occupied cells


def test_saved_judge_loads_and_judges_the_same(trained, tmp_path):
    """The train_judge stage's artifact: safetensors + judge.json; evaluate loads the same verdicts."""
    judge, stats = trained
    judge.save(tmp_path / "judge", stats, JudgeConfig(**SMALL))
    assert sorted(p.name for p in (tmp_path / "judge").iterdir()) == ["judge.json", "judge.safetensors"]
    loaded, loaded_stats = Judge.load(tmp_path / "judge")
    assert loaded_stats == stats and loaded.geometry == judge.geometry
    rng = np.random.default_rng(7)
    images = [render(sample_scene(rng, image_size=32, n_objects=2)) for _ in range(20)]
    assert loaded.predict(images) == judge.predict(images)
    # a mixture without toy-world scenes: the directory says why there is no judge
    Judge.save_skipped(tmp_path / "none", "no toy-world scenes")
    assert Judge.load(tmp_path / "none") == (None, {"skipped": "no toy-world scenes"})
    with pytest.raises(FileNotFoundError, match="judge.json"):
        Judge.load(tmp_path)
