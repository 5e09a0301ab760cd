"""The MLflow record, through the MLflow client on a real sqlite store (no Ray): where the record
goes (config key > $MLFLOW_TRACKING_URI > embedded), standard tags and experiment kind, datasets
as inputs, logged models linked to metrics and the registry, system metrics.

    pytest -q tests/unit/test_tracking.py

The same things on a whole smoke run: tests/integration/test_exports_mlflow.py.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines import cache
from pipelines.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    Tracker,
    default_uri,
    find_logged_model,
    log_datasets,
    log_model,
    log_model_metrics,
    register_model,
    resolve_uri,
    system_metrics,
)


def test_uri_precedence_config_then_env_then_embedded(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None, tmp_path) == (default_uri(tmp_path), (tmp_path.resolve() / "mlartifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(None, tmp_path) == ("http://127.0.0.1:5999", None)
    assert resolve_uri("sqlite:///x.db", tmp_path) == ("sqlite:///x.db", None)


def test_every_preset_honours_the_environment(tmp_path, monkeypatch):
    from pipelines.tracking import make_tracker
    from pipelines.config import load_config
    from pipelines.definitions import get_pipeline

    uri = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    stages = get_pipeline("vpit").stages
    for preset in ("smoke", "tiny", "cluster"):
        loaded = load_config(stages, preset=preset, overrides=[f"run_root={tmp_path / preset}"])
        assert make_tracker(loaded).uri == uri, preset
    loaded = load_config(stages, preset="smoke", overrides=[f"run_root={tmp_path}", f"tracking.uri={default_uri(tmp_path)}"])
    assert make_tracker(loaded).uri == default_uri(tmp_path)  # the config key wins


@pytest.fixture
def tracker(tmp_path):
    return Tracker(default_uri(tmp_path), "exp", (tmp_path / "mlartifacts").as_uri())


def test_experiment_kind_and_standard_tags(tracker):
    client = tracker.client
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    run = client.get_run(tracker.start_run("r").run_id)
    tags = run.data.tags
    assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
    sha = cache.git_sha()
    assert tags.get("mlflow.source.git.commit") == (sha if sha != "unknown" else None)


def _promoted(root, stage, key, artifact, write):
    """A stage output dir as the engine leaves it: files, then the manifest with row counts."""
    tmp, final = root / stage / f"{key}.tmp", root / stage / key
    (tmp / artifact).mkdir(parents=True)
    rows = write(tmp / artifact)
    cache.promote(tmp, final, {"key": key}, {f"{artifact}/{k}": v for k, v in rows.items()})
    return final / artifact


def test_datasets_are_run_inputs_with_the_cache_key_as_digest(tracker, tmp_path):
    def tokenized(d):
        pq.write_table(pa.table({"input_ids": [[1, 2], [3]], "labels": [[1, 2], [3]]}), d / "part-00000.parquet")
        return {}

    def curated(d):
        (d / "shard-train-00000.tar").write_bytes(b"x" * 10)
        (d / "shard-heldout-00000.tar").write_bytes(b"y" * 10)
        pq.write_table(pa.table({"id": ["a", "b", "c"], "task": ["t2i"] * 3}), d / "index.parquet")
        return {"shard-train-00000.tar": 2, "shard-heldout-00000.tar": 1}

    inputs = {
        "tokenized": _promoted(tmp_path, "tokenize", "k" * 16, "tokenized", tokenized),
        "curated_generation": _promoted(tmp_path, "curate_generation", "c" * 16, "curated_generation", curated),
        "tokenizer": tmp_path / "somewhere",  # not a dataset: left out
    }
    h = tracker.start_run("train")
    assert log_datasets(h, inputs, "training") == ["curated_generation", "tokenized"]
    got = {d.dataset.name: d for d in tracker.client.get_run(h.run_id).inputs.dataset_inputs}
    tok = got["tokenized"].dataset
    assert tok.digest == "k" * 16 and json.loads(tok.profile)["num_rows"] == 2
    assert [c["name"] for c in json.loads(tok.schema)["mlflow_colspec"]] == ["input_ids", "labels"]
    assert json.loads(tok.source)["uri"] == inputs["tokenized"].resolve().as_uri()
    cur = json.loads(got["curated_generation"].dataset.profile)
    assert (cur["num_rows"], cur["train_rows"], cur["heldout_rows"]) == (3, 2, 1)
    assert {t.key: t.value for t in got["tokenized"].tags}["mlflow.data.context"] == "training"


def test_stages_starting_together_log_the_same_datasets_without_failing(tracker, tmp_path):
    """Stages that start at once (the runner's threads) log the same inputs to the pipeline run and
    to their own runs; MLflow's store looks up then inserts, so before the retry one of them failed
    its stage on a UNIQUE constraint (seen in CI as `mix` failing)."""
    import threading

    def tokenized(d):
        pq.write_table(pa.table({"input_ids": [[1]], "labels": [[1]]}), d / "part-00000.parquet")
        return {}

    arts = {f"curated_f{i}": _promoted(tmp_path, f"curate_f{i}", f"{i}" * 16, f"curated_f{i}", tokenized)
            for i in range(12)}
    parent = tracker.start_run("pipeline")
    children = [tracker.start_run(f"stage{i}", parent_id=parent.run_id) for i in range(4)]
    barrier, errors = threading.Barrier(len(children)), []

    def stage(child):
        barrier.wait()
        try:
            for name, path in arts.items():
                log_datasets(child, {name: path}, "processing")
                log_datasets(parent, {name: path}, "processing")
        except Exception as e:  # noqa: BLE001 - collected, asserted below
            errors.append(e)

    threads = [threading.Thread(target=stage, args=(c,)) for c in children]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert errors == []
    for h in (parent, *children):
        got = sorted(d.dataset.name for d in tracker.client.get_run(h.run_id).inputs.dataset_inputs)
        assert got == sorted(arts)  # every input logged once per run, none lost


def test_logged_model_linked_to_metrics_and_registered(tracker, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    export = tmp_path / "vpit_model"
    export.mkdir()
    (export / "config.json").write_text('{"model_type": "metamorph"}')
    train = tracker.start_run("train_vpit")
    model_id = log_model(train, export, name="vpit_model", model_type="transformers", tags={"cache_key": "abc"})
    client = tracker.client
    m = client.get_logged_model(model_id)
    assert str(m.status).endswith("READY") and m.source_run_id == train.run_id
    assert [a.path for a in client.list_logged_model_artifacts(model_id)] == ["config.json"]
    assert model_id in [o.model_id for o in client.get_run(train.run_id).outputs.model_outputs]

    ev = tracker.start_run("evaluate")
    assert find_logged_model(ev, "vpit_model", "abc") == model_id
    assert find_logged_model(ev, "vpit_model", "other") is None
    log_model_metrics(ev, model_id, {"eval/qa_acc": 0.75, "eval/fid": float("nan")})
    linked = {x.key: x for x in client.get_logged_model(model_id).metrics}
    assert linked["eval/qa_acc"].value == 0.75 and linked["eval/qa_acc"].run_id == ev.run_id
    assert "eval/fid" not in linked  # NaN (not measured) is not a result
    version = register_model(ev, model_id, "vpit", {"eval/qa_acc": 0.75}, description="smoke")
    mv = client.get_model_version("vpit", version)
    assert mv.source == f"models:/{model_id}" and mv.run_id == ev.run_id
    assert mv.tags["eval/qa_acc"] == "0.75" and "eval/qa_acc: 0.75" in mv.description
    assert json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"]) == [{"name": "vpit", "version": version}]
    assert register_model(ev, model_id, "vpit", {}) == str(int(version) + 1)  # a second version, same name
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the process-wide URI was restored (unset)


def test_system_metrics_on_a_short_run(tracker):
    h = tracker.start_run("train")
    with system_metrics(h, interval_s=60):  # shorter than one interval: the exit sample still lands
        pass
    keys = set(MlflowClient(h.uri).get_run(h.run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
