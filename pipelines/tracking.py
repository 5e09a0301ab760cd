"""MLflow tracking: one experiment per pipeline, a parent run per invocation, a child per stage.

    metamorph ui            # then open http://127.0.0.1:5000

Where the record goes (``resolve_uri``): the ``tracking.uri`` config key, else
``$MLFLOW_TRACKING_URI``, else the embedded store ``sqlite:///{run_root}/mlflow.db`` with artifacts
under ``{run_root}/mlartifacts`` (so moving ``run_root`` moves the whole record).

What a run records besides params and metrics: the standard source tags (git commit, entry point,
user) and an experiment marked ``custom_model_development``; datasets as inputs (``log_datasets``:
digest = the producing stage's cache key); system metrics on training runs (``system_metrics``);
each trained model as an MLflow 3 logged model (``log_model``) that evaluate's metrics link to
(``log_model_metrics``) and ``register_model`` can put in the registry. Everything goes through
``MlflowClient`` (no global active-run state), so stages running in threads log safely.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipelines.stage import TrackingHandle

if TYPE_CHECKING:
    from pipelines.config import LoadedConfig

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value (3.x)


def default_uri(run_root: Path) -> str:
    return f"sqlite:///{Path(run_root).resolve() / 'mlflow.db'}"


def default_artifact_root(run_root: Path) -> str:
    return (Path(run_root).resolve() / "mlartifacts").as_uri()


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.mlflow = mlflow
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_root, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        else:
            self.experiment_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        self._standard_tags = standard_tags()

    def start_run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> TrackingHandle:
        tags = {**self._standard_tags, **{k: str(v) for k, v in (tags or {}).items()}}
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        handle = TrackingHandle(uri=self.uri, run_id=run.info.run_id)
        if params:
            self.log_params(handle.run_id, params)
        return handle

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items() if _is_number(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def end(self, run_id: str, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(run_id, status=status)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or isinstance(v, bool)


def _param_value(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."


# --- where the record lives ------------------------------------------------------------------

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


def resolve_uri(configured: str | None, run_root: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact root or None). Precedence: the ``tracking.uri`` config key, then
    ``$MLFLOW_TRACKING_URI``, then the embedded store ``sqlite:///{run_root}/mlflow.db`` (whose
    artifacts go under ``{run_root}/mlartifacts``; a server decides its own artifact root)."""
    import os

    if configured:
        return configured, None
    env = os.environ.get(TRACKING_URI_ENV)
    if env:
        return env, None
    return default_uri(run_root), default_artifact_root(run_root)


# --- standard tags ---------------------------------------------------------------------------

# MLflow 3's UI opens an experiment tagged this way on the runs table (not the GenAI overview).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def standard_tags() -> dict[str, str]:
    """The tags MLflow's fluent API sets on a run (source, commit, user), for client-made runs."""
    import getpass
    import sys

    from pipelines.cache import git_sha

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("metamorph")
    tags = {
        "mlflow.user": user,
        "mlflow.source.type": "LOCAL",
        # the entry point: "metamorph" for the CLI; `python -m pkg` gives pkg/__main__.py -> "pkg"
        "mlflow.source.name": argv0.parent.name if argv0.name == "__main__.py" else argv0.name,
    }
    sha = git_sha()
    if sha and sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
    return tags


# --- system metrics --------------------------------------------------------------------------

SYSTEM_METRICS_INTERVAL_S = 5.0  # one sample (CPU, memory, disk, network; GPU with pynvml) per 5 s


class system_metrics:
    """Context manager: MLflow's system-metrics monitor on ``handle``'s run while the body runs.

    The monitor samples this host (CPU %, memory, disk, network, and GPU utilisation/memory when
    ``pynvml`` is installed) as ``system/...`` metrics; a last sample is logged on exit so even a
    run shorter than one interval has one. A no-op without a run or without psutil.
    """

    def __init__(self, handle: TrackingHandle, interval_s: float = SYSTEM_METRICS_INTERVAL_S):
        self.handle, self.interval_s, self.monitor = handle, interval_s, None

    def __enter__(self):
        if not self.handle.run_id:
            return self
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError:  # psutil missing: the record simply has no system metrics
            return self
        self.monitor = SystemMetricsMonitor(
            self.handle.run_id, sampling_interval=self.interval_s, samples_before_logging=1,
            tracking_uri=self.handle.uri,
        )
        self.monitor.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.monitor is None:
            return
        try:
            self.monitor.collect_metrics()
            self.monitor.publish_metrics(self.monitor.aggregate_metrics())
        finally:
            self.monitor.finish()


# --- datasets as run inputs ------------------------------------------------------------------

DATASET_ARTIFACTS = ("mixture", "tokenized")  # plus every curated_* artifact


