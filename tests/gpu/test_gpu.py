"""Tests that need a CUDA GPU (skipped without one): the cluster's device code path.

    python -m pytest tests/gpu -q        # on a GPU machine; every test here skips elsewhere

* train_loop with FSDP2, the bf16 MixedPrecisionPolicy and activation checkpointing over NCCL
  (one process per GPU), on the real MetaMorph model, with a checkpoint and a resume.
* The smoke DAG with ``use_gpu``, bf16 and FSDP2 on every GPU training stage, through Ray.
"""

from __future__ import annotations

import functools
import math
import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shards: str, out: str, steps: int) -> None:
    import torch.distributed as dist

    from metamorph.data import packing
    from metamorph.train.config import TrainConfig
    from metamorph.train.loop import train_loop
    from metamorph.train.reader import ShardReader
    from tests.unit.test_train_loop import _metamorph
    from tests.unit.train_fixtures import FEAT

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        cfg = TrainConfig(strategy="fsdp2", precision="bf16", grad_checkpointing=True,
                          micro_batch_size=4, max_steps=steps, lr=1e-2, warmup_ratio=0.1, checkpoint_every=2,
                          log_every=1)
        reader = ShardReader(shards, rank=rank, world_size=world, micro_batch_size=4,
                             collate=functools.partial(packing.collate, feature_dim=FEAT))
        stats = train_loop(_metamorph(), cfg, reader, checkpoint_root=Path(out) / "ck",
                           export_dir=Path(out) / "export", device=torch.device("cuda", rank))
        if rank == 0:
            (Path(out) / f"stats-{steps}.txt").write_text(repr(stats))
    finally:
        dist.destroy_process_group()


def test_fsdp2_bf16_over_nccl_trains_checkpoints_and_resumes(tmp_path):
    import torch.multiprocessing as mp

    from tests.unit.train_fixtures import write_shards

    world = max(1, min(2, torch.cuda.device_count()))
    shards = write_shards(tmp_path / "tok", n_rows=64, per_file=32, row_group=4)
    mp.spawn(_worker, args=(world, _free_port(), str(shards), str(tmp_path), 4), nprocs=world)
    first = eval((tmp_path / "stats-4.txt").read_text())  # noqa: S307 - our own repr of floats
    assert first["steps"] == 4 and first["final_text_loss"] < first["first_text_loss"]
    # the same run again resumes from its final checkpoint (DCP, sharded by FSDP2) and does no work
    mp.spawn(_worker, args=(world, _free_port(), str(shards), str(tmp_path), 4), nprocs=world)
    again = eval((tmp_path / "stats-4.txt").read_text())  # noqa: S307
    assert again["start_step"] == 4
    assert (tmp_path / "export" / "heads.safetensors").is_file()


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), num_gpus=torch.cuda.device_count(),
                 include_dashboard=False, object_store_memory=1024 * 2**20)
    yield ray
    ray.shutdown()


def test_smoke_dag_on_gpu_with_fsdp2_and_bf16(ray_gpu, tmp_path):
    from pipelines.commands import execute
    from pipelines.config import load_config
    from pipelines.definitions import get_pipeline

    n = torch.cuda.device_count()
    train = [f"stages.{s}.{k}={v}" for s in ("train_connector", "train_vpit")
             for k, v in (("scaling.use_gpu", "true"), ("train.strategy", "fsdp2"), ("train.precision", "bf16"),
                          ("scaling.num_workers", n), ("scaling.gpus_per_worker", 1.0), ("scaling.cpus_per_worker", 1.0))]
    overrides = [f"run_root={tmp_path}", *train, "stages.train_decoder.scaling.use_gpu=true",
                 "stages.train_decoder.train.bf16=true", "stages.evaluate.use_gpu=true"]
    pipeline = get_pipeline("vpit")
    summary = execute(pipeline, load_config(pipeline.stages, preset="smoke", overrides=overrides), name="smoke-gpu")
    assert set(summary.statuses.values()) == {"ran"}, summary.statuses
    for stage in ("train_connector", "train_vpit"):
        stats = summary.stats[stage]
        assert stats["steps"] > 0 and math.isfinite(stats["final_loss"]), stage


def test_fsdp2_bf16_compute_dtype_is_bf16_on_gpu():
    """The bf16 policy really computes in bf16 on a GPU (params stay fp32 masters)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        lin = torch.nn.Linear(16, 16).cuda()
        seen = {}
        lin.register_forward_hook(lambda m, i, o: seen.setdefault("dtype", o.dtype))
        fully_shard(lin, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        lin(torch.randn(2, 16, device="cuda")).sum().backward()
        assert seen["dtype"] == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in lin.parameters())
    finally:
        dist.destroy_process_group()

