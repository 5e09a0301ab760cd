"""Training-loop configuration shared by the connector (stage 1) and VPiT (stage 2) stages.

    python -c "from metamorph.train.config import TrainConfig; print(TrainConfig())"

Defaults suit the `tiny` preset (2 CPU workers, a few minutes); conf/presets/*.yaml override them
under `stages.<train stage>.train`. The worker group (how many, CPUs/GPUs each, restarts) is the
stage's ``scaling`` (stages/_training.py), not a library knob: the loop reads its world size from
the process group. A step is either ``grad_accum`` rounds of one micro-batch per worker (global
batch = micro_batch_size x grad_accum x world size packed rows: ``global_batch_rows``), or, with
``global_batch_samples`` > 0 (the paper's units), as many rounds as it takes to hold that many
samples (metamorph.train.schedule.steps_from_samples).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from metamorph.fields import operational

STRATEGIES = ("ddp", "fsdp2")
PRECISIONS = ("bf16", "fp32")


@dataclass(kw_only=True)
class TrainConfig:
    # --- parallelism and numerics
    strategy: str = "ddp"  # "ddp" (replicate) | "fsdp2" (fully_shard per decoder block; >1B params)
    # "bf16": on GPU, FSDP2 MixedPrecisionPolicy(param bf16, reduce fp32) / autocast for DDP.
    # CPU trains in fp32 (bf16 matmuls are slower than fp32 on most CPUs) unless bf16_on_cpu.
    precision: str = "bf16"
    # Run the bf16 policy on CPU too (FSDP2 bf16 all-gathers over gloo, or CPU autocast for DDP):
    # slower than fp32 there, but the cluster's numerics and code path (the rehearsal preset).
    bf16_on_cpu: bool = False
    # DDP only: tolerate trainable parameters without a gradient in a step (an extra autograd
    # traversal per step). MetaMorph touches every parameter in every forward, so off.
    find_unused_parameters: bool = False

    # --- batch and length of the run
    micro_batch_size: int = 4  # packed rows per worker per forward
    grad_accum: int = 1  # micro-batches per optimizer step (row rule only; must stay 1 with samples)
    # > 0: global batch in SAMPLES, as the paper counts it (one sample per padded row in the
    # official code): a step takes rounds of packed rows until the run holds k x this many
    # samples after step k; lr_base_batch and warmup then count samples too. 0: rows (grad_accum).
    global_batch_samples: int = 0
    max_steps: int = 0  # optimizer steps; 0: derive from `epochs`
    epochs: float = 1.0  # passes over the tokenized shards when max_steps == 0 (paper: 1)

    # --- optimisation (AdamW, cosine schedule)
    lr: float = 1e-3  # peak LR (at lr_base_batch global batch when that is > 0)
    # > 0: apply the paper's rule lr * sqrt(global_batch / lr_base_batch) (schedule.sqrt_scaled_lr),
    # the batch in samples with global_batch_samples, else in rows;
    # the paper's bases: 448 @ 3.74e-5 (stage 1), 1536 @ 6.93e-5 (stage 2). 0: use lr as given.
    lr_base_batch: int = 0
    # fraction of the run with linear warmup (paper: 3%): of the steps, or of the samples when
    # global_batch_samples > 0 (warmup ends at the step where 3% of the run's samples are seen)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak LR
    weight_decay: float = 0.0  # paper: 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0  # max global grad L2 norm; 0 disables clipping (the norm is still logged)
    seed: int = 0  # model init (stage 1), dropout and data order
    shuffle: bool = True  # seeded shuffle of row groups and of rows inside a group, per epoch
    # Recompute decoder-block activations in backward: ~30% slower, far less activation memory.
    grad_checkpointing: bool = field(default=False, metadata=operational())

    # --- checkpoints and logging (operational: outside the cache key)
    checkpoint_every: int = field(default=50, metadata=operational())  # optimizer steps between checkpoints (0: only the final one)
    keep_last: int = field(default=2, metadata=operational())  # complete checkpoints kept; older ones are deleted
    log_every: int = field(default=10, metadata=operational())  # optimizer steps between metric logs (each is one all-reduce + report)
    # Peak FLOP/s of ONE worker's device, for the MFU estimate (H100 bf16 dense: 989e12; one
    # modern CPU core ~5e10-1e11 fp32). 0 disables MFU.
    peak_flops: float = field(default=1e11, metadata=operational())

    # --- the dry run's estimate (operational: only `metamorph run --dry-run` reads them; the real
    # run counts the tokenized rows). Expected samples in the tokenized data and samples per
    # packed row (e.g. 4096-position rows of ~110-position t2i and ~300-position QA samples: ~20).
    expected_samples: int = field(default=0, metadata=operational())
    expected_samples_per_row: float = field(default=0.0, metadata=operational())
    gpu_memory_gb: float = field(default=80.0, metadata=operational())  # per-GPU memory the dry run's estimate must fit (GPU only)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for key in ("micro_batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.global_batch_samples < 0:
            raise ValueError(f"train.global_batch_samples must be >= 0 (0: count rows), got {self.global_batch_samples}")
        if self.global_batch_samples and self.grad_accum != 1:
            raise ValueError(
                f"train.grad_accum={self.grad_accum} with train.global_batch_samples={self.global_batch_samples}: "
                "a step's micro-batch count follows from the samples; leave train.grad_accum at 1"
            )
        if self.expected_samples < 0 or self.expected_samples_per_row < 0 or self.gpu_memory_gb <= 0:
            raise ValueError("train.expected_samples and train.expected_samples_per_row must be >= 0, "
                             "train.gpu_memory_gb > 0")
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

    def global_batch_rows(self, world_size: int) -> int:
        """Packed rows per optimizer step under the row rule, summed over ``world_size`` workers
        (the one place this product is formed)."""
        return self.micro_batch_size * self.grad_accum * world_size

    @property
    def counts_samples(self) -> bool:
        return self.global_batch_samples > 0

    def peak_lr(self, world_size: int) -> float:
        """``lr``, or ``lr x sqrt(batch / lr_base_batch)`` with the batch in the rule's unit
        (samples with global_batch_samples, else rows over ``world_size`` workers)."""
        if self.lr_base_batch <= 0:
            return self.lr
        from metamorph.train.schedule import sqrt_scaled_lr

        batch = self.global_batch_samples if self.counts_samples else self.global_batch_rows(world_size)
        return sqrt_scaled_lr(batch, self.lr_base_batch, self.lr)
