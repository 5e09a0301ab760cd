"""Training checkpoints for every training loop here (the LLM stages and the decoder): save every N
steps, keep the last K, resume from the latest complete one.

    python -m metamorph.train.checkpoint runs/train_connector/<key>.ckpt/loop   # list checkpoints

Layout of one checkpoint, ``{root}/step-{NNNNNNNN}/``:

    dcp/              model + optimizer (+ any extra tensors, e.g. EMA weights),
                      torch.distributed.checkpoint (each rank writes what it owns: a DDP replica
                      is written once, an FSDP2 shard by its owner). Frozen parameters are left
                      out: they are rebuilt exactly from the model's source.
    rng-rank{r}.pt    that rank's RNG states (torch CPU/CUDA, python), torch.save of tensors and
                      tuples only, so ``torch.load(weights_only=True)`` reads it (no pickle code).
    state.json        rank 0: step, data-reader position, LR-scheduler state, run counters.
    COMPLETE          written last, after every rank finished: a dir without it is ignored
                      (a crash mid-save never looks like a checkpoint) and deleted later.

Every rank must see ``root`` (a local dir on one machine, shared storage on a cluster).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

MARKER = "COMPLETE"
_PREFIX = "step-"
# Frozen parameters (the LLM in stage 1) are not saved: smaller checkpoints, and the run rebuilds
# them deterministically from the same config/seed or upstream export before loading.
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: the frozen keys are absent on purpose. DCP still fails on any trainable key the
# checkpoint lacks (it loads exactly the keys _OPTIONS asks for), so nothing slips through.
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def _step_of(path: Path) -> int:
    return int(path.name[len(_PREFIX) :])


def list_checkpoints(root: Path, complete_only: bool = True) -> list[Path]:
    """Checkpoint dirs under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()]
    if complete_only:
        dirs = [p for p in dirs if (p / MARKER).is_file()]
    return sorted(dirs, key=_step_of)


def latest_checkpoint(root: Path) -> Path | None:
    done = list_checkpoints(root)
    return done[-1] if done else None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dcp_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """What DCP saves and loads (in place): the trainable model state, the optimizer, ``extra``."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    sd = {"model": model_sd, "optim": optim_sd}
    if extra:
        sd["extra"] = extra
    return sd


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
    extra: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Collective: every rank calls it. ``state`` (JSON-serialisable: step, scheduler, counters) is
    taken from rank 0; ``extra``: more tensors saved with the model (the same on every rank)."""
    path = step_dir(root, step)
    rank = _rank()
    if rank == 0:
        if path.exists():  # an incomplete leftover of a crashed attempt at this step
            shutil.rmtree(path)
        path.mkdir(parents=True)
    _barrier()

    sd = _dcp_state(model, optimizer, extra)
    with _single_process_quiet():
        dcp.save(sd, checkpoint_id=str(path / "dcp"), no_dist=not dist.is_initialized())
    torch.save(_rng_state(), path / f"rng-rank{rank}.pt")
    if rank == 0:
        _write_atomic(path / "state.json", json.dumps(state, indent=1, sort_keys=True))
    _barrier()  # every rank's files are on disk before the marker says so

    if rank == 0:
        _write_atomic(path / MARKER, json.dumps({"step": step}))
        _prune(Path(root), keep_last)
    return path


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Collective: load model/optimizer/RNG (and ``extra``'s tensors, in place: pass tensors of
    the saved names and shapes) into this rank; return the saved ``state`` dict."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    sd = _dcp_state(model, optimizer, extra)
    with _single_process_quiet():
        dcp.load(sd, checkpoint_id=str(path / "dcp"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=_LOAD_OPTIONS)
    rng_file = path / f"rng-rank{_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "state.json").read_text())


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(root: Path, keep_last: int) -> None:
    done = list_checkpoints(root)
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    # incomplete dirs older than the newest complete one are dead attempts
    if done:
        newest = _step_of(done[-1])
        for p in list_checkpoints(root, complete_only=False):
            if _step_of(p) < newest and not (p / MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)


def main() -> None:
    root = Path(sys.argv[1])
    for p in list_checkpoints(root, complete_only=False):
        state = "complete" if (p / MARKER).is_file() else "incomplete"
        print(f"{p.name}  {state}")


if __name__ == "__main__":
    main()
