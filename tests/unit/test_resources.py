"""`metamorph run --dry-run` checks (pipelines/resources.py), without Ray.

    python -m pytest tests/unit/test_resources.py -q
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest

from metamorph.train.config import TrainConfig
from stages._training import Scaling
from pipelines import resources as R
from pipelines.runner import PlanItem
from pipelines.stage import Stage, StageConfig


@dataclass(kw_only=True)
class _Src:
    name: str = "s"
    path: str = "world:generation"
    image_root: Optional[str] = None


@dataclass(kw_only=True)
class _Model:
    path: Optional[str] = None


@dataclass(kw_only=True)
class _Cfg(StageConfig):
    model: _Model = field(default_factory=_Model)
    sources: list[_Src] = field(default_factory=lambda: [_Src()])
    extra_path: Optional[str] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: Scaling = field(default_factory=lambda: Scaling(num_workers=2, cpus_per_worker=1.0))


class _Train(Stage):
    name = "t"
    config_cls = _Cfg

    def validate(self, cfg):
        if cfg.extra_path == "bad":
            raise ValueError("t.extra_path='bad' is rejected by the stage")

    def resources(self, cfg):
        return cfg.scaling.resources()


def _engine(cfg: _Cfg):
    stage = _Train()
    engine = SimpleNamespace(dag=SimpleNamespace(stages={"t": stage}), stage_cfgs={"t": cfg})
    return engine, [PlanItem("t", "k", "run", "", Path("/nonexistent"))]


def test_missing_paths_are_named_by_key(tmp_path):
    have = tmp_path / "llm"
    have.mkdir()
    cfg = _Cfg(model=_Model(path=str(tmp_path / "nope")),
               sources=[_Src(), _Src(name="b", path=str(have), image_root=str(tmp_path / "imgs"))],
               extra_path=str(have))
    engine, plan = _engine(cfg)
    problems, warnings = R.check_paths(engine, plan)
    assert len(problems) == 2 and not warnings
    assert any("stages.t.model.path=" in p and "nope" in p for p in problems)
    assert any("stages.t.sources[1].image_root=" in p for p in problems)  # world: sources are produced by the run


def test_stage_validate_problems_are_collected_not_raised(tmp_path):
    engine, plan = _engine(_Cfg(extra_path="bad"))
    problems = R.check_stage_configs(engine, plan)
    assert problems == ["stage 't': t.extra_path='bad' is rejected by the stage"]
    # the generic path check does not report the same value twice
    assert R.check_paths(engine, plan, problems)[0] == []


def test_resources_total_and_per_node():
    engine, plan = _engine(_Cfg(scaling=Scaling(num_workers=4, use_gpu=True, gpus_per_worker=2.0, cpus_per_worker=8.0)))
    nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}]
    assert R.check_resources(engine, plan, {"CPU": 32.0, "GPU": 8.0}, nodes) == []
    # enough GPUs in total, but a 3-GPU worker fits only once on each 4-GPU node
    engine, plan = _engine(_Cfg(scaling=Scaling(num_workers=2, use_gpu=True, gpus_per_worker=3.0, cpus_per_worker=1.0)))
    assert R.check_resources(engine, plan, {"CPU": 32.0, "GPU": 8.0}, nodes) == []
    engine, plan = _engine(_Cfg(scaling=Scaling(num_workers=3, use_gpu=True, gpus_per_worker=3.0, cpus_per_worker=1.0)))
    problems = R.check_resources(engine, plan, {"CPU": 32.0, "GPU": 9.0}, nodes + [{"CPU": 4.0, "GPU": 1.0}])
    assert len(problems) == 1 and "do not fit the cluster's nodes" in problems[0] and "only 2" in problems[0]
    # no GPUs at all
    problems = R.check_resources(engine, plan, {"CPU": 32.0}, [{"CPU": 32.0}])
    assert any("needs 9 GPU, the cluster has 0" in p for p in problems)


def test_run_root_checks(tmp_path):
    assert R.check_run_root(str(tmp_path / "a" / "b"), n_hosts=1) == ([], [])
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problems, _ = R.check_run_root(str(ro / "runs"), n_hosts=1)
        import os

        if os.geteuid() != 0:  # root writes anywhere
            assert problems and "not writable" in problems[0]
    finally:
        ro.chmod(0o700)
    problems, warnings = R.check_run_root("/", n_hosts=3)
    fstype = R._fs_type(Path("/"))
    if fstype.split(".")[0] in R.LOCAL_FS:
        assert problems and "spans 3 hosts" in problems[0]


def test_tracking_server_must_answer():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    problems, _ = R.check_tracking(f"http://127.0.0.1:{port}", n_hosts=1)
    assert problems and "tracking.uri" in problems[0]
    assert R.check_tracking(None, n_hosts=1) == ([], [])
    assert R.check_tracking(None, n_hosts=2)[1]  # sqlite across hosts: a warning


def test_worker_bundles_found_in_nested_configs():
    cfg = _Cfg(scaling=Scaling(num_workers=8, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=4.0))
    assert R.worker_bundles(cfg) == [(8, {"CPU": 4.0, "GPU": 1.0})]


# ---- the training table: steps in samples and memory per GPU, against a hand computation


def _train_engine(**train_kw):
    from metamorph.model.config import LLMConfig, MetaMorphConfig

    model = MetaMorphConfig(llm=LLMConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                          intermediate_size=176, vocab_size=100), vision_dim=32, n_tokens=16)
    base = dict(strategy="fsdp2", precision="bf16", micro_batch_size=2,
                global_batch_samples=64, expected_samples=1000, expected_samples_per_row=4.0, epochs=2.0,
                warmup_ratio=0.03, lr=1e-3, lr_base_batch=16, grad_checkpointing=True, gpu_memory_gb=80.0)
    train = TrainConfig(**{**base, **train_kw})
    scaling = Scaling(num_workers=4, use_gpu=True)
    cfgs = {"tokenize": SimpleNamespace(max_length=128),
            "train_connector": SimpleNamespace(model=model, train=train, scaling=scaling),
            "train_vpit": SimpleNamespace(train=train, scaling=scaling)}
    engine = SimpleNamespace(stage_cfgs=cfgs)
    plan = [PlanItem(n, "k", "run", "", Path("/nonexistent")) for n in ("train_connector", "train_vpit")]
    return engine, plan, model


def test_training_table_matches_a_hand_computation():
    engine, plan, model_cfg = _train_engine()
    (conn, vpit), problems = R.training_estimates(engine, plan)
    assert problems == []
    # d=64, 2 layers, 4 heads (kv 2 -> kv_dim 32), SwiGLU 176, vocab 100 untied, vision dim 32
    block = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176 + 2 * 64  # 46208
    projector, head = 32 * 64 + 64 + 64 * 64 + 64, 64 * 64 + 64 + 64 * 32 + 32  # 6272, 6240
    total = 100 * 64 + 2 * block + 64 + 100 * 64 + projector + head
    assert vpit.params == conn.params == total == 117792
    from metamorph.model.modeling import MetaMorphForCausalLM

    built = MetaMorphForCausalLM.from_config(
        dataclasses.replace(model_cfg, image_start_id=98, image_end_id=99, pad_id=0), seed=0)
    assert sum(p.numel() for p in built.parameters()) == total  # the formula is the real model's count
    assert vpit.trainable == total and conn.trainable == projector + 100 * 64  # stage 1: projector + embedding
    for est in (conn, vpit):
        assert est.samples_per_step == 64 and est.rows_per_step == 16 and est.tokens_per_step == 16 * 128
        assert (est.steps_per_epoch, est.total_steps, est.warmup_steps) == (1000 // 64, 2000 // 64, 1)  # 15, 31, ceil(0.93)
        assert est.peak_lr == pytest.approx(1e-3 * (64 / 16) ** 0.5)
    # memory of the vpit stage, bytes per GPU: FSDP2 over 4 workers, bf16 compute, checkpointing
    m = vpit.memory_gb
    gathered = 2 * (2 * block + (total - 2 * block))  # two bf16 blocks + the root's own weights
    assert m["params"] * 1e9 == pytest.approx(4 * total / 4 + gathered)
    assert m["grads"] * 1e9 == pytest.approx(4 * total / 4)
    assert m["optimizer"] * 1e9 == pytest.approx(8 * total / 4)
    tokens = 2 * 128
    per_layer = (8 * 64 + 2 * 32 + 4 * 176) * 2
    assert m["activations"] * 1e9 == pytest.approx(tokens * (2 * 64 * 2 + per_layer) + tokens * 100 * (2 + 4 + 4))
    assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total"))
    assert conn.memory_gb["optimizer"] * 1e9 == pytest.approx(8 * (projector + 6400) / 4)
    row = vpit.row()
    assert row[:8] == ("train_vpit", "64", "16.0", "2,048", "15", "31", "1", "0.002")


def test_training_table_flags_memory_over_the_gpu_budget():
    engine, plan, _ = _train_engine(gpu_memory_gb=3.0, grad_checkpointing=False)  # 3 GB: the overhead alone
    _, problems = R.training_estimates(engine, plan)
    assert len(problems) == 2 and all("train.gpu_memory_gb=3" in p for p in problems)
    # a round of micro-batches bigger than the sample batch is named too
    engine, plan, _ = _train_engine(global_batch_samples=16, micro_batch_size=4)
    _, problems = R.training_estimates(engine, plan)
    assert any("holds more than train.global_batch_samples=16" in p for p in problems)


def test_llm_shape_comes_from_the_checkpoint_when_present(tmp_path):
    import json

    from metamorph.model.config import LLMConfig, MetaMorphConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False}))
    shape = R.llm_shape(MetaMorphConfig(llm=LLMConfig(path=str(tmp_path))))
    assert (shape.hidden, shape.layers, shape.kv_dim, shape.vocab) == (4096, 32, 1024, 128258)  # + 2 image tokens
    # Llama-3.1-8B: 8.03B parameters (+ the two new rows, the projector and the vision head)
    total, _ = R.param_counts(MetaMorphConfig(llm=LLMConfig(path=str(tmp_path)), vision_dim=1152), shape, "vpit")
    assert 8.03e9 < total - 2 * 2 * 4096 - (1152 * 4096 + 2 * 4096 * 4096 + 4096 * 1152) < 8.04e9
    # no checkpoint yet: the llm fields describe it (the cluster preset fills them)
    assert R.llm_shape(MetaMorphConfig(llm=LLMConfig(path=str(tmp_path / "absent"), vocab_size=7))).vocab == 7
