"""Learning-rate schedule (linear warmup, cosine decay) and the paper's sqrt batch-scaling rule.

    python -c "from metamorph.train.schedule import sqrt_scaled_lr; print(sqrt_scaled_lr(512, 448, 3.74e-5))"
"""

from __future__ import annotations

import math

import torch

# The paper's bases (MetaMorph, arXiv 2412.14164): global batch (sequences) -> peak LR.
STAGE1_BASE_BATCH, STAGE1_BASE_LR = 448, 3.74e-5
STAGE2_BASE_BATCH, STAGE2_BASE_LR = 1536, 6.93e-5


def sqrt_scaled_lr(global_batch: int, base_batch: int, base_lr: float) -> float:
    """Peak LR for ``global_batch`` given ``base_lr`` tuned at ``base_batch``: the LR grows with
    the square root of the batch (Adam's noise scale), not linearly."""
    if global_batch < 1 or base_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got global_batch={global_batch}, base_batch={base_batch}")
    return base_lr * math.sqrt(global_batch / base_batch)


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(warmup_ratio * total_steps))


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear ramp to 1 over the warmup
    (the first step already gets 1/warmup, so no step is wasted at LR 0), then half a cosine
    down to ``min_ratio`` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine:
    """A picklable LR lambda (LambdaLR keeps it out of its state_dict; the step count is in it)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
        self.total_steps, self.warmup_steps, self.min_ratio = total_steps, warmup_steps, min_ratio

    def __call__(self, step: int) -> float:
        return cosine_factor(step, self.total_steps, self.warmup_steps, self.min_ratio)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(total_steps, warmup_steps_for(total_steps, warmup_ratio), min_ratio)
    )
