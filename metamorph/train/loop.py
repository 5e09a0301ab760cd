"""The training loop for both LLM stages: DDP or FSDP2, grad accumulation, checkpoint/resume.

    python -m pytest tests/unit/test_train_loop.py -q     # runs it as one plain process

Uses only ``torch.distributed``: Ray Train workers call it after Ray set up the process group
(stages/_training.py); without a process group it is a plain single-process loop.

Per optimizer step: ``grad_accum`` micro-batches, or with ``global_batch_samples`` as many
micro-batch rounds as hold that many samples (a plan every rank derives from the shards' sample
counts, see metamorph.train.schedule); gradient sync only on the last; each micro-batch's loss
weighted by its share of the step's samples; clip, AdamW, cosine LR. Every ``log_every`` steps
the window's losses and token counts are all-reduced and handed to ``on_log`` on every rank
(identical values; side effects such as MLflow belong on rank 0, while Ray's ``report`` is a
barrier every rank must reach). Every
``checkpoint_every`` steps and at the end: a checkpoint (metamorph.train.checkpoint). On start
the loop resumes from the newest complete checkpoint under ``checkpoint_root``, so a restarted
worker group and a rerun of the stage both continue where the last checkpoint left off.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from metamorph.train import checkpoint as ckpt
from metamorph.train.config import TrainConfig
from metamorph.train.reader import ShardReader
from metamorph.train.schedule import (
    steps_from_samples,
    warmup_cosine_scheduler,
    warmup_steps_for,
    warmup_steps_in_samples,
)

LogFn = Callable[[int, dict[str, float]], None]


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """Peak LR: ``cfg.lr``, or the sqrt-scaled LR when ``cfg.lr_base_batch`` is set."""
    return cfg.peak_lr(world_size)


@dataclass
class StepPlan:
    """Micro-batches per optimizer step and, when steps count samples, the samples in each step."""

    rounds: list[int]  # micro-batches (per rank) in each step
    samples: list[int] | None  # samples in each step, summed over ranks (None: row rule)
    warmup_steps: int

    @property
    def total_steps(self) -> int:
        return len(self.rounds)


def plan_steps(cfg: TrainConfig, reader: ShardReader) -> StepPlan:
    """The run's optimizer steps: ``grad_accum`` micro-batches each (rows), or sample-counted."""
    if not cfg.counts_samples:
        total = cfg.max_steps or reader.batches_in(cfg.epochs) // cfg.grad_accum
        if total < 1:
            raise ValueError(
                f"train.epochs={cfg.epochs} gives {reader.batches_in(cfg.epochs)} micro-batches per worker, fewer "
                f"than train.grad_accum={cfg.grad_accum}: train longer or tokenize more data"
            )
        return StepPlan([cfg.grad_accum] * total, None, warmup_steps_for(total, cfg.warmup_ratio))
    B = cfg.global_batch_samples
    epochs = cfg.epochs if not cfg.max_steps else 1.0
    while True:
        rounds = reader.round_samples(epochs)
        steps = steps_from_samples(rounds, B)
        if not cfg.max_steps or len(steps) >= cfg.max_steps or epochs > 1000:
            break
        epochs += 1.0
    if rounds and sum(rounds) / len(rounds) > B:
        raise ValueError(
            f"train.global_batch_samples={B}, but one round of micro-batches (train.micro_batch_size="
            f"{cfg.micro_batch_size} rows on {reader.world_size} workers) holds {sum(rounds) / len(rounds):.0f} "
            "samples on average: lower micro_batch_size or num_workers, or raise global_batch_samples"
        )
    if cfg.max_steps:
        steps = steps[: cfg.max_steps]
    if not steps or (cfg.max_steps and len(steps) < cfg.max_steps):
        raise ValueError(
            f"train.global_batch_samples={B}: the tokenized data holds {sum(rounds)} samples in train.epochs="
            f"{cfg.epochs}, not enough for one step; lower it or tokenize more data"
        )
    samples, i = [], 0
    for k in steps:
        samples.append(int(sum(rounds[i : i + k])))
        i += k
    return StepPlan(steps, samples, warmup_steps_in_samples(samples, cfg.warmup_ratio))