def is_dataset_artifact(name: str) -> bool:
    return name.startswith("curated_") or name in DATASET_ARTIFACTS


def dataset_entity(artifact: str, path: Path):
    """An MLflow ``Dataset`` for a promoted artifact dir: digest = its stage's cache key, source =
    its path, profile = row counts from the manifest, schema = the columns of its Parquet rows
    (tokenized parts) or of its sample index (curated shards, mixture)."""
    import json

    from mlflow.entities import Dataset

    from pipelines.cache import read_manifest

    path = Path(path).resolve()
    stage_dir = path.parent
    manifest = read_manifest(stage_dir) or {}
    key = str(manifest.get("key") or stage_dir.name)
    files = [f for f in manifest.get("files", []) if str(f.get("path", "")).startswith(f"{artifact}/")]
    tars = [f for f in files if f["path"].endswith(".tar")]
    counted = tars or [f for f in files if f["path"].endswith(".parquet") and not f["path"].endswith("index.parquet")]
    profile: dict[str, Any] = {"num_rows": int(sum(f.get("rows", 0) for f in counted)),
                               "num_files": len(counted), "num_bytes": int(sum(f.get("bytes", 0) for f in files))}
    if tars:
        profile["heldout_rows"] = int(sum(f.get("rows", 0) for f in tars if "heldout" in f["path"]))
        profile["train_rows"] = profile["num_rows"] - profile["heldout_rows"]
    schema = None
    table = sorted(path.glob("*.parquet")) if not tars else [path / "index.parquet"]
    table = [t for t in table if t.exists() and (tars or t.name != "index.parquet")]
    if table:
        try:
            import pyarrow.parquet as pq

            arrow = pq.read_schema(table[0])
            schema = json.dumps({"mlflow_colspec": [{"name": f.name, "type": str(f.type)} for f in arrow]})
        except Exception:  # noqa: BLE001 - a schema is a courtesy, never a reason to fail a stage
            schema = None
    return Dataset(
        name=artifact,
        digest=key[:36],  # MLflow's digest column holds at most 36 characters
        source_type="local",
        source=json.dumps({"uri": path.as_uri()}),
        schema=schema,
        profile=json.dumps(profile),
    )


def log_datasets(handle: TrackingHandle, inputs: Mapping[str, Path], context: str) -> list[str]:
    """``mlflow.log_input`` for every dataset-like artifact in ``inputs`` (name -> dir); returns
    the names logged. ``context``: "training", "evaluation" or "processing" (the UI shows it)."""
    if not handle.run_id:
        return []
    from mlflow.entities import DatasetInput, InputTag

    datasets = [
        DatasetInput(dataset_entity(name, Path(p)), tags=[InputTag("mlflow.data.context", context)])
        for name, p in sorted(inputs.items())
        if is_dataset_artifact(name) and Path(p).is_dir()
    ]
    if datasets:
        log_inputs(handle._client(), handle.run_id, datasets=datasets)
    return [d.dataset.name for d in datasets]


def log_inputs(client, run_id: str, *, datasets=None, models=None, attempts: int = 5) -> None:
    """``client.log_inputs``, safe when two stages log the same input at once. MLflow's SQL store
    looks a dataset (and a run's input link) up, then inserts it: two stages that start together
    and read the same dataset both miss it, and the second insert fails its unique constraint
    (datasets per experiment, inputs per run). Logging is idempotent, so a retry, which finds the
    row the other writer inserted, is the whole cure; anything else is raised as it was."""
    for attempt in range(attempts):
        try:
            client.log_inputs(run_id, datasets=datasets, models=models)
            return
        except Exception as e:  # noqa: BLE001 - MlflowException wraps the driver's IntegrityError
            text = str(e).lower()
            if not any(w in text for w in ("integrityerror", "unique", "duplicate")):
                raise
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def stage_context(stage: str) -> str:
    if stage.startswith("train_") or stage == "vision_encoder":
        return "training"
    return "evaluation" if stage == "evaluate" else "processing"


# --- logged models ---------------------------------------------------------------------------


