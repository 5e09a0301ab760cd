"""Checks for `metamorph run --dry-run`: config, paths, storage, tracking and cluster resources.

    metamorph run --preset cluster --dry-run                 # against the cluster ray.address names
    metamorph run --preset cluster --dry-run --address 10.0.0.1:6379

Everything here is read-only: nothing is written under run_root, no stage runs. Each check
returns a list of problems (strings that name the config key and the fix); the dry run prints
them all at once rather than stopping at the first, so one pass fixes a whole preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

# Config fields that name something a stage reads: checked to exist before any work starts.
# Output locations are never config fields (stages write under ctx.output), so anything here is
# an input: a checkpoint dir, an annotation file, an image root.
PATH_FIELD_NAMES = ("path", "image_root", "video_root")
PATH_FIELD_SUFFIXES = ("_path",)
WORLD_PREFIX = "world:"  # curation sources inside the toy-world artifact: produced by the run

# Filesystem types every host of a cluster can share (from /proc/mounts). A run_root on anything
# else is local to one host, which breaks a cluster spanning several: checkpoints, shards and
# manifests must be visible to every node.
SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cephfs", "glusterfs", "wekafs",
             "cifs", "smb3", "9p", "virtiofs", "efs", "fuse")
LOCAL_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "vfat", "f2fs", "ramfs")


# ------------------------------------------------------------------ config walking
def walk_config(obj: Any, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted key, field name, value) for every leaf of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _walk_value(getattr(obj, f.name), f"{prefix}.{f.name}", f.name)


def _walk_value(value: Any, key: str, name: str) -> Iterator[tuple[str, str, Any]]:
    if dataclasses.is_dataclass(value):
        yield from walk_config(value, key)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _walk_value(v, f"{key}[{i}]", name)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _walk_value(v, f"{key}.{k}", name)
    else:
        yield key, name, value


def is_path_field(name: str) -> bool:
    return name in PATH_FIELD_NAMES or name.endswith(PATH_FIELD_SUFFIXES)


def _exists(value: str) -> tuple[bool | None, str]:
    """(exists?, detail): None when the location cannot be checked from here."""
    if "://" in value and not value.startswith("file://"):
        try:
            import pyarrow.fs as pafs

            fs, inner = pafs.FileSystem.from_uri(value)
            info = fs.get_file_info(inner)
            return info.type != pafs.FileType.NotFound, ""
        except Exception as e:  # noqa: BLE001 - no credentials, no network, unknown scheme
            return None, f"{type(e).__name__}: {e}"
    return Path(value.removeprefix("file://")).expanduser().exists(), ""


# ------------------------------------------------------------------ checks
def check_stage_configs(engine, plan) -> list[str]:
    """Every planned stage's own ``validate(cfg)`` (paths it reads, codecs, cross-field rules)."""
    problems = []
    for it in plan:
        if it.action != "run":
            continue
        try:
            engine.dag.stages[it.name].validate(engine.stage_cfgs[it.name])
        except (ValueError, OSError) as e:
            problems.append(f"stage {it.name!r}: {e}")
    return problems


def check_paths(engine, plan, already: list[str] = ()) -> tuple[list[str], list[str]]:
    """Input paths in stage configs (``*.path``, ``*_path``, ``image_root``, ``video_root``) exist.

    Returns (problems, warnings); a path a stage's own validate already reported is not repeated,
    and a remote URI that cannot be checked from the driver is a warning."""
    problems, warnings = [], []
    for it in plan:
        if it.action != "run":
            continue
        for key, name, value in walk_config(engine.stage_cfgs[it.name], f"stages.{it.name}"):
            if not (is_path_field(name) and isinstance(value, str) and value):
                continue
            if value.startswith(WORLD_PREFIX):
                continue
            if any(msg.startswith(f"stage {it.name!r}:") and value in msg for msg in already):
                continue  # this stage's own validate reported it
            ok, detail = _exists(value)
            if ok is None:
                warnings.append(f"{key}={value!r}: cannot check from the driver ({detail})")
            elif not ok:
                problems.append(f"{key}={value!r} does not exist (stage {it.name!r} reads it)")
    return problems, warnings


def check_cross_stage(engine) -> list[str]:
    """Values two stages must agree on that neither can check alone."""
    problems = []
    cfgs = engine.stage_cfgs
    tok, conn = cfgs.get("tokenize"), cfgs.get("train_connector")
    llm = getattr(getattr(conn, "model", None), "llm", None)
    max_length = getattr(tok, "max_length", None)
    if llm is not None and max_length and llm.path is None and llm.max_position < max_length:
        problems.append(
            f"stages.train_connector.model.llm.max_position={llm.max_position} < "
            f"stages.tokenize.max_length={max_length}: packed rows would run past the position range"
        )
    return problems


def _fs_type(path: Path) -> str:
    """Filesystem type of the mount holding ``path`` (longest mount-point prefix)."""
    best, fstype = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return fstype
    p = str(path)
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, parts[2]
    return fstype


def check_run_root(run_root: str, n_hosts: int) -> tuple[list[str], list[str]]:
    """run_root is creatable/writable and, on a cluster of several hosts, on shared storage."""
    problems, warnings = [], []
    if "://" in run_root:
        warnings.append(f"run_root={run_root!r}: stages write with local file APIs; mount the bucket (e.g. a FUSE "
                        "mount) and give its path")
        return problems, warnings
    root = Path(run_root).expanduser().absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        problems.append(f"run_root={run_root!r}: {existing} is not writable by this user (the pipeline creates "
                        f"{root} and everything under it)")
    if n_hosts > 1:
        fstype = _fs_type(existing.resolve())
        base = fstype.split(".")[0]
        if base in LOCAL_FS:
            problems.append(f"run_root={run_root!r} is on a local {fstype} filesystem but the cluster spans {n_hosts} "
                            "hosts: every node reads and writes under run_root; point it at shared storage")
        elif base not in SHARED_FS:
            warnings.append(f"run_root={run_root!r} is on a {fstype} filesystem: make sure every host sees it")
    return problems, warnings


