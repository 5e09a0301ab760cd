"""The one Ray Train launcher (every training stage: train_connector, train_vpit, train_decoder)
and the LLM stages' worker.

    python -m pytest tests/integration/test_training_stages.py -q -m integration

``fit(ctx, worker_fn, job, scaling)`` runs ``worker_fn(job)`` on every worker of a
``TorchTrainer`` group (gloo on CPU, nccl on GPU) with the worker's output sent to the stage's
log, and returns Ray's ``Result``. Restarts are the loop's business: it resumes from the newest
complete checkpoint under ``{ctx.checkpoint_dir}/loop``, a path that is the same for every
worker-group restart (``FailureConfig.max_failures``) and, because the engine keeps the
checkpoint dir of a ``resumable`` stage whose key did not change, for a rerun of the stage too.
``Scaling`` (the worker group's shape) is a field of each training stage's config.

The LLM worker (``llm_worker``) runs ``metamorph.train.loop.train_loop``; Ray Train gets each log
window's metrics through ``ray.train.report`` (metrics only: the checkpoints already live on
storage every worker sees, so Ray need not copy them) and the run's stats in a last report (with
a tiny checkpoint holding them: Ray hands metrics to the driver only with a checkpoint).

Every LLM worker records ``{pid, hostname, rank, attempt start}`` in ``{ctx.checkpoint_dir}/workers/``
so an operator (or a test) can find the training processes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from metamorph.train.config import TrainConfig
from pipelines.logs import capture_output, write_progress
from pipelines.stage import StageContext, TrackingHandle, operational

log = logging.getLogger(__name__)


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


@dataclass
class WorkerJob:
    """What one Ray Train worker needs; pickled to the workers (keep it small and plain)."""

    build_model: Callable[[], Any]  # a module-level function (or partial): returns the model, trainable set
    train: dict[str, Any]  # TrainConfig fields
    shards: str  # tokenized dir
    feature_dim: int  # collate needs it for a batch without images
    checkpoint_root: str
    workers_dir: str
    export_dir: str
    tracking: TrackingHandle
    flops_seq_len: int  # sequence length for the MFU attention term
    cpus_per_worker: float = 1.0  # the worker's CPU reservation: its torch thread count
    loss_args: dict[str, Any] = field(default_factory=dict)  # the loss's arguments (train_vpit: vision_coef)
    log_path: str = ""  # the stage's log file: every worker's stdout/stderr/logging goes there
    progress_path: str = ""  # rank 0 writes steps done / total here for the console


def llm_worker(job: WorkerJob) -> None:
    """An LLM training worker: ``train_loop`` over this rank's slice of the tokenized shards."""
    import functools

    import torch
    import ray.train
    import torch.distributed as dist
    from ray.train.torch import get_device

    from metamorph.data.packing import BATCH_KEYS, collate
    from metamorph.train.loop import flops_per_token, train_loop
    from metamorph.train.reader import ShardReader

    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(**job.train)
    # one intra-op thread per reserved CPU: more would oversubscribe the cores other workers hold
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    _record_worker(Path(job.workers_dir), rank)

    model = job.build_model()
    reader = ShardReader(
        job.shards,
        rank=rank,
        world_size=world,
        micro_batch_size=cfg.micro_batch_size,
        seed=cfg.seed,
        shuffle=cfg.shuffle,
        collate=functools.partial(collate, feature_dim=job.feature_dim),
        columns=BATCH_KEYS,  # skip sample_ids/num_tokens: nothing in the batch reads them
    )
    llm_cfg = getattr(getattr(model, "config", None), "llm", None)
    fpt = flops_per_token(
        model,
        n_layers=getattr(llm_cfg, "num_layers", 0),
        hidden=getattr(llm_cfg, "hidden_size", 0),
        seq_len=job.flops_seq_len,
    )

    total = cfg.max_steps or reader.batches_in(cfg.epochs) // cfg.grad_accum  # as train_loop counts

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if rank == 0:
            job.tracking.log_metrics(metrics, step=step)
            shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "text_loss", "vision_loss", "lr", "tokens_per_s"))
            log.info("step %d/%d %s", step, total, shown)
            write_progress(job.progress_path, done=step, total=total, unit="steps", metric=_headline(metrics))
        ray.train.report({"step": step, **metrics})  # a barrier: every rank reports

    stats = train_loop(
        model,
        cfg,
        reader,
        checkpoint_root=job.checkpoint_root,
        export_dir=job.export_dir,
        device=get_device(),
        on_log=on_log,
        flops_per_tok=fpt,
        loss_args=job.loss_args,
    )
    # Ray attaches metrics to the driver's Result only with a checkpoint: rank 0 reports a tiny
    # one holding the stats (the model itself is the export, the resumable state is in
    # checkpoint_root).
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (Path(tmp) / "stats.json").write_text(json.dumps(stats, indent=1))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"done": 1.0, **stats}, checkpoint=checkpoint)


def _headline(metrics: dict[str, float]) -> str:
    """The console's key metric: loss and throughput."""
    parts = [f"loss={metrics['loss']:.3g}"] if "loss" in metrics else []
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)


def _record_worker(workers_dir: Path, rank: int) -> None:
    workers_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "hostname": socket.gethostname(), "rank": rank, "started": time.time()}
    tmp = workers_dir / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, workers_dir / f"rank{rank}.json")


def fit_llm(
    ctx: StageContext,
    train: TrainConfig,
    scaling: Scaling,
    build_model: Callable[[], Any],
    shards: Path,
    feature_dim: int,
    seq_len: int,
    export_dir: Path,
    loss_args: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train an LLM stage with ``fit`` and ``llm_worker`` (resuming from any checkpoint); return
    the loop's stats. ``loss_args``: the loss's arguments set by the stage (``vision_coef``)."""
    ckpt_dir = Path(ctx.checkpoint_dir).resolve()
    job = WorkerJob(
        build_model=build_model,
        train=asdict(train),
        shards=str(Path(shards).resolve()),
        feature_dim=feature_dim,
        checkpoint_root=str(ckpt_dir / "loop"),
        workers_dir=str(ckpt_dir / "workers"),
        export_dir=str(Path(export_dir).resolve()),
        tracking=ctx.tracking,
        flops_seq_len=seq_len,
        cpus_per_worker=scaling.cpus_per_worker,
        loss_args=dict(loss_args or {}),
        log_path=str(ctx.log_path or ""),
        progress_path=str(ctx.progress_path or ""),
    )
    t0 = time.perf_counter()
    result = fit(ctx, llm_worker, job, scaling)
    stats = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float)) and k != "done"}
    if not (result.metrics or {}).get("done"):
        raise RuntimeError(f"{ctx.stage}: Ray Train finished without the workers' final report: {result.metrics}")
    stats["fit_seconds"] = time.perf_counter() - t0
    return stats


def publish(ctx: StageContext, export_dir: Path, tokenizer, artifact: str) -> None:
    """Put the tokenizer, with the chat template training used, beside the exported model (users
    and downstream stages load one dir) and log it to MLflow."""
    from metamorph.data.chat import jinja_chat_template

    n_visual = int(json.loads((Path(export_dir) / "config.json").read_text())["n_tokens"])
    tokenizer.chat_template = jinja_chat_template(tokenizer, n_visual)
    tokenizer.save_pretrained(export_dir)
    from pipelines.tracking import log_model

    log_model(ctx.tracking, export_dir, name=artifact, model_type="transformers",
              tags={"stage": ctx.stage, "cache_key": ctx.key, "format": "transformers AutoModelForCausalLM"})
