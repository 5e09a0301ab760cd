"""The one Ray Train launcher, for every training stage (train_connector, train_vpit, train_decoder).

    python -m pytest tests/integration/test_training_stages.py -q -m integration

``fit(ctx, worker_fn, job, scaling)`` runs ``worker_fn(job)`` on every worker of a
``TorchTrainer`` group (gloo on CPU, nccl on GPU) with the worker's output sent to the stage's
log, and returns Ray's ``Result``. Restarts are the loop's business: it resumes from the newest
complete checkpoint under ``{ctx.checkpoint_dir}/loop``, a path that is the same for every
worker-group restart (``FailureConfig.max_failures``) and, because the engine keeps the
checkpoint dir of a ``resumable`` stage whose key did not change, for a rerun of the stage too.
``Scaling`` (the worker group's shape) is a field of each training stage's config. The workers:
``stages._llm.llm_worker`` (the LLM stages), ``stages.train_decoder.decoder_worker``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipelines.logs import capture_output
from pipelines.stage import StageContext, operational


@dataclass(kw_only=True)
class Scaling:
    """The Ray Train worker group of a training stage (``stages.<stage>.scaling``)."""

    num_workers: int = 2  # Ray Train workers (one process each; one GPU each when use_gpu)
    # CPUs reserved per worker, also its torch thread count (min 1). Fractional on purpose: on a
    # 2-core box two workers at 1.0 would take every CPU and starve the Ray driver/Data tasks
    # (Ray Train then hangs waiting for them).
    cpus_per_worker: float = field(default=0.5, metadata=operational())
    use_gpu: bool = False  # nccl + one device per worker (bf16 there); False: CPU with gloo
    gpus_per_worker: float = field(default=1.0, metadata=operational())  # only read when use_gpu
    max_failures: int = field(default=2, metadata=operational())  # worker-group restarts before the stage fails

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError("scaling.gpus_per_worker must be > 0 when scaling.use_gpu is true")
        if self.max_failures < -1:
            raise ValueError("scaling.max_failures must be >= 0, or -1 for unlimited restarts")

    def resources(self) -> dict[str, float]:
        """Peak Ray resources of the worker group (for ``metamorph run --dry-run``)."""
        need = {"CPU": self.num_workers * self.cpus_per_worker}
        if self.use_gpu:
            need["GPU"] = self.num_workers * self.gpus_per_worker
        return need


def fit(ctx: StageContext, worker_fn: Callable[[Any], None], job: Any, scaling: Scaling) -> Any:
    """Run ``worker_fn(job)`` on every worker of a TorchTrainer group until it finishes (each
    restart resumes from the job's checkpoints); return Ray Train's ``Result``. ``worker_fn`` must
    be a module-level function; ``job`` a small picklable dataclass with a ``log_path``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.tracking import system_metrics

    ckpt_dir = Path(ctx.checkpoint_dir).resolve()
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config={"fn": worker_fn, "job": job},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"{ctx.stage}-{ctx.key}",
            storage_path=str(ckpt_dir / "ray"),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
    )
    with system_metrics(ctx.tracking):  # this host's CPU/memory (and GPU) while the workers train
        return trainer.fit()  # raises ray.train.TrainingFailedError once max_failures is spent


def _worker_entry(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker (the process group is up): its output goes to the stage's log."""
    job = config["job"]
    with capture_output(job.log_path):
        config["fn"](job)
