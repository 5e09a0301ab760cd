"""The `metamorph` command: help, config errors before work, the MLflow UI on 127.0.0.1.

    pytest -q tests/integration/test_cli.py
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def metamorph(*args, timeout=120, **kw):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, **kw
    )


def test_help_everywhere():
    r = metamorph("--help")
    assert r.returncode == 0
    for cmd in ("run", "plan", "stages", "ui"):
        assert cmd in r.stdout
        sub = metamorph(cmd, "--help")
        assert sub.returncode == 0, sub.stderr
    assert "--only" in metamorph("run", "--help").stdout


def test_bad_config_fails_before_work(tmp_path):
    root = tmp_path / "root"
    r = metamorph("run", "--preset", "smoke", f"run_root={root}", "stages.world.no_such_knob=1")
    assert r.returncode == 2
    assert "stages.world.no_such_knob" in r.stderr
    assert not root.exists()  # nothing started
    r = metamorph("run", "--preset", "smoke", f"run_root={root}", "--only", "no_such_stage")
    assert r.returncode == 2 and "no_such_stage" in r.stderr
    assert not root.exists()


def test_plan_lists_every_stage_with_keys(tmp_path):
    r = metamorph("plan", "--preset", "smoke", "--json", f"run_root={tmp_path}")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    names = [p["stage"] for p in plan]
    assert names[-1] == "evaluate" and "tokenize" in names and "train_decoder" in names
    assert all(p["action"] == "run" and len(p["key"]) == 16 for p in plan)
    # a config change moves the key of that stage and everything downstream, nothing upstream
    r2 = json.loads(metamorph("plan", "--preset", "smoke", "--json", f"run_root={tmp_path}", "stages.tokenize.max_length=300").stdout)
    changed = {a["stage"] for a, b in zip(plan, r2) if a["key"] != b["key"]}
    assert "tokenize" in changed and "evaluate" in changed and "world" not in changed and "mix" not in changed


def test_stages_lists_config_fields():
    r = metamorph("stages")
    assert r.returncode == 0, r.stderr
    assert "curate_generation" in r.stdout and "outputs=['curated_generation']" in r.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_run_roots_store_on_loopback(tmp_path):
    from pipelines.tracking import Tracker, default_artifact_root, default_uri

    t = Tracker(default_uri(tmp_path), "ui-test", default_artifact_root(tmp_path))
    h = t.start_run("hello", tags={"stage": "x"})
    t.end(h.run_id, "FINISHED")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "ui", "--run-root", str(tmp_path), "--port", str(port)],
        cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        body = None
        while time.time() < deadline:
            assert proc.poll() is None, "mlflow ui exited"
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                    data=json.dumps({"max_results": 10}).encode(),
                    headers={"Content-Type": "application/json"},
                )
                body = json.loads(urllib.request.urlopen(req, timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        assert body is not None, "UI never answered"
        assert "ui-test" in [e["name"] for e in body["experiments"]]
        # bound to loopback only
        out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout if shutil_which("ss") else ""
        for line in out.splitlines():
            if f":{port} " in line:
                assert "127.0.0.1" in line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def shutil_which(name):
    import shutil

    return shutil.which(name)
