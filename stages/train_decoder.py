"""`train_decoder`: fine-tune a diffusers UNet to render an image from its N vision tokens.

    python -c "from pipelines.testing import run_stage; from stages.train_decoder import TrainDecoder as S; import ray; ray.init(num_cpus=2); print(run_stage(S(), S.config_cls(), inputs={'curated_generation': 'runs/curate_generation/KEY/curated_generation', 'vision_encoder': 'runs/vision_encoder/KEY/vision_encoder'}, root='/tmp/runs')[1])"

1. Reads the t2i samples of ``curated_generation`` (their response image) and computes each
   image's vision tokens once with the frozen ``vision_encoder`` and its own ``encode_images``
   (the recipe ``tokenize`` uses), so the decoder learns from exactly the tokens the VPiT model
   is trained to predict: in the driver for small sets, on a Ray Data pool of encoder actors
   (GPUs on a cluster) when ``num_encoders > 0``.
2. Trains in a Ray Train ``TorchTrainer`` (fractional CPUs per worker, so it runs beside the LLM
   stages on a small box) with ``metamorph.decoder.train.train_loop``. The loop resumes from the
   newest complete checkpoint under ``{ctx.checkpoint_dir}/loop``: the same path for every
   worker-group restart (``max_failures``) and every rerun of this key (``resumable``). The
   training set travels to the workers through the object store.
3. Rank 0 logs losses to MLflow and, every ``train.sample_every`` steps and at the end, a grid of
   held-out images (odd rows) above their reconstructions from their own tokens (even rows).
   It exports the pipeline (EMA weights) to ``{ctx.checkpoint_dir}/export``; the driver reloads
   it with one ``from_pretrained`` call, saves it as the ``decoder`` artifact and scores held-out
   reconstructions (colour / background agreement, object IoU, token retrieval).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metamorph.decoder.config import DecoderConfig, DecoderTrainConfig, SamplingConfig
from pipelines.stage import Stage, StageConfig, StageContext, TrackingHandle


@dataclass(kw_only=True)
class TrainDecoderConfig(StageConfig):
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    train: DecoderTrainConfig = field(default_factory=DecoderTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # grids, evaluation, export defaults
    max_train_images: Optional[int] = None  # cap on training images (None: every t2i sample)
    # Held-out images reconstructed for the stats (agreement s.e. ~6% at 64) and the final grid.
    # Taken from the ``heldout`` split; if curation wrote none, the last ones of ``train`` are
    # held back instead.
    n_eval: int = 64
    n_grid: int = 16  # held-out pairs in each periodic MLflow grid (each costs one sampling run)
    num_workers: int = 1  # Ray Train workers (DDP); the global batch is split across them
    # CPUs per worker: 0.5 lets this stage share 2 cores with the LLM training stages. The
    # worker uses ``torch_threads`` threads whatever the reservation.
    cpus_per_worker: float = 0.5
    torch_threads: int = 1  # intra-op threads per worker; 1 on a shared box (OpenMP spinning across
    # oversubscribed cores made a tiny UNet step ~50x slower with 2 threads)
    use_gpu: bool = False  # one GPU per worker (NCCL); the CPU path uses gloo
    max_failures: int = 2  # worker-group restarts before the stage fails (each resumes)
    encode_batch_size: int = 64  # images per vision-encoder call
    # Vision tokens of the training images: 0 = computed in the driver process (a few thousand
    # 32 px images take seconds); N > 0 = a Ray Data pool of N encoder actors (cluster: one per
    # GPU; SigLIP so400m on 50k photos is hours on a CPU).
    num_encoders: int = 0
    encoder_cpus: float = 1.0  # CPUs per encoder actor (also its torch threads, min 1)
    encoder_gpus: float = 0.0  # GPUs per encoder actor (0: CPU)

    def __post_init__(self) -> None:
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"train_decoder.max_train_images={self.max_train_images} must be >= 1 or null")
        if self.n_eval < 1 or self.n_grid < 0:
            raise ValueError("train_decoder.n_eval must be >= 1 and train_decoder.n_grid >= 0")
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.torch_threads < 1:
            raise ValueError("train_decoder.num_workers >= 1, cpus_per_worker > 0 and torch_threads >= 1 are required")
        if self.train.batch_size % self.num_workers:
            raise ValueError(
                f"train_decoder.train.batch_size={self.train.batch_size} must be divisible by "
                f"train_decoder.num_workers={self.num_workers}"
            )
        if self.max_failures < 0 or self.encode_batch_size < 1:
            raise ValueError("train_decoder.max_failures must be >= 0 and encode_batch_size >= 1")
        if self.num_encoders < 0 or self.encoder_cpus <= 0 or self.encoder_gpus < 0:
            raise ValueError("train_decoder.num_encoders >= 0, encoder_cpus > 0 and encoder_gpus >= 0 are required")


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


def _worker(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker: its output goes to the stage's log file."""
    from pipelines.logs import capture_output

    job: DecoderJob = config["job"]
    with capture_output(job.log_path):
        _worker_body(job)


