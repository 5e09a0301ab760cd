"""Runs sharing a run root, damaged caches, forced replacement and a full disk, on the toy engine
pipeline (real Ray, real MLflow store, real files; seconds per run).

    python -m pytest tests/integration/test_cache_safety.py -q

The smoke-pipeline versions (two concurrent `metamorph run --preset smoke`, a truncated shard)
are in test_faults.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines import cache
from pipelines.lock import read_holder
from pipelines.tracking import default_uri

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pipelines.commands import execute
from pipelines.config import load_config
from tests.integration.engine.toy_stages import toy_pipeline
p = toy_pipeline()
args = sys.argv[1:]
force = [a[len("--force="):] for a in args if a.startswith("--force=")]
loaded = load_config(p.stages, overrides=[a for a in args if not a.startswith("--")])
execute(p, loaded, force=force, verify="--verify" in args)
"""


def _args(root: Path, *extra: str) -> list[str]:
    return [f"run_root={root}", "experiment=toy", "ray.num_cpus=1", "ray.object_store_memory_mb=100", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}


def _start(root: Path, log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *_args(root, *extra)], cwd=REPO, env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _run(root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, *_args(root, *extra)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=240)


def run_here(root: Path, *overrides: str, force=(), verify: bool = False):
    """One invocation in this process on the session's Ray: (summary, [(stage, event, detail)])."""
    from pipelines.config import load_config
    from pipelines.runner import Engine
    from pipelines.tracking import Tracker
    from tests.integration.engine.toy_stages import toy_pipeline

    pipeline = toy_pipeline()
    loaded = load_config(pipeline.stages, overrides=[f"run_root={root}", "experiment=toy", *overrides])
    engine = Engine(pipeline, loaded)
    plan = engine.plan(force=force, verify=verify)
    t = loaded.typed.tracking
    tracker = Tracker(t.uri or default_uri(root), "toy", t.artifact_root or (root / "mlartifacts").as_uri())
    events: list[tuple[str, str, str]] = [(it.name, "plan", it.reason) for it in plan]
    summary = engine.run(plan, tracker=tracker, on_event=lambda ev: events.append((ev.stage, ev.kind, ev.detail)))
    return summary, events


def _wait(cond, timeout: float, what: str, procs=()):
    deadline = time.time() + timeout
    while not cond():
        for p in procs:
            assert p.poll() is None, f"a run exited ({p.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def ran_per_key(root: Path) -> dict[tuple[str, str], int]:
    """(stage, cache key) -> how many child runs computed it (status `ran`) in the MLflow store."""
    client = MlflowClient(default_uri(root))
    exps = [e.experiment_id for e in client.search_experiments()]
    out: dict[tuple[str, str], int] = {}
    for r in client.search_runs(exps, filter_string="tags.status = 'ran'", max_results=1000):
        k = (r.data.tags["stage"], r.data.tags["cache_key"])
        out[k] = out.get(k, 0) + 1
    return out


def data_digests(root: Path) -> dict[str, str]:
    """stage -> {file: sha256} of every promoted output, from the manifests (timestamps excluded)."""
    out = {}
    for m in sorted(root.glob(f"*/*/{cache.MANIFEST}")):
        if cache.KEY_RE.match(m.parent.name):
            man = cache.read_manifest(m.parent)
            out[f"{m.parent.parent.name}/{m.parent.name}"] = {f["path"]: f["sha256"] for f in man["files"]}
    return out


def test_two_runs_on_one_root_share_a_key_instead_of_racing(ray_session, tmp_path):
    root, hold = tmp_path / "root", tmp_path / "hold"
    a = _start(root, tmp_path / "a.log", f"stages.scale.hold_file={hold}")
    b = None
    try:
        _wait(lambda: Path(str(hold) + ".started").exists(), 180, "run A to compute scale", [a])
        lock = next((root / "scale").glob("*.lock"))
        assert read_holder(lock)["pid"] == a.pid
        b = _start(root, tmp_path / "b.log", f"stages.scale.hold_file={hold}")
        _wait(lambda: "waiting" in (tmp_path / "b.log").read_text(), 180, "run B to wait for scale's lock", [a, b])
        # B waits on A's key; it has not touched A's attempt dir
        assert (next((root / "scale").glob("*.tmp")) / "scaled" / "partial.txt").exists()
        hold.write_text("go")
        assert a.wait(180) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert b.wait(180) == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    blog = (tmp_path / "b.log").read_text()
    assert "is being computed by" in blog and "computed by another run" in blog, blog[-3000:]
    counts = ran_per_key(root)
    assert sorted(s for s, _ in counts) == ["letters", "numbers", "report", "scale"]
    assert set(counts.values()) == {1}, f"a key was computed twice: {counts}"
    assert not list(root.glob("*/*.lock")) and not list(root.glob("*/*.tmp"))
    # the same outputs (same keys, same bytes) as one run alone
    alone = tmp_path / "alone"
    run_here(alone, f"stages.scale.hold_file={hold}")  # the hold file exists: no wait
    assert data_digests(alone) == data_digests(root)


