"""train_decoder's Ray Train worker: builds the decoder pipeline, runs the library's loop on its
rank's slice of every batch, logs, draws sample grids, and (rank 0) exports.

    python -m pytest tests/integration/test_train_decoder_stage.py -q -m integration

Launched by ``stages._training.fit`` from ``stages/train_decoder.py``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metamorph.decoder.config import DecoderConfig, DecoderTrainConfig, SamplingConfig
from pipelines.stage import TrackingHandle


@dataclass
class DecoderJob:
    """What each Ray Train worker needs (pickled to the workers; the data rides as an ObjectRef)."""

    decoder: dict[str, Any]
    train: dict[str, Any]
    sampling: dict[str, Any]
    feature_dim: int
    n_tokens: int
    init_seed: int
    data_ref: Any  # ray.ObjectRef -> {"images", "tokens", "grid_images", "grid_tokens"}
    ckpt_dir: str
    export_dir: str
    samples_dir: str
    tracking: TrackingHandle
    torch_threads: int
    log_path: str = ""  # the stage's log file: every worker's stdout/stderr/logging goes there
    progress_path: str = ""  # rank 0 writes steps done / total here for the console


def decoder_worker(job: DecoderJob) -> None:
    """Train on every worker (the process group is up when world size > 1); rank 0 exports."""
    import json
    import logging

    import ray
    import torch
    from ray.train.torch import get_device

    from metamorph.decoder.heldout import reconstruction_grid
    from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
    from metamorph.decoder.train import DecoderData, set_trainable, train_loop, write_export
    from pipelines.logs import write_progress

    log = logging.getLogger("stages.train_decoder")
    torch.set_num_threads(job.torch_threads)
    train_cfg = DecoderTrainConfig(**job.train)
    blob = ray.get(job.data_ref)
    data = DecoderData(images=blob["images"], tokens_BND=torch.from_numpy(blob["tokens"].copy()))  # object-store arrays are read-only
    dec_cfg = DecoderConfig(**job.decoder)
    pipe = MetaMorphDecoderPipeline.from_decoder_config(dec_cfg, feature_dim=job.feature_dim, n_tokens=job.n_tokens,
                                                        sampling=SamplingConfig(**job.sampling), seed=job.init_seed)
    set_trainable(pipe, dec_cfg.train_unet)

    def on_log(metrics: dict[str, float], step: int) -> None:
        job.tracking.log_metrics(metrics, step=step)
        log.info("step %d/%d %s", step, train_cfg.max_steps, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        metric = f"loss={metrics['loss']:.3g}" if "loss" in metrics else ""
        write_progress(job.progress_path, done=step, total=train_cfg.max_steps, unit="steps", metric=metric)

    grid_tokens = torch.from_numpy(blob["grid_tokens"].copy()) if len(blob["grid_images"]) else None

    def on_sample(p: MetaMorphDecoderPipeline, step: int) -> None:
        if grid_tokens is None:
            return
        from PIL import Image

        truths = [Image.open(io.BytesIO(b)).convert("RGB") for b in blob["grid_images"]]
        recons = p(grid_tokens, generator=torch.Generator().manual_seed(0)).images
        path = Path(job.samples_dir) / f"step-{step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        reconstruction_grid(truths, recons).save(path)
        job.tracking.log_artifact(path, "samples")

    res = train_loop(pipe, data, train_cfg, ckpt_dir=Path(job.ckpt_dir), device=get_device(), on_log=on_log, on_sample=on_sample)
    if ray.train.get_context().get_world_rank() == 0:
        write_export(pipe.to("cpu"), Path(job.export_dir), res.stats())
        log.info("export written: %s", json.dumps(res.stats()))