def log_model(handle: TrackingHandle, local_dir: Path, name: str, model_type: str,
              tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None) -> str | None:
    """An MLflow 3 logged model of ``handle``'s run holding the files of ``local_dir`` (an export
    users open with transformers / diffusers), marked READY and recorded as the run's output.
    Returns its model id (None without tracking)."""
    if not handle.run_id:
        return None
    from mlflow.entities import LoggedModelOutput

    client = handle._client()
    run = client.get_run(handle.run_id)
    model = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=handle.run_id, model_type=model_type,
        tags={k: str(v) for k, v in (tags or {}).items()},
        params={k: _param_value(v) for k, v in (params or {}).items()},
    )
    try:
        client.log_model_artifacts(model.model_id, str(local_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(handle.run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def find_logged_model(handle: TrackingHandle, name: str, cache_key: str) -> str | None:
    """The newest READY logged model ``name`` made by the stage run with ``cache_key`` (a cached
    stage's model was logged by the run that trained it)."""
    if not handle.run_id:
        return None
    client = handle._client()
    exp = client.get_run(handle.run_id).info.experiment_id
    models = client.search_logged_models([exp], filter_string=f"name = '{name}'", max_results=1000)
    hits = [m for m in models if m.tags.get("cache_key") == cache_key and str(m.status) in ("READY", "LoggedModelStatus.READY")]
    hits.sort(key=lambda m: m.creation_timestamp, reverse=True)
    return hits[0].model_id if hits else None


def log_model_metrics(handle: TrackingHandle, model_id: str, metrics: Mapping[str, float],
                      dataset: Any = None) -> None:
    """Metrics on ``handle``'s run that also belong to the logged model ``model_id`` (its page
    lists them), optionally tied to the dataset (an mlflow ``Dataset``) they were measured on."""
    if not handle.run_id:
        return
    import math

    from mlflow.entities import LoggedModelInput, Metric

    ts = int(time.time() * 1000)
    dn, dd = (dataset.name, dataset.digest) if dataset is not None else (None, None)
    items = [Metric(k, float(v), ts, 0, model_id=model_id, dataset_name=dn, dataset_digest=dd)
             for k, v in metrics.items() if _is_number(v) and not math.isnan(float(v))]
    client = handle._client()
    log_inputs(client, handle.run_id, models=[LoggedModelInput(model_id)])
    for i in range(0, len(items), 500):
        client.log_batch(handle.run_id, metrics=items[i : i + 500])


class process_tracking_uri:
    """Context manager: MLflow's process-wide tracking URI (and ``$MLFLOW_TRACKING_URI``, which
    ``mlflow.set_tracking_uri`` also sets) pointed at ``uri``, both restored on exit. For the few
    MLflow calls that ignore their client's URI (registering ``models:/``, ``load_table``)."""

    def __init__(self, uri: str):
        self.uri = uri

    def __enter__(self):
        import os

        from mlflow.tracking._tracking_service import utils

        self.env = os.environ.get(TRACKING_URI_ENV)
        self.before = utils._tracking_uri
        utils.set_tracking_uri(self.uri)
        return self

    def __exit__(self, *exc) -> None:
        import os

        from mlflow.tracking._tracking_service import utils

        utils.set_tracking_uri(self.before)
        if self.env is None:
            os.environ.pop(TRACKING_URI_ENV, None)
        else:
            os.environ[TRACKING_URI_ENV] = self.env


def register_model(handle: TrackingHandle, model_id: str, name: str, metrics: Mapping[str, float],
                   description: str = "") -> str:
    """Register logged model ``model_id`` as a new version of ``name`` in the model registry, with
    ``metrics`` as the version's tags and in its description. Returns the version number."""
    import json

    from mlflow.exceptions import MlflowException

    client = handle._client()
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered: add a version
    lines = [description] if description else []
    lines += [f"- {k}: {v:.4g}" for k, v in sorted(metrics.items()) if _is_number(v)]
    # MLflow resolves a "models:/" source against the process-wide tracking URI: point it at
    # this store for the call (only then does the version record its logged model)
    with process_tracking_uri(handle.uri):
        mv = client.create_model_version(
            name, source=f"models:/{model_id}", run_id=handle.run_id, model_id=model_id,
            tags={k: f"{float(v):.6g}" for k, v in metrics.items() if _is_number(v)},
            description="\n".join(lines),
        )
    # the logged model's page lists its registered versions from this tag (as mlflow.register_model does)
    versions = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions", "[]"))
    versions.append({"name": name, "version": str(mv.version)})
    client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(versions)})
    return str(mv.version)


def make_tracker(loaded: "LoadedConfig") -> "Tracker":
    """The run root's tracker for a loaded config: its tracking URI, experiment and artifact root."""
    t = loaded.typed.tracking
    uri, default_art = resolve_uri(t.uri, loaded.run_root)  # config key > $MLFLOW_TRACKING_URI > embedded
    art = t.artifact_root or default_art
    loaded.run_root.mkdir(parents=True, exist_ok=True)
    from pipelines.lock import StageLock

    # two runs starting on one run root would both create (migrate) the sqlite store and the
    # experiment; MLflow's migration is not safe against that, so the first one does it alone
    with StageLock(loaded.run_root / "mlflow.db.lock", timeout_s=60, heartbeat_s=5):
        return Tracker(uri, loaded.typed.experiment, art)