def _worker_body(job: DecoderJob) -> None:
    """Train on every worker (the process group is up when world size > 1)."""
    import json
    import logging

    import ray
    import torch
    import torch.distributed as dist
    from ray.train.torch import get_device, prepare_model

    from metamorph.decoder.metrics import image_grid, pair_rows
    from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
    from metamorph.decoder.train import DecoderData, set_trainable, train_loop, write_export
    from pipelines.logs import write_progress

    log = logging.getLogger("stages.train_decoder")
    torch.set_num_threads(job.torch_threads)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dec_cfg = DecoderConfig(**job.decoder)
    train_cfg = DecoderTrainConfig(**job.train)
    sampling = SamplingConfig(**job.sampling)
    blob = ray.get(job.data_ref)
    data = DecoderData(images=blob["images"], tokens_BND=torch.from_numpy(blob["tokens"].copy()))  # object-store arrays are read-only

    pipe = MetaMorphDecoderPipeline.from_decoder_config(
        dec_cfg, feature_dim=job.feature_dim, n_tokens=job.n_tokens, sampling=sampling, seed=job.init_seed
    )
    set_trainable(pipe, dec_cfg.train_unet)
    device = get_device()

    def all_reduce_mean(x: float) -> float:
        if not distributed:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t) / world

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
        image_grid(pair_rows(truths, recons)).save(path)
        job.tracking.log_artifact(path, "samples")

    res = train_loop(
        pipe,
        data,
        train_cfg,
        ckpt_dir=Path(job.ckpt_dir),
        rank=rank,
        world_size=world,
        device=device,
        wrap=prepare_model if distributed else (lambda m: m),
        all_reduce_mean=all_reduce_mean,
        on_log=on_log,
        on_sample=on_sample,
    )
    if rank == 0:
        stats = {
            "first_loss": res.first_loss,
            "final_loss": res.final_loss,
            "steps": res.steps,
            "resumed_from": res.resumed_from,
            "train_seconds": res.seconds,
            "s_per_step": res.seconds / max(1, res.steps - res.resumed_from),
        }
        write_export(pipe.to("cpu"), Path(job.export_dir), stats)
        log.info("export written: %s", json.dumps(stats))


def _t2i_images(curated: Path, split: str, limit: Optional[int]) -> tuple[list[bytes], list[dict]]:
    """The response image of every t2i sample of ``split`` (in shard order), with its meta."""
    from metamorph.data.shards import iter_samples

    images, metas = [], []
    for sample, payloads in iter_samples(curated, split=split):
        if limit is not None and len(images) >= limit:
            break
        if sample.task != "t2i":
            continue
        resp = [b for ref, b in zip(sample.images, payloads) if ref.role == "response"]
        if resp:
            images.append(resp[0])
            metas.append(sample.meta)
    return images, metas


