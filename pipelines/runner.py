"""The engine: plan a run (what is cached, what must run), then execute the DAG on Ray.

    metamorph run --preset smoke            # the CLI drives this module

Each stage runs in its own driver thread (its Ray Data / Ray Train work is distributed by Ray);
independent stages overlap up to ``engine.max_parallel_stages``. A stage that raises is recorded
as a ``failed`` child run; nothing downstream of it starts; stages on other branches finish; what
finished stays promoted, so the next invocation resumes from there.

Listeners (the console, tests) get a ``StageEvent`` for every state change through ``on_event``;
the engine itself prints nothing. With ``log_dir`` each stage is handed the paths of its log file
and progress file (``pipelines.logs``), which its Ray workers write to. Ray starts only when the
first stage that must run is about to start (``start_ray``): a fully cached run never starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from pipelines import cache
from pipelines.config import LoadedConfig, flatten, to_plain
from pipelines.graph import Dag, GraphError, Pipeline, build_dag, select
from pipelines.planning import (CACHED, RUN, SKIP, PlanItem, RunSummary, StageEvent, decide,
                                default_run_name, record_cached)
from pipelines.stage import StageContext, TrackingHandle



class StageFailed(RuntimeError):
    """One or more stages raised; the message lists them. Upstream outputs are kept."""

    def __init__(self, failures: dict[str, BaseException], blocked: list[str], parent_run_id: str | None = None):
        self.failures = failures
        self.blocked = blocked
        self.parent_run_id = parent_run_id
        lines = [f"stage {n!r} failed: {type(e).__name__}: {e}" for n, e in failures.items()]
        if blocked:
            lines.append(f"not run because an upstream stage failed: {blocked}")
        super().__init__("\n".join(lines))


EventFn = Callable[[StageEvent], None]


class Engine:
    def __init__(self, pipeline: Pipeline, loaded: LoadedConfig):
        self.pipeline = pipeline
        self.loaded = loaded
        self.run_root = loaded.run_root
        self.stage_cfgs = {s.name: loaded.stage(s.name) for s in pipeline.stages}
        self.dag: Dag = build_dag(pipeline, self.stage_cfgs)
        self.keys: dict[str, str] = {}
        self.verify_hashes = False  # --verify: cache hits are checked against sha256, not just sizes
        self._locks: dict[str, Any] = {}  # stage -> the StageLock this run holds (released on Ctrl-C)
        self.external: dict[str, dict[str, Any]] = {}
        for n in self.dag.order:
            stage = self.dag.stages[n]
            cfg = self.stage_cfgs[n]
            self.external[n] = stage.fingerprint(cfg)
            upstream = {a: self.keys[self.dag.producer[a]] for a in self.dag.inputs[n]}
            self.keys[n] = cache.cache_key(
                n,
                stage.version,
                cache.cache_config(cfg),
                upstream,
                self.external[n],
            )

    # ------------------------------------------------------------------ planning
    def out_dir(self, name: str) -> Path:
        return cache.stage_dirs(self.run_root, name, self.keys[name])[0]

    def artifact_dir(self, artifact: str) -> Path:
        return self.out_dir(self.dag.producer[artifact]) / artifact

    def graph_facts(self) -> dict[str, Any]:
        """What planning needs from the config and the stage code, as plain data: the DAG's order
        and edges, every stage's cache key, the resumable stages (``planning.decide``'s inputs)."""
        order = self.dag.order
        return {"order": order, "upstream": {n: self.dag.upstream(n) for n in order}, "keys": dict(self.keys),
                "resumable": [n for n in order if self.dag.stages[n].resumable]}

    def selection(self, only: Iterable[str] = (), from_: str | None = None, until: str | None = None,
                  force: Iterable[str] = ()) -> tuple[set[str], set[str]]:
        """(selected, forced) stage names; unknown or unselected names raise ``GraphError``."""
        selected = select(self.dag, only, from_, until)
        forced: set[str] = set()
        for f in force:
            if f in ("all", "*"):
                forced |= selected
            elif f not in self.dag.stages:
                raise GraphError(f"--force names unknown stage {f!r}; stages: {self.dag.order}")
            elif f not in selected:
                raise GraphError(f"--force {f!r}: that stage is not selected by --only/--from/--until")
            else:
                forced.add(f)
        return selected, forced

    def plan(
        self,
        only: Iterable[str] = (),
        from_: str | None = None,
        until: str | None = None,
        force: Iterable[str] = (),
        verify: bool | None = None,
    ) -> list[PlanItem]:
        return self.plan_selected(*self.selection(only, from_, until, force), verify=verify)

    def plan_selected(self, selected: set[str], forced: set[str], verify: bool | None = None) -> list[PlanItem]:
        """The plan for a selection already checked by ``selection``."""
        if verify is not None:
            self.verify_hashes = verify
        return decide(**self.graph_facts(), run_root=self.run_root, selected=selected, forced=forced,
                      verify_hashes=self.verify_hashes)

    def validate_stages(self, plan: list[PlanItem]) -> None:
        for it in plan:
            if it.action == RUN:
                self.dag.stages[it.name].validate(self.stage_cfgs[it.name])

    # ------------------------------------------------------------------ execution
    def run(
        self,
        plan: list[PlanItem],
        tracker=None,
        run_name: str | None = None,
        on_event: EventFn | None = None,
        log_dir: Path | None = None,
        start_ray: Callable[[], str] | None = None,
    ) -> RunSummary:
        """Execute ``plan``. ``tracker`` is a pipelines.tracking.Tracker (or None: no MLflow).

        ``log_dir``: where stage logs and progress files go (``pipelines.logs``); None: nowhere.
        ``start_ray``: called once, just before the first stage that must run starts.
        """
        from pipelines import logs

        listener = on_event or (lambda ev: None)
        paths = (lambda n: (logs.log_path(log_dir, n), logs.progress_path(log_dir, n))) if log_dir else (lambda n: (None, None))

        def emit(n: str, kind: str, detail: str = "", **kw: Any) -> None:
            lp, pp = paths(n) if n else (None, None)
            listener(StageEvent(n, kind, detail, log_path=lp, progress_path=pp, **kw))

        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
        todo = [it for it in plan if it.action != SKIP]
        by_name = {it.name: it for it in plan}
        parent = TrackingHandle()
        started = time.time()
        if tracker is not None:
            parent = tracker.start_run(
                run_name or default_run_name(self.loaded.typed.preset),
                tags={
                    "git_sha": cache.git_sha(),
                    "preset": self.loaded.typed.preset or "none",
                    "run_root": str(self.run_root),
                    "pipeline": self.pipeline.name,
                    "host": socket.gethostname(),
                    "stages_planned": ",".join(it.name for it in todo if it.action == RUN),
                },
                params=flatten(self.loaded.plain),
            )
            tracker.log_dict(parent.run_id, self.loaded.plain, "resolved_config.json")
            if log_dir is not None:
                tracker.set_tags(parent.run_id, {"log_dir": str(log_dir)})
        summary = RunSummary(parent_run_id=parent.run_id, log_dir=Path(log_dir) if log_dir else None)
        for it in todo:
            emit(it.name, "waiting", it.reason)
        ray_started = False
        events: queue.Queue = queue.Queue()
        running: dict[str, tuple[threading.Thread, TrackingHandle]] = {}
        done: set[str] = set()
        failures: dict[str, BaseException] = {}
        blocked: list[str] = []
        pending = [it.name for it in todo]
        max_par = self.loaded.typed.engine.max_parallel_stages
        try:
            while pending or running:
                for n in list(pending):
                    ups = [u for u in self.dag.upstream(n) if by_name[u].action != SKIP]
                    if any(u in failures or u in blocked for u in ups):
                        pending.remove(n)
                        blocked.append(n)
                        summary.statuses[n] = "blocked"
                        emit(n, "blocked", "an upstream stage failed")
                        continue
                    if not all(u in done for u in ups):
                        continue
                    it = by_name[n]
                    if it.action == CACHED:
                        pending.remove(n)
                        self._record_cached(it, tracker, parent, summary)
                        done.add(n)
                        emit(n, "cached", it.key, stats=summary.stats.get(n, {}))
                        continue
                    if len(running) >= max_par:
                        continue
                    pending.remove(n)
                    if not ray_started and start_ray is not None:
                        emit("", "ray", start_ray())
                    ray_started = True
                    child = TrackingHandle()
                    if tracker is not None:
                        child = tracker.start_run(
                            n,
                            tags={"stage": n, "cache_key": it.key, "status": "running", "resumed": it.reason.startswith("resume")},
                            params=flatten(to_plain(self.stage_cfgs[n])),
                            parent_id=parent.run_id,
                        )
                    # only a forced stage (or one downstream of it) replaces a valid output; any
                    # other uses the key if another run finished it while we waited for its lock
                    must_run = it.reason in ("forced", "upstream reruns")
                    th = threading.Thread(
                        target=self._execute, args=(it, child, parent, events, must_run, *paths(n)), name=f"stage-{n}",
                        daemon=True,
                    )
                    running[n] = (th, child)
                    emit(n, "start", f"{it.key} ({it.reason})")
                    th.start()
                if not running:
                    if pending:  # nothing can start and nothing runs: only blocked stages remain
                        continue
                    break
                try:
                    n, ok, payload, secs = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if ok in ("waiting", "damaged"):  # the stage thread goes on
                    emit(n, ok, payload)
                    continue
                th, child = running.pop(n)
                if ok == "cached":  # another run computed this key while we waited for its lock
                    th.join()
                    done.add(n)
                    summary.statuses[n] = "cached"
                    summary.stats[n] = payload.get("stats", {})
                    summary.out_dirs[n] = by_name[n].out_dir
                    if tracker is not None:
                        tracker.set_tags(child.run_id, {"status": "cached",
                                                        "cached_from_run_id": payload.get("mlflow_run_id", "")})
                        tracker.log_metrics(child.run_id, _numeric(payload.get("stats", {})))
                        tracker.end(child.run_id, "FINISHED")
                    emit(n, "cached", f"{by_name[n].key} (computed by another run)")
                    continue
                th.join()
                summary.seconds[n] = secs
                if ok:
                    done.add(n)
                    summary.statuses[n] = "ran"
                    summary.stats[n] = payload
                    summary.out_dirs[n] = by_name[n].out_dir
                    if tracker is not None:
                        tracker.set_tags(child.run_id, {"status": "ran"})
                        tracker.end(child.run_id, "FINISHED")
                    emit(n, "done", f"{secs:.1f}s", seconds=secs, stats=payload)
                else:
                    failures[n] = payload
                    summary.statuses[n] = "failed"
                    if tracker is not None:
                        tb = "".join(traceback.format_exception(payload))
                        tracker.set_tags(
                            child.run_id,
                            {"status": "failed", "error": f"{type(payload).__name__}: {payload}"[:4000]},
                        )
                        tracker.log_text(child.run_id, tb, "error.txt")
                        tracker.end(child.run_id, "FAILED")
                    emit(n, "failed", f"{type(payload).__name__}: {payload}", seconds=secs, error=payload)
        except KeyboardInterrupt:
            for lk in list(self._locks.values()):  # the process exits now: let other runs in
                lk.release()
            if tracker is not None:
                for n, (_, child) in running.items():
                    tracker.set_tags(child.run_id, {"status": "killed"})
                    tracker.end(child.run_id, "KILLED")
                tracker.set_tags(parent.run_id, {"status": "killed"})
                tracker.end(parent.run_id, "KILLED")
            raise
        if tracker is not None:
            n_ran = sum(1 for s in summary.statuses.values() if s == "ran")
            n_cached = sum(1 for s in summary.statuses.values() if s == "cached")
            tracker.log_metrics(
                parent.run_id,
                {"stages_ran": n_ran, "stages_cached": n_cached, "stages_failed": len(failures),
                 "wall_seconds": time.time() - started},
            )
            tracker.set_tags(parent.run_id, {"status": "failed" if failures else "finished"})
            tracker.end(parent.run_id, "FAILED" if failures else "FINISHED")
        if failures:
            raise StageFailed(failures, blocked, parent.run_id)
        return summary

    def _record_cached(self, it: PlanItem, tracker, parent: TrackingHandle, summary: RunSummary) -> None:
        manifest = record_cached(self.run_root, it, summary)
        if tracker is None:
            return
        child = tracker.start_run(
            it.name,
            tags={
                "stage": it.name,
                "cache_key": it.key,
                "status": "cached",
                "cached_from_run_id": manifest.get("mlflow_run_id", ""),
            },
            params=flatten(to_plain(self.stage_cfgs[it.name])),
            parent_id=parent.run_id,
        )
        stats = _numeric(manifest.get("stats", {}))
        tracker.log_metrics(child.run_id, stats)
        # headline metrics (eval/...) also on the parent, so a fully cached run still lines up
        # with the others in the MLflow runs table
        headline = {k: v for k, v in stats.items() if k.startswith("eval/")}
        if headline:
            tracker.log_metrics(parent.run_id, headline)
        tracker.log_dict(child.run_id, manifest, "manifest.json")
        tracker.end(child.run_id, "FINISHED")

    def _execute(
        self,
        it: PlanItem,
        child: TrackingHandle,
        parent: TrackingHandle,
        events: queue.Queue,
        must_run: bool = True,
        log_path: Path | None = None,
        progress_path: Path | None = None,
    ) -> None:
        from pipelines.lock import StageLock, describe, lock_path

        n = it.name
        t0 = time.time()
        # first line of the stage's log file (pipelines.logs routes this thread's records there)
        logging.getLogger(__name__).info("stage %s started: key %s (%s)", n, it.key, it.reason)
        eng = self.loaded.typed.engine
        lk = StageLock(lock_path(self.run_root, n, it.key), timeout_s=eng.lock_timeout_s, heartbeat_s=eng.lock_heartbeat_s)
        try:
            lk.acquire(on_wait=lambda info: events.put((n, "waiting", f"{it.key} is being computed by {describe(info)}", 0.0)))
        except BaseException as e:  # noqa: BLE001
            events.put((n, False, e, time.time() - t0))
            return
        self._locks[n] = lk
        try:
            self._execute_locked(it, child, parent, events, must_run, lk, t0, log_path, progress_path)
        finally:
            self._locks.pop(n, None)
            lk.release()

    def _execute_locked(self, it, child, parent, events, must_run, lk, t0, log_path, progress_path) -> None:
        n = it.name
        stage = self.dag.stages[n]
        cfg = self.stage_cfgs[n]
        log = logging.getLogger(__name__)
        tmp = None
        try:
            cache.recover(self.run_root, n, it.key)
            final = it.out_dir
            if cache.is_complete(final, it.key):
                damage = cache.verify(final, hashes=self.verify_hashes)
                if not must_run and not damage:
                    events.put((n, "cached", cache.read_manifest(final) or {}, time.time() - t0))
                    return
                if damage:
                    aside = cache.move_aside_dir(final)
                    events.put((n, "damaged", f"{len(damage)} problem(s), moved to {aside.name}: {'; '.join(damage[:3])}", 0.0))
            final, tmp, ckpt = cache.prepare_attempt(self.run_root, n, it.key)
            if not stage.resumable and ckpt.exists():
                import shutil

                shutil.rmtree(ckpt)
            ctx = StageContext(
                stage=n,
                key=it.key,
                cfg=cfg,
                seed=self.loaded.typed.seed,
                inputs={a: self.artifact_dir(a) for a in self.dag.inputs[n]},
                work_dir=tmp,
                checkpoint_dir=ckpt,
                run_root=self.run_root,
                tracking=child,
                parent_tracking=parent,
                log_path=log_path,
                progress_path=progress_path,
            )
            if child.run_id:  # the datasets this stage reads, as MLflow run inputs (digest = cache key)
                from pipelines.tracking import log_datasets, stage_context

                log_datasets(child, ctx.inputs, stage_context(n))
                log_datasets(parent, ctx.inputs, stage_context(n))  # the pipeline run's Dataset column
            stats = stage.run(ctx) or {}
            missing = [a for a in stage.outputs if not (tmp / a).exists()]
            if missing:
                raise RuntimeError(f"stage {n!r} finished without writing its outputs {missing}")
            resolved = to_plain(cfg)
            lk.check()  # taken over while we stalled: the new holder owns .tmp now
            manifest = cache.promote(
                tmp,
                final,
                {
                    "stage": n,
                    "version": stage.version,
                    "key": it.key,
                    "config": resolved,
                    "upstream": {a: self.keys[self.dag.producer[a]] for a in self.dag.inputs[n]},
                    "external": self.external[n],
                    "stats": stats,
                    "git_sha": cache.git_sha(),
                    "started_at": t0,
                    "seconds": time.time() - t0,
                    "mlflow_run_id": child.run_id,
                    "mlflow_parent_run_id": parent.run_id,
                    "seed": self.loaded.typed.seed,
                },
                ctx.row_counts,
                ctx.digests,
            )
            if ckpt.exists():  # the promoted export supersedes the checkpoints
                import shutil

                shutil.rmtree(ckpt, ignore_errors=True)
            if child.run_id:
                from pipelines.tracking import Tracker  # noqa: F401  (mlflow already imported)

                child.log_metrics(_numeric(stats))
                client = child._client()
                client.log_dict(child.run_id, manifest, "manifest.json")
                client.log_text(child.run_id, yaml.safe_dump(resolved, sort_keys=False), "config.yaml")
            log.info("stage %s done in %.1fs: %s", n, time.time() - t0, stats)
            _log_file_artifact(child, log_path)
            events.put((n, True, stats, time.time() - t0))
        except BaseException as e:  # noqa: BLE001 - reported to the main thread, which decides
            e = cache.explain_disk_full(e, tmp) if tmp is not None and not lk.lost else e
            log.error("stage %s failed", n, exc_info=e)
            _log_file_artifact(child, log_path)
            events.put((n, False, e, time.time() - t0))


def _log_file_artifact(child: TrackingHandle, path: Path | None) -> None:
    """The stage's log file as an artifact of its MLflow run (best effort: logging must not fail it)."""
    if not child.run_id or path is None or not Path(path).exists():
        return
    try:
        child.log_artifact(path, "logs")
    except Exception:  # noqa: BLE001
        logging.getLogger(__name__).warning("could not attach %s to run %s", path, child.run_id, exc_info=True)


