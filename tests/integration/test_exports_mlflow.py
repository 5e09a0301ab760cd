"""The smoke run's exports open where metamorph is not installed, and MLflow records the run:
logged models linked to their runs and to evaluate's metrics, the registry entry, dataset inputs
with digests, system metrics, standard source tags, the experiment kind, evaluation tables.

    pytest -q tests/integration/test_exports_mlflow.py

Both tests read the session's one smoke run (``smoke_run`` in conftest.py); the venv with only
torch + transformers + diffusers is built once and cached under the temp dir (``plain_venv``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.cache import read_manifest
from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, default_uri, process_tracking_uri

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(2400)]

CHECK = Path(__file__).with_name("plain_env_check.py")


def test_exports_load_and_generate_without_metamorph(smoke_run, plain_venv, tmp_path):
    out = smoke_run["summary"].out_dirs
    vpit, decoder = out["train_vpit"] / "vpit_model", out["train_decoder"] / "decoder"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    res = subprocess.run([str(plain_venv), str(CHECK), str(vpit), str(decoder), str(tmp_path)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "Do you wish to run the custom code" not in res.stdout + res.stderr  # every load said trust_remote_code
    r = json.loads(res.stdout.strip().splitlines()[-1])
    cfg = json.loads((vpit / "config.json").read_text())
    tok_cfg = json.loads((vpit / "tokenizer_config.json").read_text())
    # the saved code ran (no metamorph there), and generation gave visual tokens and text ids
    assert r["model_class"].startswith("transformers_modules") and r["model_class"].endswith("MetaMorphVPiTForCausalLM")
    assert r["pipeline_class"].startswith("diffusers_modules") and r["pipeline_class"].endswith("MetaMorphDecoderPipeline")
    assert r["visual_tokens"] == [1, cfg["n_tokens"], cfg["vision_dim"]]
    assert all(abs(n - 1) < 1e-4 for n in r["token_norms"])
    assert r["n_visual_prompt"] == cfg["n_tokens"]  # the chat template laid out one image
    assert r["answer_ids"] and (r["answer_stopped"] or len(r["answer_ids"]) == 8)
    eot = cfg["eos_token_id"]
    assert r["eos_token_id"] == eot and tok_cfg["eos_token"] == "<|eot_id|>"
    assert not r["answer_stopped"] or r["answer_ids"][-1] == eot  # stopped = at the end of turn
    assert r["image_size"] == [32, 32] and (tmp_path / "generated.png").stat().st_size > 0
    # model_index.json names the saved code, and no temporary dir of the training run
    index = (decoder / "model_index.json").read_text()
    assert json.loads(index)["_class_name"] == ["pipeline", "MetaMorphDecoderPipeline"]
    for f in decoder.rglob("*.json"):
        assert "_name_or_path" not in f.read_text() and "/tmp" not in f.read_text(), f


def _runs(smoke_run):
    client = MlflowClient(default_uri(smoke_run["root"]))
    exp = client.get_experiment_by_name(smoke_run["loaded"].typed.experiment)
    parent = client.get_run(smoke_run["summary"].parent_run_id)
    kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)
    return client, exp, parent, {k.data.tags["stage"]: k for k in kids}


def test_mlflow_is_the_record_of_the_run(smoke_run):
    client, exp, parent, kids = _runs(smoke_run)
    out = smoke_run["summary"].out_dirs

    # experiment kind (the MLflow 3 UI opens on the runs table) and the standard source tags
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    for run in (parent, *kids.values()):
        tags = run.data.tags
        assert tags["mlflow.user"] and tags["mlflow.source.name"] and tags["mlflow.source.type"] == "LOCAL"
        assert len(tags.get("mlflow.source.git.commit", "")) == 40 or tags.get("git_sha", "unknown") == "unknown"

    # logged models: one per trained model, READY, output of the run that trained it, with the files
    models = {m.name: m for m in client.search_logged_models([exp.experiment_id])}
    for name, stage, must_have in (("connector_model", "train_connector", "config.json"),
                                   ("vpit_model", "train_vpit", "modeling_metamorph.py"),
                                   ("decoder", "train_decoder", "model_index.json")):
        m = models[name]
        assert str(m.status).endswith("READY") and m.source_run_id == kids[stage].info.run_id
        assert m.tags["cache_key"] == out[stage].name
        assert m.model_id in [o.model_id for o in kids[stage].outputs.model_outputs]
        files = {Path(a.path).name for a in client.list_logged_model_artifacts(m.model_id)}
        assert must_have in files, (name, files)

    # evaluate's metrics are linked to the VPiT model (and to the held-out dataset they used)
    ev = client.get_run(kids["evaluate"].info.run_id)  # search_runs leaves out model inputs
    vpit = client.get_logged_model(models["vpit_model"].model_id)
    linked = {mt.key: mt for mt in vpit.metrics if mt.run_id == ev.info.run_id}
    assert "eval/qa_acc" in linked and linked["eval/qa_acc"].value == pytest.approx(ev.data.metrics["eval/qa_acc"])
    assert linked["eval/qa_acc"].dataset_name == "mixture"
    assert vpit.model_id in [i.model_id for i in ev.inputs.model_inputs]

    # the registry: evaluate.register_as registered the VPiT model with the metrics as tags
    mv = client.search_model_versions("name = 'metamorph-smoke'")[0]
    assert mv.source == f"models:/{vpit.model_id}" and float(mv.tags["eval/qa_acc"]) == pytest.approx(ev.data.metrics["eval/qa_acc"], rel=1e-5)
    assert "eval/qa_acc" in mv.description

    # datasets as inputs: digest = the producing stage's cache key, counts from its manifest
    def inputs(stage):
        return {d.dataset.name: d for d in kids[stage].inputs.dataset_inputs}

    tok_in = inputs("train_connector")["tokenized"]
    assert tok_in.dataset.digest == out["tokenize"].name[:36]
    assert {t.key: t.value for t in tok_in.tags}["mlflow.data.context"] == "training"
    rows = sum(f.get("rows", 0) for f in read_manifest(out["tokenize"])["files"]
               if f["path"].startswith("tokenized/") and f["path"].endswith(".parquet"))
    assert json.loads(tok_in.dataset.profile)["num_rows"] == rows > 0
    assert "input_ids" in tok_in.dataset.schema and json.loads(tok_in.dataset.source)["uri"].startswith("file://")
    assert set(inputs("mix")) >= {"curated_understanding", "curated_generation", "curated_image_edit"}
    assert json.loads(inputs("mix")["curated_generation"].dataset.profile)["num_rows"] > 0
    assert "mixture" in inputs("tokenize") and "tokenized" in inputs("train_vpit")
    ev_mix = inputs("evaluate")["mixture"]
    assert {t.key: t.value for t in ev_mix.tags}["mlflow.data.context"] == "evaluation"
    assert "curated_generation" in inputs("train_decoder")

    # system metrics on the training runs
    for stage in ("train_connector", "train_vpit", "train_decoder"):
        sysm = [k for k in kids[stage].data.metrics if k.startswith("system/")]
        assert any("cpu_utilization" in k for k in sysm) and any("memory" in k for k in sysm), (stage, sysm)

    # evaluation tables: per-sample QA and generations with their images
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    with process_tracking_uri(default_uri(smoke_run["root"])):  # load_table searches runs through the fluent API
        qa = client.load_table(exp.experiment_id, "eval_qa_table.json", run_ids=[ev.info.run_id])
        gen = client.load_table(exp.experiment_id, "eval_generation_table.json", run_ids=[ev.info.run_id])
    assert "MLFLOW_TRACKING_URI" not in os.environ or os.environ["MLFLOW_TRACKING_URI"] == env_before
    assert {"question", "answer", "prediction", "correct"} <= set(qa.columns) and len(qa) > 0
    assert {"caption", "generated", "judged"} <= set(gen.columns) and len(gen) > 0
    assert gen["generated"].iloc[0]["type"] == "image"
