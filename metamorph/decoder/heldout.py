"""The decoder's data and held-out scores: t2i images from curated shards, their vision tokens,
and how well the trained decoder reconstructs held-out images from their own tokens.

    python -m pytest tests/unit/test_decoder.py -q -k heldout

Pure library code (no Ray): ``stages/train_decoder.py`` reads the shards with ``t2i_images``,
encodes with ``encode_tokens`` (or the shared encoder actor pool on a cluster), trains, and scores
the export with ``heldout_metrics``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import numpy as np


def t2i_images(curated: Path, split: str, limit: Optional[int]) -> tuple[list[bytes], list[dict]]:
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


def train_and_heldout(curated: Path, max_train: Optional[int], n_eval: int) -> tuple[list[bytes], list[dict], list[bytes], list[dict]]:
    """(train images, metas, held-out images, metas): the ``heldout`` split's first ``n_eval``; if
    curation wrote none, the tail of ``train`` is held back instead (at most a tenth of it)."""
    train_imgs, train_metas = t2i_images(curated, "train", max_train)
    held_imgs, held_metas = t2i_images(curated, "heldout", n_eval)
    if not held_imgs:  # no heldout split written: hold back the tail of train
        k = min(n_eval, len(train_imgs) // 10)
        held_imgs, held_metas = train_imgs[len(train_imgs) - k :], train_metas[len(train_metas) - k :]
        train_imgs = train_imgs[: len(train_imgs) - k]
    if not train_imgs or not held_imgs:
        raise ValueError(
            f"train_decoder: {curated} has {len(train_imgs)} train and {len(held_imgs)} held-out t2i images; "
            "needs at least one of each (is curate_generation's source empty?)"
        )
    return train_imgs, train_metas, held_imgs, held_metas


def encode_tokens(encoder, images: list[bytes], batch_size: int) -> np.ndarray:
    """[M, N, D] float16 numpy tokens (fp16: halves the object-store copy; tokens are unit-norm)."""
    import torch
    from PIL import Image

    out = []
    for i in range(0, len(images), batch_size):
        ims = [Image.open(io.BytesIO(b)) for b in images[i : i + batch_size]]
        out.append(encoder.encode_images(ims).to(torch.float16).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.n_tokens, encoder.feature_dim), np.float16)


def reconstruction_grid(truths: list[Any], recons: list[Any]):
    """Held-out images (odd rows) above their reconstructions from their own tokens (even rows)."""
    from metamorph.decoder.metrics import image_grid, pair_rows

    return image_grid(pair_rows(truths, recons))


def heldout_metrics(pipe, encoder, held_imgs: list[bytes], held_metas: list[dict], held_tok: np.ndarray,
                    batch_size: int, seed: int) -> tuple[dict[str, float], list[Any], list[Any]]:
    """Reconstruct each held-out image from its own tokens; return (scores, truths, recons).

    Scores: colour / background agreement and object IoU against the scene meta
    (``reconstruction_agreement``), and whether a reconstruction re-encodes closest to its own
    source's tokens (``token_retrieval_acc``, chance 1/n) with the mean such cosine."""
    import torch
    from PIL import Image

    from metamorph.decoder.metrics import reconstruction_agreement

    held_tok_t = torch.from_numpy(held_tok).float()
    recons = []
    for i in range(0, len(held_imgs), batch_size):
        recons += pipe(held_tok_t[i : i + batch_size], generator=torch.Generator().manual_seed(seed + i)).images
    truths = [Image.open(io.BytesIO(b)).convert("RGB") for b in held_imgs]
    agree = reconstruction_agreement(truths, recons, held_metas)
    rec_tok = encoder.encode_images(recons).float()
    sim = torch.einsum("ind,jnd->ij", rec_tok, held_tok_t) / rec_tok.shape[1]
    agree["token_retrieval_acc"] = float((sim.argmax(dim=1) == torch.arange(len(recons))).float().mean())
    agree["token_cosine"] = float(sim.diagonal().mean())
    return agree, truths, recons
