"""The live view, log routing and progress files, without Ray; and the light imports of the CLI.

    pytest -q tests/unit/test_console.py
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

from pipelines import logs
from pipelines.console import QUIET, VERBOSE, LiveView, headline
from pipelines.runner import StageEvent

ROOT = Path(__file__).resolve().parents[2]


def _ev(stage, kind, tmp: Path, **kw):
    return StageEvent(stage, kind, log_path=logs.log_path(tmp, stage), progress_path=logs.progress_path(tmp, stage), **kw)


def test_plain_view_prints_one_line_per_event_and_a_summary(tmp_path):
    out = io.StringIO()
    view = LiveView(["a", "b"], file=out, live=False, poll_s=0.05)
    with view:
        view(_ev("a", "waiting", tmp_path))
        view(_ev("a", "start", tmp_path, detail="k1 (no cached output)"))
        logs.write_progress(logs.progress_path(tmp_path, "a"), done=5, total=10, unit="steps", metric="loss=1.5")
        view._refresh()
        view._refresh()  # a second poll within PLAIN_PROGRESS_EVERY_S prints nothing new
        view(_ev("a", "done", tmp_path, seconds=2.0, stats={"final_loss": 0.25, "n_rows": 3}))
        view(_ev("b", "cached", tmp_path, stats={"eval/acc": 0.9}))
    view.summary("run123", Path("/runs"), tmp_path, ok=True)
    text = out.getvalue()
    assert "\x1b[" not in text
    assert sum("start a" in ln for ln in text.splitlines()) == 1
    assert sum("progress a" in ln for ln in text.splitlines()) == 1
    assert "5/10 steps (50%) loss=1.5" in text
    assert "final_loss=0.25" in text and "eval/acc=0.9" in text
    assert "run123" in text and "metamorph ui --run-root /runs" in text


def test_fully_cached_summary_names_the_runs_that_computed_the_outputs(tmp_path):
    out = io.StringIO()
    view = LiveView(["a", "b", "c"], file=out, live=False)
    with view:
        for s in ("a", "b", "c"):
            view(_ev(s, "cached", tmp_path))
    view.summary(None, Path("/runs"), tmp_path, ok=True, produced_by={"a": "run1", "b": "run1", "c": "run2"})
    text = out.getvalue()
    assert "nothing to run" in text and "no new MLflow run" in text
    assert "run1 (2 stages)" in text and "run2 (1 stage)" in text
    assert "mlflow run None" not in text and "metamorph ui --run-root /runs" in text


def test_quiet_view_prints_failures_and_the_summary_only(tmp_path):
    out = io.StringIO()
    view = LiveView(["a"], file=out, verbosity=QUIET, live=False)
    with view:
        view(_ev("a", "start", tmp_path))
        view(_ev("a", "failed", tmp_path, detail="RuntimeError: [disk] on fire", error=RuntimeError("x")))
    text = out.getvalue()
    assert "start" not in text
    assert "stage a failed" in text and "[disk] on fire" in text and str(logs.log_path(tmp_path, "a")) in text


def test_verbose_view_tails_the_log_files(tmp_path):
    out = io.StringIO()
    view = LiveView(["a"], file=out, verbosity=VERBOSE, live=False)
    view.log_dir = tmp_path
    logs.log_path(tmp_path, "a").write_text("first line\npartial")
    view._refresh()
    assert "a| first line" in out.getvalue() and "partial" not in out.getvalue()


def test_headline_prefers_eval_then_final_losses():
    assert headline({"first_loss": 3.0, "final_loss": 1.0, "eval/qa": 0.5, "n_rows": 4}, 2) == "eval/qa=0.5  final_loss=1"
    assert headline({"eval/fd_encoder": 1.3, "eval/qa_acc": 0.6, "eval/retrieval_top1": 0.9}, 2) == \
        "eval/qa_acc=0.6  eval/retrieval_top1=0.9"
    # a curation stage: what it kept and set aside, not its timings
    assert headline({"seconds": 4.2, "images_per_s": 45.0, "samples_out": 120, "quarantined": 0}) == \
        "samples_out=120  quarantined=0"
    # the judge: its own test's weakest attribute and whether its verdicts count, not its timings
    assert headline({"judge_acc_shape": 0.958, "judge_acc_min": 0.958, "judge_ok": 1.0, "judge_seconds": 25.0}) == \
        "judge_acc_min=0.958  judge_ok=1"


def test_router_files_records_by_stage_thread(tmp_path):
    with logs.RunLogs(tmp_path):
        lg = logging.getLogger("stages.test_router")
        t = threading.Thread(target=lambda: lg.info("from a"), name="stage-a")
        t.start()
        t.join()
        lg.info("from nowhere")  # main thread, no stage running: driver.log
        logs_router = logging.getLogger().handlers
        router = next(h for h in logs_router if isinstance(h, logs.StageRouter))
        router.stage_started("b")
        lg.info("while only b runs")  # e.g. Ray Data's executor thread
        router.stage_ended("b")
    assert "from a" in (tmp_path / "a.log").read_text()
    assert "from nowhere" in (tmp_path / "driver.log").read_text()
    assert "while only b runs" in (tmp_path / "b.log").read_text()


def test_progress_file_round_trip_and_missing(tmp_path):
    p = tmp_path / "x.progress.json"
    assert logs.read_progress(p) is None
    logs.write_progress(p, done=3, total=9, unit="steps")
    got = logs.read_progress(p)
    assert got["done"] == 3 and got["total"] == 9 and "time" in got
    logs.write_progress(None, done=1)  # no path: a no-op
    assert [f.name for f in tmp_path.iterdir()] == ["x.progress.json"]  # no temp files left


def test_capture_output_sends_fds_and_logging_to_the_file(tmp_path):
    path = tmp_path / "w.log"
    code = (
        "import logging, os, sys\n"
        "from pipelines.logs import capture_output\n"
        f"with capture_output({str(path)!r}):\n"
        "    print('to stdout', flush=True)\n"
        "    os.write(2, b'raw fd 2\\n')\n"
        "    logging.getLogger('x').info('a record')\n"
        "print('after')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    text = path.read_text()
    assert "to stdout" in text and "raw fd 2" in text and "a record" in text
    assert r.stdout.strip() == "after"


def test_cli_stage_modules_and_planning_import_no_heavy_library(tmp_path):
    # the `metamorph plan` path (config, stage modules, cache keys, plan) in a fresh interpreter:
    # none of the libraries that only running a stage needs
    code = (
        "import sys\n"
        "import pipelines.commands\n"
        "from pipelines.config import load_config\n"
        "from pipelines.definitions import get_pipeline\n"
        "from pipelines.runner import Engine\n"
        "p = get_pipeline('vpit')\n"
        f"Engine(p, load_config(p.stages, preset='smoke', overrides=['run_root={tmp_path}'])).plan()\n"
        "print([m for m in HEAVY if m in sys.modules])\n"
    ).replace("HEAVY", repr(("torch", "transformers", "diffusers", "ray", "mlflow", "numpy", "pyarrow", "pandas", "PIL", "av")))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(r.stdout.strip().replace("'", '"')) == []


def test_quieted_library_file_handler_is_closed_and_its_records_reach_root(tmp_path):
    """Ray Data attaches its own ray-data.log FileHandler on import; routing its logger to ours
    must close that file (no leaked descriptor) and still deliver the records through root."""
    lg = logging.getLogger("ray.data")
    saved = (list(lg.handlers), lg.propagate)
    fh = logging.FileHandler(tmp_path / "ray-data.log")
    lg.addHandler(fh)
    lg.propagate = False
    seen: list[str] = []
    catch = logging.Handler()
    catch.emit = lambda rec: seen.append(rec.getMessage())  # type: ignore[method-assign]
    root = logging.getLogger()
    root.addHandler(catch)
    try:
        logs.quiet_library_loggers()
        assert fh not in lg.handlers and fh.stream is None  # closed, not just detached
        lg.warning("from ray data")
        assert seen == ["from ray data"]
    finally:
        root.removeHandler(catch)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        for h in saved[0]:
            lg.addHandler(h)
        lg.propagate = saved[1]
