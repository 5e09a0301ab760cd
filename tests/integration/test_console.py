"""The console and the light CLI, end to end in subprocesses: one smoke run under a pseudo-terminal,
one stage rerun through a pipe, a fully cached run and a plan that import no torch and start no Ray.

    pytest -q tests/integration/test_console.py
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

# one whole smoke run (~3 min on 2 idle cores) + one training stage; generous for a loaded box
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
# Runs the CLI and, at exit, writes which heavy modules were imported, and whether the config was
# resolved (OmegaConf loaded) or the command was answered from its remembered resolution.
HOOK = """
import atexit, json, os, sys
def _report():
    heavy = [m for m in ("torch", "transformers", "diffusers", "ray", "mlflow", "numpy", "pyarrow", "PIL", "av") if m in sys.modules]
    with open(os.environ["MM_MODULES_OUT"], "w") as f:
        json.dump({"heavy": heavy, "resolved": "omegaconf" in sys.modules}, f)
atexit.register(_report)
from pipelines.cli import main
main()
"""
# Lines that only Ray, its workers or Ray Train print: none may reach the console.
NOISE = ("(raylet)", "(pid=", "TrainingReport", "PlacementGroupCleaner", "worker.py:", "Started a local Ray",
         "ray.data", "ray.train", "Traceback")
STAGES = ("world", "vision_encoder", "curate_understanding", "curate_generation", "curate_video",
          "curate_visual_thinking", "curate_image_edit", "mix", "tokenize", "train_connector", "train_vpit",
          "train_decoder", "train_judge", "evaluate")


def _env(tmp: Path, name: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MM_MODULES_OUT=str(tmp / f"{name}.modules.json"),
               COLUMNS="140", TERM="xterm-256color")
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(args: list[str], tmp: Path, name: str, timeout: int = 600) -> tuple[str, list[str], bool]:
    """Run the CLI off a terminal (stdout+stderr piped); return its output, heavy imports and
    whether it resolved the config (False: answered from memory)."""
    r = subprocess.run([sys.executable, "-c", HOOK, *args], cwd=ROOT, env=_env(tmp, name), capture_output=True,
                       text=True, timeout=timeout)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    report = json.loads((tmp / f"{name}.modules.json").read_text())
    return out, report["heavy"], report["resolved"]


def _cli_pty(args: list[str], tmp: Path, timeout: int = 900) -> str:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal; return what it drew."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", HOOK, *args], cwd=ROOT, env=_env(tmp, "pty"),
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # the test is being torn down: take the run (and its Ray) with it
            proc.terminate()
            proc.wait(timeout=60)
        os.close(master)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> tuple[Path, str]:
    """The one smoke run of this module, drawn on a pseudo-terminal."""
    root = tmp_path_factory.mktemp("console")
    out = _cli_pty(["run", "--preset", "smoke", "--run-root", str(root), "--name", "pty"], root)
    return root, out


def test_tty_run_draws_a_table_and_a_summary_and_no_ray_output(smoke_root):
    root, out = smoke_root
    assert "\x1b[" in out  # drawn as a terminal (cursor movement / colour), not plain lines
    for noise in NOISE:
        assert noise not in out, noise
    summary = out[out.rindex("summary"):]
    for stage in STAGES:
        assert stage in summary, stage
    assert "metamorph ui --run-root" in summary
    logs = root / "logs" / "pty"
    for stage in STAGES:
        assert (logs / f"{stage}.log").exists(), stage
    # worker output (rank 0 and 1 of the Ray Train group) is in the stage's log, not the console
    vpit = (logs / "train_vpit.log").read_text()
    assert "step 1/" in vpit or "step 2/" in vpit
    assert "[pid " in vpit and "TrainingReport" in vpit
    assert "step 8/" not in out and "tokens_per_s=" not in out


def test_piped_rerun_prints_one_line_per_event(smoke_root, tmp_path):
    root, _ = smoke_root
    out, _, _ = _cli(["run", "--preset", "smoke", "--run-root", str(root), "--name", "piped",
                   "--only", "train_vpit", "--force", "train_vpit"], tmp_path, "piped")
    assert "\x1b[" not in out  # plain text off a terminal
    for noise in NOISE:
        assert noise not in out, noise
    lines = [ln.split("s ", 1)[-1] for ln in out.splitlines() if ln.strip()]
    steps = [ln for ln in lines if "steps" in ln]
    assert len(steps) == len(set(steps)), steps  # no duplicated step lines
    assert sum(1 for ln in out.splitlines() if "start train_vpit" in ln) == 1
    assert sum(1 for ln in out.splitlines() if "done train_vpit" in ln) == 1
    assert "train_vpit" in out[out.rindex("summary"):]
    log = (root / "logs" / "piped" / "train_vpit.log").read_text()
    assert "step 8/8" in log


def test_plan_and_cached_run_import_no_torch_and_start_no_ray(smoke_root, tmp_path):
    root, _ = smoke_root
    out, heavy, _ = _cli(["plan", "--preset", "smoke", "--run-root", str(root)], tmp_path, "plan")
    assert heavy == [], heavy
    assert "cached" in out
    for attempt in ("resolved", "remembered"):  # the second identical command answers from memory
        out, heavy, resolved = _cli(["run", "--preset", "smoke", "--run-root", str(root), "--name", "cached"],
                                    tmp_path, "cached")
        assert resolved == (attempt == "resolved")
        assert heavy == [], heavy  # neither torch nor ray (nor MLflow: nothing to record) was even imported
        table = out[out.rindex("summary"):].split("done in")[0]
        for stage in STAGES:
            row = next(ln for ln in table.splitlines() if f" {stage} " in ln)
            assert "cached" in row, row
        assert "started" not in out  # Ray never started
        assert "nothing to run, every stage cached" in out


def test_a_repeated_plan_is_answered_from_memory_until_something_changes(smoke_root, tmp_path):
    root, _ = smoke_root
    exp = tmp_path / "exp.yaml"
    exp.write_text("stages:\n  evaluate:\n    n_t2i: 8\n")  # smoke's own value: nothing changes
    args = ["plan", "--preset", "smoke", "--run-root", str(root), "--config", str(exp), "--json"]

    def plan() -> tuple[dict[str, tuple[str, str]], bool]:
        out, heavy, resolved = _cli(args, tmp_path, "memo")
        assert heavy == []
        return {p["stage"]: (p["key"], p["action"]) for p in json.loads(out[out.index("["):])}, resolved

    first, resolved = plan()
    assert resolved and all(action == "cached" for _, action in first.values())
    again, resolved = plan()
    assert not resolved and again == first  # same answer without loading the config
    ev_dir = root / "evaluate" / first["evaluate"][0]
    aside = ev_dir.with_name(ev_dir.name + ".aside")
    ev_dir.rename(aside)  # the run root is always read live
    try:
        live, resolved = plan()
        assert not resolved and live["evaluate"] == (first["evaluate"][0], "run")
    finally:
        aside.rename(ev_dir)
    st = exp.stat()
    exp.write_text("stages:\n  evaluate:\n    n_t2i: 6\n")  # a config file the command read changed
    os.utime(exp, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed, resolved = plan()
    assert resolved and changed["evaluate"][0] != first["evaluate"][0] and changed["evaluate"][1] == "run"
    assert changed["train_vpit"] == first["train_vpit"]
