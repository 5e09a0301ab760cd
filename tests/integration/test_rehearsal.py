"""The rehearsal preset end to end: the cluster code path on CPU, with a worker killed mid-VPiT.

    python -m pytest tests/integration/test_rehearsal.py -q -m integration

Checkpoints in the real HF formats come from `metamorph make-checkpoints` (random weights) and
are loaded by path; training is FSDP2 with the bf16 policy on 2 gloo workers, rows of 4096
positions, steps counted in samples, DCP checkpoints. While train_vpit runs, rank 1 is
SIGKILLed after its first checkpoint: Ray Train restarts the group and the loop resumes from
the checkpoint; the pipeline finishes every stage.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.commands import execute
from pipelines.config import load_config
from pipelines.definitions import get_pipeline

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]
KILL_AFTER = 2  # train_vpit's checkpoint_every in the preset


class _Killer(threading.Thread):
    """SIGKILLs train_vpit's rank-1 worker once the checkpoint of step ``after`` is complete."""

    def __init__(self, root: Path, after: int):
        super().__init__(daemon=True)
        self.marker = f"{root}/train_vpit/*.ckpt/loop/step-{after:08d}/COMPLETE"
        self.root = root
        self.killed_pid: int | None = None
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            done = glob.glob(self.marker)
            if done:
                workers = Path(done[0]).parents[2] / "workers" / "rank1.json"
                self.killed_pid = json.loads(workers.read_text())["pid"]
                os.kill(self.killed_pid, signal.SIGKILL)
                return
            time.sleep(0.01)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpts")
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "make-checkpoints", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_make_checkpoints_writes_the_real_formats(checkpoints):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoints / "llm")
    vocab = tok.get_vocab()
    # Llama-3.1's special tokens after the BPE ids, in Meta's order; eos <|eot_id|>; no pad
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    first = vocab["<|begin_of_text|>"]
    assert [vocab[t] for t in named] == list(range(first, first + len(named)))
    assert len(tok) == first + 256 and tok.eos_token == "<|eot_id|>" and tok.pad_token is None
    text = tok.apply_chat_template([{"role": "user", "content": "What color is the square?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date")
    assert text.endswith("What color is the square?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    cfg = AutoConfig.from_pretrained(checkpoints / "llm")
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok) and str(cfg.dtype).endswith("bfloat16")
    assert AutoConfig.from_pretrained(checkpoints / "siglip").model_type == "siglip"
    for sub, cls in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL"), ("scheduler", "PNDMScheduler")):
        name = "scheduler_config.json" if sub == "scheduler" else "config.json"
        assert json.loads((checkpoints / "sd" / sub / name).read_text())["_class_name"] == cls


def test_rehearsal_end_to_end_with_a_killed_worker(ray_session, checkpoints, tmp_path):
    pipeline = get_pipeline("vpit")
    loaded = load_config(pipeline.stages, preset="rehearsal",
                         overrides=[f"run_root={tmp_path}", f"shared.models={checkpoints}"])
    killer = _Killer(tmp_path, KILL_AFTER)
    killer.start()
    t0 = time.perf_counter()
    try:
        summary = execute(pipeline, loaded, name="rehearsal")
    finally:
        killer.stop = True
    minutes = (time.perf_counter() - t0) / 60
    assert set(summary.statuses.values()) == {"ran"}, summary.statuses
    print(f"rehearsal DAG: {minutes:.1f} min")  # reported, not asserted: the box is shared

    # the killed worker was restarted and the loop resumed from a checkpoint, not from step 0
    assert killer.killed_pid is not None
    vpit = summary.stats["train_vpit"]
    assert vpit["start_step"] >= KILL_AFTER and vpit["steps"] == 6

    # rows of the paper's length; steps counted in samples, LR by the sqrt rule in samples
    tok_dir = summary.out_dirs["tokenize"] / "tokenized"
    rows = pq.read_table(sorted(tok_dir.glob("*.parquet")), columns=["input_ids", "sample_ids"])
    assert {len(r) for r in rows.column("input_ids").to_pylist()} == {4096}
    per_row = sum(len(s) for s in rows.column("sample_ids").to_pylist()) / rows.num_rows
    assert per_row > 10  # many samples per packed row: a row is not a sample
    conn = summary.stats["train_connector"]
    assert conn["global_batch_samples"] == 64
    assert conn["peak_lr"] == pytest.approx(3.74e-5 * math.sqrt(64 / 448))
    assert abs(conn["mean_samples_per_step"] - 64) <= 2 * per_row + 1  # within a round of 2 rows
    assert vpit["peak_lr"] == pytest.approx(6.93e-5 * math.sqrt(64 / 1536))

    # the exports load; the LLM started from the checkpoint's tokenizer (+ the 2 image tokens)
    from metamorph.data.tokenizer import load_tokenizer
    from metamorph.model.modeling_metamorph import load_vpit

    out = summary.out_dirs["train_vpit"] / "vpit_model"
    model = load_vpit(out)
    tok = load_tokenizer(out)
    assert model.config.llm.vocab_size == len(tok) == len(load_tokenizer_base(checkpoints)) + 2
    assert model.config.n_tokens == 64
    dec = json.loads((summary.out_dirs["train_decoder"] / "decoder" / "conditioner" / "config.json").read_text())
    assert dec["layout"] == "official" and dec["context_length"] == 77 and dec["hidden_dim"] == 2048


def load_tokenizer_base(checkpoints: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoints / "llm")
