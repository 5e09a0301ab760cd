"""The LLM training stages' Ray Train worker (train_connector, train_vpit) and what they publish.

    python -m pytest tests/integration/test_training_stages.py -q -m integration

``fit_llm`` launches ``llm_worker`` with the one launcher (``stages._training.fit``): each worker
runs ``metamorph.train.loop.train_loop`` over its slice of the tokenized shards. Ray Train gets
each log window's metrics through ``ray.train.report`` (metrics only: the checkpoints already
live on storage every worker sees, so Ray need not copy them) and the run's stats in a last
report (with a tiny checkpoint holding them: Ray hands metrics to the driver only with a
checkpoint).

Every worker records ``{pid, hostname, rank, attempt start}`` in ``{ctx.checkpoint_dir}/workers/``
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
from pipelines.logs import write_progress
from pipelines.stage import StageContext, TrackingHandle
from stages._training import Scaling, fit

log = logging.getLogger(__name__)


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

    t_start = time.time()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(**job.train)
    # one intra-op thread per reserved CPU: more would oversubscribe the cores other workers hold
    torch.set_num_threads(max(1, int(job.cpus_per_worker)))
    _record_worker(Path(job.workers_dir), rank)

    model = job.build_model()
    t_model = time.time()
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
    if rank == 0:  # where a stage's start-up goes (Ray Train's worker group start is before t_start)
        log.info("worker ready %.1fs after its function started: model built in %.1fs, shards opened in %.1fs",
                 time.time() - t_start, t_model - t_start, time.time() - t_model)
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
    the loop's stats. ``loss_args``: the loss's arguments set by the stage (``vision_coef``); the
    forward never returns logits here (the loop reads only the losses: the LM head then runs on the
    labelled positions alone, ~5% of a tiny-preset step)."""
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
        loss_args={"return_logits": False, **(loss_args or {})},
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