def flops_per_token(model: nn.Module, n_layers: int = 0, hidden: int = 0, seq_len: int = 0) -> float:
    """Training FLOPs per token, for MFU: forward 2N, backward 2N for activation gradients plus
    2N_trainable for weight gradients (N = parameters outside embedding tables, which are lookups),
    plus attention scores 12 * layers * hidden * seq_len (PaLM appendix B). Frozen layers still
    pay the activation backward whenever anything before them trains (the stage-1 projector)."""
    n = n_trainable = 0
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            continue
        for p in m.parameters(recurse=False):
            n += p.numel()
            n_trainable += p.numel() if p.requires_grad else 0
    return 4.0 * n + 2.0 * n_trainable + 12.0 * n_layers * hidden * seq_len


@dataclass
class _Window:
    """Sums over the steps since the last log, all-reduced at log time."""

    loss: float = 0.0
    n_loss: int = 0
    text: float = 0.0
    n_text: int = 0
    vision: float = 0.0
    n_vision: int = 0
    tokens: int = 0
    steps: int = 0
    grad_norm: float = 0.0

    def add(self, losses: list[float], counts: list[float], grad_norm: float) -> None:
        self.loss, self.text, self.vision = self.loss + losses[0], self.text + losses[1], self.vision + losses[2]
        self.n_loss += int(counts[0])
        self.n_text += int(counts[1])
        self.n_vision += int(counts[2])
        self.tokens += int(counts[3])
        self.steps += 1
        self.grad_norm += grad_norm


