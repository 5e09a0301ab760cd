"""The frozen SigLIP vision encoder whose normalised tokens are both VPiT's input and its target.

    python -m metamorph.model.vision        # builds the tiny encoder, encodes two images, prints shapes

Feature recipe (MetaMorph paper + official code): the output of the **last encoder layer before
the post-layernorm** (27x27x1152 for so400m-patch14-384), reshaped to its patch grid, resized by
**bilinear interpolation** (``align_corners=False``, not pooling) to sqrt(N) x sqrt(N), and
**L2-normalised per token**. The encoder is frozen: ``encode`` runs under ``no_grad``.

On disk (``save_pretrained``): the SigLIP vision tower in safetensors + its ``config.json`` (a
normal ``SiglipVisionModel`` dir, loadable by transformers alone) and ``metamorph_vision.json``
with this module's ``VisionConfig`` (N, seed, the pixel normalisation).

Tensor names: B batch, S image side (px), G patch-grid side, P = G*G patches, D feature dim,
N output tokens, n = sqrt(N).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from metamorph.model.config import VisionConfig  # noqa: F401  (defined there: light to import)

CONFIG_FILE = "metamorph_vision.json"


class VisionEncoder(nn.Module):
    """Frozen SigLIP tower -> [B, N, D] L2-normalised tokens. Build with from_config/from_pretrained."""

    def __init__(self, cfg: VisionConfig, model: SiglipVisionModel):
        super().__init__()
        self.model = model
        sc = model.config
        # The checkpoint is the truth for the architecture; keep cfg consistent with it so a
        # save/load round trip and feature_dim agree.
        self.cfg = dataclasses.replace(
            cfg,
            path=None,
            image_size=int(sc.image_size),
            patch_size=int(sc.patch_size),
            hidden_size=int(sc.hidden_size),
            num_layers=int(sc.num_hidden_layers),
            num_heads=int(sc.num_attention_heads),
            intermediate_size=int(sc.intermediate_size),
        )
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("mean_C", torch.tensor(self.cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_C", torch.tensor(self.cfg.image_std).view(1, 3, 1, 1), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.cfg.hidden_size

    @property
    def n_tokens(self) -> int:
        return self.cfg.n_tokens

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    # --- construction / persistence -----------------------------------------------------------

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "VisionEncoder":
        """Load ``cfg.path`` when set, else build a random-init encoder seeded by ``cfg.seed``."""
        if cfg.path is not None:
            enc = cls.from_pretrained(cfg.path)
            # the caller's N/seed/normalisation win over what a plain SigLIP checkpoint implies
            return cls(dataclasses.replace(enc.cfg, n_tokens=cfg.n_tokens, seed=cfg.seed), enc.model)
        # fork_rng: seeding must not disturb the caller's global RNG stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = SiglipVisionModel(cfg.siglip_config())
        return cls(cfg, model)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VisionEncoder":
        """A dir from ``save_pretrained``, or any SigLIP checkpoint dir (vision tower loaded)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"vision encoder dir {path} does not exist")
        model = SiglipVisionModel.from_pretrained(str(path), use_safetensors=True)
        meta = path / CONFIG_FILE
        if meta.exists():
            cfg = VisionConfig(**json.loads(meta.read_text()))
        else:  # a plain SigLIP checkpoint: take its preprocessor normalisation when present
            kw = {}
            pp = path / "preprocessor_config.json"
            if pp.exists():
                p = json.loads(pp.read_text())
                kw = {k: list(p[k]) for k in ("image_mean", "image_std") if k in p}
            cfg = VisionConfig(path=str(path), **kw)
        return cls(cfg, model)

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path), safe_serialization=True)
        (path / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.cfg), indent=2))

    def train(self, mode: bool = True) -> "VisionEncoder":
        # frozen: dropout etc. stay in eval mode whatever the caller asks
        super().train(False)
        return self

    # --- features -----------------------------------------------------------------------------

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> normalised pixels [B, 3, S, S] (bicubic resize to S, as SigLIP's processor)."""
        S = self.cfg.image_size
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (S, S):
                im = im.resize((S, S), Image.Resampling.BICUBIC)
            arrs.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(S, S, 3))
        x_BSSC = torch.stack(arrs).float() / 255.0
        x_BCSS = x_BSSC.permute(0, 3, 1, 2)
        return ((x_BCSS - self.mean_C.cpu()) / self.std_C.cpu()).contiguous()

    @torch.no_grad()
    def encode(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> [B, N, D] float32 tokens, unit L2 norm each."""
        return self.features(pixels_BCSS)

    def features(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        """``encode`` with autograd (pretraining the tower, vision_pretrain.py)."""
        dev = self.mean_C.device
        dtype = next(self.model.parameters()).dtype
        pixels_BCSS = pixels_BCSS.to(device=dev, dtype=dtype)
        # embeddings + encoder layers directly: the post-layernorm and pooled head are skipped
        # on purpose (the paper's feature is the last layer *before* the post-layernorm).
        h_BPD = self.model.embeddings(pixels_BCSS)
        h_BPD = self.model.encoder(inputs_embeds=h_BPD).last_hidden_state
        B, P, D = h_BPD.shape
        G = math.isqrt(P)
        if G * G != P:
            raise ValueError(f"patch count {P} is not a square grid")
        h_BDGG = h_BPD.transpose(1, 2).reshape(B, D, G, G)
        n = math.isqrt(self.cfg.n_tokens)
        h_BDnn = F.interpolate(h_BDGG.float(), size=(n, n), mode="bilinear", align_corners=False)
        feats_BND = h_BDnn.flatten(2).transpose(1, 2)
        return F.normalize(feats_BND, dim=-1)

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        return self.encode(self.preprocess(images))

    def forward(self, pixels_BCSS: torch.Tensor) -> torch.Tensor:
        return self.encode(pixels_BCSS)


if __name__ == "__main__":
    enc = VisionEncoder.from_config(VisionConfig())
    ims = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    f = enc.encode_images(ims)
    print("features", tuple(f.shape), "norms", f.norm(dim=-1)[0, :4].tolist())
    print("mean cos red/blue", float((f[0] * f[1]).sum(-1).mean()))
