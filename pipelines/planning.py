"""What a run would do, decided from cache keys and the run root alone.

    metamorph plan --preset smoke

``decide`` turns the DAG's order, its edges, every stage's cache key and the selection into the
plan (run / cached / skip, with the reason); ``Engine.plan`` computes those inputs from the config
and the stage code, and the remembered resolution of a repeated command (``pipelines.memo``) hands
in the same inputs without either. ``record_cached`` and ``run_cached`` finish a run in which
every selected stage is cached: no Ray, no MLflow run, the summary names the runs that computed
the outputs. Nothing here imports more than the standard library and ``pipelines.cache``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipelines import cache

RUN, CACHED, SKIP = "run", "cached", "skip"


@dataclass
class PlanItem:
    name: str
    key: str
    action: str  # run | cached | skip
    reason: str
    out_dir: Path  # {run_root}/{stage}/{key}


@dataclass
class StageEvent:
    """One state change, handed to ``Engine.run``'s ``on_event`` in the main thread.

    kind: ``waiting`` (planned, upstream not done; or, after ``start``, another run holds the
    key's lock), ``start``, ``damaged`` (the cached output failed verification and is moved aside
    and recomputed), ``cached``, ``done``, ``failed``, ``blocked`` (an upstream stage failed), or
    ``ray`` (Ray was started; ``detail`` says where).
    """

    stage: str
    kind: str
    detail: str = ""
    seconds: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    log_path: Path | None = None  # the stage's log file (None without a log_dir)
    progress_path: Path | None = None


@dataclass
class RunSummary:
    parent_run_id: str | None
    statuses: dict[str, str] = field(default_factory=dict)  # stage -> ran | cached | failed | blocked
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    out_dirs: dict[str, Path] = field(default_factory=dict)
    log_dir: Path | None = None
    # cached stage -> the MLflow run that computed its output (from its manifest: the pipeline
    # run if recorded, else the stage's own run); a fully cached run opens none of its own
    produced_by: dict[str, str] = field(default_factory=dict)


class GraphError(ValueError):
    """The pipeline is not a valid DAG, or a selection cannot run; raised before any work starts."""


def decide(
    order: list[str],
    upstream: dict[str, list[str]],
    keys: dict[str, str],
    resumable: Iterable[str],
    run_root: Path,
    selected: Iterable[str],
    forced: Iterable[str],
    verify_hashes: bool = False,
) -> list[PlanItem]:
    """The plan, in ``order``. ``selected``/``forced``: stage names already checked against the DAG.

    Stages that rerun because of ``forced``, and everything selected downstream of them, replace
    valid outputs. Any other stage that runs (missing, damaged, resumable) produces the content
    its key names, so valid outputs downstream of it stay cached.
    """
    selected, forced, resumable = set(selected), set(forced), set(resumable)
    items: dict[str, PlanItem] = {}
    dirty: set[str] = set()
    for n in order:
        out, _, ckpt = cache.stage_dirs(run_root, n, keys[n])
        complete = cache.is_complete(out, keys[n])
        if n not in selected:
            items[n] = PlanItem(n, keys[n], SKIP, "not selected" + (" (cached)" if complete else ""), out)
            continue
        damage = cache.verify(out, hashes=verify_hashes) if complete and n not in forced else []
        if n in forced:
            action, reason = RUN, "forced"
        elif any(u in dirty for u in upstream[n]):
            action, reason = RUN, "upstream reruns"
        elif damage:  # recomputed under the key's lock (moved aside there)
            action = RUN
            reason = f"cached output damaged: {damage[0]}" + (f" (+{len(damage) - 1} more)" if len(damage) > 1 else "")
        elif complete:
            action, reason = CACHED, "manifest " + ("and sha256 verified" if verify_hashes else "and sizes match")
        else:
            resumed = n in resumable and ckpt.exists() and any(ckpt.iterdir())
            action, reason = RUN, "resume from checkpoint" if resumed else "no cached output"
        if reason in ("forced", "upstream reruns"):
            dirty.add(n)
        items[n] = PlanItem(n, keys[n], action, reason, out)
    for n, it in items.items():
        if it.action == SKIP:
            continue
        for u in upstream[n]:
            if items[u].action == SKIP and not cache.is_complete(items[u].out_dir, keys[u]):
                raise GraphError(
                    f"stage {n!r} needs the output of {u!r} (key {keys[u]}), which is not "
                    f"cached and not selected; run it first or widen the selection"
                )
    return [items[n] for n in order]


def record_cached(run_root: Path, it: PlanItem, summary: RunSummary) -> dict[str, Any]:
    """Put a cached stage's output in ``summary`` (stats, out dir, the run that computed it), after
    finishing a replacement a crash interrupted (``{key}.old-*`` leftovers) if no other run is
    doing so. Returns its manifest."""
    if cache.has_leftovers(it.out_dir):
        from pipelines.lock import StageLock, lock_path

        lk = StageLock(lock_path(run_root, it.name, it.key))
        if lk.try_acquire():  # held by another run: it cleans up itself
            try:
                cache.recover(run_root, it.name, it.key)
            finally:
                lk.release()
    manifest = cache.read_manifest(it.out_dir) or {}
    summary.statuses[it.name] = "cached"
    summary.stats[it.name] = manifest.get("stats", {})
    summary.out_dirs[it.name] = it.out_dir
    producer = producer_of(manifest)
    if producer:
        summary.produced_by[it.name] = producer
    return manifest


def producer_of(manifest: dict[str, Any]) -> str | None:
    """The MLflow run that computed an output: the pipeline run if recorded, else the stage's."""
    return manifest.get("mlflow_parent_run_id") or manifest.get("mlflow_run_id")