def _numeric(stats: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in flatten(stats).items():
        if isinstance(v, (int, float)):
            out[k.replace(":", "_")] = float(v)
    return out


# Ray 2.60 binds every server of a node (GCS, raylet, object manager, core workers, dashboard
# and runtime-env agents, the metrics and autoscaler exporters) to loopback when the node's IP is
# loopback, and to all interfaces otherwise. But ray.init rewrites a loopback ``_node_ip_address``
# into the host's routable address (ray._private.services.resolve_ip_for_localhost ->
# get_node_ip_address) unless multi-node clusters are disabled, as they are by default on macOS
# and Windows: that switch is this variable, read when ray._private.ray_constants is imported.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def loopback_node():
    """Around ``ray.init`` of a local (single-node) Ray: every process it starts listens on
    127.0.0.1 only (``tests/integration/test_loopback.py`` checks with ``ss``).

    The processes started inside inherit the variable (they read it when they import ray); the
    driver has imported ray already, and its services read ``ray_constants.ENABLE_RAY_CLUSTER`` at
    call time, so that is set for the duration too. Both are restored on exit, so a later
    ``ray start --address`` (a worker node) from this process is not refused.
    """
    from ray._private import ray_constants

    prior_env, prior_flag = os.environ.get(SINGLE_NODE_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[SINGLE_NODE_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = prior_flag
        if prior_env is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = prior_env


def init_ray(ray_cfg, address: str | None = None) -> str:
    """Connect to a cluster (``address`` / ray.address / RAY_ADDRESS) or start a local Ray that
    listens on loopback only (``loopback_node``).

    Workers' output stays out of the driver's console (``log_to_driver=False``): training workers
    write it to their stage's log (``pipelines.logs.capture_output``), the rest stays in Ray's
    session logs. Ray's own loggers are routed to our log files, Ray Data's progress bars are off
    (the live view shows progress).
    """
    import ray

    # the stage libraries' imports overlap Ray's start-up (mostly waiting on its daemons); no stage
    # thread runs yet, so they are still imported before any stage can touch them
    failed: list[BaseException] = []

    def _import() -> None:
        try:
            import_stage_libraries()
        except BaseException as e:  # raised below, on the caller's thread
            failed.append(e)

    importing = threading.Thread(target=_import, name="import-stage-libraries", daemon=True)
    importing.start()
    if ray.is_initialized():
        where = "existing"
    else:
        address = address or ray_cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
            where = f"cluster {address}"
        else:
            with loopback_node():
                ray.init(
                    address="local",  # never join some other Ray that happens to run on this machine
                    num_cpus=ray_cfg.num_cpus,
                    object_store_memory=ray_cfg.object_store_memory_mb * 2**20,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            where = "local"
    importing.join()  # before ray.data's imports: two threads importing one package can see it half-initialised
    if failed:
        raise failed[0]
    import ray.data  # configures its loggers on import: route them (and Ray's) to our files

    from pipelines.logs import quiet_library_loggers

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    quiet_library_loggers()
    return where


def import_stage_libraries() -> None:
    """Import the heavy libraries the stages' driver code uses, on this (the scheduler's) thread.

    Stage modules import torch/transformers/diffusers inside the functions that run, so several
    stage threads can reach their first import at once; transformers' lazily populated top-level
    module is not safe to initialise from two threads (the loser gets "cannot import name
    'SiglipVisionConfig' from 'transformers'", seen with two concurrent runs). Called once, just
    before the first stage thread starts (``init_ray``); a fully cached run never gets here."""
    import diffusers  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