def check_tracking(uri: str | None, n_hosts: int) -> tuple[list[str], list[str]]:
    """An MLflow server answers; a file/sqlite store is only safe when every writer shares a host."""
    problems, warnings = [], []
    if uri and uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status != 200:
                    problems.append(f"tracking.uri={uri!r}: /health answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            problems.append(f"tracking.uri={uri!r} is not reachable from the driver ({e}); start the MLflow server "
                            "or fix the URI")
    elif n_hosts > 1:
        warnings.append(f"tracking.uri={uri or 'sqlite in run_root'!r}: training workers on other hosts log to it; "
                        "an MLflow server (http://...) is the safe choice on a multi-host cluster")
    return problems, warnings


def worker_bundles(cfg: Any) -> list[tuple[int, dict[str, float]]]:
    """(count, per-worker resources) of every Ray Train worker group a stage config describes:
    any nested config with ``num_workers`` and ``cpus_per_worker`` (metamorph.train TrainConfig
    and configs shaped like it)."""
    out = []
    todo = [cfg]
    while todo:
        c = todo.pop()
        if not dataclasses.is_dataclass(c):
            continue
        if hasattr(c, "num_workers") and hasattr(c, "cpus_per_worker"):
            b = {"CPU": float(c.cpus_per_worker)}
            if getattr(c, "use_gpu", False):
                b["GPU"] = float(getattr(c, "gpus_per_worker", 1.0))
            out.append((int(c.num_workers), b))
        todo.extend(getattr(c, f.name) for f in dataclasses.fields(c))
    return out


def _fits_per_node(count: int, bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many of ``count`` bundles the nodes hold (each bundle must sit on one node)."""
    placed = 0
    for node in nodes:
        per = min((math.floor(node.get(r, 0.0) / a + 1e-9) if a > 0 else count) for r, a in bundle.items())
        placed += per
    return min(placed, count)


def check_resources(engine, plan, totals: dict[str, float] | None = None,
                    nodes: list[dict[str, float]] | None = None) -> list[str]:
    """Problems (empty if none): a stage asking for more of a resource than the cluster has, or a
    worker group whose per-worker bundle does not fit the cluster's nodes."""
    if totals is None or nodes is None:
        import ray

        totals = ray.cluster_resources()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    problems = []
    for it in plan:
        if it.action != "run":
            continue
        stage = engine.dag.stages[it.name]
        cfg = engine.stage_cfgs[it.name]
        short = False
        for res, amount in stage.resources(cfg).items():
            have = totals.get(res, 0.0)
            if amount > have + 1e-9:
                short = True
                problems.append(f"stage {it.name!r} needs {amount:g} {res}, the cluster has {have:g}")
        for count, bundle in ([] if short else worker_bundles(cfg)):  # a total shortfall says enough
            placed = _fits_per_node(count, bundle, nodes)
            if placed < count:
                problems.append(
                    f"stage {it.name!r}: {count} workers of {bundle} do not fit the cluster's nodes "
                    f"(only {placed} can be placed; each worker sits on one node)"
                )
    return problems


# ------------------------------------------------------------------ the dry run
@dataclasses.dataclass
class DryRun:
    problems: list[str]
    warnings: list[str]
    rows: list[tuple[str, str, str]]  # (stage, action, resources) for the printed plan
    cluster: str


def _hosts(nodes: list[dict]) -> int:
    return len({n.get("NodeManagerAddress") for n in nodes if n.get("Alive")}) or 1


def dry_run(engine, plan, loaded, connect) -> DryRun:
    """All checks; ``connect()`` joins the cluster (it may raise) and returns a description."""
    problems = check_stage_configs(engine, plan)
    path_problems, warnings = check_paths(engine, plan, problems)
    problems += path_problems + check_cross_stage(engine)
    rows = []
    for it in plan:
        need = engine.dag.stages[it.name].resources(engine.stage_cfgs[it.name]) if it.action == "run" else {}
        shown = ", ".join(f"{v:g} {k}" for k, v in sorted(need.items()))
        rows.append((it.name, it.action, shown or ("in the driver" if it.action == "run" else "-")))
    try:
        where = connect()
    except Exception as e:  # noqa: BLE001 - a cluster that cannot be reached is one more problem
        problems.append(f"cannot connect to Ray ({type(e).__name__}: {e}); check ray.address / --address")
        return DryRun(problems, warnings, rows, "not connected")
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    totals = ray.cluster_resources()
    n_hosts = _hosts(nodes)
    problems += check_resources(engine, plan, totals, [n["Resources"] for n in nodes])
    p, w = check_run_root(loaded.typed.run_root, n_hosts)
    problems += p
    warnings += w
    p, w = check_tracking(loaded.typed.tracking.uri, n_hosts)
    problems += p
    warnings += w
    shown = ", ".join(f"{totals.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k in totals or k == "CPU")
    cluster = f"{where}: {len(nodes)} node(s) on {n_hosts} host(s), {shown}"
    return DryRun(problems, warnings, rows, cluster)
