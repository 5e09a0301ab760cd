"""Remembered resolutions (pipelines/memo.py): what invalidates them, and a repeated plan / fully
cached run answered from one, on a run root of hand-made manifests (no Ray, no config).

    pytest -q tests/unit/test_memo.py
"""

from __future__ import annotations

import io
import json
import os
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from pipelines import memo
from pipelines.planning import RUN, decide

ARGV = ["plan", "--preset", "smoke"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    d = tmp_path / "store"
    monkeypatch.setenv("METAMORPH_CLI_CACHE_DIR", str(d))
    monkeypatch.delenv(memo.ENV_SWITCH, raising=False)
    return d


def _bump(path: Path, text: str) -> None:
    """Rewrite ``path`` so that its mtime surely moves (coarse file-system clocks)."""
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_recall_returns_what_was_remembered_until_a_dependency_changes(store, tmp_path):
    conf = tmp_path / "preset.yaml"
    conf.write_text("a: 1\n")
    memo.remember(ARGV, {"x": 1}, files=[conf])
    assert memo.recall(ARGV) == {"x": 1}
    assert memo.recall(["plan", "--preset", "tiny"]) is None  # another command line
    _bump(conf, "a: 2\n")
    assert memo.recall(ARGV) is None  # the config file changed: resolve again
    memo.remember(ARGV, {"x": 2}, files=[conf])
    conf.unlink()
    assert memo.recall(ARGV) is None  # ...or disappeared


def test_loaded_modules_are_dependencies(store):
    memo.remember(ARGV, {"x": 1})
    entry = json.loads(next(store.glob("*.json")).read_text())
    assert memo.__file__ in entry["files"]  # a code change (this module, a stage's) invalidates
    assert json.__file__ in entry["files"]  # as does a library upgrade


def test_environment_and_working_directory_are_part_of_the_identity(store, tmp_path, monkeypatch):
    memo.remember(ARGV, {"x": 1})
    monkeypatch.setenv("METAMORPH_TEST_SOMETHING", "1")
    assert memo.recall(ARGV) is None
    monkeypatch.delenv("METAMORPH_TEST_SOMETHING")
    assert memo.recall(ARGV) == {"x": 1}
    monkeypatch.chdir(tmp_path)  # relative paths (./runs) mean something else here
    assert memo.recall(ARGV) is None
    # values are hashed, never written: an environment may hold secrets
    monkeypatch.setenv("METAMORPH_TEST_SECRET", "hunter2-secret-value")
    memo.remember(ARGV, {"x": 1})
    assert not any("hunter2" in p.read_text() for p in store.glob("*.json"))


def test_switched_off_and_damaged_store(store, monkeypatch):
    monkeypatch.setenv(memo.ENV_SWITCH, "0")
    memo.remember(ARGV, {"x": 1})
    assert not store.exists() and memo.recall(ARGV) is None
    monkeypatch.delenv(memo.ENV_SWITCH)
    memo.remember(ARGV, {"x": 1})
    next(store.glob("*.json")).write_text("{not json")
    assert memo.recall(ARGV) is None


def test_store_is_pruned_to_the_newest_entries(store, monkeypatch):
    monkeypatch.setattr(memo, "MAX_ENTRIES", 3)
    base = time.time() - 100
    for i in range(5):
        memo.remember(["plan", f"x={i}"], {"i": i})
        (new,) = [p for p in store.glob("*.json") if p.stat().st_mtime > base + 50]
        os.utime(new, (base + i, base + i))  # distinct ages, in the order written
    assert len(list(store.glob("*.json"))) == 3
    assert memo.recall(["plan", "x=4"]) == {"i": 4} and memo.recall(["plan", "x=0"]) is None


def _manifest(run_root: Path, stage: str, key: str) -> None:
    out = run_root / stage / key
    out.mkdir(parents=True)
    (out / "data.txt").write_text("abc")
    (out / "_SUCCESS.json").write_text(json.dumps({
        "key": key, "files": [{"path": "data.txt", "bytes": 3}], "stats": {"n_rows": 3},
        "mlflow_parent_run_id": "run-that-computed-it"}))


def _stored(run_root: Path, command: str, **options) -> dict:
    facts = {"order": ["a", "b"], "upstream": {"a": [], "b": ["a"]}, "keys": {"a": "a" * 16, "b": "b" * 16},
             "resumable": []}
    return memo.payload(facts, run_root, {"a", "b"}, set(), False, command=command, **options)


def test_answer_reads_the_run_root_live(store, tmp_path, capsys):
    root = tmp_path / "runs"
    _manifest(root, "a", "a" * 16)
    argv_plan, argv_run = ["plan", "x"], ["run", "x"]
    memo.begin(argv_plan, dict(os.environ))
    memo.remember(argv_plan, _stored(root, "plan", as_json=True))
    memo.remember(argv_run, _stored(root, "run", verbosity=1, name="again", preset="p", capture=False))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert memo.answer(argv_plan) == 0
    plan = {p["stage"]: p["action"] for p in json.loads(buf.getvalue())}
    assert plan == {"a": "cached", "b": RUN}
    assert memo.answer(argv_run) is None  # b must run: Ray, MLflow, stage code -> the full path
    _manifest(root, "b", "b" * 16)
    assert memo.answer(argv_run) == 0  # everything cached now: answered here, no Ray
    err = capsys.readouterr().err
    assert "nothing to run, every stage cached" in err and "run-that-computed-it (2 stages)" in err
    assert (root / "logs" / "again").is_dir()
    (root / "b" / ("b" * 16) / "data.txt").write_text("abcd")  # damaged: the size no longer matches
    items = decide(**_stored(root, "plan")["facts"], run_root=root, selected={"a", "b"}, forced=set())
    assert items[1].action == RUN and "damaged" in items[1].reason
    assert memo.answer(argv_run) is None
