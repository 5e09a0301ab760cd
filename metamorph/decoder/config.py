"""Configuration of the diffusion decoder (vision tokens -> image) and how to sample from it.

    python -c "from metamorph.decoder.config import DecoderConfig; print(DecoderConfig())"

Two regimes, chosen by ``pretrained_path``:

* ``None`` (smoke/tiny): a small ``UNet2DConditionModel`` built from the fields below, in pixel
  space. With ``pixel_patch = p`` the UNet sees each p x p pixel patch as 3*p*p channels
  (``pixel_unshuffle``): a lossless reshaping, so noise and loss are still per pixel, but the
  UNet's grid is p times smaller; on 2 CPU cores a 32 px UNet with p=2 steps ~4x faster than
  with p=1 (measured 0.11 vs 0.30-0.8 s at batch 32), mostly because attention at 32x32 is
  16x dearer than at 8x8.
* a path (cluster): Stable Diffusion 1.5 in diffusers layout (``unet/``, ``vae/``,
  ``scheduler/``), latent space; the UNet fine-tuned or frozen (``train_unet``), the vision
  tokens zero-padded to SD's 77-token context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# ``metamorph.fields.operational()`` spelled out: this file is also saved into every decoder export
# as remote code, which imports nothing of metamorph (metamorph.fields checks the key's spelling)
_OPERATIONAL = {"operational": True}

SAMPLERS = ("ddim", "dpm")  # DDIMScheduler, DPMSolverMultistepScheduler
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _default_blocks() -> list[int]:
    return [32, 64, 64]


@dataclass(kw_only=True)
class DecoderConfig:
    # Stable Diffusion 1.5 dir in diffusers layout (unet/, vae/, scheduler/ subdirs), latent space.
    # None: a pixel-space UNet built from the fields below (nothing downloaded).
    pretrained_path: Optional[str] = None
    # Fine-tune the pretrained UNet (True) or freeze it and train the conditioner alone (False:
    # ~3x cheaper per step and no UNet optimizer state, but the UNet's cross-attention keeps its
    # CLIP-text expectations and reconstructions are looser). Pixel-space UNets always train.
    train_unet: bool = True
    # Rendered image side in px. Pixel space: the UNet's canvas (the toy world renders 32 px).
    # Latent space: 512 for SD 1.5 (a 64x64x4 latent); training images are resized to it.
    image_size: int = 32
    # Pixel space: side of the pixel patch folded into channels (1 = plain pixels). image_size
    # must be divisible by pixel_patch * 2**(levels-1).
    pixel_patch: int = 2
    # UNet width per resolution level (pixel space); each level halves the grid. More levels or
    # wider blocks learn shape detail faster per step but cost time roughly with width**2.
    block_out_channels: list[int] = field(default_factory=_default_blocks)
    layers_per_block: int = 1  # resnet (+ attention) layers per level (SD: 2)
    # Levels below this index are plain conv blocks; from it on, blocks cross-attend to the
    # condition. Attention cost grows with grid area**2, so the full-resolution level skips it.
    cross_attn_from_level: int = 1
    cross_attention_dim: int = 64  # context width C the conditioner maps tokens to (SD: 768)
    attention_heads: int = 4  # heads per cross-attention layer (must divide the block widths)
    norm_num_groups: int = 8  # GroupNorm groups (must divide every block width)
    # Context length the UNet attends to: the N vision tokens are zero-padded to it. None: N
    # (no padding). SD 1.5 was trained on 77 CLIP text tokens; the paper pads to 77 there.
    # Pixel space: also add the attention-pooled context to the UNet's timestep embedding
    # (diffusers' addition_embed_type="text"), so the condition modulates every resnet block,
    # not only the cross-attention levels. Measured on the tiny preset: with cross-attention
    # alone a 600-step UNet ignored its tokens (noise MSE with the true, zeroed and shuffled
    # tokens equal to 3 digits) and sampled grey mean images. The zero condition still maps to
    # one fixed embedding, so it stays the unconditional branch.
    pooled_condition: bool = True
    # Pixel space: also give each pixel the context of its own token-grid cell as UNet input
    # channels (see VisionConditioner.unet_input). Not in the paper, whose SD UNet learned where
    # things go from captions at scale; a small UNet trained for minutes ignores object colour and
    # position without it (tiny preset, 1500 steps: object colour agreement 0.16 -> 0.55, object
    # IoU 0.03 -> 0.31). A pretrained (SD) UNet keeps its 4 input channels: ignored there.
    spatial_condition: bool = True
    context_length: Optional[int] = None
    cond_hidden_dim: Optional[int] = None  # conditioner MLP hidden width; None: context width (SD: 2048)
    # Conditioner layout (metamorph.decoder.conditioning): "official", the MetaMorph code's
    # Linear-LayerNorm-ReLU-Linear-LayerNorm, or "mlp" (Linear-GELU-Linear, no output norm; exports
    # made before the official layout). The output LayerNorm also matters for a small pixel UNet:
    # it puts the context (and the spatial channels) at unit scale, where mlp's sat at ~0.02
    # (tiny preset, 600 steps: judged colour of reconstructions 0.23 -> 0.51 with official).
    conditioner: str = "official"
    # DDPM training schedule (pixel space; a pretrained model brings its own). The default is SD
    # 1.5's (scaled_linear, 0.00085..0.012: alpha_bar_T = 0.0047). Schedules that end at
    # alpha_bar_T ~ 0 (cosine, or linear 1e-4..0.02) make an epsilon model's first sampling steps
    # divide its error by sqrt(alpha_bar_T) (measured on the tiny preset: DDIM and DPM-Solver
    # samples stayed noise). The signal left at T is what noise_offset is for (train section).
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # What the UNet predicts: "epsilon" (the paper; SD 1.5) or "v_prediction". Pixel space only:
    # a pretrained UNet keeps its checkpoint's target. The pixel-space default is v with a zero
    # terminal SNR (below): measured on the tiny preset (1500 steps, held-out reconstructions from
    # their own tokens), epsilon on SD's schedule sampled noise (background agreement 0.28, i.e.
    # chance) while v + zero SNR got every background right (1.00). "sample" (x0) predicts the
    # clean image itself: its samples are clean where v's keep residual grain after a few hundred
    # steps (the tiny preset's choice, with train.edge_weight; figures there).
    prediction_type: str = "v_prediction"
    # Rescale the betas so alpha_bar_T = 0 (Lin et al. 2024, "Common Diffusion Noise Schedules
    # and Sample Steps are Flawed") and sample from T ("trailing" spacing). With alpha_bar_T > 0
    # the UNet learns to read an image's mean colour off x_T, then gets none from pure noise at
    # sampling and renders mid-grey backgrounds. Needs v_prediction (epsilon is undefined at T).
    zero_terminal_snr: bool = True

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"decoder.image_size={self.image_size} must be > 0")
        if self.context_length is not None and self.context_length <= 0:
            raise ValueError(f"decoder.context_length={self.context_length} must be > 0 or null")
        if self.cond_hidden_dim is not None and self.cond_hidden_dim <= 0:
            raise ValueError(f"decoder.cond_hidden_dim={self.cond_hidden_dim} must be > 0 or null")
        if self.conditioner not in ("official", "mlp"):
            raise ValueError(f"decoder.conditioner={self.conditioner!r} must be 'official' or 'mlp'")
        if self.pretrained_path is not None:
            return  # the architecture comes from the checkpoint
        if self.pixel_patch < 1:
            raise ValueError(f"decoder.pixel_patch={self.pixel_patch} must be >= 1")
        if not self.block_out_channels or min(self.block_out_channels) <= 0:
            raise ValueError("decoder.block_out_channels must be a non-empty list of positive widths")
        levels = len(self.block_out_channels)
        grid_div = self.pixel_patch * 2 ** (levels - 1)
        if self.image_size % grid_div:
            raise ValueError(
                f"decoder.image_size={self.image_size} must be divisible by pixel_patch * 2**(levels-1) "
                f"= {grid_div}; change image_size, pixel_patch or block_out_channels"
            )
        if self.block_out_channels[0] < 3 * self.pixel_patch**2:
            raise ValueError(
                f"decoder.block_out_channels[0]={self.block_out_channels[0]} must be >= 3 * pixel_patch**2 = "
                f"{3 * self.pixel_patch ** 2}: narrower, the first level cannot carry the per-pixel noise "
                "(measured: loss stalls at ~0.4)"
            )
        if not 0 <= self.cross_attn_from_level < levels:
            raise ValueError(
                f"decoder.cross_attn_from_level={self.cross_attn_from_level} must be in [0, {levels - 1}] "
                "(at least one level must cross-attend to the condition)"
            )
        for w in self.block_out_channels:
            if w % self.norm_num_groups:
                raise ValueError(f"decoder.norm_num_groups={self.norm_num_groups} must divide every block width ({w})")
            if w % self.attention_heads:
                raise ValueError(f"decoder.attention_heads={self.attention_heads} must divide every block width ({w})")
        if self.layers_per_block < 1 or self.cross_attention_dim <= 0:
            raise ValueError("decoder.layers_per_block must be >= 1 and decoder.cross_attention_dim > 0")
        if self.num_train_timesteps < 2:
            raise ValueError(f"decoder.num_train_timesteps={self.num_train_timesteps} must be >= 2")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"decoder.beta_start={self.beta_start} / beta_end={self.beta_end} need 0 < start < end < 1")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"decoder.prediction_type={self.prediction_type!r} must be one of {PREDICTION_TYPES}")
        if self.zero_terminal_snr and self.prediction_type == "epsilon":
            raise ValueError("decoder.zero_terminal_snr needs decoder.prediction_type v_prediction or sample "
                             "(epsilon is undefined where alpha_bar = 0)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"decoder.beta_schedule={self.beta_schedule!r} must be one of {BETA_SCHEDULES}")

    @property
    def latent(self) -> bool:
        return self.pretrained_path is not None

    def check_pretrained(self) -> None:
        """Raise if the pretrained dir lacks a diffusers component (cheap; no weights loaded)."""
        if self.pretrained_path is None:
            return
        root = Path(self.pretrained_path)
        missing = [d for d in ("unet", "vae", "scheduler") if not (root / d).is_dir()]
        if missing:
            raise ValueError(
                f"decoder.pretrained_path={root} lacks {missing}: point it at a Stable Diffusion 1.5 "
                "dir in diffusers layout (unet/, vae/, scheduler/)"
            )


@dataclass(kw_only=True)
class SamplingConfig:
    """How reconstructions are sampled (training grids, held-out evaluation, the export's defaults)."""

    # Classifier-free guidance against the all-zero condition; 1 = conditional only. The paper
    # sweeps 6-12.5 with SD 1.5 (the cluster preset: 7.5). A small pixel UNet trained for minutes
    # has a weak unconditional branch (10% of its steps): at 3 the tiny preset's samples lost
    # their backgrounds (agreement 1.00 -> 0.23), so the default is off.
    guidance_scale: float = 1.0
    num_inference_steps: int = 25  # denoising steps (paper: 50); DPM-Solver needs fewer than DDIM
    sampler: str = "ddim"  # "ddim" (DDIMScheduler) or "dpm" (DPMSolverMultistepScheduler)

    def __post_init__(self) -> None:
        if self.guidance_scale < 0:
            raise ValueError(f"sampling.guidance_scale={self.guidance_scale} must be >= 0 (1 = no guidance)")
        if self.num_inference_steps < 1:
            raise ValueError(f"sampling.num_inference_steps={self.num_inference_steps} must be >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampling.sampler={self.sampler!r} must be one of {SAMPLERS}")


LR_SCHEDULES = ("constant", "cosine")


@dataclass(kw_only=True)
class DecoderTrainConfig:
    max_steps: int = 1500  # optimizer steps (~0.22 s each on 1 CPU thread at batch 32, tiny's UNet)
    batch_size: int = 32  # global batch, split evenly across workers (paper-scale SD fine-tunes use 256+)
    lr: float = 2e-3  # peak AdamW LR; a from-scratch pixel UNet this small tolerates 2e-3 (with
    # Min-SNR weighting: clean samples in 1500 steps where 1e-3 unweighted left grain); SD 1.5 wants ~1e-5
    weight_decay: float = 0.01  # AdamW decoupled decay, the official decoder script's (and diffusers')
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 50  # linear LR warmup from ~0; guards the first steps of a fresh UNet
    lr_schedule: str = "constant"  # after warmup: "constant" (SD fine-tuning) or "cosine" to 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    # Probability of zeroing a sample's whole condition. The paper's script uses 0.8 with SD 1.5
    # fine-tuned on millions of images; on a few hundred steps that wastes 80% of the signal that
    # teaches the UNet to follow the tokens, so the default keeps the classic 0.1: enough
    # unconditional samples for guidance, most steps conditional.
    cfg_prob: float = 0.1
    # Per-sample, per-channel constant added to the noise (x noise_offset); 0.05-0.1 lets SD render
    # very dark/bright images. 0 = plain DDPM.
    noise_offset: float = 0.0
    # Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma): each sample's
    # epsilon-MSE is scaled by min(SNR(t), gamma) / SNR(t) (v-MSE by min(SNR+1, gamma) / (SNR+1)),
    # which damps the low-noise steps whose large, unhelpful loss otherwise dominates the gradient. None = plain, unweighted MSE (the
    # paper's; the cluster preset). Default 5 (the paper's gamma): on the tiny preset the samples
    # lost their residual grain at the same step count.
    snr_gamma: Optional[float] = 5.0
    # Pixel space: weight each pixel's loss by 1 + edge_weight * (its edge magnitude in the clean
    # image, in [0, 1]), renormalised to mean 1, so the few pixels that outline a shape count more
    # than flat background (a one-object 32 px scene: ~10% of pixels carry the outline, and with
    # plain MSE a few hundred steps draw right-coloured blobs of no shape). 0 = plain per-pixel MSE.
    edge_weight: float = 0.0
    # EMA of the trained weights, exported instead of the raw ones; 0 disables. The decay warms
    # up as 1 - (1 + step)**-ema_power (capped at ema_decay): with 0.75 it is ~0.99 after 500
    # steps, so a short run's EMA averages its last ~100 steps rather than its random start.
    ema_decay: float = 0.999
    ema_power: float = 0.75
    bf16: bool = False  # bf16 autocast for the UNet on CUDA (ignored on CPU)
    checkpoint_every: int = field(default=200, metadata=_OPERATIONAL)  # steps between checkpoints (0: only at the end)
    keep_last: int = field(default=2, metadata=_OPERATIONAL)  # complete checkpoints kept (older ones are deleted)
    log_every: int = field(default=20, metadata=_OPERATIONAL)  # steps between loss logs
    sample_every: int = field(default=0, metadata=_OPERATIONAL)  # steps between sample grids (0: only at the end); costs one sampling run
    seed: int = 0  # data order, noise, condition drops (the UNet init uses the stage seed)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"train.max_steps={self.max_steps} must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size={self.batch_size} must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("train.lr must be > 0 and train.weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        if self.warmup_steps < 0:
            raise ValueError(f"train.warmup_steps={self.warmup_steps} must be >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if not 0 <= self.cfg_prob < 1:
            raise ValueError(f"train.cfg_prob={self.cfg_prob} must be in [0, 1) (1 would never see a condition)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"train.snr_gamma={self.snr_gamma} must be > 0 or null (null: unweighted)")
        if self.noise_offset < 0 or self.grad_clip < 0 or self.edge_weight < 0:
            raise ValueError("train.noise_offset, train.grad_clip and train.edge_weight must be >= 0")
        if not 0 <= self.ema_decay < 1 or self.ema_power <= 0:
            raise ValueError("train.ema_decay must be in [0, 1) (0 = off) and train.ema_power > 0")
        for key in ("checkpoint_every", "sample_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key} must be >= 0 (0 = only at the end)")
        if self.keep_last < 1 or self.log_every < 1:
            raise ValueError("train.keep_last and train.log_every must be >= 1")
