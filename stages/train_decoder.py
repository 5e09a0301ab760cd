"""`train_decoder`: fine-tune a diffusers UNet to render an image from its N vision tokens.

    python -c "from pipelines.testing import run_stage; from stages.train_decoder import TrainDecoder as S; import ray; ray.init(num_cpus=2); print(run_stage(S(), S.config_cls(), inputs={'curated_generation': 'runs/curate_generation/KEY/curated_generation', 'vision_encoder': 'runs/vision_encoder/KEY/vision_encoder'}, root='/tmp/runs')[1])"

1. Reads the t2i samples of ``curated_generation`` (``metamorph.decoder.heldout``) and computes
   each image's vision tokens once with the frozen ``vision_encoder`` (the recipe ``tokenize``
   uses), so the decoder learns from exactly the tokens the VPiT model is trained to predict: in
   the driver for small sets, on the shared Ray Data encoder pool (``stages._encoders``, GPUs on
   a cluster) when ``num_encoders > 0``.
2. Trains with the one Ray Train launcher (``_training.fit``; fractional CPUs per worker, so it
   runs beside the LLM stages on a small box): each worker (``stages._decoder.decoder_worker``)
   runs ``metamorph.decoder.train.train_loop``,
   which resumes from the newest complete checkpoint under ``{ctx.checkpoint_dir}/loop``: the
   same path for every worker-group restart and every rerun of this key (``resumable``). The
   training set travels to the workers through the object store.
3. Rank 0 logs losses to MLflow and, every ``train.sample_every`` steps and at the end, a grid of
   held-out images (odd rows) above their reconstructions from their own tokens (even rows).
   It exports the pipeline (EMA weights) to ``{ctx.checkpoint_dir}/export``; the driver reloads
   it with one ``from_pretrained`` call, saves it as the ``decoder`` artifact and scores held-out
   reconstructions (``metamorph.decoder.heldout.heldout_metrics``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metamorph.decoder.config import DecoderConfig, DecoderTrainConfig, SamplingConfig
from pipelines.stage import Stage, StageConfig, StageContext, operational
from stages import _training
from stages._decoder import DecoderJob, decoder_worker


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
    n_grid: int = field(default=16, metadata=operational())  # held-out pairs per periodic MLflow grid (one sampling run each)
    # Ray Train workers (DDP; the global batch train.batch_size is split across them, so the
    # result does not depend on their number). 0.5 CPU each lets this stage share 2 cores with
    # the LLM training stages; the worker uses ``torch_threads`` threads whatever the reservation.
    scaling: _training.Scaling = field(default_factory=lambda: _training.Scaling(num_workers=1), metadata=operational())
    # intra-op threads per worker; 1 on a shared box (OpenMP spinning across oversubscribed cores
    # made a tiny UNet step ~50x slower with 2 threads)
    torch_threads: int = field(default=1, metadata=operational())
    encode_batch_size: int = field(default=64, metadata=operational())  # images per vision-encoder call
    # Vision tokens of the training images: 0 = computed in the driver process (a few thousand
    # 32 px images take seconds); N > 0 = the shared Ray Data pool of N encoder actors (cluster:
    # one per GPU; SigLIP so400m on 50k photos is hours on a CPU).
    num_encoders: int = field(default=0, metadata=operational())
    encoder_cpus: float = field(default=1.0, metadata=operational())  # CPUs per encoder actor (also its torch threads, min 1)
    encoder_gpus: float = field(default=0.0, metadata=operational())  # GPUs per encoder actor (0: CPU)

    def __post_init__(self) -> None:
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(f"train_decoder.max_train_images={self.max_train_images} must be >= 1 or null")
        if self.n_eval < 1 or self.n_grid < 0 or self.torch_threads < 1:
            raise ValueError("train_decoder.n_eval >= 1, n_grid >= 0 and torch_threads >= 1 are required")
        if self.train.batch_size % self.scaling.num_workers:
            raise ValueError(f"train_decoder.train.batch_size={self.train.batch_size} must be divisible by "
                             f"train_decoder.scaling.num_workers={self.scaling.num_workers}")
        if self.train.cfg_prob == 0 and self.sampling.guidance_scale != 1:
            raise ValueError(f"train_decoder.sampling.guidance_scale={self.sampling.guidance_scale} needs an unconditional "
                             "branch: set train_decoder.train.cfg_prob > 0 (e.g. 0.1) or guidance_scale 1")
        if self.encode_batch_size < 1 or self.num_encoders < 0 or self.encoder_cpus <= 0 or self.encoder_gpus < 0:
            raise ValueError("train_decoder: encode_batch_size >= 1, num_encoders >= 0, encoder_cpus > 0 and "
                             "encoder_gpus >= 0 are required")


class TrainDecoder(Stage):
    name = "train_decoder"
    version = "2"  # 2: v-prediction Min-SNR weight min(snr+1, g)/(snr+1) (metamorph/decoder/train.py)
    inputs = ("curated_generation", "vision_encoder")
    outputs = ("decoder",)
    config_cls = TrainDecoderConfig
    resumable = True
    description = "diffusion decoder: vision tokens -> image (diffusers UNet, Ray Train)"

    def validate(self, cfg: TrainDecoderConfig) -> None:
        cfg.decoder.check_pretrained()

    def fingerprint(self, cfg: TrainDecoderConfig) -> dict[str, Any]:
        if cfg.decoder.pretrained_path is None:
            return {}
        root = Path(cfg.decoder.pretrained_path)
        return {"pretrained": sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                                     if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))}

    def resources(self, cfg: TrainDecoderConfig) -> dict[str, float]:
        # the encoder pool finishes before the worker group starts: the peak is the larger one
        group = cfg.scaling.resources()
        need = {"CPU": max(group["CPU"], cfg.num_encoders * cfg.encoder_cpus)}
        gpus = max(group.get("GPU", 0.0), cfg.num_encoders * cfg.encoder_gpus)
        return need | ({"GPU": float(gpus)} if gpus else {})

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        from metamorph.decoder.heldout import encode_tokens, heldout_metrics, reconstruction_grid, train_and_heldout
        from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
        from metamorph.decoder.train import read_export_stats
        from metamorph.model.vision import VisionEncoder
        from metamorph.threads import torch_threads
        from pipelines.tracking import log_model
        from stages._encoders import encode_images_on_pool

        cfg: TrainDecoderConfig = ctx.cfg
        t_start = time.perf_counter()
        encoder = VisionEncoder.from_pretrained(ctx.input("vision_encoder"))
        train_imgs, _, held_imgs, held_metas = train_and_heldout(ctx.input("curated_generation"), cfg.max_train_images, cfg.n_eval)
        with torch_threads(cfg.torch_threads):
            if cfg.num_encoders:
                both = encode_images_on_pool(train_imgs + held_imgs, str(ctx.input("vision_encoder")), n_tokens=encoder.n_tokens,
                                             feature_dim=encoder.feature_dim, num_encoders=cfg.num_encoders, cpus=cfg.encoder_cpus,
                                             gpus=cfg.encoder_gpus, batch_size=cfg.encode_batch_size)
                train_tok, held_tok = both[: len(train_imgs)], both[len(train_imgs) :]
            else:
                train_tok = encode_tokens(encoder, train_imgs, cfg.encode_batch_size)
                held_tok = encode_tokens(encoder, held_imgs, cfg.encode_batch_size)
        encode_seconds = time.perf_counter() - t_start
        n_grid = min(cfg.n_grid, len(held_imgs))
        blob = {"images": train_imgs, "tokens": train_tok, "grid_images": held_imgs[:n_grid], "grid_tokens": held_tok[:n_grid]}

        ckpt_dir = Path(ctx.checkpoint_dir).resolve()
        export_dir = ckpt_dir / "export"
        stats = read_export_stats(export_dir)
        if stats is None or stats.get("steps") != cfg.train.max_steps:
            job = DecoderJob(
                decoder=dataclasses.asdict(cfg.decoder),
                train=dataclasses.asdict(dataclasses.replace(cfg.train, seed=cfg.train.seed + ctx.seed)),
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
            _training.fit(ctx, decoder_worker, job, cfg.scaling)
            stats = read_export_stats(export_dir)
            if stats is None:
                raise RuntimeError(f"train_decoder: training finished without a complete export in {export_dir}")

        # the artifact is whatever one from_pretrained call gives back: reload, then save
        pipe = MetaMorphDecoderPipeline.from_pretrained(export_dir)
        pipe.set_progress_bar_config(disable=True)
        out = ctx.output("decoder")
        pipe.save_pretrained(out, safe_serialization=True)
        log_model(ctx.tracking, out, name="decoder", model_type="diffusers",
                  tags={"stage": ctx.stage, "cache_key": ctx.key, "format": "diffusers DiffusionPipeline"})

        t_eval = time.perf_counter()
        with torch_threads(cfg.torch_threads):
            agree, truths, recons = heldout_metrics(pipe, encoder, held_imgs, held_metas, held_tok, cfg.encode_batch_size, ctx.seed)
        samples = ckpt_dir / "samples"
        samples.mkdir(parents=True, exist_ok=True)
        reconstruction_grid(truths[:32], recons[:32]).save(samples / "heldout_final.png")
        ctx.log_artifact(samples / "heldout_final.png", "samples")

        result = {k: float(v) for k, v in stats.items()} | agree
        result.update(n_train=float(len(train_imgs)), n_heldout=float(len(held_imgs)), encode_seconds=encode_seconds,
                      eval_seconds=time.perf_counter() - t_eval,
                      n_params_unet=float(sum(p.numel() for p in pipe.unet.parameters())),
                      n_params_conditioner=float(sum(p.numel() for p in pipe.conditioner.parameters())),
                      stage_seconds=time.perf_counter() - t_start)
        ctx.log_metrics(agree)
        return result
