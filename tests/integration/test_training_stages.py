"""train_connector and train_vpit on local Ray Train (2 CPU workers, gloo), including a real
worker kill (Ray Train restarts the group, the loop resumes) and a stopped-then-rerun stage.

    python -m pytest tests/integration/test_training_stages.py -q -m integration

The shards are written here in the tokenize stage's format (metamorph.data.packing's packer and
writer) from a synthetic task, so these tests do not depend on the curation stages: the
response counts up from a "colour" token in the prompt, and a response image's features are a
fixed direction per colour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from metamorph.data.packing import PackSample, PartWriter, pack
from metamorph.data.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer, special_ids
from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.modeling_metamorph import load_vpit
from metamorph.train import checkpoint as ckpt
from metamorph.train.config import TrainConfig
from pipelines.testing import run_stage
from stages.train_connector import TrainConnector, TrainConnectorConfig
from stages._training import Scaling
from stages.train_vpit import TrainVPiT, TrainVPiTConfig

N_VIS, FEAT, MAX_LEN = 4, 16, 64
STEPS, CKPT_EVERY, KILL_AFTER = 40, 5, 10

pytestmark = [pytest.mark.integration]


def _samples(tok, n: int, seed: int = 0) -> list[PackSample]:
    ids = special_ids(tok)
    rng = np.random.default_rng(seed)
    specials = set(vars(ids).values())
    words = [i for i in range(40, len(tok)) if i not in specials]
    colours = words[:4]
    dirs = rng.standard_normal((4, N_VIS, FEAT))
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    out = []
    for k in range(n):
        c = int(rng.integers(4))
        prompt = [ids.bos, *rng.choice(words[4:], 3).tolist(), colours[c], ids.eot]
        start = words.index(colours[c])
        answer = [words[(start + j) % len(words)] for j in range(1, 6)] + [ids.eot]
        inp, lab = prompt + answer, [-100] * len(prompt) + answer
        vis = [False] * len(inp)
        feats = b""
        if k % 2 == 0:  # a response image, teacher-forced: <image_start> N x pad <image_end>
            inp = inp[:-1] + [ids.image_start] + [ids.pad] * N_VIS + [ids.image_end, ids.eot]
            lab = lab[:-1] + [ids.image_start] + [-100] * N_VIS + [ids.image_end, ids.eot]
            vis = [False] * (len(inp) - N_VIS - 2) + [True] * N_VIS + [False, False]
            feats = dirs[c].astype(np.float16).tobytes()
        out.append(PackSample(id=f"s{k}", input_ids=inp, labels=lab, visual_mask=vis,
                              response_visual_mask=list(vis), vision_feats=feats))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_inputs")
    tok = build_tokenizer(TokenizerConfig(vocab_size=300), ["the red green blue square circle"] * 20)
    tok.save_pretrained(root / "tokenizer")
    ids = special_ids(tok)
    rows = pack(_samples(tok, 160), MAX_LEN, ids.pad, window=8)
    meta = {"max_length": MAX_LEN, "n_visual": N_VIS, "feature_dim": FEAT, "vocab_size": len(tok), "pad_id": ids.pad}
    with PartWriter(root / "tokenized", row_group_size=4, rows_per_part=16, metadata=meta) as w:
        for r in rows:
            w.write(r)
    return {"tokenized": root / "tokenized", "tokenizer": root / "tokenizer"}


def _connector_cfg(max_failures: int = 2, **train) -> TrainConnectorConfig:
    model = MetaMorphConfig(llm=LLMConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64))
    base = dict(micro_batch_size=2, max_steps=STEPS, lr=1e-2, checkpoint_every=CKPT_EVERY, keep_last=2, log_every=5)
    return TrainConnectorConfig(model=model, train=TrainConfig(**{**base, **train}),
                                scaling=Scaling(num_workers=2, cpus_per_worker=0.5, max_failures=max_failures))


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")  # the HF export: one file, every weight


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


class _Killer(threading.Thread):
    """SIGKILLs training worker ``rank`` once the checkpoint of step ``after`` is complete."""

    def __init__(self, ckpt_dir: Path, after: int, rank: int = 1):
        super().__init__(daemon=True)
        self.marker = ckpt.step_dir(ckpt_dir / "loop", after) / ckpt.MARKER
        self.pid_file = ckpt_dir / "workers" / f"rank{rank}.json"
        self.killed_pid: int | None = None

    def run(self) -> None:
        deadline = time.time() + 400  # worker start-up alone can take a minute on a busy 2-core box
        while time.time() < deadline and not self.marker.exists():
            time.sleep(0.005)
        if self.marker.exists():
            self.killed_pid = json.loads(self.pid_file.read_text())["pid"]
            os.kill(self.killed_pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(ray_session, data, tmp_path_factory):
    """One uninterrupted run: the weights the interrupted runs must reproduce."""
    root = tmp_path_factory.mktemp("ref")
    out, stats = run_stage(TrainConnector(), _connector_cfg(), inputs=data, root=root)
    return out / "connector_model", stats


@pytest.mark.timeout(360)
def test_connector_trains_and_exports_one_dir(reference):
    out, stats = reference
    assert stats["steps"] == STEPS and stats["start_step"] == 0 and stats["tokens"] > 0
    assert stats["final_text_loss"] < stats["first_text_loss"]  # only the connector learns
    model = load_vpit(out)  # weights + config
    assert load_tokenizer(out) is not None  # the tokenizer beside them
    assert model.config.vision_dim == FEAT and model.config.n_tokens == N_VIS


@pytest.mark.timeout(480)
def test_killed_worker_is_restarted_and_resumes_to_same_weights(ray_session, data, reference, tmp_path):
    ckpt_dir = tmp_path / "train_connector" / "test.ckpt"
    killer = _Killer(ckpt_dir, after=KILL_AFTER)
    killer.start()
    out, stats = run_stage(TrainConnector(), _connector_cfg(), inputs=data, root=tmp_path)
    killer.join(1)
    assert killer.killed_pid is not None
    restarted = json.loads((ckpt_dir / "workers" / "rank1.json").read_text())["pid"]
    assert restarted != killer.killed_pid  # Ray Train started a new worker process
    assert KILL_AFTER <= stats["start_step"] < STEPS  # resumed from a checkpoint, not step 0
    _assert_same_weights(reference[0], out / "connector_model")


@pytest.mark.timeout(480)
def test_stopped_stage_reruns_from_its_checkpoint(ray_session, data, reference, tmp_path):
    ckpt_dir = tmp_path / "train_connector" / "test.ckpt"
    killer = _Killer(ckpt_dir, after=KILL_AFTER)
    killer.start()
    with pytest.raises(Exception):  # max_failures=0: the first worker death fails the stage
        run_stage(TrainConnector(), _connector_cfg(max_failures=0), inputs=data, root=tmp_path)
    killer.join(1)
    saved = ckpt.latest_checkpoint(ckpt_dir / "loop")
    step = int(saved.name.split("-")[1])
    assert KILL_AFTER <= step < STEPS

    out, stats = run_stage(TrainConnector(), _connector_cfg(max_failures=0), inputs=data, root=tmp_path)
    assert stats["start_step"] == step  # continued, not from step 0
    _assert_same_weights(reference[0], out / "connector_model")


@pytest.mark.timeout(360)
def test_vpit_starts_from_connector_and_learns_visual_tokens(ray_session, data, reference, tmp_path):
    cfg = TrainVPiTConfig(train=dataclasses.replace(_connector_cfg().train, max_steps=30, lr=3e-3, checkpoint_every=0))
    out, stats = run_stage(TrainVPiT(), cfg, inputs={"tokenized": data["tokenized"], "connector_model": reference[0]},
                           root=tmp_path)
    assert stats["final_text_loss"] < stats["first_text_loss"]
    assert stats["final_vision_loss"] < stats["first_vision_loss"]  # -cosine: lower is better
    model = load_vpit(out / "vpit_model")
    connector = load_vpit(reference[0])
    # stage 2 moved the LLM itself (stage 1 had frozen it)
    w2, w1 = dict(model.named_parameters()), dict(connector.named_parameters())
    assert not torch.equal(w2["llm.model.layers.0.mlp.up_proj.weight"], w1["llm.model.layers.0.mlp.up_proj.weight"])
    assert load_tokenizer(out / "vpit_model") is not None
