"""The smoke pipeline on a real two-node Ray cluster on this machine, submitted with `ray job submit`,
and `metamorph run --preset cluster --dry-run`.

    python -m pytest tests/integration/test_multinode.py -q -m integration

The cluster is `ray start --head` plus a node joined with `ray start --address` (each with its own
ports and temp dir: tests/integration/local_cluster.py); it is shared with test_faults.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.local_cluster import BASE_ENV, REPO, SMOKE_RUN_NAME, shared_cluster, smoke_run

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def cluster(request):
    return shared_cluster(request.config, nodes=2)


@pytest.mark.timeout(1200)
def test_smoke_pipeline_via_job_submit_on_two_nodes(cluster, tmp_path_factory):
    from mlflow import MlflowClient

    from pipelines.definitions import get_pipeline
    from pipelines.tracking import default_uri

    assert len(cluster.alive_nodes()) == 2
    run = smoke_run(cluster, tmp_path_factory.mktemp("smoke") / "root")
    assert run.status == "SUCCEEDED", run.logs[-8000:]
    print(f"smoke pipeline on 2 nodes via ray job submit: {run.seconds:.0f}s; tasks per node {run.task_nodes}")

    stages = [s.name for s in get_pipeline("vpit").stages]
    assert sorted(run.manifests) == sorted(stages), f"stages without a manifest: {set(stages) - set(run.manifests)}"
    from pipelines.cache import verify

    for name, m in run.manifests.items():
        assert m["stage"] == name and m["files"], name
        # every file hashed at promotion (written by workers on both nodes), and still matching
        assert all(len(f.get("sha256", "")) == 64 for f in m["files"]), name
        assert verify(run.root / name / m["key"], hashes=True) == [], name
    assert not list(run.root.glob("*/*.lock")), "a stage lock outlived the run"
    # the work was spread: tasks and actors of the job ran on both nodes
    assert len(run.task_nodes) == 2, run.task_nodes

    client = MlflowClient(default_uri(run.root))
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, filter_string=f"attributes.run_name = '{SMOKE_RUN_NAME}'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["status"] == "finished"
    children = client.search_runs(exps, filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(stages)
    assert all(c.info.status == "FINISHED" and c.data.tags["status"] == "ran" for c in children)


def _dry_run(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **BASE_ENV, "COLUMNS": "1000"}  # rich wraps at 80 columns without a TTY
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", "cluster", "--dry-run", *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _local(root: Path, tmp: Path) -> list[str]:
    """A local Ray told it has many CPUs (nothing runs, so only the scheduler's count matters)
    instead of the cluster the preset names; checkpoints and datasets looked for under ``tmp``."""
    return [f"run_root={root}", f"shared.models={tmp / 'models'}", f"shared.data={tmp / 'data'}",
            "ray.address=null", "ray.num_cpus=512", "ray.object_store_memory_mb=100"]


# GPU asks of the cluster preset, turned off for a machine without GPUs
CPU_ONLY = [
    "stages.train_connector.scaling.use_gpu=false",
    "stages.train_vpit.scaling.use_gpu=false",
    "stages.train_decoder.scaling.use_gpu=false",
    "stages.train_decoder.encoder_gpus=0",
    "stages.evaluate.use_gpu=false",
]
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".pt")


def _input_paths(loaded, under: Path) -> list[tuple[str, str]]:
    """(dotted key, value) of every input path in the stage configs that lies under ``under``."""
    from pipelines.resources import is_path_field, walk_config

    return [
        (key, value)
        for name in loaded.plain["stages"]
        for key, field, value in walk_config(loaded.stage(name), f"stages.{name}")
        if is_path_field(field) and isinstance(value, str) and value.startswith(str(under))
    ]


def _make_dummies(loaded, under: Path) -> list[str]:
    """Create every input path the config names under ``under`` (empty files and dirs, laid out
    as the stages check them); return the dotted keys."""
    keys = []
    for key, value in _input_paths(loaded, under):
        p = Path(value)
        if p.suffix in FILE_SUFFIXES:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
        else:
            p.mkdir(parents=True, exist_ok=True)
        if key.endswith("decoder.pretrained_path"):  # a diffusers pipeline dir
            for sub in ("unet", "vae", "scheduler"):
                (p / sub).mkdir(exist_ok=True)
        keys.append(key)
    return keys


@pytest.mark.timeout(600)
def test_cluster_preset_dry_run(tmp_path):
    from pipelines.config import load_config
    from pipelines.definitions import get_pipeline

    stages = get_pipeline("vpit").stages
    shipped = load_config(stages, preset="cluster")
    assert shipped.typed.ray.address == "auto"
    assert shipped.stage("tokenize").max_length == 4096 and shipped.stage("vision_encoder").n_tokens == 64
    root = tmp_path / "runs"

    # 1) as shipped, on a machine without the checkpoints, datasets or GPUs: every problem at
    #    once, each naming its key
    r = _dry_run(*_local(root, tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    loaded = load_config(stages, preset="cluster", overrides=_local(root, tmp_path))
    for key, value in _input_paths(loaded, tmp_path):
        assert value in err, (key, value, err[-4000:])  # every missing input, not just the first
    for key in ("vision_encoder.path", "tokenize.tokenizer.path", "stages.train_connector.model.llm.path",
                "stages.curate_generation.sources[1].path"):
        assert key in err, (key, err[-4000:])
    assert re.search(r"stage 'train_vpit' needs \d+ GPU, the cluster has 0", err), err[-4000:]
    assert "nothing was run" in err
    assert not root.exists()

    # 2) every path in place (empty stand-ins), GPUs off: config, paths and resources pass
    made = _make_dummies(loaded, tmp_path)
    assert len(made) >= 10, made
    r = _dry_run(*_local(root, tmp_path), *CPU_ONLY)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "check out; nothing was run" in r.stderr
    needs = r.stderr.split("resources per stage")[1].split("training stages")[0].split("ray:")[0]
    assert "train_vpit" in needs and "GPU" not in needs
    assert not root.exists()  # a dry run writes nothing
