"""A real multi-node Ray cluster on one machine, for the multi-node and fault tests.

    python -m tests.integration.local_cluster        # start head + one node, print addresses, stop

Each node is its own `ray start --block` process (a head, then nodes joined with
`ray start --address`), so every node has its own raylet, object store, dashboard agent and
runtime-env agent, exactly as on separate machines. Two raylets on one host (and the Ray
instances other tests on this machine start in parallel) would collide on Ray's default agent,
metrics and worker ports: every node gets its own free ports and its own short --temp-dir
(Unix socket paths must stay under ~107 characters, so not pytest's long tmp_path).

Stopping never runs `ray stop` (it stops every Ray on the machine, other people's too): each
node's `ray start --block` process is sent SIGTERM, which makes it stop exactly the processes it
started; stragglers are found by our temp dir in their command line and killed by pid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# Faster failure detection than Ray's defaults (health check every 3 s, 5 misses): a dead node is
# declared dead in ~2 s instead of ~15-30 s, which keeps the fault tests short.
FAST_FAILURE_ENV = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}
BASE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "TOKENIZERS_PARALLELISM": "false",
    # the job's driver imports `pipelines`/`stages` from this checkout whatever its cwd
    "PYTHONPATH": str(REPO),
}


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS says are free now (bound together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def worker_port_range(width: int = 200, taken: list[tuple[int, int]] | None = None) -> tuple[int, int]:
    """A free range for a node's worker processes, below the kernel's ephemeral range (32768+,
    where port-0 binds land) and above Ray's default worker range (10002-19999)."""
    taken = taken or []
    for _ in range(200):
        lo = random.randrange(20000, 32768 - width, 10)
        hi = lo + width - 1
        if any(not (hi < a or lo > b) for a, b in taken):
            continue
        if all(_port_free(p) for p in range(lo, hi + 1, 7)):
            return lo, hi
    raise RuntimeError("no free worker port range found")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    todo, out = [pid], []
    while todo:
        kids = _children(todo.pop())
        out.extend(kids)
        todo.extend(kids)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_mentioning(text: str) -> list[int]:
    me = os.getpid()
    return [int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
            if int(p.parent.name) != me and text in cmdline(int(p.parent.name))]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:  # a zombie is dead for our purposes
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class NodeStartError(RuntimeError):
    """A `ray start` exited while starting (e.g. a port taken in the meantime): retried."""