def test_damaged_output_is_reported_moved_aside_and_recomputed(ray_session, tmp_path):
    root = tmp_path / "root"
    run_here(root)
    before = data_digests(root)
    scale_dir = next(d for d in (root / "scale").iterdir() if cache.KEY_RE.match(d.name))
    shard = scale_dir / "scaled" / "scaled.parquet"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 7)  # a copy that stopped short
    # `metamorph verify` names the file, expected and found
    v = subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "--run-root", str(root), "--report-only"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"{shard}: expected {size} bytes, found {size - 7}" in v.stdout, v.stdout
    assert "1 damaged" in v.stdout
    # the next run recomputes that stage only, and says why
    summary, events = run_here(root)
    assert ("scale", "plan", f"cached output damaged: {shard}: expected {size} bytes, found {size - 7}") in events
    assert any(e[:2] == ("scale", "damaged") and "moved to" in e[2] for e in events), events
    assert summary.statuses == {"numbers": "cached", "letters": "cached", "scale": "ran", "report": "cached"}
    assert len(list((root / "scale").glob("*.damaged-*"))) == 1  # kept for inspection, never served
    assert data_digests(root) == before

    # same size, other bytes: only a sha256 check sees it (--verify / metamorph verify)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    summary, _ = run_here(root)
    assert summary.statuses["scale"] == "cached"  # sizes match: a plain run trusts it
    summary, events = run_here(root, verify=True)
    assert any(e[:2] == ("scale", "plan") and "expected sha256" in e[2] for e in events), events
    assert summary.statuses["scale"] == "ran"
    assert data_digests(root) == before
    v = subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "scale", "--run-root", str(root)],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "0 damaged" in v.stdout, v.stdout


def test_forced_rerun_replaces_atomically_and_crash_leftovers_are_cleaned(ray_session, tmp_path):
    root = tmp_path / "root"
    run_here(root)
    final = next(d for d in (root / "scale").iterdir() if cache.KEY_RE.match(d.name))
    key = final.name
    first = cache.read_manifest(final)["mlflow_run_id"]
    summary, _ = run_here(root, force=["scale"])
    assert summary.statuses["scale"] == "ran"
    assert cache.read_manifest(final)["mlflow_run_id"] != first
    assert sorted(p.name for p in (root / "scale").iterdir()) == [key]

    # a crash between "old renamed aside" and "new renamed in" (the fallback where the file system
    # cannot exchange two dirs): no {key}, the finished new attempt in .tmp, the old one in .old-*
    old = final.with_name(f"{key}.old-123-456")
    shutil.copytree(final, final.with_name(f"{key}.tmp"))
    final.rename(old)
    summary, _ = run_here(root)
    assert summary.statuses["scale"] == "cached"  # the finished attempt was promoted, not redone
    assert sorted(p.name for p in (root / "scale").iterdir()) == [key]
    assert cache.verify(final, hashes=True) == []
    # leftovers of an old output next to a good one are removed by the next run, even a cached one
    shutil.copytree(final, old)
    summary, _ = run_here(root)
    assert summary.statuses["scale"] == "cached"
    assert sorted(p.name for p in (root / "scale").iterdir()) == [key]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_names_path_and_bytes_then_a_run_with_space_succeeds(ray_session, tmp_path):
    """The run root on a 256 KiB tmpfs (the MLflow store elsewhere); `numbers` writes ~2 MB."""
    from pipelines.runner import StageFailed

    root = tmp_path / "small"
    if not _mount_tmpfs(root, "256k"):
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        store = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"tracking.artifact_root={(tmp_path / 'arts').as_uri()}", "stages.numbers.n=150000"]
        with pytest.raises(StageFailed) as ei:
            run_here(root, *store)
        err = str(ei.value.failures["numbers"])
        assert type(ei.value.failures["numbers"]).__name__ == "DiskFull"
        assert "No space left on device" in err and str(root / "numbers") in err, err
        written = int(err.split("had written ")[1].split()[0])
        needed = int(err.split("needs more than ")[1].split()[0])
        assert 0 < written <= needed, err
        assert not list(root.glob("numbers/*.tmp")), "the attempt dir was left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(root)], check=True)
        summary, _ = run_here(root, *store)
        assert summary.statuses["numbers"] == "ran"
        produced = sum(f.stat().st_size for f in root.glob("numbers/*/numbers/*"))
        assert produced > needed  # the figure in the message was a true lower bound
    finally:
        subprocess.run(["umount", "-l", str(root)], capture_output=True)
