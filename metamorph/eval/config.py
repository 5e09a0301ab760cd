"""Configs of the evaluation metrics, apart from their torch code so a plan can import them.

    python -c "from metamorph.eval.config import FIDConfig, JudgeConfig; print(JudgeConfig())"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from metamorph.world import attributes as A


@dataclass(kw_only=True)
class FIDConfig:
    # TorchScript Inception feature extractor (clean-fid / StyleGAN's inception-2015-12-05.pt).
    # None: FID is skipped (recorded as such).
    inception_path: Optional[str] = None
    # Hugging Face CLIP dir (e.g. openai/clip-vit-large-patch14 downloaded beforehand). None: skipped.
    clip_path: Optional[str] = None
    # Generations to score: 0 = every evaluated t2i item (COCO-30K protocol: 30000). FID is
    # biased upwards at small counts; compare runs at the same count only.
    n_samples: int = 0
    # Side both real and generated images are resized to before feature extraction; 0 keeps the
    # decoder's output size (the protocol's "resolution" param; the paper reports 256 for COCO).
    resolution: int = 0
    batch_size: int = 32

    def __post_init__(self) -> None:
        for key in ("inception_path", "clip_path"):
            p = getattr(self, key)
            if p is not None and not str(p).strip():
                raise ValueError(f"evaluate.fid.{key}: empty string; use null to skip")
        if self.n_samples < 0 or self.resolution < 0 or self.batch_size < 1:
            raise ValueError("evaluate.fid.n_samples and .resolution must be >= 0, .batch_size >= 1")


@dataclass(kw_only=True)
class JudgeConfig:
    # Fresh renders to train on (each gives 9 cell crops). Measured at 32 px, 1-3 objects:
    # 3000 x 6 epochs -> 95.8% exact shape sets, 99.7% colour/size/position, 100% background
    # (~25 s of one core); 4 epochs -> 90.4% shapes. Errors are mostly small-object shapes.
    n_train: int = 3000
    n_test: int = 1000  # fresh renders for the judge's own accuracy (binomial s.e. <= 1.6% at 1000)
    epochs: int = 6
    batch_size: int = 64  # scenes per step (x9 crops)
    lr: float = 5e-3  # AdamW peak of a one-cycle schedule
    width: int = 16  # channels of the first conv, doubled at each of the 2 downsamplings
    min_objects: int = 1  # objects per training scene; 1..3 covers captions (1) and edits (1-3)
    max_objects: int = 3
    # Augmentation: Gaussian pixel noise (std in [0, 1] units, drawn per image up to this) so the
    # slightly noisy output of a few-step diffusion sampler is in distribution; 0 turns it off.
    noise_std: float = 0.06
    # Minimum held-out accuracy on every attribute for generation scores to count (judge_ok).
    threshold: float = 0.9
    # Render geometry; 0 = infer from the held-out samples' toy-world meta (image_size and the
    # object extents), falling back to WorldConfig's defaults.
    image_size: int = 0
    small_frac: float = 0.0
    large_frac: float = 0.0
    jitter: float = 1.0
    supersample: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"train_judge.{key}: {msg}")

        need(self.n_train >= 10, "n_train", "must be >= 10 (use a few thousand)")
        need(self.n_test >= 10, "n_test", "must be >= 10")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.width >= 4, "width", "must be >= 4")
        need(1 <= self.min_objects <= self.max_objects <= len(A.SHAPES), "min_objects/max_objects",
             f"need 1 <= min <= max <= {len(A.SHAPES)}")
        need(0.0 <= self.noise_std <= 0.5, "noise_std", "must be in [0, 0.5]")
        need(0.0 <= self.threshold <= 1.0, "threshold", "must be in [0, 1]")
        need(self.image_size == 0 or self.image_size >= 12, "image_size", "0 (infer) or >= 12")
        need(self.small_frac == 0 or 0.1 <= self.small_frac < 1, "small_frac", "0 (infer) or in [0.1, 1)")
        need(self.large_frac == 0 or 0.1 < self.large_frac <= 1, "large_frac", "0 (infer) or in (0.1, 1]")
        need(0.0 <= self.jitter <= 1.0, "jitter", "must be in [0, 1]")
        need(1 <= self.supersample <= 16, "supersample", "must be in 1..16")
