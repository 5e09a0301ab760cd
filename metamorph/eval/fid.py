"""FID and CLIP score on real-data generations, only with weights the user points to.

    python -c "from metamorph.eval.fid import FIDConfig; print(FIDConfig())"

Nothing downloads: without ``inception_path`` / ``clip_path`` the metric is skipped and the reason
recorded (``skipped``). What is supported:

* FID: a **TorchScript** Inception-v3 feature extractor, the TF-Inception port that clean-fid and
  StyleGAN2/3's metrics use (``inception-2015-12-05.pt``): ``forward(x, return_features=True)``
  on float images [B, 3, 299, 299] in 0..255 gives the 2048-d pool features (a ``torch.export``
  ``.pt2`` program with the same input works too). Images are resized
  to 299 with PIL bicubic (clean-fid's "clean" resize). torchvision's Inception is not used: its
  weights differ from the TF graph every published FID comes from.
* CLIP score: a Hugging Face CLIP dir (``CLIPModel`` safetensors + tokenizer + optional
  ``preprocessor_config.json``): 100 * max(cos(image, text), 0), averaged (torchmetrics'
  convention; Hessel et al. use 2.5x).

The protocol (COCO-30K in the paper: 30k captions, one image each, FID against the real images)
is recorded as params: resolution, guidance, steps, sampler, sample count, implementation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from metamorph.eval.config import FIDConfig  # noqa: F401  (defined there: light to import)
from metamorph.eval.frechet import frechet_distance_features

INCEPTION_SIZE = 299


def _resized(images: Sequence[Image.Image], size: int) -> list[Image.Image]:
    out = []
    for im in images:
        im = im.convert("RGB")
        out.append(im.resize((size, size), Image.Resampling.BICUBIC) if size and im.size != (size, size) else im)
    return out


def _load_extractor(path: str | Path):
    """``.pt2``: a ``torch.export`` program; anything else: TorchScript (the published FID file)."""
    if str(path).endswith(".pt2"):
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still the FID standard
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def inception_features(path: str | Path, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
    """[B, F] features from a TorchScript Inception (see the module docstring)."""
    model = _load_extractor(path)
    feats = []
    for i in range(0, len(images), batch_size):
        batch = _resized(images[i : i + batch_size], INCEPTION_SIZE)
        x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in batch])).permute(0, 3, 1, 2)
        try:
            f = model(x, return_features=True)
        except (RuntimeError, TypeError):  # an extractor without the keyword returns features directly
            f = model(x)
        feats.append(torch.as_tensor(f).float().reshape(len(batch), -1).numpy())
    return np.concatenate(feats)


@torch.no_grad()
def clip_score(path: str | Path, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 32) -> float:
    """Mean 100 * max(cos(image, text), 0) with a local Hugging Face CLIP."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    path = Path(path)
    model = CLIPModel.from_pretrained(str(path), use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    if (path / "preprocessor_config.json").exists():
        proc = CLIPImageProcessor.from_pretrained(str(path))
    else:
        side = int(model.config.vision_config.image_size)
        proc = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    max_len = int(model.config.text_config.max_position_embeddings)
    scores = []
    for i in range(0, len(images), batch_size):
        ims = [im.convert("RGB") for im in images[i : i + batch_size]]
        txt = list(texts[i : i + batch_size])
        pix = proc(images=ims, return_tensors="pt")["pixel_values"]
        t = tok(txt, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        img_e = model.get_image_features(pixel_values=pix)
        txt_e = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        img_e = getattr(img_e, "pooler_output", img_e)
        txt_e = getattr(txt_e, "pooler_output", txt_e)
        cos = torch.nn.functional.cosine_similarity(img_e.float(), txt_e.float(), dim=-1)
        scores.append((100 * cos.clamp(min=0)).numpy())
    return float(np.concatenate(scores).mean())


def real_data_metrics(
    cfg: FIDConfig,
    generated: Sequence[Image.Image],
    references: Sequence[Image.Image],
    captions: Sequence[str],
    protocol: dict[str, Any],
) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
    """(metrics, params, skipped {metric: reason}) for FID and CLIP score."""
    n = len(generated) if not cfg.n_samples else min(cfg.n_samples, len(generated))
    gen, ref, caps = list(generated[:n]), list(references[:n]), list(captions[:n])
    if cfg.resolution:
        gen, ref = _resized(gen, cfg.resolution), _resized(ref, cfg.resolution)
    params = {
        "fid_n_samples": n,
        "fid_resolution": cfg.resolution or (gen[0].size[0] if gen else 0),
        **{f"fid_{k}": v for k, v in protocol.items()},
    }
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if cfg.inception_path is None:
        skipped["fid"] = "no evaluate.fid.inception_path given (nothing is downloaded)"
    elif not Path(cfg.inception_path).is_file():
        skipped["fid"] = f"evaluate.fid.inception_path={cfg.inception_path} is not a file"
    elif n < 2:
        skipped["fid"] = f"{n} generated images; FID needs at least 2"
    else:
        fg = inception_features(cfg.inception_path, gen, cfg.batch_size)
        fr = inception_features(cfg.inception_path, ref, cfg.batch_size)
        metrics["fid"] = frechet_distance_features(fg, fr)
        params["fid_implementation"] = f"torchscript:{Path(cfg.inception_path).name}, PIL bicubic {INCEPTION_SIZE}px"
    if cfg.clip_path is None:
        skipped["clip_score"] = "no evaluate.fid.clip_path given (nothing is downloaded)"
    elif not Path(cfg.clip_path).is_dir():
        skipped["clip_score"] = f"evaluate.fid.clip_path={cfg.clip_path} is not a directory"
    elif n < 1:
        skipped["clip_score"] = "no generated images"
    else:
        metrics["clip_score"] = clip_score(cfg.clip_path, gen, caps, cfg.batch_size)
        params["clip_score_implementation"] = f"transformers CLIPModel:{Path(cfg.clip_path).name}, 100*max(cos,0)"
    return metrics, params, skipped
