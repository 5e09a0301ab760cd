"""Fault tolerance on a real two-node Ray cluster on this machine; every test compares results
with an uninterrupted run of the same config, not just exit codes.

    python -m pytest tests/integration/test_faults.py -q -m integration

* The driver (`metamorph run`, its whole process group) is SIGKILLed while curation stages run:
  a rerun's shards are byte-identical to the uninterrupted run's.
* A Ray worker (a tokenize encoder actor) is SIGKILLed mid-stage: Ray Data retries its work and
  the Parquet rows are identical to the uninterrupted run's.
* A worker node dies (its raylet SIGKILLed) while `train_vpit` trains on it: Ray Train restarts
  the worker group on the surviving head node, the loop resumes from its last checkpoint, and
  the final weights equal an uninterrupted run's bit for bit.
* Two `metamorph run --preset smoke` start at once on one run root: both succeed, every key is
  computed once (MLflow child runs with status `ran`), and the outputs are the sequential run's;
  then a shard is truncated: `metamorph verify` reports it and the next run recomputes that stage.

All reuse the session's cluster and the uninterrupted smoke run of test_multinode.py (its
manifests, with a sha256 per file, are the reference; its run root is the cache the training
fault starts from).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.local_cluster import BASE_ENV, REPO, alive, shared_cluster, smoke_run

pytestmark = [pytest.mark.integration]

CURATIONS = ("curate_understanding", "curate_generation", "curate_video", "curate_visual_thinking", "curate_image_edit")


@pytest.fixture(scope="module")
def cluster(request):
    return shared_cluster(request.config, nodes=2)


@pytest.fixture(scope="module")
def baseline(cluster, tmp_path_factory):
    run = smoke_run(cluster, tmp_path_factory.mktemp("smoke") / "root")
    assert run.status == "SUCCEEDED", run.logs[-8000:]
    return run


def _env() -> dict[str, str]:
    env = {**os.environ, **BASE_ENV, "COLUMNS": "1000"}  # rich wraps at 80 columns without a TTY
    env.pop("RAY_ADDRESS", None)
    return env


def _driver(cluster, root: Path, log: Path, *args: str) -> subprocess.Popen:
    """`metamorph run --preset smoke` connected to the cluster, in its own process group."""
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", "smoke", "--address", cluster.address,
           f"run_root={root}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-6000:] if log else ''}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}:\n{log.read_text()[-6000:] if log else ''}")


def _manifest_dirs(root: Path, stage: str) -> list[Path]:
    return sorted(d for d in (root / stage).glob("*") if (d / "_SUCCESS.json").exists())


def _digests(manifest: dict) -> dict[str, str]:
    """file -> sha256 of a stage output (the manifest's own timestamps are not data)."""
    return {f["path"]: f["sha256"] for f in manifest["files"]}


def _curated(out_dir: Path, stage: str) -> tuple[dict, list[str], int]:
    """(stats, ids in the index, samples actually in the shards)."""
    from metamorph.data.shards import iter_samples, read_index

    manifest = json.loads((out_dir / "_SUCCESS.json").read_text())
    art = out_dir / stage.replace("curate_", "curated_")
    ids = read_index(art)["id"].to_pylist()
    in_shards = sum(1 for _ in iter_samples(art))
    return manifest["stats"], ids, in_shards


@pytest.mark.timeout(1200)  # includes the shared smoke run when this module goes first
def test_driver_killed_during_curation_rerun_matches_uninterrupted(cluster, baseline, tmp_path):
    root = tmp_path / "root"
    log = tmp_path / "killed.log"
    proc = _driver(cluster, root, log, "--until", "mix")
    try:
        # curation attempts write into {stage}/{key}.tmp; kill a moment after one is in flight
        _wait(lambda: list(root.glob("curate_*/*.tmp")), 300, "a curation stage to start", proc, log)
        time.sleep(1.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    interrupted = [s for s in CURATIONS if not _manifest_dirs(root, s)]
    assert interrupted, "every curation had finished before the kill: nothing was interrupted"
    print(f"driver killed with {interrupted} unfinished")

    rerun = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "run", "--preset", "smoke", "--address", cluster.address,
         f"run_root={root}", "--until", "mix"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-6000:]
    for stage in CURATIONS:
        dirs = _manifest_dirs(root, stage)
        assert len(dirs) == 1, (stage, dirs)
        assert not list((root / stage).glob("*.tmp")), f"{stage}: an attempt dir was left behind"
        ref = baseline.manifests[stage]
        assert dirs[0].name == ref["key"], f"{stage}: the rerun computed another cache key"
        stats, ids, in_shards = _curated(dirs[0], stage)
        ref_stats, ref_ids, _ = _curated(baseline.root / stage / ref["key"], stage)
        assert len(ids) == len(set(ids)), f"{stage}: duplicate ids in the index"
        assert in_shards == len(ids), f"{stage}: {in_shards} samples in the shards, {len(ids)} in the index"
        assert stats["samples_out"] + stats["quarantined"] == stats["records_in"], f"{stage}: samples lost"
        assert sorted(ids) == sorted(ref_ids), f"{stage}: other samples than the uninterrupted run"
        for k in ("records_in", "samples_out", "quarantined", "split/train", "split/heldout"):
            assert stats[k] == ref_stats[k], (stage, k, stats[k], ref_stats[k])
        # byte-identical shards, index and quarantine
        got = _digests(json.loads((dirs[0] / "_SUCCESS.json").read_text()))
        assert got == _digests(ref), f"{stage}: files differ from the uninterrupted run"
    assert _manifest_dirs(root, "mix")[0].name == baseline.manifests["mix"]["key"]


# Holds every CPU of the head node until a release file appears, so that the training worker
# group is placed on the second node (Ray packs placement groups wherever they fit).
_BLOCKER = r"""
import os, sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1], log_to_driver=False)
head = next(n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
@ray.remote
class Hold:
    def node(self):
        return ray.get_runtime_context().get_node_id()
h = Hold.options(num_cpus=head["Resources"]["CPU"],
                 scheduling_strategy=NodeAffinitySchedulingStrategy(head["NodeID"], soft=False)).remote()
print("holding", ray.get(h.node.remote()), flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.1)
"""


def _workers(ckpt: Path) -> dict[int, dict]:
    out = {}
    for f in (ckpt / "workers").glob("rank*.json"):
        try:
            info = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out[info["rank"]] = info
    return out


def _both_workers(ckpt: Path, not_pids: set[int] = frozenset()) -> dict[int, dict] | None:
    """Both ranks' records once both are written by a worker group whose pids are new."""
    w = _workers(ckpt)
    pids = {x["pid"] for x in w.values()}
    if len(w) == 2 and not pids & set(not_pids) and all(alive(p) for p in pids):
        return w
    return None


def _complete_checkpoints(ckpt: Path) -> list[Path]:
    return sorted(p for p in (ckpt / "loop").glob("step-*") if (p / "COMPLETE").exists())


# a new train_vpit key (seed), long enough to be killed between checkpoints
TRAIN_ARGS = (
    "stages.train_vpit.train.seed=1234",
    "stages.train_vpit.train.max_steps=60",
    "stages.train_vpit.train.checkpoint_every=5",
    "stages.train_vpit.train.log_every=5",
    "stages.train_vpit.scaling.num_workers=2",
    "stages.train_vpit.scaling.cpus_per_worker=0.5",
    "stages.train_vpit.scaling.max_failures=3",
)


def _weights(manifest: dict) -> dict[str, str]:
    return {p: h for p, h in _digests(manifest).items() if p.endswith(".safetensors")}


@pytest.mark.slow
@pytest.mark.timeout(1800)  # includes the shared smoke run when this module goes first
def test_worker_node_killed_during_train_vpit_resumes(cluster, baseline, tmp_path):
    root = baseline.root  # every stage upstream of train_vpit is cached there
    # the uninterrupted reference: same config, same world size (2 workers)
    ref_log = tmp_path / "reference.log"
    ref = _driver(cluster, root, ref_log, "--until", "train_vpit", *TRAIN_ARGS)
    assert ref.wait(900) == 0, ref_log.read_text()[-6000:]
    ref_dir = next(d for d in _manifest_dirs(root, "train_vpit") if d.name != baseline.manifests["train_vpit"]["key"])
    ref_manifest = json.loads((ref_dir / "_SUCCESS.json").read_text())
    assert _weights(ref_manifest)

    head, node = cluster.live_nodes()[:2]
    release = tmp_path / "release"
    blocker_log = tmp_path / "blocker.log"
    blocker = subprocess.Popen([sys.executable, "-c", _BLOCKER, cluster.address, str(release)], env=_env(),
                               stdout=open(blocker_log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    log = tmp_path / "train.log"
    proc = None
    try:
        _wait(lambda: "holding" in blocker_log.read_text(), 120, "the head's CPUs to be held", blocker, blocker_log)
        # the reference's key again, forced: the new output replaces it only once it is complete
        proc = _driver(cluster, root, log, "--until", "train_vpit", "--force", "train_vpit", *TRAIN_ARGS)
        ckpt = _wait(lambda: next(iter((root / "train_vpit").glob("*.ckpt")), None), 300, "train_vpit to start", proc, log)
        first = _wait(lambda: _both_workers(ckpt), 300, "both training workers", proc, log)
        placed = {r: cluster.node_of(w["pid"]) for r, w in first.items()}
        assert all(n is node for n in placed.values()), f"workers not on the second node: {placed}"
        release.write_text("go")  # the head's CPUs are free again for the restart
        blocker.wait(60)
        _wait(lambda: _complete_checkpoints(ckpt), 300, "a complete checkpoint", proc, log)
        raylet = node.raylet_pid()
        os.kill(raylet, signal.SIGKILL)
        t_kill = time.time()
        print(f"killed raylet {raylet} of {node.name} after {_complete_checkpoints(ckpt)[-1].name}")
        _wait(lambda: not any(alive(w["pid"]) for w in first.values()), 60, "the workers on the dead node to go")
        old_pids = {w["pid"] for w in first.values()}
        again = _wait(lambda: _both_workers(ckpt, old_pids), 300, "the restarted workers", proc, log)
        placed = {r: cluster.node_of(w["pid"]) for r, w in again.items()}
        assert all(n is head for n in placed.values()), f"restarted workers not on the head: {placed}"
        rc = proc.wait(600)
        assert rc == 0, log.read_text()[-8000:]
    finally:
        release.write_text("go")
        for p in (blocker, proc):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
    print(f"train_vpit finished {time.time() - t_kill:.0f}s after the node died")

    dirs = _manifest_dirs(root, "train_vpit")
    done = [d for d in dirs if d.name != baseline.manifests["train_vpit"]["key"]]
    assert len(done) == 1
    stats = json.loads((done[0] / "_SUCCESS.json").read_text())["stats"]
    assert stats["start_step"] > 0, f"the loop restarted from scratch, not from a checkpoint: {stats}"
    assert (done[0] / "vpit_model").is_dir()
    # bitwise: both runs are 2 gloo ranks (a 2-rank allreduce sums the same two numbers in either
    # order) and the resume restores step, data position, RNG, optimizer and scheduler exactly
    manifest = json.loads((done[0] / "_SUCCESS.json").read_text())
    assert manifest["mlflow_run_id"] != ref_manifest["mlflow_run_id"]
    assert _weights(manifest) == _weights(ref_manifest), "resumed weights differ from the uninterrupted run"
    assert not list((root / "train_vpit").glob("*.old-*"))
    assert len(cluster.alive_nodes()) == 1  # the cluster noticed; nothing was restarted behind our back


def _encoder_actors(cluster) -> list[int]:
    """pids of tokenize's encoder actors (Ray Data map workers) on the cluster's nodes."""
    from tests.integration.local_cluster import cmdline, descendants

    pids = []
    for node in cluster.live_nodes():
        for pid in descendants(node.proc.pid):
            if cmdline(pid).startswith("ray::MapWorker") and "EncodeImages" in cmdline(pid) and alive(pid):
                pids.append(pid)
    return pids


def _rows(tokenized: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(tokenized.glob("part-*.parquet")) for r in pq.read_table(f).to_pylist()]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_worker_killed_during_tokenize_rows_identical(cluster, baseline, tmp_path):
    root = baseline.root
    key = baseline.manifests["tokenize"]["key"]
    reference = _rows(root / "tokenize" / key / "tokenized")
    assert reference
    log = tmp_path / "tokenize.log"
    proc = _driver(cluster, root, log, "--until", "tokenize", "--force", "tokenize")
    killed = None
    try:
        _wait(lambda: (root / "tokenize" / f"{key}.tmp").exists() and _encoder_actors(cluster), 300,
              "tokenize's encoder actors", proc, log)
        time.sleep(1.0)  # let it take a batch
        killed = _encoder_actors(cluster)[0]
        os.kill(killed, signal.SIGKILL)
        assert (root / "tokenize" / f"{key}.tmp").exists(), "tokenize finished before the kill"
        assert proc.wait(600) == 0, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    print(f"killed encoder actor {killed} during tokenize")
    manifest = json.loads((root / "tokenize" / key / "_SUCCESS.json").read_text())
    assert manifest["mlflow_run_id"] != baseline.manifests["tokenize"]["mlflow_run_id"]  # it did rerun
    assert _rows(root / "tokenize" / key / "tokenized") == reference
    assert _digests(manifest) == _digests(baseline.manifests["tokenize"])  # and the bytes too


def _ran_per_key(root: Path) -> dict[tuple[str, str], int]:
    from tests.integration.test_cache_safety import ran_per_key

    return ran_per_key(root)


def _close(a, b, rtol: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rtol * max(1.0, abs(a), abs(b))
    return a == b


def _eval_close(rel: str, a: Path, b: Path) -> bool:
    """evaluate runs its CPU inference in the driver, whose torch intra-op thread count differs
    between a `ray job submit` entrypoint and a terminal driver; float32 sums then differ in the
    last bits (seen: 1e-7 relative on cosines, 1e-5 on Frechet distances, 3e-4 on the judge's
    probabilities, which are rounded to 4 places from decoded pixels). The weights it reads are
    compared bitwise (train_vpit, train_decoder); here numbers agree to 1e-3 and everything else
    (judged attributes, answers, ids) exactly."""
    from pipelines.cache import _strip_volatile

    if rel not in ("eval_report/metrics.json", "eval_report/samples.jsonl", "eval_report/gallery.jsonl"):
        return False
    ta, tb = (a / rel).read_text(), (b / rel).read_text()
    la, lb = ([ta], [tb]) if rel.endswith(".json") else (ta.splitlines(), tb.splitlines())
    return len(la) == len(lb) and all(
        _close(_strip_volatile(json.loads(x)), _strip_volatile(json.loads(y)), 1e-3) for x, y in zip(la, lb) if x.strip()
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_two_concurrent_smoke_runs_share_keys_and_a_truncated_shard_is_recomputed(cluster, baseline, tmp_path):
    from pipelines.cache import MANIFEST, compare_outputs, read_manifest

    root = tmp_path / "root"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [_driver(cluster, root, logs[0])]
    time.sleep(2.0)  # B plans while A holds the first keys
    procs.append(_driver(cluster, root, logs[1]))
    try:
        for p, log in zip(procs, logs):
            assert p.wait(1200) == 0, log.read_text()[-6000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
    text = logs[0].read_text() + logs[1].read_text()
    assert "is being computed by" in text, "the second run never waited for a key the first was computing"
    counts = _ran_per_key(root)
    assert set(counts.values()) == {1}, f"a key was computed twice: {counts}"
    assert {s for s, _ in counts} == set(baseline.manifests), counts
    for stage, ref in baseline.manifests.items():
        assert read_manifest(root / stage / ref["key"]) is not None, f"{stage}: no output with key {ref['key']}"
        # sha256 per file; JSON differing only in run-root paths / timings, and the timed HTML report, aside
        diffs = compare_outputs(root / stage / ref["key"], baseline.root / stage / ref["key"])
        if stage == "evaluate":
            diffs = [d for d in diffs if not _eval_close(d.split(":")[0], root / stage / ref["key"],
                                                           baseline.root / stage / ref["key"])]
        assert not diffs, f"{stage}: differs from the sequential run: {diffs}"
    assert not list(root.glob("*/*.lock")) and not list(root.glob("*/*.tmp"))

    # a copy that stopped short, after the manifest was written
    gen = root / "curate_generation" / baseline.manifests["curate_generation"]["key"]
    shard = sorted(gen.glob("curated_generation/shard-*.tar"))[0]
    size = shard.stat().st_size
    os.truncate(shard, size // 2)
    v = subprocess.run([sys.executable, "-m", "pipelines.cli", "verify", "--preset", "smoke", f"--run-root={root}",
                        "--report-only"], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert v.returncode == 1, v.stdout + v.stderr
    assert f"{shard}: expected {size} bytes, found {size // 2}" in v.stdout, v.stdout
    log = tmp_path / "again.log"
    p = _driver(cluster, root, log, "--until", "mix")
    assert p.wait(600) == 0, log.read_text()[-6000:]
    out = " ".join(log.read_text().split())
    assert "cached output damaged" in out and shard.name in out, out[-4000:]
    # the summary table's rows: "│ curate_generation │ ran │ ...", "│ mix │ cached │ ..."
    assert re.search(r"curate_generation\W+ran\b", out) and re.search(r"\bmix\W+cached\b", out), out[-3000:]
    assert _digests(read_manifest(gen)) == _digests(baseline.manifests["curate_generation"])
    assert len(list((root / "curate_generation").glob("*.damaged-*"))) == 1
    assert (gen / MANIFEST).exists()