def default_run_name(preset: str | None) -> str:
    return f"{preset or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def fresh_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``... if a run of the same name already logged there."""
    out, i = path, 1
    while out.exists():
        i += 1
        out = path.with_name(f"{path.name}-{i}")
    return out


def log_dir_for(run_root: Path, name: str) -> Path:
    """A new ``{run_root}/logs/<run name>`` for this invocation (created)."""
    out = fresh_dir(run_root / "logs" / name.replace("/", "_").replace(" ", "_"))
    out.mkdir(parents=True)
    return out


def run_cached(items: list[PlanItem], run_root: Path, verbosity: int, name: str | None, preset: str | None,
               capture: bool) -> RunSummary:
    """Finish a `run` whose every selected stage is cached, answered from memory or resolved: the
    same console, log directory and summary as a run that computes something, but no Ray and no
    MLflow run (the summary names the runs that computed the outputs). ``capture``: this
    process's stdout/stderr go to driver.log."""
    import contextlib
    import os
    import sys

    from pipelines import logs
    from pipelines.console import NORMAL, LiveView, print_plan

    if verbosity > NORMAL:
        print_plan(items)
    log_dir = log_dir_for(run_root, name or default_run_name(preset))
    todo = [it for it in items if it.action != SKIP]
    summary = RunSummary(parent_run_id=None, log_dir=log_dir)
    with contextlib.ExitStack() as stack:
        term = sys.stderr
        if capture:
            fd = stack.enter_context(logs.redirect_fds(log_dir / logs.DRIVER_LOG))
            term = stack.enter_context(os.fdopen(os.dup(fd), "w", buffering=1))
        stack.enter_context(logs.RunLogs(log_dir))
        view = LiveView([it.name for it in todo], file=term, verbosity=verbosity)
        view.log_dir = log_dir
        with view:
            for it in todo:  # topological order: every stage's upstream is reported first
                record_cached(run_root, it, summary)
                view(StageEvent(it.name, "cached", it.key, stats=summary.stats[it.name]))
        view.summary(None, run_root, log_dir, ok=True, produced_by=summary.produced_by)
    return summary
