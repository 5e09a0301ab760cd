"""The DAG engine end to end on local Ray with the embedded MLflow store.

    pytest -q tests/integration/test_engine.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import cache
from pipelines.config import load_config
from pipelines.runner import Engine, StageFailed
from pipelines.tracking import Tracker, default_uri
from tests.integration.engine.toy_stages import toy_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]


def run(root: Path, *overrides, only=(), from_=None, until=None, force=(), name=None):
    pipeline = toy_pipeline()
    loaded = load_config(pipeline.stages, overrides=[f"run_root={root}", "experiment=toy", *overrides])
    engine = Engine(pipeline, loaded)
    plan = engine.plan(only=only, from_=from_, until=until, force=force)
    tracker = Tracker(default_uri(root), "toy", (root / "mlartifacts").as_uri())
    return engine, engine.run(plan, tracker=tracker, run_name=name)


def mlflow_runs(root: Path):
    client = MlflowClient(tracking_uri=default_uri(root))
    exp = client.get_experiment_by_name("toy")
    return client, client.search_runs([exp.experiment_id], max_results=500)


def test_cache_rerun_and_config_change(ray_session, tmp_path):
    engine, s1 = run(tmp_path, name="first")
    assert set(s1.statuses.values()) == {"ran"}
    report = json.loads((engine.out_dir("report") / "report" / "report.json").read_text())
    assert report["total"] == 2 * sum(range(20)) and report["letters"] == "abc"
    mtimes = {n: (engine.out_dir(n) / cache.MANIFEST).stat().st_mtime_ns for n in engine.dag.order}

    # identical second run: all cache hits, nothing executed or rewritten
    engine2, s2 = run(tmp_path, name="second")
    assert set(s2.statuses.values()) == {"cached"}
    assert {n: (engine2.out_dir(n) / cache.MANIFEST).stat().st_mtime_ns for n in engine2.dag.order} == mtimes

    # an operational knob does not change any key
    engine3, s3 = run(tmp_path, "stages.numbers.workers=8")
    assert set(s3.statuses.values()) == {"cached"}

    # changing one stage's config reruns it and its downstream only
    engine4, s4 = run(tmp_path, "stages.letters.text=xyz")
    assert s4.statuses == {"numbers": "cached", "scale": "cached", "letters": "ran", "report": "ran"}
    assert engine4.keys["letters"] != engine.keys["letters"] and engine4.keys["report"] != engine.keys["report"]
    assert engine4.keys["scale"] == engine.keys["scale"]

    # independent stages ran concurrently in the first run: letters started before scale finished
    m_letters = cache.read_manifest(engine.out_dir("letters"))
    m_scale = cache.read_manifest(engine.out_dir("scale"))
    assert m_letters["started_at"] < m_scale["finished_at"]

    # manifests list every file with size, and row counts where known
    files = {f["path"]: f for f in cache.read_manifest(engine.out_dir("scale"))["files"]}
    assert files["scaled/scaled.parquet"]["rows"] == 20
    assert cache.verify(engine.out_dir("scale")) == []

    # MLflow: parent per invocation with flattened config + tags; a child per stage
    client, runs = mlflow_runs(tmp_path)
    parents = {r.info.run_name: r for r in runs if "mlflow.parentRunId" not in r.data.tags}
    first = parents["first"]
    assert first.data.params["stages.numbers.n"] == "20"
    assert first.data.params["run_root"] == str(tmp_path)
    assert first.data.tags["run_root"] == str(tmp_path) and "git_sha" in first.data.tags
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert set(by_stage) == {"numbers", "scale", "letters", "report"}
    scale = by_stage["scale"]
    assert scale.data.tags["status"] == "ran" and scale.info.status == "FINISHED"
    assert scale.data.tags["cache_key"] == engine.keys["scale"]
    assert scale.data.params["factor"] == "2"
    assert scale.data.metrics["rows"] == 20 and scale.data.metrics["sum"] == 380
    arts = {a.path for a in client.list_artifacts(scale.info.run_id)}
    assert {"manifest.json", "config.yaml"} <= arts
    second_children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents["second"].info.run_id]
    assert {r.data.tags["status"] for r in second_children} == {"cached"}


def test_selection_flags(ray_session, tmp_path):
    engine, s = run(tmp_path, until="scale")
    assert s.statuses == {"numbers": "ran", "scale": "ran"}
    # --only a stage whose upstream is cached
    _, s = run(tmp_path, only=["letters"])
    assert s.statuses == {"letters": "ran"}
    # --from: that stage and downstream; upstream cached ones are used, not rerun
    _, s = run(tmp_path, from_="scale", force=["scale"])
    assert s.statuses == {"scale": "ran", "report": "ran"}
    # --force reruns a cached stage and its downstream
    _, s = run(tmp_path, force=["letters"])
    assert s.statuses == {"numbers": "cached", "scale": "cached", "letters": "ran", "report": "ran"}
    # --only with an uncached upstream fails before work, naming it
    from pipelines.graph import GraphError

    pipeline = toy_pipeline()
    loaded = load_config(pipeline.stages, overrides=[f"run_root={tmp_path / 'other'}"])
    with pytest.raises(GraphError, match="needs the output of '(letters|scale)'"):
        Engine(pipeline, loaded).plan(only=["report"])


def test_failure_keeps_upstream_and_rerun_completes(ray_session, tmp_path):
    trigger = tmp_path / "fail-now"
    trigger.write_text("1")
    # the stage fails while the trigger file exists (same config, so the rerun has the same key)
    import tests.integration.engine.toy_stages as ts

    orig = ts.Scale.run

    def flaky(self, ctx):
        if trigger.exists():
            raise RuntimeError("disk on fire")
        return orig(self, ctx)

    ts.Scale.run = flaky
    try:
        with pytest.raises(StageFailed, match="disk on fire") as ei:
            run(tmp_path, name="broken")
        assert "report" in ei.value.blocked
        client, runs = mlflow_runs(tmp_path)
        failed = [r for r in runs if r.data.tags.get("stage") == "scale"]
        assert failed and failed[0].info.status == "FAILED" and failed[0].data.tags["status"] == "failed"
        assert "disk on fire" in failed[0].data.tags["error"]
        parent = [r for r in runs if r.info.run_name == "broken"][0]
        assert parent.info.status == "FAILED"
        assert not [r for r in runs if r.data.tags.get("stage") == "report"]  # never started
        trigger.unlink()
        engine, s = run(tmp_path, name="fixed")
    finally:
        ts.Scale.run = orig
    # upstream outputs from the failed run were kept and reused; the independent branch too
    assert s.statuses == {"numbers": "cached", "letters": "cached", "scale": "ran", "report": "ran"}


KILL_SCRIPT = """
import sys
from pipelines.commands import execute
from pipelines.config import load_config
from tests.integration.engine.toy_stages import toy_pipeline
p = toy_pipeline()
loaded = load_config(p.stages, overrides=sys.argv[1:])
execute(p, loaded)
"""


def test_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    hold = tmp_path / "hold"
    args = [f"run_root={tmp_path}", f"stages.scale.hold_file={hold}", "ray.num_cpus=2", "ray.object_store_memory_mb=200"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while not Path(str(hold) + ".started").exists():
            assert proc.poll() is None, "pipeline exited before the stage started"
            assert time.time() < deadline, "stage never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, Ray included
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # every dir with a manifest lists exactly what it holds; the interrupted stage has none
    manifests = list(tmp_path.glob("*/*/" + cache.MANIFEST))
    assert {m.parent.parent.name for m in manifests} <= {"numbers", "letters"}
    for m in manifests:
        assert cache.verify(m.parent) == []
    assert list(tmp_path.glob("scale/*.tmp/scaled/partial.txt"))  # the half-written attempt
    assert not list(tmp_path.glob("scale/*/" + cache.MANIFEST))
    # a rerun completes and the half-written attempt is gone
    hold.write_text("go")
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list(tmp_path.glob("*/*/" + cache.MANIFEST))) == 4
    assert not list(tmp_path.glob("scale/*.tmp"))
