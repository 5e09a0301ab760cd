"""Training-loop configuration shared by the connector (stage 1) and VPiT (stage 2) stages.

    python -c "from metamorph.train.config import TrainConfig; print(TrainConfig())"

Defaults suit the `tiny` preset (2 CPU workers, a few minutes); conf/presets/*.yaml override them
under `stages.<train stage>.train`. Global batch = micro_batch_size x grad_accum x num_workers
packed sequences per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGIES = ("ddp", "fsdp2")
PRECISIONS = ("bf16", "fp32")


@dataclass(kw_only=True)
class TrainConfig:
    # --- scaling (operational: they change speed, not the math, given the same global batch)
    num_workers: int = 2  # Ray Train workers (one process each; one GPU each when use_gpu)
    # CPUs reserved per worker. Fractional on purpose: on a 2-core box two workers at 1.0 would
    # take every CPU and starve the Ray driver/Data tasks (Ray Train then hangs waiting for them).
    cpus_per_worker: float = 0.5
    use_gpu: bool = False  # nccl + one device per worker; False: CPU with gloo
    gpus_per_worker: float = 1.0  # only read when use_gpu
    strategy: str = "ddp"  # "ddp" (replicate) | "fsdp2" (fully_shard per decoder block; >1B params)
    # "bf16": on GPU, FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32) / autocast for DDP.
    # CPU always trains in fp32 (bf16 matmuls are slower than fp32 on most CPUs).
    precision: str = "bf16"
    max_failures: int = 2  # Ray Train worker-group restarts before the stage fails
    # DDP only: tolerate trainable parameters without a gradient in a step (an extra autograd
    # traversal per step). MetaMorph touches every parameter in every forward, so off.
    find_unused_parameters: bool = False

    # --- batch and length of the run
    micro_batch_size: int = 4  # packed rows per worker per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 0  # optimizer steps; 0: derive from `epochs`
    epochs: float = 1.0  # passes over the tokenized shards when max_steps == 0 (paper: 1)

    # --- optimisation (AdamW, cosine schedule)
    lr: float = 1e-3  # peak LR (at lr_base_batch global batch when that is > 0)
    # > 0: apply the paper's rule lr * sqrt(global_batch / lr_base_batch) (schedule.sqrt_scaled_lr);
    # the paper's bases: 448 @ 3.74e-5 (stage 1), 1536 @ 6.93e-5 (stage 2). 0: use lr as given.
    lr_base_batch: int = 0
    warmup_ratio: float = 0.03  # fraction of the steps with linear warmup (paper: 3%)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak LR
    weight_decay: float = 0.0  # paper: 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad L2 norm; 0 disables clipping (the norm is still logged)
    seed: int = 0  # model init (stage 1), dropout and data order
    shuffle: bool = True  # seeded shuffle of row groups and of rows inside a group, per epoch
    # Recompute decoder-block activations in backward: ~30% slower, far less activation memory.
    grad_checkpointing: bool = False

    # --- checkpoints and logging (operational)
    checkpoint_every: int = 50  # optimizer steps between checkpoints (0: only the final one)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted
    log_every: int = 10  # optimizer steps between metric logs (each is one all-reduce + report)
    # Peak FLOP/s of ONE worker's device, for the MFU estimate (H100 bf16 dense: 989e12; one
    # modern CPU core ~5e10-1e11 fp32). 0 disables MFU.
    peak_flops: float = 1e11

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"train.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"train.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            raise ValueError("train.gpus_per_worker must be > 0 when train.use_gpu is true")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_failures < -1:
            raise ValueError("train.max_failures must be >= 0, or -1 for unlimited restarts")
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise ValueError(f"train.max_steps must be >= 0 (0: use train.epochs), got {self.max_steps}")
        if self.max_steps == 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"train.epochs must be > 0 when train.max_steps is 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.lr_base_batch < 0:
            raise ValueError(f"train.lr_base_batch must be >= 0 (0: no sqrt scaling), got {self.lr_base_batch}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        if self.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1 (resume needs one), got {self.keep_last}")
        if self.log_every < 1:
            raise ValueError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.peak_flops < 0:
            raise ValueError(f"train.peak_flops must be >= 0 (0 disables MFU), got {self.peak_flops}")

    @property
    def global_batch(self) -> int:
        """Packed sequences per optimizer step, summed over workers."""
        return self.micro_batch_size * self.grad_accum * self.num_workers


# Fields that change speed or bookkeeping but not the trained weights: outside the cache key.
OPERATIONAL_FIELDS = (
    "cpus_per_worker",
    "gpus_per_worker",
    "max_failures",
    "grad_checkpointing",
    "checkpoint_every",
    "keep_last",
    "log_every",
    "peak_flops",
)
