"""Ray Train overhead: steps/s of the same model and data in a plain process vs one Ray Train worker.

    python bench/train.py                 # tiny-preset model and 512-position rows, ~3 min on 2 cores
    python bench/train.py --steps 60 --repeats 1

Both sides run ``metamorph.train.loop.train_loop`` with one intra-op thread, each in a process
of its own (the plain one a fresh Python without Ray in it), on the same
synthetic tokenized shards (written with the tokenize stage's packer and writer) and the
tiny preset's model in stage-2 mode (everything trains, visual loss on). The Ray side goes
through the stage glue (``stages._llm.fit_llm``: TorchTrainer, 1 worker, gloo, a metrics report
every log window). Steady-state steps/s excludes the first log window (warm-up) and checkpoint
time; the end-to-end figure adds worker start-up, model build, the final checkpoint and export.
Plain and Ray runs alternate ``--repeats`` times and the best of each is compared (the box is
shared, so the best run is the least disturbed one). Target: Ray overhead <= 10% steady-state.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

for _k, _v in {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metamorph.data.packing import PackSample, PartWriter, collate, pack  # noqa: E402
from metamorph.model.config import LLMConfig, MetaMorphConfig  # noqa: E402
from metamorph.train.config import TrainConfig  # noqa: E402
from metamorph.train.loop import flops_per_token, train_loop  # noqa: E402
from metamorph.train.reader import ShardReader  # noqa: E402

VOCAB, N_VIS, FEAT = 2048, 16, 64  # the tiny preset's tokenizer size and vision encoder
START, END, PAD = VOCAB - 2, VOCAB - 1, 0


def write_data(out: Path, n_samples: int, max_length: int, seed: int = 0) -> Path:
    """Random conversations with a response image every other sample, packed like `tokenize`."""
    rng = np.random.default_rng(seed)
    samples = []
    for k in range(n_samples):
        prompt = rng.integers(1, START, int(rng.integers(8, 24))).tolist()
        answer = rng.integers(1, START, int(rng.integers(4, 40))).tolist()
        ids, labels = prompt + answer, [-100] * len(prompt) + answer
        vis, feats = [False] * len(ids), b""
        if k % 2 == 0:
            ids += [START] + [PAD] * N_VIS + [END]
            labels += [START] + [-100] * N_VIS + [END]
            vis += [False] + [True] * N_VIS + [False]
            f = rng.standard_normal((N_VIS, FEAT))
            feats = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16).tobytes()
        samples.append(PackSample(id=str(k), input_ids=ids, labels=labels, visual_mask=vis,
                                  response_visual_mask=list(vis), vision_feats=feats))
    meta = {"max_length": max_length, "n_visual": N_VIS, "feature_dim": FEAT, "vocab_size": VOCAB, "pad_id": PAD}
    with PartWriter(out, row_group_size=16, rows_per_part=256, metadata=meta) as w:
        for row in pack(samples, max_length, PAD, window=16):
            w.write(row)
    return out


def model_config() -> MetaMorphConfig:
    return MetaMorphConfig(llm=LLMConfig(vocab_size=VOCAB), vision_dim=FEAT, n_tokens=N_VIS,
                           image_start_id=START, image_end_id=END, pad_id=PAD)


def build_model():
    from metamorph.model.modeling import MetaMorphForCausalLM

    model = MetaMorphForCausalLM.from_config(model_config(), seed=0)
    model.set_trainable("vpit")
    return model


def run_plain(cfg: TrainConfig, shards: Path, work: Path) -> dict[str, float]:
    """The plain loop in a fresh process (no Ray threads in it), one thread, as the Ray worker."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, __file__, "--plain-child", json.dumps({"cfg": asdict(cfg), "shards": str(shards), "work": str(work)})]
    out = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_child(spec: dict) -> None:
    torch.set_num_threads(1)
    cfg, work = TrainConfig(**spec["cfg"]), Path(spec["work"])
    t0 = time.perf_counter()
    model = build_model()
    reader = ShardReader(spec["shards"], micro_batch_size=cfg.micro_batch_size, seed=cfg.seed,
                         collate=lambda rows: collate(rows, feature_dim=FEAT))
    stats = train_loop(model, cfg, reader, checkpoint_root=work / "ck", export_dir=work / "export",
                       flops_per_tok=flops_per_token(model))
    stats["wall_s"] = time.perf_counter() - t0
    print(json.dumps(stats))


def run_ray(cfg: TrainConfig, shards: Path, work: Path, max_length: int) -> dict[str, float]:
    from pipelines.stage import StageContext
    from stages._llm import fit_llm
    from stages._training import Scaling

    ctx = StageContext(stage="bench_train", key=work.name, cfg=None, seed=0, inputs={}, work_dir=work,
                       checkpoint_dir=work / "ckpt", run_root=work)
    t0 = time.perf_counter()
    scaling = Scaling(num_workers=1, cpus_per_worker=1.0, max_failures=0)
    stats = fit_llm(ctx, cfg, scaling, build_model, shards, feature_dim=FEAT, seq_len=max_length, export_dir=work / "export")
    stats["wall_s"] = time.perf_counter() - t0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--plain-child", help=argparse.SUPPRESS)  # internal: the plain run's process
    args = ap.parse_args()
    if args.plain_child:
        return plain_child(json.loads(args.plain_child))

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    shards = write_data(root / "tokenized", n_samples=2000, max_length=args.max_length)
    cfg = TrainConfig(micro_batch_size=args.micro_batch, max_steps=args.steps, lr=1e-3, log_every=10, checkpoint_every=0)
    # our own local cluster (never one another process on this box started)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    plain, via_ray = [], []
    for i in range(args.repeats):
        plain.append(run_plain(cfg, shards, root / f"plain{i}"))
        via_ray.append(run_ray(cfg, shards, root / f"ray{i}", args.max_length))
        print(f"repeat {i}: plain {plain[-1]['steps_per_s']:.2f} steps/s ({plain[-1]['wall_s']:.1f} s end to end), "
              f"ray {via_ray[-1]['steps_per_s']:.2f} steps/s ({via_ray[-1]['wall_s']:.1f} s end to end)", flush=True)
    ray.shutdown()

    p = max(plain, key=lambda s: s["steps_per_s"])
    r = max(via_ray, key=lambda s: s["steps_per_s"])
    overhead = 1 - r["steps_per_s"] / p["steps_per_s"]
    p_wall, r_wall = min(s["wall_s"] for s in plain), min(s["wall_s"] for s in via_ray)
    print(f"model: tiny preset shapes ({sum(x.numel() for x in build_model().parameters()) / 1e6:.2f}M params), "
          f"rows of {args.max_length}, micro-batch {args.micro_batch}, {args.steps} steps, 1 thread")
    print(f"steady state: plain {p['steps_per_s']:.2f} steps/s, Ray Train 1 worker {r['steps_per_s']:.2f} steps/s "
          f"-> Ray overhead {overhead * 100:+.1f}% (target <= 10%)")
    print(f"end to end:   plain {p_wall:.1f} s, Ray Train {r_wall:.1f} s (worker start-up {r_wall - p_wall:+.1f} s)")


if __name__ == "__main__":
    main()
