"""train_loop as one plain process (and as 2 gloo processes for DDP vs FSDP2): learning,
checkpoint/resume equal to an uninterrupted run, pruning, and refusal of a mismatched resume.

    python -m pytest tests/unit/test_train_loop.py -q
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from metamorph.data import packing
from metamorph.train import checkpoint as ckpt
from metamorph.train.config import TrainConfig
from metamorph.train.loop import train_loop
from metamorph.train.reader import ShardReader
from tests.unit.train_fixtures import FEAT, N_IMG, VOCAB, ToyVPiT, collate, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("tok") / "tokenized", n_rows=96, per_file=48, row_group=8)


def _cfg(**kw) -> TrainConfig:
    base = dict(micro_batch_size=4, grad_accum=2, max_steps=12, lr=1e-2, warmup_ratio=0.1,
                checkpoint_every=4, keep_last=2, log_every=1, seed=0)
    return TrainConfig(**{**base, **kw})


def _run(shards, cfg, root: Path, export: Path | None = None, on_log=None, dropout=0.1, rank=0, world=1):
    torch.manual_seed(cfg.seed)  # model init, as the stages do
    model = ToyVPiT(dropout=dropout)
    reader = ShardReader(shards, rank=rank, world_size=world, micro_batch_size=cfg.micro_batch_size,
                         seed=cfg.seed, collate=collate)
    return train_loop(model, cfg, reader, checkpoint_root=root, export_dir=export, on_log=on_log, flops_per_tok=1e3)


def test_loss_falls_and_metrics_are_complete(shards, tmp_path):
    logged = []
    stats = _run(shards, _cfg(max_steps=40, grad_accum=1, log_every=5, checkpoint_every=0, lr=3e-2), tmp_path / "ck",
                 on_log=lambda s, m: logged.append((s, m)))
    assert [s for s, _ in logged] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert {"loss", "text_loss", "vision_loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu"} <= set(logged[0][1])
    assert stats["final_text_loss"] < 0.5 * stats["first_text_loss"]
    assert stats["final_vision_loss"] < stats["first_vision_loss"] - 0.05  # -cosine: lower is better
    assert stats["steps"] == 40 and stats["start_step"] == 0 and stats["tokens"] > 0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ck")] == ["step-00000040"]  # the final one


class _Crash(Exception):
    pass


def test_interrupted_run_resumes_to_identical_weights(shards, tmp_path):
    ref = _run(shards, _cfg(), tmp_path / "ref", export=tmp_path / "ref_out")

    def crash_after_6(step, metrics):
        if step == 6:
            raise _Crash  # dies between the checkpoints at 4 and 8

    with pytest.raises(_Crash):
        _run(shards, _cfg(), tmp_path / "ck", export=tmp_path / "out", on_log=crash_after_6)
    assert ckpt.latest_checkpoint(tmp_path / "ck").name == "step-00000004"
    # a half-written newer checkpoint (no marker) must be ignored
    (ckpt.step_dir(tmp_path / "ck", 6) / "dcp").mkdir(parents=True)

    resumed = _run(shards, _cfg(), tmp_path / "ck", export=tmp_path / "out")
    assert resumed["start_step"] == 4
    want, got = load_file(tmp_path / "ref_out" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert resumed["first_loss"] == ref["first_loss"]  # kept in the checkpoint across the crash
    assert resumed["final_loss"] == ref["final_loss"]
    # keep_last=2, and the dead step-6 attempt is gone
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "ck", complete_only=False)] == ["step-00000008", "step-00000012"]


def test_frozen_params_stay_and_are_not_checkpointed(shards, tmp_path):
    torch.manual_seed(0)
    model = ToyVPiT()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("projector")  # stage 1: connector only
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reader = ShardReader(shards, micro_batch_size=4, collate=collate)
    train_loop(model, _cfg(max_steps=3, checkpoint_every=0), reader, checkpoint_root=tmp_path / "ck")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) == (not k.startswith("projector")) for k in before)
    meta = torch.distributed.checkpoint.FileSystemReader(str(ckpt.latest_checkpoint(tmp_path / "ck") / "dcp")).read_metadata()
    model_keys = {k for k in meta.state_dict_metadata if k.startswith("model.")}
    assert model_keys and all(k.startswith("model.projector") for k in model_keys)
    # and a resume loads it into a model whose frozen weights come from the same seed
    torch.manual_seed(0)
    again = ToyVPiT()
    for name, p in again.named_parameters():
        p.requires_grad = name.startswith("projector")
    stats = train_loop(again, _cfg(max_steps=3, checkpoint_every=0), ShardReader(shards, micro_batch_size=4, collate=collate),
                       checkpoint_root=tmp_path / "ck")
    assert stats["start_step"] == 3
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())


def test_resume_with_other_length_is_refused(shards, tmp_path):
    _run(shards, _cfg(max_steps=4), tmp_path / "ck")
    with pytest.raises(ValueError, match="steps"):
        _run(shards, _cfg(max_steps=8), tmp_path / "ck")


# ---- the real MetaMorph model: DDP and FSDP2 on two gloo processes, activation checkpointing


def _metamorph():
    from metamorph.model.config import LLMConfig, MetaMorphConfig
    from metamorph.model.modeling import MetaMorphForCausalLM

    cfg = MetaMorphConfig(llm=LLMConfig(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                                        intermediate_size=32), vision_dim=FEAT, n_tokens=N_IMG,
                          image_start_id=VOCAB - 2, image_end_id=VOCAB - 1, pad_id=0)
    model = MetaMorphForCausalLM.from_config(cfg, seed=0)
    model.set_trainable("vpit")
    return model


def _run_metamorph(shards, cfg, out: Path, rank=0, world=1):
    reader = ShardReader(shards, rank=rank, world_size=world, micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                         collate=functools.partial(packing.collate, feature_dim=FEAT))
    return train_loop(_metamorph(), cfg, reader, checkpoint_root=out / "ck", export_dir=out / "export")


def _worker(rank: int, world: int, port: int, strategy: str, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = _cfg(strategy=strategy, max_steps=4, checkpoint_every=2, log_every=2)
        _run_metamorph(Path(shards), cfg, Path(out), rank=rank, world=world)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "model.safetensors")  # the HF export: one file, every weight


@pytest.mark.timeout(180)
def test_ddp_and_fsdp2_agree_on_two_processes(shards, tmp_path):
    """FSDP2 shards each LlamaDecoderLayer (found via _no_split_modules) and exports gathered
    full weights through save_pretrained(state_dict=...); fp32 on CPU it must match DDP."""
    for strategy in ("ddp", "fsdp2"):
        mp.spawn(_worker, args=(2, _free_port(), strategy, str(shards), str(tmp_path / strategy)), nprocs=2)
    ddp, fsdp = _export_weights(tmp_path / "ddp" / "export"), _export_weights(tmp_path / "fsdp2" / "export")
    assert ddp.keys() == fsdp.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], fsdp[k], rtol=1e-4, atol=1e-5)
    init = _metamorph().state_dict()  # the export's keys carry the HF wrapper's "vpit." prefix
    assert not torch.equal(init["llm.model.layers.0.mlp.up_proj.weight"], ddp["vpit.llm.model.layers.0.mlp.up_proj.weight"])


def test_grad_checkpointing_gives_the_same_steps(shards, tmp_path):
    cfg = _cfg(max_steps=2, grad_accum=1, checkpoint_every=0)
    plain = _run_metamorph(shards, cfg, tmp_path / "plain")
    ckpt_run = _run_metamorph(shards, dataclasses.replace(cfg, grad_checkpointing=True), tmp_path / "gc")
    assert ckpt_run["final_loss"] == pytest.approx(plain["final_loss"], rel=1e-5)
