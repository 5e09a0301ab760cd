"""Learning-rate schedule for every training loop here, LLM and decoder (linear warmup, then
cosine decay or constant), the paper's sqrt batch-scaling rule, and
optimizer steps counted in samples over packed rows.

    python -c "from metamorph.train.schedule import sqrt_scaled_lr; print(sqrt_scaled_lr(512, 448, 3.74e-5))"

The paper's batch sizes count samples (the official code pads one sample per row). Packing puts
15-35 samples in a 4096-position row, so a batch of B rows would be 15-35x fewer steps at an LR
scaled for rows. With ``train.global_batch_samples = B`` a step instead takes micro-batch
rounds (one micro-batch on every worker) until the run's running sample count reaches k x B at
the end of step k (``steps_from_samples``): every step holds B samples give or take one round,
the mean over the run is B exactly (the errors do not add up), and steps per epoch are
samples / B as in the paper. Every rank derives the same plan from the rows' sample counts
(Parquet metadata the reader reads once), so the ranks stay in lockstep without a collective.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# The paper's bases (MetaMorph, arXiv 2412.14164): global batch (samples) -> peak LR.
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


def steps_from_samples(round_samples: Sequence[int], batch_samples: int) -> list[int]:
    """Micro-batch rounds per optimizer step, given the samples in each round (summed over
    workers) in reading order: step k closes at the first round where the running count reaches
    k x ``batch_samples``; every step takes at least one round; rounds after the last complete
    step are left out (the row-count rule drops its last partial batch the same way)."""
    if batch_samples < 1:
        raise ValueError(f"batch_samples must be >= 1, got {batch_samples}")
    steps: list[int] = []
    seen, rounds = 0, 0
    for n in round_samples:
        seen += int(n)
        rounds += 1
        if seen >= (len(steps) + 1) * batch_samples:
            steps.append(rounds)
            rounds = 0
    return steps


def warmup_steps_in_samples(step_samples: Sequence[int], warmup_ratio: float) -> int:
    """Warmup measured in samples: the steps it takes until ``warmup_ratio`` of the run's samples
    have been seen (rounded up to a whole step). Equals ceil(ratio x steps) when steps are even."""
    if warmup_ratio <= 0 or not step_samples:
        return 0
    want = warmup_ratio * sum(step_samples)
    seen = 0
    for k, n in enumerate(step_samples, start=1):
        seen += n
        if seen >= want - 1e-9:
            return k
    return len(step_samples)


def cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear ramp to 1 over the warmup
    (the first step already gets 1/warmup, so no step is wasted at LR 0), then half a cosine
    down to ``min_ratio`` at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


SHAPES = ("cosine", "constant")  # after the warmup: half a cosine down to min_ratio, or flat at 1


def constant_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier with a linear warmup (as ``cosine_factor``'s) and then a constant 1."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    return 1.0


class WarmupCosine:
    """A picklable LR lambda (LambdaLR keeps its attributes in its state_dict; the step count is
    the scheduler's). ``shape``: "cosine" (the LLM stages, the paper) or "constant" (SD-style
    decoder fine-tuning)."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0, shape: str = "cosine"):
        if shape not in SHAPES:
            raise ValueError(f"LR schedule shape must be one of {SHAPES}, got {shape!r}")
        self.total_steps, self.warmup_steps, self.min_ratio, self.shape = total_steps, warmup_steps, min_ratio, shape

    def __call__(self, step: int) -> float:
        if self.shape == "constant":
            return constant_factor(step, self.warmup_steps)
        return cosine_factor(step, self.total_steps, self.warmup_steps, self.min_ratio)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_ratio: float,
    min_ratio: float = 0.0,
    warmup_steps: int | None = None,
    shape: str = "cosine",
) -> torch.optim.lr_scheduler.LambdaLR:
    """``warmup_steps`` (e.g. from ``warmup_steps_in_samples``, or a decoder's fixed count)
    overrides ceil(ratio x steps)."""
    if warmup_steps is None:
        warmup_steps = warmup_steps_for(total_steps, warmup_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps, min_ratio, shape))
