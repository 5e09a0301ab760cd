"""The evaluate stage end to end on tiny random artifacts (no Ray, no MLflow).

    pytest -q tests/unit/test_eval_stage.py
"""

from __future__ import annotations

import json

import pytest

from pipelines.testing import run_stage
from stages.evaluate import EvaluateConfig, EvaluateStage
from stages.train_judge import TrainJudgeConfig, TrainJudgeStage
from tests.unit.eval_fixtures import build_run

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    paths = build_run(root, n_per_task=2)
    # an untrained judge: it must fail its own test and its verdicts on generations must not count
    judge_dir, judge_stats = run_stage(TrainJudgeStage(), TrainJudgeConfig(n_train=30, n_test=60, epochs=1),
                                       inputs={"mixture": paths["mixture"]}, root=root / "runs")
    assert judge_stats["judge_ok"] == 0.0
    cfg = EvaluateConfig(decoder_steps=1, cfg_scales=[1.0, 2.0], max_new_tokens=4)
    out, stats = run_stage(EvaluateStage(), cfg, inputs={**paths, "judge": judge_dir / "judge"}, root=root / "runs")
    return out / "eval_report", stats


def test_outputs(evaluated):
    out, stats = evaluated
    doc = json.loads((out / "metrics.json").read_text())
    m, head = doc["metrics"], doc["headline"]
    # every task was evaluated: QA (image, video, visual thinking) and generation (t2i, edit, frames)
    for k in ("qa_acc/image_qa", "qa_acc/video_qa", "qa_acc/visual_thinking", "qa_majority", "qa_majority_heldout"):
        assert 0.0 <= m[k] <= 1.0
    assert m["qa_prior_items"] >= 3  # the baseline's answers come from the mixture's training shards
    for t in ("t2i", "image_edit", "frame_prediction"):
        for s in ("1", "2"):
            assert -1.0 <= m[f"gen/{t}/cfg{s}/cosine"] <= 1.0
            assert m[f"gen/{t}/cfg{s}/retrieval_top1"] in (0.0, 0.5, 1.0)
    assert m["gen/t2i/cfg1/fd_encoder"] >= 0.0
    assert 0.0 <= m["gen/t2i/image_start_p"] <= 1.0
    assert set(head) >= {"eval/qa_acc", "eval/qa_majority", "eval/judge_acc", "eval/judge_ok", "eval/token_cosine"}
    assert stats["eval/qa_acc"] == head["eval/qa_acc"] and "judge_ok" in stats
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == m["n_records"]
    kinds = {(r["kind"], r["task"]) for r in lines}
    assert ("qa", "video_qa") in kinds and ("generation", "frame_prediction") in kinds
    html = (out / "report.html").read_text()
    assert "Understanding" in html and "t2i samples" in html and "data:image/png;base64," in html
    # FID/CLIP were not configured: skipped, with the reason recorded
    assert "no evaluate.fid.inception_path given" in doc["params"]["skipped_fid"]


def test_failed_judge_withholds_judged_generation_scores(evaluated):
    out, _ = evaluated
    doc = json.loads((out / "metrics.json").read_text())
    m, head = doc["metrics"], doc["headline"]
    assert m["judge_ok"] == 0.0 and "eval/gen_attr_acc" not in head
    assert not [k for k in m if "/judge/" in k and "/reference/" not in k]
    # the judge's own reading of the real held-out images is still reported (it shows why)
    assert "gen/t2i/reference/judge/colour" in m


def test_config_validation():
    with pytest.raises(ValueError, match="cfg_scales"):
        EvaluateConfig(cfg_scales=[])
    with pytest.raises(ValueError, match="n_t2i"):
        EvaluateConfig(n_t2i=-1)
    with pytest.raises(ValueError, match="tsv_paths"):
        EvaluateStage().validate(EvaluateConfig(tsv_paths=["/nonexistent.tsv"]))


def test_publish_to_child_and_parent_runs(tmp_path):
    """Headline metrics land on the pipeline's parent run, everything on the stage's child run."""
    from mlflow import MlflowClient

    from pipelines.stage import StageContext
    from pipelines.tracking import Tracker, default_uri
    from stages.evaluate import publish

    tracker = Tracker(default_uri(tmp_path), "t", (tmp_path / "mlartifacts").as_uri())
    parent = tracker.start_run("pipeline")
    child = tracker.start_run("evaluate", tags={"stage": "evaluate"}, parent_id=parent.run_id)
    out = tmp_path / "work" / "eval_report"
    out.mkdir(parents=True)
    (out / "report.html").write_text("<html></html>")
    ctx = StageContext(stage="evaluate", key="k", cfg=EvaluateConfig(), seed=0, inputs={}, work_dir=tmp_path / "work",
                       checkpoint_dir=tmp_path / "ck", run_root=tmp_path, tracking=child, parent_tracking=parent)
    stats = publish(ctx, out, {"qa_acc": 0.9, "gen/t2i/cfg1/cosine": 0.5, "judge_ok": 1.0},
                    {"eval/qa_acc": 0.9, "eval/judge_ok": 1.0}, {"fid_steps": 50, "skipped_fid": "no weights"})
    client = MlflowClient(default_uri(tmp_path))
    assert client.get_run(child.run_id).data.tags["eval.fid_steps"] == "50"
    assert client.get_run(parent.run_id).data.metrics == {"eval/qa_acc": 0.9, "eval/judge_ok": 1.0}
    assert client.get_run(child.run_id).data.metrics["gen/t2i/cfg1/cosine"] == 0.5
    assert [a.path for a in client.list_artifacts(child.run_id)] == ["report.html"]
    assert stats["eval/qa_acc"] == 0.9 and stats["judge_ok"] == 1.0
