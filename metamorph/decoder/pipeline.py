"""The exported decoder: a diffusers ``DiffusionPipeline`` that renders images from vision tokens.

    python -m metamorph.decoder.pipeline     # builds the tiny pipeline, round-trips it, samples 2 images

Use::

    pipe = MetaMorphDecoderPipeline.from_pretrained("runs/train_decoder/KEY/decoder")
    tokens = VisionEncoder.from_pretrained(enc_dir).encode_images([img])   # or VPiT's predicted tokens
    images = pipe(tokens, guidance_scale=3.0, num_inference_steps=25, sampler="dpm",
                  generator=torch.Generator().manual_seed(0)).images        # list of PIL images

Registered modules: ``unet`` (UNet2DConditionModel), ``conditioner`` (VisionConditioner: a
diffusers ModelMixin, so it saves/loads as safetensors like the UNet), ``scheduler`` (the DDPM
training schedule; DDIM / DPM-Solver samplers are built from its config per call) and, in latent
space, ``vae`` (AutoencoderKL). Pipeline config (model_index.json): ``pixel_patch``,
``image_size`` and the default sampling settings the decoder was evaluated with.

Classifier-free guidance: eps = eps(zero condition) + g * (eps(tokens) - eps(zero condition));
``guidance_scale = 1`` runs the conditional branch alone.

Tensor names: B batch, N tokens, D token dim, L context length, C channels (model space), H/W
model-space grid, S image side in px.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    ImagePipelineOutput,
    UNet2DConditionModel,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

# relative imports only: this file, conditioning.py and config.py are saved into every export as
# the pipeline's remote code (DiffusionPipeline.from_pretrained(dir, trust_remote_code=True))
from .conditioning import VisionConditioner
from .config import SAMPLERS, DecoderConfig, SamplingConfig

# model_index.json entries of an export: module files saved beside it, as diffusers custom
# pipelines and components are (the pipeline file at the root, the conditioner's in its folder)
REMOTE_PIPELINE = "pipeline"
REMOTE_CONDITIONER = "conditioning"


def make_sampler(name: str, train_scheduler_config) -> Union[DDIMScheduler, DPMSolverMultistepScheduler]:
    """A fresh sampling scheduler sharing the training schedule (betas, spacing, clipping)."""
    if name == "ddim":
        return DDIMScheduler.from_config(train_scheduler_config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(train_scheduler_config)
    raise ValueError(f"sampler={name!r} must be one of {SAMPLERS}")


class MetaMorphDecoderPipeline(DiffusionPipeline):
    """Vision tokens [B, N, D] -> images, with classifier-free guidance against the zero condition."""

    model_cpu_offload_seq = "conditioner->unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        conditioner: VisionConditioner,
        scheduler: DDPMScheduler,
        vae: Optional[AutoencoderKL] = None,
        pixel_patch: int = 1,
        image_size: int = 32,
        guidance_scale: float = 3.0,
        num_inference_steps: int = 25,
        sampler: str = "ddim",
    ):
        super().__init__()
        self.register_modules(unet=unet, conditioner=conditioner, scheduler=scheduler, vae=vae)
        self.register_to_config(
            pixel_patch=int(pixel_patch),
            image_size=int(image_size),
            guidance_scale=float(guidance_scale),
            num_inference_steps=int(num_inference_steps),
            sampler=str(sampler),
        )
        self.set_progress_bar_config(disable=True)  # callers opt in; training grids stay quiet

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_decoder_config(
        cls,
        cfg: DecoderConfig,
        *,
        feature_dim: int,
        n_tokens: int,
        sampling: Optional[SamplingConfig] = None,
        seed: int = 0,
    ) -> "MetaMorphDecoderPipeline":
        """Build the (untrained) pipeline: a pixel UNet from ``cfg``, or SD 1.5 from its path."""
        sampling = sampling or SamplingConfig()
        # fork_rng: initialising with our seed must not disturb the caller's RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if cfg.pretrained_path is None:
                unet, vae, scheduler = _build_pixel_components(cfg)
                pixel_patch = cfg.pixel_patch
            else:
                cfg.check_pretrained()
                unet = UNet2DConditionModel.from_pretrained(cfg.pretrained_path, subfolder="unet")
                vae = AutoencoderKL.from_pretrained(cfg.pretrained_path, subfolder="vae")
                # SD ships a PNDM config; training needs DDPM's add_noise on the same betas (and
                # the checkpoint's prediction type: epsilon for SD 1.5)
                scheduler = DDPMScheduler.from_pretrained(cfg.pretrained_path, subfolder="scheduler")
                pixel_patch = 1
            ctx_len = cfg.context_length or n_tokens
            width = int(unet.config.cross_attention_dim)
            conditioner = VisionConditioner(
                feature_dim=feature_dim,
                n_tokens=n_tokens,
                cross_attention_dim=width,
                context_length=ctx_len,
                hidden_dim=cfg.cond_hidden_dim or width,
                spatial=cfg.spatial_condition and cfg.pretrained_path is None,
                layout=cfg.conditioner,
            )
        return cls(
            unet=unet,
            conditioner=conditioner,
            scheduler=scheduler,
            vae=vae,
            pixel_patch=pixel_patch,
            image_size=cfg.image_size,
            guidance_scale=sampling.guidance_scale,
            num_inference_steps=sampling.num_inference_steps,
            sampler=sampling.sampler,
        )

    # --- export ---------------------------------------------------------------------------------

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``, plus this pipeline's code so the export loads anywhere.

        ``model_index.json`` names ``["pipeline", "MetaMorphDecoderPipeline"]`` and the conditioner
        ``["conditioning", "VisionConditioner"]``; the files are copies of this package's modules
        (``pipeline.py``, ``conditioning.py``, ``config.py`` at the root, ``conditioner/conditioning.py``),
        so ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` works without
        ``metamorph``. With it, ``MetaMorphDecoderPipeline.from_pretrained(dir)`` needs no remote
        code (see ``load_config``). Saved configs carry no ``_name_or_path`` (a temporary dir).
        """
        import inspect
        import json
        import shutil
        from pathlib import Path

        super().save_pretrained(save_directory, *args, **kwargs)
        root = Path(save_directory)
        here = Path(__file__).resolve().parent
        cond_file = Path(inspect.getfile(type(self.conditioner))).resolve()
        for name in (f"{REMOTE_PIPELINE}.py", "config.py"):
            shutil.copyfile(here / name, root / name)
        shutil.copyfile(cond_file, root / f"{REMOTE_CONDITIONER}.py")
        shutil.copyfile(cond_file, root / "conditioner" / f"{REMOTE_CONDITIONER}.py")
        index = json.loads((root / "model_index.json").read_text())
        index["_class_name"] = [REMOTE_PIPELINE, type(self).__name__]
        index["conditioner"] = [REMOTE_CONDITIONER, type(self.conditioner).__name__]
        index.pop("_name_or_path", None)  # where this pipeline was loaded from: often a temporary dir
        (root / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for cfg_file in root.glob("*/*.json"):
            cfg = json.loads(cfg_file.read_text())
            if isinstance(cfg, dict) and cfg.pop("_name_or_path", None) is not None:
                cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_config(cls, *args, **kwargs):
        """The export's config, pointed at this (imported) code instead of the saved copies, so
        ``MetaMorphDecoderPipeline.from_pretrained(dir)`` loads without remote code."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if cls is not DiffusionPipeline and isinstance(config.get("_class_name"), list):
            config["_class_name"] = cls.__name__
            entry = config.get("conditioner")
            if isinstance(entry, list) and entry[0] == REMOTE_CONDITIONER:
                config["conditioner"] = [VisionConditioner.__module__, VisionConditioner.__name__]
        return out

    # --- model space <-> pixels ---------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def model_space_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        S = self.config.image_size
        if self.vae is not None:
            side = S // self.vae_scale
            return (batch_size, int(self.unet.config.in_channels), side, side)
        p = self.config.pixel_patch
        return (batch_size, 3 * p * p, S // p, S // p)

    def encode_pixels(self, pixels_BCSS: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] at image_size -> the space the UNet denoises."""
        if self.vae is not None:
            pixels_BCSS = pixels_BCSS.to(device=self.vae.device, dtype=self.vae.dtype)
            dist = self.vae.encode(pixels_BCSS).latent_dist
            return dist.sample(generator) * self.vae.config.scaling_factor
        p = self.config.pixel_patch
        return F.pixel_unshuffle(pixels_BCSS, p) if p > 1 else pixels_BCSS

    def decode_to_pixels(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Model space -> images in [-1, 1] (not clamped)."""
        if self.vae is not None:
            x_BCHW = x_BCHW.to(dtype=self.vae.dtype)
            return self.vae.decode(x_BCHW / self.vae.config.scaling_factor).sample
        p = self.config.pixel_patch
        return F.pixel_shuffle(x_BCHW, p) if p > 1 else x_BCHW

    # --- denoising ----------------------------------------------------------------------------

    def guided_noise(
        self,
        x_BCHW: torch.Tensor,
        t: torch.Tensor,
        ctx_BLC: torch.Tensor,
        null_ctx_BLC: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """The noise prediction with classifier-free guidance against ``null_ctx_BLC``."""
        dtype = self.unet.dtype
        if guidance_scale == 1.0:
            x_in = self.conditioner.unet_input(x_BCHW, ctx_BLC)
            return self.unet(x_in.to(dtype), t, encoder_hidden_states=ctx_BLC.to(dtype)).sample
        # one UNet call on the doubled batch: half the Python overhead of two calls
        both_ctx = torch.cat([null_ctx_BLC, ctx_BLC])
        eps_2BCHW = self.unet(
            self.conditioner.unet_input(torch.cat([x_BCHW, x_BCHW]), both_ctx).to(dtype),
            t,
            encoder_hidden_states=both_ctx.to(dtype),
        ).sample
        eps_uncond, eps_cond = eps_2BCHW.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    @torch.no_grad()
    def __call__(
        self,
        vision_tokens: Union[torch.Tensor, np.ndarray],
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        sampler: Optional[str] = None,
        generator: Optional[Union[torch.Generator, list[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Render one image per token set.

        vision_tokens: [B, N, D] (or [N, D]) L2-normalised vision tokens; all zeros = unconditional.
        guidance_scale / num_inference_steps / sampler ("ddim" | "dpm"): None = the pipeline's
        configured defaults. output_type: "pil" (list of PIL images), "np" ([B, S, S, 3] floats
        in [0, 1]) or "pt" ([B, 3, S, S] in [0, 1]).
        """
        g = self.config.guidance_scale if guidance_scale is None else float(guidance_scale)
        steps = self.config.num_inference_steps if num_inference_steps is None else int(num_inference_steps)
        sampler = sampler or self.config.sampler
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r} must be 'pil', 'np' or 'pt'")
        tokens_BND = torch.as_tensor(vision_tokens)
        if tokens_BND.ndim == 2:
            tokens_BND = tokens_BND.unsqueeze(0)
        device = self._execution_device
        B = tokens_BND.shape[0]

        ctx_BLC = self.conditioner(tokens_BND.to(device))
        null_ctx_BLC = self.conditioner(self.conditioner.null_tokens(B))
        sched = make_sampler(sampler, self.scheduler.config)
        sched.set_timesteps(steps, device=device)
        shape = self.model_space_shape(B)
        if latents is None:
            x_BCHW = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            x_BCHW = latents.to(device=device, dtype=self.unet.dtype)
        x_BCHW = x_BCHW * sched.init_noise_sigma
        for t in self.progress_bar(sched.timesteps):
            x_in = sched.scale_model_input(x_BCHW, t)
            eps = self.guided_noise(x_in, t, ctx_BLC, null_ctx_BLC, g)
            x_BCHW = sched.step(eps, t, x_BCHW, generator=generator).prev_sample

        img_BCSS = ((self.decode_to_pixels(x_BCHW).float().clamp(-1, 1) + 1) / 2).cpu()
        if output_type == "pt":
            images = img_BCSS
        else:
            arr = img_BCSS.permute(0, 2, 3, 1).numpy()
            images = arr if output_type == "np" else to_pil(arr)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def to_pil(arr_BSSC: np.ndarray) -> list[Image.Image]:
    """[B, S, S, 3] floats in [0, 1] -> PIL images."""
    return [Image.fromarray(a) for a in (arr_BSSC * 255).round().clip(0, 255).astype(np.uint8)]


def _build_pixel_components(cfg: DecoderConfig):
    p = cfg.pixel_patch
    levels = len(cfg.block_out_channels)
    down = tuple("CrossAttnDownBlock2D" if i >= cfg.cross_attn_from_level else "DownBlock2D" for i in range(levels))
    up = tuple(
        "CrossAttnUpBlock2D" if i >= cfg.cross_attn_from_level else "UpBlock2D" for i in reversed(range(levels))
    )
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // p,
        # the spatial condition adds one input channel per context width (see VisionConditioner)
        in_channels=3 * p * p + (cfg.cross_attention_dim if cfg.spatial_condition else 0),
        out_channels=3 * p * p,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        cross_attention_dim=cfg.cross_attention_dim,
        # diffusers' legacy name: this value is the number of heads per attention layer
        attention_head_dim=cfg.attention_heads,
        norm_num_groups=cfg.norm_num_groups,
        addition_embed_type="text" if cfg.pooled_condition else None,
        addition_embed_type_num_heads=cfg.attention_heads,
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        prediction_type=cfg.prediction_type,
        clip_sample=True,  # pixel space lives in [-1, 1]; clipping x0 keeps few-step samples in range
        rescale_betas_zero_snr=cfg.zero_terminal_snr,
        # zero terminal SNR: start sampling at T (pure noise, where training saw pure noise).
        # Otherwise SD's spacing 1, 1+k, ...: an epsilon model's x0 estimate divides by
        # sqrt(alpha_bar_t), so the steps nearest T are the ones to skip.
        timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading",
        steps_offset=0 if cfg.zero_terminal_snr else 1,
    )
    return unet, None, scheduler


if __name__ == "__main__":
    import tempfile

    pipe = MetaMorphDecoderPipeline.from_decoder_config(DecoderConfig(), feature_dim=64, n_tokens=16)
    tokens = F.normalize(torch.randn(2, 16, 64), dim=-1)
    with tempfile.TemporaryDirectory() as d:
        pipe.save_pretrained(d)
        pipe = MetaMorphDecoderPipeline.from_pretrained(d)
    out = pipe(tokens, num_inference_steps=5, generator=torch.Generator().manual_seed(0))
    print("images", [im.size for im in out.images])
