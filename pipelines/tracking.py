"""MLflow tracking: one experiment per pipeline, a parent run per invocation, a child per stage.

    metamorph ui            # then open http://127.0.0.1:5000

The default store is embedded: ``sqlite:///{run_root}/mlflow.db`` with artifacts under
``{run_root}/mlartifacts``, so moving ``run_root`` moves the whole record. Everything goes through
``MlflowClient`` (no global active-run state), so stages running in threads log safely.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from pipelines.stage import TrackingHandle

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
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            self.experiment_id = exp.experiment_id

    def start_run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> TrackingHandle:
        tags = {k: str(v) for k, v in (tags or {}).items()}
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
