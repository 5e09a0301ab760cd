"""What the local Ray that `metamorph run` starts listens on (`ss -ltnp` over its process tree).

    python -m pytest tests/integration/test_loopback.py -q

A probe process starts Ray the way the CLI does (``pipelines.runner.init_ray``), runs a task and a
two-worker gloo ``TorchTrainer`` (a training stage's process group), and lists every TCP listener
of its process tree, before and while training. Ray's own servers (GCS, raylet, object manager,
core workers, dashboard / runtime-env agents, metrics exporters) must all be on loopback.

The training stages' process-group store (torch's TCPStore, on rank 0 at MASTER_PORT) is not
Ray's: torch's store server binds "::" or "0.0.0.0" whatever host it is given
(torch/csrc/distributed/c10d/TCPStoreLibUvBackend.cpp), so the launcher binds its socket to
loopback itself and hands it over (``stages._training.torch_config``, ``master_listen_fd``). The
probe builds its trainer with that config, as every training stage does, and the store must be
found, on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, subprocess, time
from pipelines.config import RayConfig
from pipelines.runner import init_ray

DRIVER = os.getpid()

def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += kids.get(p, [])
    return out

def listeners():
    pids, rows = tree(DRIVER), []
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines():
        for part in line.split("pid=")[1:]:
            pid = int(part.split(",")[0])
            if pid in pids:
                try:
                    name = open(f"/proc/{pid}/cmdline").read().split("\0")[0]
                except OSError:
                    name = "?"
                rows.append({"addr": line.split()[3], "pid": pid, "name": os.path.basename(name)})
    return rows

def snapshot(seconds):
    # servers come up over a few seconds (agents, metrics exporters): union of several looks
    seen, t0 = {}, time.time()
    while True:
        for r in listeners():
            seen[(r["addr"], r["pid"])] = r
        if time.time() - t0 > seconds:
            return list(seen.values())
        time.sleep(0.5)

init_ray(RayConfig(num_cpus=2, object_store_memory_mb=100))
import ray
ray.get(ray.remote(lambda: 1).remote())
print("IDLE", json.dumps(snapshot(4)))
import sys
print("LIBS", json.dumps(sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules)))

from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from stages._training import torch_config

def fn(cfg):
    import torch, torch.distributed as dist
    dist.all_reduce(torch.ones(2))
    if dist.get_rank() == 0:
        out = {"master_port": os.environ["MASTER_PORT"], "rank0_pid": os.getpid(), "rows": snapshot(2)}
        open(cfg["out"], "w").write(json.dumps(out))
    dist.barrier()

out = os.path.join(os.environ["PROBE_OUT"], "train.json")
TorchTrainer(fn, train_loop_config={"out": out}, scaling_config=ScalingConfig(num_workers=2),
             torch_config=torch_config("gloo")).fit()
print("TRAIN", open(out).read())
ray.shutdown()
"""


def _loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    return host.startswith("127.") or host in ("::1", "localhost") or host.startswith("::ffff:127.")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if subprocess.run(["which", "ss"], capture_output=True).returncode:
        pytest.skip("no `ss` on this machine")
    out = tmp_path_factory.mktemp("loopback")
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_ADDRESS": "", "PROBE_OUT": str(out)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # init_ray alone must do it
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=360)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {ln.split(" ", 1)[0]: json.loads(ln.split(" ", 1)[1]) for ln in r.stdout.splitlines()
             if ln.startswith(("IDLE ", "TRAIN ", "LIBS "))}
    return lines["IDLE"], lines["TRAIN"], lines["LIBS"]


def _is_torch_store(row: dict, train: dict) -> bool:
    return row["pid"] == train["rank0_pid"] and row["addr"].rsplit(":", 1)[1] == train["master_port"]


def test_ray_services_listen_on_loopback_only(probe):
    idle, train, _ = probe
    names = {r["name"] for r in idle}
    # the probe saw Ray's servers at all (else an empty list would pass)
    assert {"gcs_server", "raylet"} <= names, idle
    assert any(n.startswith("ray::") for n in names), idle
    exposed = sorted({f'{r["addr"]} {r["name"]}' for r in idle + train["rows"] if not _loopback(r["addr"])})
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)
    assert "dashboard" not in " ".join(names) and "mlflow" not in " ".join(names), idle  # no UI of ours


def test_torch_store_on_loopback(probe):
    _, train, _ = probe
    stores = [r for r in train["rows"] if _is_torch_store(r, train)]
    assert len(stores) == 1, train  # the process group's rendezvous store, exactly where expected
    assert _loopback(stores[0]["addr"]), stores


def test_init_ray_imports_the_stage_libraries_before_any_stage_thread(probe):
    # stage threads importing transformers at once race on its lazy top-level module
    # (pipelines.runner.import_stage_libraries); init_ray runs on the scheduler's thread
    assert probe[2] == ["diffusers", "torch", "transformers"]