def _encode(encoder, images: list[bytes], batch_size: int):
    """[M, N, D] float16 numpy tokens (fp16: halves the object-store copy; tokens are unit-norm)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for i in range(0, len(images), batch_size):
        ims = [Image.open(io.BytesIO(b)) for b in images[i : i + batch_size]]
        out.append(encoder.encode_images(ims).to(torch.float16).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.n_tokens, encoder.feature_dim), np.float16)


class _EncodeActor:
    """Ray Data actor: the frozen vision encoder on one device; image bytes -> fp16 tokens."""

    def __init__(self, encoder_dir: str, threads: int):
        import torch

        from metamorph.model.vision import VisionEncoder

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = VisionEncoder.from_pretrained(encoder_dir).to(self.device)

    def __call__(self, batch: dict) -> dict:
        tokens = _encode(self.encoder, list(batch["image"]), len(batch["image"]))
        return {"i": batch["i"], "tokens": tokens}


def _encode_ray(encoder_dir: Path, images: list[bytes], cfg: "TrainDecoderConfig"):
    """Like ``_encode``, on a Ray Data pool of ``cfg.num_encoders`` encoder actors."""
    import numpy as np
    import ray

    ds = ray.data.from_items([{"i": i, "image": b} for i, b in enumerate(images)])
    ds = ds.map_batches(
        _EncodeActor,
        fn_constructor_kwargs={"encoder_dir": str(encoder_dir), "threads": int(max(1, cfg.encoder_cpus))},
        batch_size=cfg.encode_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_encoders),
        num_cpus=cfg.encoder_cpus,
        num_gpus=cfg.encoder_gpus,
    )
    order, chunks = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        order.append(batch["i"])
        chunks.append(batch["tokens"])
    tokens = np.concatenate(chunks)
    return tokens[np.argsort(np.concatenate(order))]


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run the driver-side torch work (encoding, evaluation) on ``n`` threads, then restore."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TrainDecoder(Stage):
    name = "train_decoder"
    version = "1"
    inputs = ("curated_generation", "vision_encoder")
    outputs = ("decoder",)
    config_cls = TrainDecoderConfig
    operational = frozenset(
        {
            "num_workers",
            "cpus_per_worker",
            "torch_threads",
            "use_gpu",
            "max_failures",
            "encode_batch_size",
            "num_encoders",
            "encoder_cpus",
            "encoder_gpus",
            "n_grid",
            "train.log_every",
            "train.sample_every",
            "train.checkpoint_every",
            "train.keep_last",
        }
    )
    resumable = True
    description = "diffusion decoder: vision tokens -> image (diffusers UNet, Ray Train)"

    def validate(self, cfg: TrainDecoderConfig) -> None:
        cfg.decoder.check_pretrained()

    def fingerprint(self, cfg: TrainDecoderConfig) -> dict[str, Any]:
        if cfg.decoder.pretrained_path is None:
            return {}
        root = Path(cfg.decoder.pretrained_path)
        return {
            "pretrained": sorted(
                (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")
            )
        }

    def resources(self, cfg: TrainDecoderConfig) -> dict[str, float]:
        # the encoder pool finishes before the worker group starts: the peak is the larger one
        need = {"CPU": max(cfg.num_workers * cfg.cpus_per_worker, cfg.num_encoders * cfg.encoder_cpus)}
        gpus = max(cfg.num_workers if cfg.use_gpu else 0, cfg.num_encoders * cfg.encoder_gpus)
        if gpus:
            need["GPU"] = float(gpus)
        return need

    def run(self, ctx: StageContext) -> dict[str, float]:
        import numpy as np
        import ray
        import torch
        from PIL import Image
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from metamorph.decoder.metrics import image_grid, pair_rows, reconstruction_agreement
        from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
        from metamorph.decoder.train import read_export_stats
        from metamorph.model.vision import VisionEncoder

        cfg: TrainDecoderConfig = ctx.cfg
        t_start = time.perf_counter()
        curated = ctx.input("curated_generation")
        encoder = VisionEncoder.from_pretrained(ctx.input("vision_encoder"))

        train_imgs, train_metas = _t2i_images(curated, "train", cfg.max_train_images)
        held_imgs, held_metas = _t2i_images(curated, "heldout", cfg.n_eval)
        if not held_imgs:  # no heldout split written: hold back the tail of train
            k = min(cfg.n_eval, len(train_imgs) // 10)
            held_imgs, held_metas = train_imgs[len(train_imgs) - k :], train_metas[len(train_metas) - k :]
            train_imgs = train_imgs[: len(train_imgs) - k]
        if not train_imgs or not held_imgs:
            raise ValueError(
                f"train_decoder: {curated} has {len(train_imgs)} train and {len(held_imgs)} held-out t2i images; "
                "needs at least one of each (is curate_generation's source empty?)"
            )
        with _torch_threads(cfg.torch_threads):
            if cfg.num_encoders:
                both = _encode_ray(ctx.input("vision_encoder"), train_imgs + held_imgs, cfg)
                train_tok, held_tok = both[: len(train_imgs)], both[len(train_imgs) :]
            else:
                train_tok = _encode(encoder, train_imgs, cfg.encode_batch_size)
                held_tok = _encode(encoder, held_imgs, cfg.encode_batch_size)
        encode_seconds = time.perf_counter() - t_start
        n_grid = min(cfg.n_grid, len(held_imgs))
        blob = {
            "images": train_imgs,
            "tokens": train_tok,
            "grid_images": held_imgs[:n_grid],
            "grid_tokens": held_tok[:n_grid],
        }

        ckpt_dir = Path(ctx.checkpoint_dir).resolve()
        export_dir = ckpt_dir / "export"
        stats = read_export_stats(export_dir)
        if stats is None or stats.get("steps") != cfg.train.max_steps:
            train_cfg = dataclasses.replace(cfg.train, seed=cfg.train.seed + ctx.seed)
            job = DecoderJob(
                decoder=dataclasses.asdict(cfg.decoder),
                train=dataclasses.asdict(train_cfg),
                sampling=dataclasses.asdict(cfg.sampling),
                feature_dim=encoder.feature_dim,
                n_tokens=encoder.n_tokens,
                init_seed=ctx.seed,
                data_ref=ray.put(blob),
                ckpt_dir=str(ckpt_dir / "loop"),
                export_dir=str(export_dir),
                samples_dir=str(ckpt_dir / "samples"),
                tracking=ctx.tracking,
                torch_threads=cfg.torch_threads,
                log_path=str(ctx.log_path or ""),
                progress_path=str(ctx.progress_path or ""),
            )
            resources = {"CPU": cfg.cpus_per_worker}
            if cfg.use_gpu:
                resources["GPU"] = 1.0
            trainer = TorchTrainer(
                _worker,
                train_loop_config={"job": job},
                torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
                scaling_config=ScalingConfig(
                    num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
                ),
                run_config=RunConfig(
                    name=f"{ctx.stage}-{ctx.key}",
                    storage_path=str(ckpt_dir / "ray"),
                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                ),
            )
            from pipelines.tracking import system_metrics

            with system_metrics(ctx.tracking):  # this host's CPU/memory (and GPU) while the workers train
                trainer.fit()  # raises once max_failures restarts are spent
            stats = read_export_stats(export_dir)
            if stats is None:
                raise RuntimeError(f"train_decoder: training finished without a complete export in {export_dir}")

        # the artifact is whatever one from_pretrained call gives back: reload, then save
        pipe = MetaMorphDecoderPipeline.from_pretrained(export_dir)
        pipe.set_progress_bar_config(disable=True)
        out = ctx.output("decoder")
        pipe.save_pretrained(out, safe_serialization=True)
        from pipelines.tracking import log_model

        log_model(ctx.tracking, out, name="decoder", model_type="diffusers",
                  tags={"stage": ctx.stage, "cache_key": ctx.key, "format": "diffusers DiffusionPipeline"})

        # held-out reconstructions from their own tokens
        t_eval = time.perf_counter()
        with _torch_threads(cfg.torch_threads):
            held_tok_t = torch.from_numpy(held_tok).float()
            recons = []
            for i in range(0, len(held_imgs), cfg.encode_batch_size):
                recons += pipe(
                    held_tok_t[i : i + cfg.encode_batch_size], generator=torch.Generator().manual_seed(ctx.seed + i)
                ).images
            truths = [Image.open(io.BytesIO(b)).convert("RGB") for b in held_imgs]
            agree = reconstruction_agreement(truths, recons, held_metas)
            # does a reconstruction re-encode closest to its own source's tokens? (chance 1/n)
            rec_tok = encoder.encode_images(recons).float()
            sim = torch.einsum("ind,jnd->ij", rec_tok, held_tok_t) / rec_tok.shape[1]
            agree["token_retrieval_acc"] = float((sim.argmax(dim=1) == torch.arange(len(recons))).float().mean())
            agree["token_cosine"] = float(sim.diagonal().mean())
        samples = ckpt_dir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        image_grid(pair_rows(truths[:32], recons[:32])).save(samples / "heldout_final.png")
        ctx.log_artifact(samples / "heldout_final.png", "samples")

        result = {k: float(v) for k, v in stats.items()}
        result.update(agree)
        result.update(
            {
                "n_train": float(len(train_imgs)),
                "n_heldout": float(len(held_imgs)),
                "encode_seconds": encode_seconds,
                "eval_seconds": time.perf_counter() - t_eval,
                "n_params_unet": float(sum(p.numel() for p in pipe.unet.parameters())),
                "n_params_conditioner": float(sum(p.numel() for p in pipe.conditioner.parameters())),
                "stage_seconds": time.perf_counter() - t_start,
            }
        )
        ctx.log_metrics(agree)
        return result