@dataclass
class Node:
    name: str
    temp_dir: Path
    proc: subprocess.Popen
    log: Path
    ports: dict[str, int] = field(default_factory=dict)

    def raylet_pid(self) -> int | None:
        for pid in descendants(self.proc.pid):
            if Path(cmdline(pid).split(" ")[0]).name == "raylet":
                return pid
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the `ray start --block` process (it stops its own raylet, GCS, agents)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # idempotent: LocalCluster.stop may have sent it
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # workers and agents that outlived their raylet: ours carry our temp dir on their command
        # line (--session-dir / --temp-dir / log paths); kill exactly those pids
        for pid in pids_mentioning(str(self.temp_dir)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class LocalCluster:
    """Head + nodes, each a `ray start --block` subprocess with its own ports and temp dir."""

    def __init__(self, cpus_per_node: float = 2, object_store_mb: int = 150):
        self.root = Path(tempfile.mkdtemp(prefix="mmrc-", dir="/tmp"))
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.nodes: list[Node] = []
        self.gcs_port = 0
        self.dashboard_port = 0
        self._worker_ranges: list[tuple[int, int]] = []
        self._joined = 0  # nodes started with --address so far (names node1, node2, ...)
        self.env = {**os.environ, **BASE_ENV, **FAST_FAILURE_ENV}
        self.env["PATH"] = f"{Path(sys.executable).parent}:{self.env.get('PATH', '')}"
        self.env.pop("RAY_ADDRESS", None)

    # ------------------------------------------------------------------ addresses
    @property
    def address(self) -> str:
        """GCS address for `ray start --address` / `metamorph run --address`."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        """Dashboard / job submission URL for `ray job submit --address`."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    # ------------------------------------------------------------------ start / stop
    def _node_args(self, name: str) -> tuple[list[str], dict[str, int], Path]:
        names = ["node_manager", "object_manager", "metrics_export", "agent_listen", "agent_grpc", "runtime_env_agent"]
        ports = dict(zip(names, free_ports(len(names))))
        lo, hi = worker_port_range(taken=self._worker_ranges)
        self._worker_ranges.append((lo, hi))
        ports.update(min_worker=lo, max_worker=hi)
        temp_dir = self.root / name
        temp_dir.mkdir()
        args = [
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--num-cpus={self.cpus_per_node:g}",
            "--num-gpus=0",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--dashboard-agent-listen-port={ports['agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            "--disable-usage-stats",
        ]
        return args, ports, temp_dir

    def _spawn(self, name: str, args: list[str], ports: dict[str, int], temp_dir: Path) -> Node:
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            [RAY, "start", *args], env=self.env, cwd=self.root, stdout=open(log, "w"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a test's SIGINT does not reach it
        )
        node = Node(name, temp_dir, proc, log, ports)
        self.nodes.append(node)
        return node

    def start_head(self, timeout: float = 120) -> Node:
        for attempt in range(3):  # a free port can be taken by someone else before Ray binds it
            args, ports, temp_dir = self._node_args(f"head{attempt or ''}")
            self.gcs_port, self.dashboard_port, client_port = free_ports(3)
            ports.update(gcs=self.gcs_port, dashboard=self.dashboard_port, client=client_port)
            args = [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={client_port}",
                *args,
            ]
            node = self._spawn(temp_dir.name, args, ports, temp_dir)
            try:
                self.wait_nodes(1, timeout, starting=node)
                return node
            except NodeStartError as e:
                self.nodes.remove(node)
                node.stop()
                err = e
        raise err

    def add_node(self, timeout: float = 120) -> Node:
        for _ in range(3):
            self._joined += 1
            args, ports, temp_dir = self._node_args(f"node{self._joined}")
            node = self._spawn(temp_dir.name, [f"--address={self.address}", *args], ports, temp_dir)
            try:
                self.wait_nodes(len(self.live_nodes()), timeout, starting=node)
                return node
            except NodeStartError as e:
                self.nodes.remove(node)
                node.stop()
                err = e
        raise err

    def stop(self) -> None:
        for node in reversed(self.nodes):  # all at once (each takes seconds to wind down)
            if node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)
        for node in reversed(self.nodes):  # then wait: workers first, the head (GCS) last
            try:
                node.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                print(f"stopping {node.name}: {e}", file=sys.stderr)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ REST (dashboard)
    def api(self, path: str, data: dict | None = None, timeout: float = 15) -> dict:
        req = urllib.request.Request(
            self.dashboard + path,
            data=json.dumps(data).encode() if data is not None else None,
            headers={"Content-Type": "application/json"},
            method="POST" if data is not None else "GET",
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
        return json.loads(body) if body.strip().startswith(("{", "[")) else {"text": body}

    def alive_nodes(self) -> list[dict]:
        nodes = self.api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_nodes(self, n: int, timeout: float, starting: Node | None = None) -> list[dict]:
        """Until the dashboard reports exactly n ALIVE nodes (start-up, or a death noticed)."""
        deadline = time.time() + timeout
        last: object = None
        while time.time() < deadline:
            if starting is not None and starting.proc.poll() is not None:
                raise NodeStartError(f"`ray start` for {starting.name} exited:\n{starting.log.read_text()[-3000:]}")
            if self.nodes and self.nodes[0].proc.poll() is not None:
                raise RuntimeError(f"the head exited:\n{self.nodes[0].log.read_text()[-3000:]}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) == n:
                    return nodes
                last = [(x["node_id"][:8], x["state"]) for x in nodes]
            except (urllib.error.URLError, OSError, KeyError, ValueError) as e:
                last = e
            time.sleep(1)
        logs = "\n".join(f"--- {nd.name}\n{nd.log.read_text()[-2000:]}" for nd in self.nodes)
        raise TimeoutError(f"waited {timeout:.0f}s for {n} alive nodes, last saw {last}\n{logs}")

    # ------------------------------------------------------------------ jobs
    def submit(self, entrypoint: list[str], submission_id: str, env: dict[str, str] | None = None,
               timeout: float = 120) -> str:
        """`ray job submit --no-wait`, retried until the head's job agent has registered
        ("No available agent to submit job" for a few seconds after start-up)."""
        runtime_env = {"env_vars": {**BASE_ENV, **(env or {})}}
        cmd = [RAY, "job", "submit", "--address", self.dashboard, "--submission-id", submission_id,
               "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entrypoint]
        deadline = time.time() + timeout
        while True:
            r = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                return submission_id
            if "already exists" in r.stdout + r.stderr:  # an earlier try got through after all
                return submission_id
            if time.time() > deadline:
                raise RuntimeError(f"ray job submit failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            time.sleep(3)

    def job_status(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}")["status"]

    def job_logs(self, submission_id: str) -> str:
        return self.api(f"/api/jobs/{submission_id}/logs").get("logs", "")

    def job_task_nodes(self, submission_id: str) -> dict[str, int]:
        """Node id -> number of the job's tasks and actors that ran there (Ray's state API)."""
        job_id = self.api(f"/api/jobs/{submission_id}").get("job_id")
        counts: dict[str, int] = {}
        if not job_id:
            return counts
        for kind in ("tasks", "actors"):
            q = f"/api/v0/{kind}?limit=10000&detail=false&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
            try:
                rows = self.api(q, timeout=60)["data"]["result"]["result"]
            except (urllib.error.URLError, OSError, KeyError, ValueError):
                continue
            for r in rows:
                if r.get("node_id"):
                    counts[r["node_id"]] = counts.get(r["node_id"], 0) + 1
        return counts

    def wait_job(self, submission_id: str, timeout: float) -> tuple[str, str]:
        """(final status, logs); TimeoutError with the log tail if it does not end in time."""
        deadline = time.time() + timeout
        status = "?"
        while time.time() < deadline:
            try:
                status = self.job_status(submission_id)
            except (urllib.error.URLError, OSError):
                status = "unreachable"
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status, self.job_logs(submission_id)
            time.sleep(2)
        try:
            logs = self.job_logs(submission_id)
        except (urllib.error.URLError, OSError) as e:
            logs = f"(logs unavailable: {e})"
        raise TimeoutError(f"job {submission_id} still {status} after {timeout:.0f}s\n{logs[-6000:]}")


    # ------------------------------------------------------------------ nodes and processes
    def live_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.proc.poll() is None]

    def ensure_nodes(self, n: int, timeout: float = 120) -> None:
        """Join nodes until n are up (a fault test may have killed one): what an autoscaler does."""
        while len(self.live_nodes()) < n:
            self.add_node(timeout)
        self.wait_nodes(n, timeout)

    def node_of(self, pid: int) -> Node | None:
        """The node whose raylet is an ancestor of ``pid`` (Ray workers are raylet children)."""
        raylets = {n.raylet_pid(): n for n in self.live_nodes()}
        while pid > 1:
            if pid in raylets:
                return raylets[pid]
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                return None
        return None


# One cluster per pytest session, shared by the multi-node and fault tests (each start costs
# ~30 s of a 2-core box). Fixtures in conftest would be the usual place; this module keeps the
# machinery beside the tests that use it.
_SHARED: LocalCluster | None = None


def shared_cluster(config, nodes: int = 2) -> LocalCluster:
    """The session's cluster with ``nodes`` live nodes; stopped when the pytest session ends."""
    global _SHARED
    if _SHARED is None:
        c = LocalCluster()
        try:
            c.start_head()
            c.ensure_nodes(nodes)
        except BaseException:
            c.stop()
            raise
        config.add_cleanup(c.stop)
        _SHARED = c
    _SHARED.ensure_nodes(nodes)
    return _SHARED


@dataclass
class SmokeRun:
    """The smoke pipeline submitted once with `ray job submit`, as captured when it ended (later
    tests add runs to the same run root: it is their cache)."""

    root: Path
    submission_id: str
    status: str
    logs: str
    seconds: float
    manifests: dict[str, dict]  # stage -> its _SUCCESS.json
    task_nodes: dict[str, int]  # node id -> tasks/actors of the job that ran there


SMOKE_RUN_NAME = "multinode-smoke"
_SMOKE: SmokeRun | None = None


def smoke_run(cluster: LocalCluster, root: Path, timeout: float = 900) -> SmokeRun:
    """Submit `metamorph run --preset smoke` to the cluster (once per session) and wait for it."""
    global _SMOKE
    if _SMOKE is not None:
        return _SMOKE
    from pipelines.cache import read_manifest
    from pipelines.definitions import get_pipeline

    t0 = time.time()
    sid = cluster.submit(
        [sys.executable, "-m", "pipelines.cli", "run", "--preset", "smoke", f"run_root={root}", "--name", SMOKE_RUN_NAME],
        f"smoke-{int(t0)}",
    )
    status, logs = cluster.wait_job(sid, timeout)
    seconds = time.time() - t0
    manifests = {}
    for stage in get_pipeline("vpit").stages:
        found = [m for d in sorted((root / stage.name).glob("*")) if d.is_dir() and (m := read_manifest(d))]
        if len(found) == 1:
            manifests[stage.name] = found[0]
    _SMOKE = SmokeRun(root, sid, status, logs, seconds, manifests, cluster.job_task_nodes(sid))
    return _SMOKE


def main() -> None:
    t0 = time.time()
    with LocalCluster() as c:
        c.start_head()
        print(f"head up in {time.time() - t0:.1f}s: gcs {c.address}, dashboard {c.dashboard}")
        c.add_node()
        print(f"2 nodes in {time.time() - t0:.1f}s; raylets {[n.raylet_pid() for n in c.nodes]}")
        sid = c.submit([sys.executable, "-c", "import ray; ray.init(); print(len(ray.nodes()), 'nodes')"], "hello")
        print(c.wait_job(sid, 120), f"{time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
