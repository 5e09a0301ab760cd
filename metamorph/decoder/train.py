"""Train the decoder: diffusion MSE (epsilon, v or x0 target) on (image, its own vision tokens), with checkpoints.

    python -m metamorph.decoder.train      # 20 steps on random images/tokens, prints the loss

One step: take the global batch's images and vision tokens, zero the whole condition of each
sample with probability ``cfg_prob`` (so the UNet also learns the unconditional branch that
classifier-free guidance subtracts), draw timesteps uniformly in [0, T), noise the images in
model space (pixels folded into patches, or VAE latents) with DDPM's schedule, and regress the
noise (or v, or the clean image: the schedule's prediction type), optionally weighting outline
pixels up (``edge_weights``). AdamW with linear warmup; optional noise offset and EMA.

Every random draw of step s (which items, timesteps, noise, condition drops) comes from
generators seeded by (seed, s) and is made for the *global* batch, of which each rank takes its
slice; so a resumed run sees exactly the batches an uninterrupted one would, whatever the worker
count. Checkpoints are the LLM loop's (``metamorph.train.checkpoint``, DCP, under
``{ckpt_dir}/step-{s:08d}/``): the trained weights and optimizer, the EMA weights as extra
tensors, LR scheduler and EMA counters in ``state.json``, each rank's RNG; ``COMPLETE`` is written
last, and only such dirs are resumed from. The LR schedule is ``metamorph.train.schedule``'s.

Tensor names: B batch (per rank unless noted), N tokens, D token dim, C/H/W model space,
S image side in px.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from metamorph.decoder.config import LR_SCHEDULES, DecoderTrainConfig  # noqa: F401  (light to import)
from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
from metamorph.train import checkpoint as ckpt
from metamorph.train.schedule import warmup_cosine_scheduler

COMPLETE = ckpt.MARKER  # marker file: a checkpoint / export dir is whole once this exists


@dataclass
class DecoderData:
    """The training set in memory: encoded images (as curated) and their vision tokens.

    Images stay encoded (PNG/JPEG bytes, ~1 KB at 32 px, ~50 KB for a real photo) and are decoded
    and resized per batch, so a set of real photos fits in worker memory at SD's 512 px (a decoded
    512 px image is 786 KB); the tokens (N x D fp16: 147 KB at paper scale) bound the set size."""

    images: list[bytes]  # encoded image files, any size (resized to the decoder's side per batch)
    tokens_BND: torch.Tensor  # [M, N, D], L2-normalised, from the frozen vision encoder

    def __post_init__(self) -> None:
        if len(self.images) != len(self.tokens_BND) or not self.images:
            raise ValueError("DecoderData needs as many token sets as images, and at least one")
        if self.tokens_BND.ndim != 3:
            raise ValueError(f"DecoderData.tokens_BND must be [M, N, D], got {tuple(self.tokens_BND.shape)}")

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, idx: torch.Tensor, size: int) -> torch.Tensor:
        """uint8 [B, 3, S, S] for the items ``idx``."""
        return torch.stack([decode_image(self.images[int(i)], size) for i in idx])


def decode_image(data: bytes, size: int) -> torch.Tensor:
    """Encoded image -> uint8 [3, S, S] (RGB; bicubic resize, as the vision encoder's preprocess)."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()


@dataclass
class TrainResult:
    first_loss: float  # mean loss of the first log window (of the first attempt)
    final_loss: float  # mean loss of the last log window
    steps: int
    seconds: float  # wall time of this attempt's steps
    resumed_from: int  # step of the checkpoint resumed from (0: fresh)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, window mean) this attempt

    def stats(self) -> dict[str, float]:
        """What the export records (``train_stats.json``) and the stage reports."""
        return {"first_loss": self.first_loss, "final_loss": self.final_loss, "steps": self.steps,
                "resumed_from": self.resumed_from, "train_seconds": self.seconds,
                "s_per_step": self.seconds / max(1, self.steps - self.resumed_from)}


class Denoiser(nn.Module):
    """conditioner + UNet as one module, so DDP wraps (and all-reduces) both together."""

    def __init__(self, unet: nn.Module, conditioner: nn.Module):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner

    def forward(self, x_BCHW: torch.Tensor, t_B: torch.Tensor, tokens_BND: torch.Tensor) -> torch.Tensor:
        ctx_BLC = self.conditioner(tokens_BND)
        return self.unet(self.conditioner.unet_input(x_BCHW, ctx_BLC), t_B, encoder_hidden_states=ctx_BLC).sample


def set_trainable(pipe: MetaMorphDecoderPipeline, train_unet: bool = True) -> None:
    """Conditioner always trains; the UNet unless frozen (pixel UNets start random: always train)."""
    pipe.conditioner.requires_grad_(True)
    pipe.unet.requires_grad_(bool(train_unet) or pipe.vae is None)
    if pipe.vae is not None:
        pipe.vae.requires_grad_(False)
        pipe.vae.eval()


# --- deterministic randomness -----------------------------------------------------------------


def _gen(seed: int, stream: str, counter: int) -> torch.Generator:
    """An independent CPU generator per (seed, stream, counter); stable across runs and machines."""
    h = hashlib.blake2b(f"{seed}/{stream}/{counter}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Global batch ``step``: positions [step*B, (step+1)*B) of the endless sequence of per-epoch
    permutations of the data (every item once per epoch)."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=_gen(seed, "epoch", epoch))
        take = perm[off : off + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class StepDraws:
    """Every random choice of one global training step except the VAE's latent sample."""

    t_B: torch.Tensor  # timesteps, uniform in [0, T)
    noise_BCHW: torch.Tensor
    drop_B: torch.Tensor  # bool: condition zeroed


def step_draws(
    step: int, seed: int, batch_size: int, shape_CHW: tuple[int, ...], num_timesteps: int, cfg_prob: float, noise_offset: float
) -> StepDraws:
    g = _gen(seed, "step", step)
    t_B = torch.randint(0, num_timesteps, (batch_size,), generator=g)
    noise = torch.randn((batch_size, *shape_CHW), generator=g)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((batch_size, shape_CHW[0], 1, 1), generator=g)
    drop_B = torch.rand(batch_size, generator=g) < cfg_prob
    return StepDraws(t_B=t_B, noise_BCHW=noise, drop_B=drop_B)


def to_unit_range(images_BCSS: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images_BCSS.float() / 127.5 - 1.0


# --- the loss -----------------------------------------------------------------------------------


def diffusion_loss(
    pipe: MetaMorphDecoderPipeline,
    denoiser: nn.Module,
    x0_BCHW: torch.Tensor,
    tokens_BND: torch.Tensor,
    draws: StepDraws,
    autocast: bool = False,
    snr_gamma: Optional[float] = None,
    edge_weight: float = 0.0,
) -> torch.Tensor:
    """MSE of ``denoiser``'s prediction (the noise, or v for a v-prediction schedule) on clean
    model-space inputs ``x0_BCHW`` under ``draws`` (or of x0 itself for a "sample" schedule);
    Min-SNR-weighted when ``snr_gamma`` is set, per-pixel edge-weighted when ``edge_weight`` > 0."""
    dev = x0_BCHW.device
    noise = draws.noise_BCHW.to(dev, x0_BCHW.dtype)
    t_B = draws.t_B.to(dev)
    x_t = pipe.scheduler.add_noise(x0_BCHW, noise, t_B)
    kind = pipe.scheduler.config.prediction_type
    if kind == "v_prediction":
        target = pipe.scheduler.get_velocity(x0_BCHW, noise, t_B)
    else:
        target = x0_BCHW if kind == "sample" else noise
    tokens_BND = torch.where(draws.drop_B.to(dev)[:, None, None], torch.zeros_like(tokens_BND), tokens_BND)
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
        pred = denoiser(x_t, t_B, tokens_BND)
    err = (pred.float() - target.float()).pow(2)
    if edge_weight > 0:
        err = err * edge_weights(pipe, x0_BCHW, edge_weight)
    if snr_gamma is None:
        return err.mean()
    alpha_bar_B = pipe.scheduler.alphas_cumprod.to(dev)[t_B].float()
    snr_B = alpha_bar_B / (1 - alpha_bar_B)
    # Min-SNR-gamma in the predicted quantity's units, as diffusers' training scripts: epsilon
    # min(snr, g) / snr; v min(snr + 1, g) / (snr + 1) (v's loss is epsilon's at SNR + 1). The
    # older v form min(snr, g) / (snr + 1) weighs the pure-noise end ~0 (exactly 0 at a zero
    # terminal SNR), so the UNet never learned to draw x0 from noise + tokens (1-step samples were
    # noise). Tiny preset, 600 steps, judged reconstructions: 0.64 -> 0.71 at 10 sampling steps
    if kind == "epsilon":
        weight_B = torch.clamp(snr_B, max=snr_gamma) / snr_B
    elif kind == "v_prediction":
        weight_B = torch.clamp(snr_B + 1, max=snr_gamma) / (snr_B + 1)
    else:  # sample: x0-MSE = v-MSE / (snr + 1), so v's weight in x0 units: min(snr + 1, g)
        weight_B = torch.clamp(snr_B + 1, max=snr_gamma)
    mse_B = err.flatten(1).mean(dim=1)
    return (weight_B * mse_B).mean()


def edge_weights(pipe: MetaMorphDecoderPipeline, x0_BCHW: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-element loss weights in model space: 1 + strength * (the image's edge magnitude, a
    3x3-dilated Sobel norm scaled to [0, 1] per image), renormalised to mean 1 per image. Pixel
    space only (a VAE latent has no pixel edges): 1 elsewhere."""
    if pipe.vae is not None:
        return torch.ones_like(x0_BCHW)
    px_B3SS = pipe.decode_to_pixels(x0_BCHW.float())
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=px_B3SS.device)
    k = torch.stack([kx, kx.T])[:, None].repeat(3, 1, 1, 1)  # [6, 1, 3, 3]: x and y per channel
    g = F.conv2d(F.pad(px_B3SS, (1, 1, 1, 1), mode="replicate"), k, groups=3)
    mag_B1SS = g.pow(2).sum(dim=1, keepdim=True).sqrt()
    mag_B1SS = F.max_pool2d(mag_B1SS, 3, stride=1, padding=1)
    mag_B1SS = mag_B1SS / mag_B1SS.flatten(1).amax(dim=1).clamp(min=1e-6)[:, None, None, None]
    w_B1SS = 1 + strength * mag_B1SS
    w_B1SS = w_B1SS / w_B1SS.flatten(1).mean(dim=1)[:, None, None, None]
    return pipe.encode_pixels(w_B1SS.expand(-1, 3, -1, -1))


# --- checkpoints: metamorph.train.checkpoint (DCP), as the LLM loop -------------------------------


def _ema_tensors(ema: Any) -> dict[str, torch.Tensor]:
    """The EMA's shadow weights as named tensors for the checkpoint's ``extra`` (loaded in place)."""
    return {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}


def _ema_scalars(ema: Any) -> dict[str, Any]:
    return {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}


def write_export(pipe: MetaMorphDecoderPipeline, out_dir: Path, stats: dict[str, Any]) -> None:
    """``save_pretrained`` plus ``train_stats.json``; the COMPLETE marker last."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "train_stats.json").write_text(json.dumps(stats, indent=2))
    (out_dir / COMPLETE).write_text("")


def read_export_stats(out_dir: Path) -> Optional[dict[str, Any]]:
    """Stats of a complete export, or None when the export is missing or was cut short."""
    out_dir = Path(out_dir)
    if not (out_dir / COMPLETE).exists():
        return None
    return json.loads((out_dir / "train_stats.json").read_text())


# --- the loop -----------------------------------------------------------------------------------


def train_loop(
    pipe: MetaMorphDecoderPipeline,
    data: DecoderData,
    cfg: DecoderTrainConfig,
    *,
    ckpt_dir: Optional[Path] = None,
    device: torch.device | str = "cpu",
    on_log: Optional[Callable[[dict[str, float], int], None]] = None,
    on_sample: Optional[Callable[[MetaMorphDecoderPipeline, int], None]] = None,
    stop_after: Optional[int] = None,
) -> TrainResult:
    """Train ``pipe`` in place up to ``cfg.max_steps``, resuming from ``ckpt_dir``'s latest checkpoint.

    With a process group up (a Ray Train worker), each rank trains its slice of every global
    batch under DDP (when there is more than one rank; as the LLM loop does it) and the logged
    loss is the mean over ranks. ``on_log``/``on_sample`` run on rank 0; ``on_sample`` gets the pipeline
    with the EMA weights swapped in. ``stop_after`` ends the attempt early at that step (tests
    use it to simulate a crash). On return the pipeline holds the weights to export (EMA ones when
    EMA is on).
    """
    from diffusers.training_utils import EMAModel

    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if cfg.batch_size % world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} must be divisible by the worker count {world_size}")
    device = torch.device(device)
    pipe.to(device)
    B_local = cfg.batch_size // world_size
    lo = rank * B_local
    denoiser = Denoiser(pipe.unet, pipe.conditioner)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    model = denoiser
    if world_size > 1:  # DDP all-reduces the gradients of the conditioner and UNet together
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(denoiser, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = warmup_cosine_scheduler(opt, cfg.max_steps, 0.0, warmup_steps=cfg.warmup_steps, shape=cfg.lr_schedule)
    ema = None
    if cfg.ema_decay > 0:
        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=cfg.ema_power)

    step, first_loss, last_loss, resumed_from = 0, float("nan"), float("nan"), 0
    latest = ckpt.latest_checkpoint(ckpt_dir) if ckpt_dir is not None else None
    if latest is not None:
        # the RNG file of a rank is absent when the worker count changed: the step streams still match
        meta = ckpt.load_checkpoint(latest, model, opt, extra=_ema_tensors(ema) if ema is not None else None)
        sched.load_state_dict(meta["scheduler"])
        if ema is not None:
            ema.load_state_dict({**meta["ema"], "shadow_params": ema.shadow_params})
        step = resumed_from = int(meta["step"])
        first_loss, last_loss = float(meta["first_loss"]), float(meta["last_loss"])

    def checkpoint(at: int) -> None:
        if ckpt_dir is None:
            return
        state = {"step": at, "first_loss": first_loss, "last_loss": last_loss, "scheduler": sched.state_dict()}
        if ema is not None:
            state["ema"] = _ema_scalars(ema)
        ckpt.save_checkpoint(ckpt_dir, at, model, opt, state, cfg.keep_last,
                             extra=_ema_tensors(ema) if ema is not None else None)

    def sample(at: int) -> None:
        if on_sample is None or rank != 0:
            return
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        model.eval()
        try:
            on_sample(pipe, at)
        finally:
            model.train()
            if ema is not None:
                ema.restore(params)

    tokens = data.tokens_BND.float()
    S = int(pipe.config.image_size)
    shape_CHW = pipe.model_space_shape(1)[1:]
    T = int(pipe.scheduler.config.num_train_timesteps)
    autocast = cfg.bf16 and device.type == "cuda"
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    window: list[float] = []
    losses: list[tuple[int, float]] = []
    t0 = time.time()
    while step < end:
        idx = batch_indices(len(data), cfg.batch_size, step, cfg.seed)[lo : lo + B_local]
        draws = step_draws(step, cfg.seed, cfg.batch_size, shape_CHW, T, cfg.cfg_prob, cfg.noise_offset)
        draws = StepDraws(draws.t_B[lo : lo + B_local], draws.noise_BCHW[lo : lo + B_local], draws.drop_B[lo : lo + B_local])
        pixels = to_unit_range(data.pixels(idx, S)).to(device)
        with torch.no_grad():
            x0 = pipe.encode_pixels(pixels, generator=_gen(cfg.seed, f"vae{rank}", step))
        loss = diffusion_loss(
            pipe, model, x0.float(), tokens[idx].to(device), draws, autocast=autocast, snr_gamma=cfg.snr_gamma,
            edge_weight=cfg.edge_weight,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.step(params)
        step += 1
        window.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = sum(window) / len(window)
            if distributed:
                t = torch.tensor([mean], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                mean = float(t) / world_size
            window.clear()
            if math.isnan(first_loss):
                first_loss = mean
            last_loss = mean
            losses.append((step, mean))
            if on_log is not None and rank == 0:
                on_log({"loss": mean, "lr": sched.get_last_lr()[0]}, step)
        if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
            sample(step)
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            checkpoint(step)
    seconds = time.time() - t0
    if ema is not None:
        ema.copy_to(params)  # from here on the pipeline holds the weights to export
    model.eval()
    if on_sample is not None and rank == 0 and step == cfg.max_steps and resumed_from < cfg.max_steps:
        on_sample(pipe, step)
    return TrainResult(
        first_loss=first_loss,
        final_loss=losses[-1][1] if losses else last_loss,
        steps=step,
        seconds=seconds,
        resumed_from=resumed_from,
        losses=losses,
    )


if __name__ == "__main__":
    from metamorph.decoder.config import DecoderConfig

    torch.manual_seed(0)
    pipe = MetaMorphDecoderPipeline.from_decoder_config(DecoderConfig(), feature_dim=64, n_tokens=16)
    set_trainable(pipe)
    def png(arr: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(0)
    data = DecoderData(
        images=[png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(64)],
        tokens_BND=F.normalize(torch.randn(64, 16, 64), dim=-1),
    )
    res = train_loop(pipe, data, DecoderTrainConfig(max_steps=20, log_every=5, warmup_steps=5))
    print("losses", [(s, round(v, 4)) for s, v in res.losses], f"{res.seconds:.1f}s")
