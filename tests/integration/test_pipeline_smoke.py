"""The whole default DAG on the smoke preset: every stage runs, outputs read back with the
standard tools, MLflow holds the runs, and a second identical run is all cache hits.

    pytest -q tests/integration/test_pipeline_smoke.py
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from mlflow import MlflowClient

from pipelines import cache
from pipelines.commands import execute
from pipelines.config import load_config
from pipelines.definitions import get_pipeline
from pipelines.tracking import default_uri

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def test_smoke_pipeline_end_to_end(smoke_run):
    # the session's one smoke run (conftest.py), shared with test_exports_mlflow.py
    pipeline = get_pipeline("vpit")
    tmp_path, loaded, summary = smoke_run["root"], smoke_run["loaded"], smoke_run["summary"]
    expected = {
        "world", "curate_understanding", "curate_generation", "curate_video", "curate_visual_thinking",
        "curate_image_edit", "mix", "vision_encoder", "tokenize", "train_connector", "train_vpit",
        "train_decoder", "train_judge", "evaluate",
    }
    assert set(summary.statuses) == expected
    assert set(summary.statuses.values()) == {"ran"}
    for name, out in summary.out_dirs.items():
        assert cache.verify(out) == [], name

    # curated shards read back with the webdataset library; counts add up with quarantine
    for fam in ("understanding", "generation", "video", "visual_thinking", "image_edit"):
        d = summary.out_dirs[f"curate_{fam}"] / f"curated_{fam}"
        urls = sorted(str(p) for p in d.glob("shard-*.tar"))
        assert urls, fam
        n = sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False))
        assert n == pq.read_table(d / "index.parquet").num_rows > 0
        stats = summary.stats[f"curate_{fam}"]
        assert stats["records_in"] == stats["samples_out"] + stats.get("quarantined", 0)

    # tokenized rows read back with pyarrow, packing efficiency reported
    tok = summary.out_dirs["tokenize"] / "tokenized"
    table = pq.read_table(sorted(tok.glob("*.parquet")))
    assert table.num_rows > 0 and {"input_ids", "labels", "vision_feats"} <= set(table.column_names)
    assert summary.stats["tokenize"]["packing_efficiency"] >= 0.9

    # MLflow: one parent with children for every stage, all finished
    client = MlflowClient(default_uri(tmp_path))
    exp = client.get_experiment_by_name(loaded.typed.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parent = [r for r in runs if r.info.run_name == "smoke-e2e"][0]
    assert parent.info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.data.tags["stage"] for r in kids} == expected
    assert all(r.data.tags["status"] == "ran" for r in kids)
    for r in kids:  # each curation child run: per-source counts that add up (records in = out + quarantined)
        if r.data.tags["stage"].startswith("curate_"):
            m = r.data.metrics
            names = {k.split("/")[1] for k in m if k.startswith("source/")}
            assert names and all(m[f"source/{n}/records_in"] == m[f"source/{n}/samples_out"] + m[f"source/{n}/quarantined"] > 0 for n in names)

    # the second identical run executes nothing
    again = execute(get_pipeline("vpit"), load_config(pipeline.stages, preset="smoke",
                                                      overrides=[f"run_root={tmp_path}", "stages.evaluate.register_as=metamorph-smoke"]))
    assert set(again.statuses.values()) == {"cached"}
    json.dumps(summary.stats, default=str)  # stats are JSON-able


def test_data_files_are_hashed_while_writing(smoke_run):
    """The manifests of the data stages take each shard's, index's, quarantine's and tokenized
    part's sha256 from its writer; only files of third-party writers are read again at promote;
    and every recorded digest is the file's."""
    root = smoke_run["root"]
    seen = 0
    for stage in ("curate_understanding", "curate_generation", "curate_video", "curate_visual_thinking",
                  "curate_image_edit", "mix", "tokenize"):
        (out,) = [d for d in (root / stage).iterdir() if cache.KEY_RE.match(d.name)]
        for f in cache.read_manifest(out)["files"]:
            ours = f["path"].endswith((".tar", ".jsonl")) or "index.parquet" in f["path"] \
                or "image_hashes.parquet" in f["path"] or f["path"].startswith("tokenized/part-")
            if ours:
                assert f["hashed"] == "writing", (stage, f)
                seen += 1
        assert cache.verify(out, hashes=True) == [], stage
    assert seen >= 7 * 2, seen


def test_qa_beside_generation_gives_the_same_figures(smoke_run, tmp_path):
    """The smoke run's evaluate ran its QA pass as a Ray task beside the generations
    (qa_beside_generation, the default), judged with the train_judge stage's judge; both in this
    process, one after the other, give every figure and sample the same."""
    from metamorph.eval.run import evaluate_all
    from metamorph.threads import torch_threads

    summary, loaded = smoke_run["summary"], smoke_run["loaded"]
    cfg = loaded.stage("evaluate")
    assert cfg.qa_beside_generation
    d = summary.out_dirs
    paths = {"vpit_model": d["train_vpit"] / "vpit_model", "decoder": d["train_decoder"] / "decoder",
             "vision_encoder": d["vision_encoder"] / "vision_encoder", "tokenizer": d["tokenize"] / "tokenizer",
             "mixture": d["mix"] / "mixture", "judge": d["train_judge"] / "judge"}
    with torch_threads(int(cfg.cpus)):
        metrics, _, _ = evaluate_all({k: str(v) for k, v in paths.items()}, cfg.library(), str(tmp_path),
                                     loaded.typed.seed, "cpu")
    before = json.loads((d["evaluate"] / "eval_report" / "metrics.json").read_text())
    before = before.get("metrics", before)
    figures = {k for k in metrics if "seconds" not in k}
    assert "judge_acc_min" in figures and "qa_acc" in figures  # the smoke judge's own test scores
    assert {k: metrics[k] for k in figures} == {k: before[k] for k in figures}
    # and every sample: answers, generated-token scores, judged attributes
    assert (tmp_path / "samples.jsonl").read_text() == (d["evaluate"] / "eval_report" / "samples.jsonl").read_text()