def train_loop(
    model: nn.Module,
    cfg: TrainConfig,
    reader: ShardReader,
    *,
    checkpoint_root: str | Path,
    export_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    on_log: LogFn | None = None,
    flops_per_tok: float = 0.0,
    loss_args: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Train ``model`` (trainable flags already set) on ``reader``'s batches; return run stats.

    ``model(**batch, **loss_args)`` must return an object with ``loss`` (and optionally
    ``text_loss``, ``vision_loss``); ``loss_args`` are the loss's own arguments, set by the stage
    that trains (train_vpit's ``vision_coef``). ``export_dir``: rank 0 writes the final weights there
    (``save_pretrained`` when the model has it, else safetensors).
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if reader.world_size != world or reader.rank != rank:
        raise ValueError(f"reader is for rank {reader.rank}/{reader.world_size}, this process is {rank}/{world}")
    on_gpu = device.type == "cuda"
    bf16 = cfg.precision == "bf16" and (on_gpu or cfg.bf16_on_cpu)

    # --- model: device, activation checkpointing, DDP or FSDP2
    if cfg.strategy != "fsdp2":
        model.to(device)  # fully_shard moves each shard to the device itself (no full copy on it)
    if cfg.grad_checkpointing:
        _enable_grad_checkpointing(model)
    model.train()
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no trainable parameters: call set_trainable(...) before train_loop")
    train_model = _wrap(model, cfg, device, world, bf16)

    # --- optimizer and schedule
    params = [p for p in train_model.parameters() if p.requires_grad]
    peak_lr = effective_lr(cfg, world)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
    plan = plan_steps(cfg, reader)
    total_steps = plan.total_steps
    scheduler = warmup_cosine_scheduler(
        optimizer, total_steps, cfg.warmup_ratio, cfg.min_lr_ratio, warmup_steps=plan.warmup_steps
    )

    # --- resume from the newest complete checkpoint, else start from the seed
    torch.manual_seed(cfg.seed * 1000 + rank)  # dropout streams differ per rank
    step, tokens_seen, first, last = 0, 0, {}, {}
    latest = ckpt.latest_checkpoint(checkpoint_root)
    if latest is not None:
        state = ckpt.load_checkpoint(latest, train_model, optimizer)
        if state["total_steps"] != total_steps:
            raise ValueError(
                f"checkpoint {latest} was made for {state['total_steps']} steps, this run has {total_steps}: "
                "the LR schedule would not match; keep the train config or start a fresh checkpoint dir"
            )
        step, tokens_seen = state["step"], state["tokens_seen"]
        first, last = state["first_metrics"], state["last_metrics"]
        reader.load_state_dict(state["reader"])
        scheduler.load_state_dict(state["scheduler"])
        if reader.rounds_done != sum(plan.rounds[:step]):
            raise ValueError(
                f"checkpoint {latest}: the data position ({reader.rounds_done} micro-batches) does not match "
                f"step {step} of this run's plan; keep the train config or start a fresh checkpoint dir"
            )
    start_step = step
    batches: Iterator[dict[str, Any]] = iter(reader)

    def save(step: int) -> None:
        state = {
            "step": step,
            "total_steps": total_steps,
            "tokens_seen": tokens_seen,
            "reader": reader.state_dict(),
            "scheduler": scheduler.state_dict(),
            "first_metrics": first,
            "last_metrics": last,
        }
        ckpt.save_checkpoint(checkpoint_root, step, train_model, optimizer, state, cfg.keep_last)

    # --- the loop
    win = _Window()
    t_win = time.perf_counter()
    # throughput after the first log window (allocator warm-up, DDP's first bucket rebuild)
    steady_steps, steady_seconds, logged_once = 0, 0.0, False
    while step < total_steps:
        loss_sum = torch.zeros(3, device=device)  # total, text, vision loss sums over micro-batches
        counts = torch.zeros(4)  # micro-batches, with text targets, with visual targets, tokens
        n_micro = plan.rounds[step]
        for micro in range(n_micro):
            cpu_batch = next(batches)
            # this micro-batch's share of the step's gradient: the gradient all-reduce averages
            # over ranks, so a rank's share is scaled by the world size
            if plan.samples is not None:
                weight = _count_samples(cpu_batch) * world / plan.samples[step]
            else:
                weight = 1.0 / n_micro
            # which losses this micro-batch has, decided on the host (no device sync)
            has_text = "labels" not in cpu_batch or bool((cpu_batch["labels"] != -100).any())
            has_vision = bool(cpu_batch["response_visual_mask"].any()) if "response_visual_mask" in cpu_batch else True
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
            with _grad_sync(train_model, cfg.strategy, enabled=micro == n_micro - 1), _autocast(device, bf16):
                out = train_model(**batch, **(loss_args or {}))
                (out.loss * weight).backward()
            loss_sum[0] += out.loss.detach().float()
            counts[0] += 1
            counts[3] += _count_tokens(cpu_batch)
            text_loss, vision_loss = getattr(out, "text_loss", None), getattr(out, "vision_loss", None)
            if has_text and text_loss is not None:
                loss_sum[1] += text_loss.detach().float()
                counts[1] += 1
            if has_vision and vision_loss is not None:
                loss_sum[2] += vision_loss.detach().float()
                counts[2] += 1
        grad_norm = _clip_grad_norm(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        win.add(loss_sum.tolist(), counts.tolist(), grad_norm)  # one host sync per step

        if step % cfg.log_every == 0 or step == total_steps:
            metrics = _reduce_window(win, device, world)
            window_tokens = metrics.pop("_tokens")
            tokens_seen += int(window_tokens)
            wall = time.perf_counter() - t_win
            if logged_once:
                steady_steps, steady_seconds = steady_steps + win.steps, steady_seconds + wall
            logged_once = True
            metrics.update(
                lr=scheduler.get_last_lr()[0],
                tokens_per_s=window_tokens / max(wall, 1e-9),
                step_time_s=wall / win.steps,
                tokens_seen=float(tokens_seen),
                epoch=reader.epoch + reader.batch_in_epoch / max(1, reader.batches_per_epoch(reader.epoch)),
            )
            if cfg.peak_flops > 0 and flops_per_tok > 0:
                metrics["mfu"] = metrics["tokens_per_s"] * flops_per_tok / (cfg.peak_flops * world)
            first = first or {k: v for k, v in metrics.items() if k.endswith("loss")}
            last = {k: v for k, v in metrics.items() if k.endswith("loss")}
            if on_log is not None:
                on_log(step, metrics)
            win = _Window()
            t_win = time.perf_counter()

        if step == total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
            t_save = time.perf_counter()
            save(step)
            t_win += time.perf_counter() - t_save  # checkpoint time is not training throughput

    # --- export the final weights from rank 0 (collective gather first for FSDP2 shards)
    if export_dir is not None:
        full_sd = get_model_state_dict(train_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            _export(model, full_sd, Path(export_dir), sharded=cfg.strategy == "fsdp2")
        if dist.is_initialized():
            dist.barrier()

    result = {
        "steps": float(total_steps),
        "start_step": float(start_step),
        "tokens": float(tokens_seen),
        "seconds": time.perf_counter() - t_start,
        "steps_per_s": steady_steps / steady_seconds if steady_seconds else 0.0,
        "peak_lr": peak_lr,
        "global_batch": float(cfg.global_batch_rows(world)),
        "warmup_steps": float(plan.warmup_steps),
    }
    if plan.samples is not None:
        result["global_batch_samples"] = float(cfg.global_batch_samples)
        result["mean_samples_per_step"] = sum(plan.samples) / len(plan.samples)
        result["mean_rows_per_step"] = sum(plan.rounds) / len(plan.rounds) * cfg.micro_batch_size * world
    result.update({f"first_{k}": v for k, v in first.items()})
    result.update({f"final_{k}": v for k, v in last.items()})
    return result


# ---- helpers (kept small; the loop above is the part to read)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: weight decay on matrices only, never on norms,
    biases or what ``model.no_weight_decay()`` names (timm's convention for position tables; the
    MetaMorph model's slot and image-ordinal embeddings). The paper trains at wd 0 anyway.
    Parameters are read off the unwrapped model (DDP's wrapper and FSDP2 hold the same objects)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if p.ndim >= 2 and n not in skip], "weight_decay": weight_decay},
        {"params": [p for n, p in named if p.ndim < 2 or n in skip], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int, bf16: bool) -> nn.Module:
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            raise ValueError("train.strategy=fsdp2 needs a process group (run it under Ray Train)")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in decoder_blocks(model):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if world > 1:
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    return model


def _enable_grad_checkpointing(model: nn.Module) -> None:
    """Turn on the HF model's own block-level checkpointing (the LLM inside a wrapper counts)."""
    # non-reentrant: works when the block inputs need no grad (frozen embeddings)
    kwargs = {"use_reentrant": False}
    for m in model.modules():
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            return
        if hasattr(m, "gradient_checkpointing_enable"):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            return
    raise ValueError(f"train.grad_checkpointing: {type(model).__name__} holds no HF model to checkpoint")


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks to shard one by one: classes named in a HF model's ``_no_split_modules``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"train.strategy=fsdp2: found no decoder blocks in {type(model).__name__} "
                         "(no _no_split_modules classes); use strategy=ddp")
    return blocks


@contextlib.contextmanager
def _grad_sync(model: nn.Module, strategy: str, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif strategy == "fsdp2" and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def _autocast(device: torch.device, bf16: bool):
    # FSDP2 casts parameters itself (MixedPrecisionPolicy); autocast covers DDP on GPU
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _count_samples(batch: Mapping[str, Any]) -> int:
    """Packed samples in a collated batch: the largest segment id of each row (segments are 1..k)."""
    if "segment_ids" in batch:
        return int(batch["segment_ids"].amax(dim=1).sum())
    return int(batch["input_ids"].shape[0])


def _count_tokens(batch: Mapping[str, Any]) -> int:
    if "segment_ids" in batch:
        return int((batch["segment_ids"] != 0).sum())
    return int(batch["input_ids"].numel())


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor norm over the shards
        norm = norm.full_tensor()
    return float(norm)


def _reduce_window(win: _Window, device: torch.device, world: int) -> dict[str, float]:
    t = torch.tensor(
        [win.loss, win.n_loss, win.text, win.n_text, win.vision, win.n_vision, win.tokens],
        dtype=torch.float64, device=device,
    )
    if dist.is_initialized():
        dist.all_reduce(t)
    loss, n_loss, text, n_text, vision, n_vision, tokens = t.tolist()
    metrics = {
        "loss": loss / max(n_loss, 1),
        "grad_norm": win.grad_norm / max(win.steps, 1),  # identical on every rank after sync
        "_tokens": tokens,
    }
    if n_text:
        metrics["text_loss"] = text / n_text
    if n_vision:
        metrics["vision_loss"] = vision / n_vision
    return metrics


def _export(model: nn.Module, full_sd: dict[str, torch.Tensor], export_dir: Path, sharded: bool) -> None:
    export_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        # FSDP2 left DTensor shards on the module: hand over the gathered full tensors instead
        model.save_pretrained(export_dir, state_dict=full_sd) if sharded else model.save_pretrained(export_dir)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full_sd.items()}, str(export_dir / "model.safetensors"))
