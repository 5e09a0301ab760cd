"""The decoder's condition: N vision tokens -> a per-token MLP -> the UNet's cross-attention context.

    python -m metamorph.decoder.conditioning    # maps random tokens and an all-zero condition

No captions: the context is the image's own N vision-encoder tokens (or the N tokens the VPiT
model predicted), each mapped by the same MLP to the UNet's cross-attention width C, then
zero-padded to the UNet's context length L (77 for SD 1.5, as in the paper; N itself for a small
UNet built here). Two layouts:

* ``official`` (the MetaMorph code's): ``Linear(D, H) - LayerNorm(H) - ReLU - Linear(H, C) -
  LayerNorm(C)``, H = 2048 for SD 1.5. The output LayerNorm matters there: SD 1.5's
  cross-attention was trained on CLIP text states, which end in a LayerNorm.
* ``mlp``: ``Linear(D, H) - GELU - Linear(H, C)``, what the tiny preset's figures were measured
  with (and what exports made before the official layout load as).

The unconditional branch of classifier-free guidance is the **all-zero condition**: a token
that is all zeros maps to an all-zero context row (not to ``MLP(0)``, which would be a learned
bias), so "condition dropped" in training, the zero-padding and the guidance baseline at
sampling are one and the same thing: an all-zero context. Real vision tokens are unit-norm, so
they are never all zero.

Tensor names: B batch, N vision tokens, D vision feature dim, L context length, C context width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

LAYOUTS = ("official", "mlp")


class VisionConditioner(ModelMixin, ConfigMixin):
    """Per-token MLP from vision tokens to the UNet context (a diffusers model: save/load with
    ``save_pretrained``/``from_pretrained``, safetensors)."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        feature_dim: int = 64,  # D: vision token width (1152 for SigLIP so400m)
        n_tokens: int = 16,  # N: tokens per image (64 in the paper)
        cross_attention_dim: int = 64,  # C: the UNet's cross-attention width (768 for SD 1.5)
        context_length: int = 16,  # L >= N: the UNet's context length (77 for SD 1.5)
        hidden_dim: int = 64,  # H: MLP hidden width
        spatial: bool = False,  # also feed the context to the UNet as input channels (see unet_input)
        layout: str = "mlp",  # "official" (Linear-LayerNorm-ReLU-Linear-LayerNorm) or "mlp"
    ):
        super().__init__()
        if context_length < n_tokens:
            raise ValueError(f"context_length={context_length} must be >= n_tokens={n_tokens}")
        if layout not in LAYOUTS:
            raise ValueError(f"conditioner layout {layout!r}: use one of {LAYOUTS}")
        self.fc1 = nn.Linear(feature_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, cross_attention_dim)
        if layout == "official":
            self.norm1 = nn.LayerNorm(hidden_dim)
            self.norm2 = nn.LayerNorm(cross_attention_dim)

    def mlp(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        """The per-token map, without the zero-condition mask."""
        if self.config.layout == "official":
            return self.norm2(self.fc2(F.relu(self.norm1(self.fc1(tokens_BND)))))
        return self.fc2(F.gelu(self.fc1(tokens_BND)))

    def forward(self, tokens_BND: torch.Tensor) -> torch.Tensor:
        """[B, N, D] vision tokens -> [B, L, C] context; all-zero tokens give all-zero rows."""
        cfg = self.config
        if tokens_BND.ndim != 3 or tokens_BND.shape[1:] != (cfg.n_tokens, cfg.feature_dim):
            raise ValueError(
                f"vision tokens must be [B, {cfg.n_tokens}, {cfg.feature_dim}], got {tuple(tokens_BND.shape)}"
            )
        tokens_BND = tokens_BND.to(dtype=self.fc1.weight.dtype, device=self.fc1.weight.device)
        # predicted tokens come from a head that normalises, encoder tokens are normalised: this
        # only guards against a caller passing raw features (F.normalize keeps zeros at zero)
        tokens_BND = F.normalize(tokens_BND, dim=-1)
        present_BN1 = (tokens_BND.abs().amax(dim=-1, keepdim=True) > 0).to(tokens_BND.dtype)
        ctx_BNC = self.mlp(tokens_BND) * present_BN1
        pad = cfg.context_length - cfg.n_tokens
        if pad:
            ctx_BNC = F.pad(ctx_BNC, (0, 0, 0, pad))  # zero rows after the N tokens
        return ctx_BNC

    @property
    def spatial_channels(self) -> int:
        """Input channels ``unet_input`` adds (0 without the spatial condition)."""
        return int(self.config.cross_attention_dim) if self.config.spatial else 0

    def unet_input(self, x_BCHW: torch.Tensor, ctx_BLC: torch.Tensor) -> torch.Tensor:
        """The UNet's input: ``x_BCHW``, plus (spatial condition) the N context rows laid out as
        their sqrt(N) x sqrt(N) grid and upsampled (nearest) to the UNet's grid, as channels.

        Cross-attention queries carry no position, so a small UNet trained briefly cannot learn
        which token describes which part of the image: it renders the right background (a global
        property) and objects of random colour in random places (measured on the tiny preset:
        object colour agreement at chance after 1500 steps). Token i *is* grid cell i, so handing
        each pixel the context of its own cell removes that search. The zero condition gives zero
        channels, so it stays the unconditional branch."""
        if not self.config.spatial:
            return x_BCHW
        cfg = self.config
        side = math.isqrt(cfg.n_tokens)
        B, _, H, W = x_BCHW.shape
        grid_BCss = ctx_BLC[:, : cfg.n_tokens].transpose(1, 2).reshape(B, -1, side, side)
        grid_BCHW = F.interpolate(grid_BCss.to(x_BCHW.dtype), size=(H, W), mode="nearest")
        return torch.cat([x_BCHW, grid_BCHW], dim=1)

    def null_tokens(self, batch_size: int) -> torch.Tensor:
        """The all-zero condition (the unconditional branch), [B, N, D]."""
        cfg = self.config
        return torch.zeros(batch_size, cfg.n_tokens, cfg.feature_dim, device=self.fc1.weight.device)


if __name__ == "__main__":
    cond = VisionConditioner(feature_dim=64, n_tokens=16, cross_attention_dim=32, context_length=20)
    with torch.no_grad():
        ctx, null = cond(torch.randn(2, 16, 64)), cond(cond.null_tokens(2))
    print("context", tuple(ctx.shape), "zero condition max |ctx|", float(null.abs().max()))
