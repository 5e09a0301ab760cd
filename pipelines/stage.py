"""The stage contract: what every DAG node declares and what it is handed when it runs.

    python -c "from pipelines.stage import Stage; help(Stage)"

A stage is a small class with class attributes (name, version, input/output artifact names, a
typed config dataclass) and one method, ``run(ctx) -> stats``. The engine (``pipelines.runner``)
derives the DAG from artifact names, computes cache keys, hands the stage a ``StageContext`` whose
output dirs live in a temporary directory, and promotes that directory atomically when ``run``
returns. A stage never writes outside ``ctx.output(...)``/``ctx.checkpoint_dir``.

Stages hold Ray glue only; the math and formats live in ``metamorph/`` (which never imports ray or
mlflow). Metrics flow out through ``ctx.log_metrics``; code running inside Ray workers (Ray Train)
logs through ``ctx.tracking`` (a picklable ``TrackingHandle``) with ``TrackingHandle.log_metrics``.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from metamorph.fields import is_operational, operational  # noqa: F401  (re-exported for stage configs)


@dataclass(kw_only=True)
class StageConfig:
    """Base class for stage configs (a ``kw_only`` dataclass beside its stage).

    Subclasses add typed fields with defaults and comments that give units and trade-offs, and
    reject bad values in ``__post_init__`` with a message that names the key and the fix.
    Supported field types (OmegaConf structured configs): int, float, bool, str, Optional[...],
    list[...], dict[str, ...], Enum, and nested kw_only dataclasses.
    """


@dataclass
class TrackingHandle:
    """Picklable pointer at one MLflow run, for code in Ray workers (log from rank 0 only).

    ``uri``/``run_id`` are None when tracking is off (unit tests): every method is then a no-op.
    """

    uri: str | None = None
    run_id: str | None = None

    def _client(self):
        import mlflow  # deferred: stages may run where mlflow is slow to import

        return mlflow.MlflowClient(tracking_uri=self.uri)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.run_id or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()]
        client = self._client()
        for i in range(0, len(items), 500):  # MLflow caps a batch at 1000 entities
            client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if not self.run_id:
            return
        local_path = Path(local_path)
        client = self._client()
        if local_path.is_dir():
            client.log_artifacts(self.run_id, str(local_path), artifact_path)
        else:
            client.log_artifact(self.run_id, str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.run_id:
            return
        client = self._client()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))


@dataclass
class StageContext:
    """Everything a running stage may touch. Built by the engine; tests may build one directly."""

    stage: str
    key: str  # the cache key of this run of the stage
    cfg: Any  # the stage's typed config instance (already validated)
    seed: int  # the pipeline-wide seed; stages derive their own streams from it
    inputs: dict[str, Path]  # artifact name -> directory written by the producing stage
    work_dir: Path  # temporary dir; promoted to {run_root}/{stage}/{key} on success
    checkpoint_dir: Path  # survives failed attempts of the same key (training resumes from it)
    run_root: Path
    tracking: TrackingHandle = field(default_factory=TrackingHandle)
    # the pipeline invocation's parent run: headline metrics (evaluation) go here too, so that
    # pipeline runs line up side by side in the MLflow runs table
    parent_tracking: TrackingHandle = field(default_factory=TrackingHandle)
    # relative path (under work_dir) -> row count, recorded into the manifest's file list
    row_counts: dict[str, int] = field(default_factory=dict)
    # relative path (under work_dir) -> {"sha256", "bytes"} taken while writing (record_digest);
    # files without one are hashed when the output is promoted
    digests: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The stage's log file and progress file (pipelines.logs); None when run outside the engine.
    # Ray workers take these paths along: ``pipelines.logs.capture_output(log_path)`` sends their
    # output to the log, ``pipelines.logs.write_progress(progress_path, ...)`` feeds the console.
    log_path: Path | None = None
    progress_path: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def input(self, artifact: str) -> Path:
        try:
            return self.inputs[artifact]
        except KeyError:
            raise KeyError(
                f"stage {self.stage!r} asked for artifact {artifact!r} it did not declare as an "
                f"input (declared: {sorted(self.inputs)})"
            ) from None

    def output(self, artifact: str) -> Path:
        """The directory to write ``artifact`` into (created on first call)."""
        path = self.work_dir / artifact
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracking.log_metrics(metrics, step)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.tracking.log_artifact(local_path, artifact_path)

    def report_progress(self, done: float, total: float | None = None, unit: str = "", metric: str = "") -> None:
        """Progress for the live view: ``done`` of ``total`` ``unit`` and a short key metric."""
        from pipelines.logs import write_progress

        write_progress(self.progress_path, done=done, total=total, unit=unit, metric=metric)

    def record_rows(self, relpath: str | Path, n: int) -> None:
        """Record a row count for a file under work_dir (Parquet files are counted automatically)."""
        with self._lock:
            self.row_counts[str(relpath)] = int(n)

    def record_digest(self, relpath: str | Path, digest: Mapping[str, Any]) -> None:
        """The sha256 and size of a file under work_dir, taken while writing it
        (metamorph/data/digest.py): the manifest uses it instead of reading the file again."""
        with self._lock:
            self.digests[str(relpath)] = {"sha256": str(digest["sha256"]), "bytes": int(digest["bytes"])}


class Stage:
    """A DAG node. Subclass, set the class attributes, implement ``run``.

    ``run`` returns a flat dict of stats (numbers) that land in the manifest and as metrics on the
    stage's MLflow child run. It raises on failure; the engine marks the child run ``failed``,
    keeps upstream outputs, and does not run anything downstream.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"  # bump when the output format or semantics change
    inputs: ClassVar[tuple[str, ...]] = ()  # artifact names consumed
    outputs: ClassVar[tuple[str, ...]] = ()  # artifact names produced (each a subdir of the output)
    config_cls: ClassVar[type] = StageConfig
    # Config fields that do not change the result (worker counts, throughput batch sizes, log
    # intervals) are excluded from the cache key where they are declared, by field metadata:
    # ``field(default=..., metadata=operational())`` (metamorph.fields), not listed here.
    # Training stages: keep ctx.checkpoint_dir between attempts of the same key and resume from it.
    resumable: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def input_artifacts(self, cfg: Any) -> tuple[str, ...]:
        """Artifacts this stage consumes under ``cfg`` (default: the class's ``inputs``).

        Override when config decides (a curation stage reads the toy world only when one of its
        sources says ``world:...``)."""
        return tuple(self.inputs)

    def fingerprint(self, cfg: Any) -> dict[str, Any]:
        """Fingerprints of external inputs (files named in cfg) that belong in the cache key."""
        return {}

    def validate(self, cfg: Any) -> None:
        """Cheap checks before any work starts (paths exist, resources fit). Raise ValueError."""

    def resources(self, cfg: Any) -> dict[str, float]:
        """Peak Ray resources the stage needs at once (e.g. {"GPU": 8, "CPU": 16}); checked by
        ``metamorph run --dry-run`` against the connected cluster."""
        return {}

    def run(self, ctx: StageContext) -> dict[str, float]:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "operational" in cls.__dict__:
            raise TypeError(
                f"{cls.__name__}.operational: cache-excluded fields are declared on the config dataclass, "
                "as field(default=..., metadata=operational()) from pipelines.stage / metamorph.fields"
            )

    def __repr__(self) -> str:
        return f"<Stage {self.name} v{self.version}>"


def config_fields(cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []


StageFactory = Callable[[], Stage]
