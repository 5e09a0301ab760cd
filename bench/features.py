"""A training step with precomputed vision features vs running the vision tower inside the step.

    python bench/features.py                 # tiny preset shapes (32 px, 2-layer SigLIP, N=16), CPU
    python bench/features.py --image-size 64 --vision-layers 6 --vision-hidden 128   # heavier tower
    python bench/features.py --paper         # the paper's proportions, scaled to a CPU

``--paper``: what matters for this comparison is the encoder's cost against the LLM's training
step. SigLIP so400m at 384 px (~400M params over 27 x 27 = 729 patches) costs ~2 x 400M x 729 =
5.8e11 FLOPs per image, about 12 LLM-training positions of an 8B model (6 x 8e9 = 4.8e10 FLOPs
each); a 4096-position row of the paper's mixture holds ~20 images. The scaled shape keeps both:
a 1-layer SigLIP of width 96 on 64 px images (16 x 16 patches -> 8 x 8 = 64 tokens) costs ~12
positions of a 4-layer, width-128 GQA LLM, and rows of 1024 positions hold 5 images. The run
prints both ratios (FLOPs per image / FLOPs per position), the paper's and the bench's.

Both variants run the same MetaMorph forward + backward + AdamW step on the same packed batch.
"precomputed" starts from the fp16 feature bytes the tokenize stage stores with each row (what
training reads); "in-step" starts from the encoded PNG bytes of the same images and decodes,
preprocesses and runs the frozen encoder (no grad) first, as a pipeline without precomputed
features must. Prints step times and their ratio (in-step / precomputed).
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.modeling import MetaMorphForCausalLM
from metamorph.model.vision import VisionConfig, VisionEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--images-per-row", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--vision-hidden", type=int, default=64)
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--n-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # 1: the dev box is shared; torch's default pool spins against other processes
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--paper", action="store_true", help="the paper's proportions (see the module doc)")
    a = ap.parse_args()
    if a.paper:
        a.batch, a.seq_len, a.images_per_row = 1, 1024, 5
        a.image_size, a.patch, a.vision_hidden, a.vision_layers, a.n_tokens = 64, 4, 96, 1, 64
        a.hidden, a.layers, a.vocab = 128, 4, 1024
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    cuda = dev.startswith("cuda")

    enc = VisionEncoder.from_config(VisionConfig(
        image_size=a.image_size, patch_size=a.patch, hidden_size=a.vision_hidden, num_layers=a.vision_layers,
        num_heads=max(1, a.vision_hidden // 32), intermediate_size=a.vision_hidden * 4, n_tokens=a.n_tokens,
    )).to(dev)
    V, N, D = a.vocab, a.n_tokens, a.vision_hidden
    model = MetaMorphForCausalLM.from_config(MetaMorphConfig(
        llm=LLMConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=4, num_kv_heads=1 if a.paper else 2,
                      intermediate_size=a.hidden * 7 // 2 if a.paper else a.hidden * 11 // 4, vocab_size=V,
                      max_position=max(2048, a.seq_len)),
        vision_dim=D, n_tokens=N, image_start_id=V - 2, image_end_id=V - 1,
    ), seed=0).to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    # a packed batch: each row holds `images-per-row` images (<is> N visual <ie>) among text,
    # every other image a response image
    g = torch.Generator().manual_seed(0)
    B, L, k = a.batch, a.seq_len, a.images_per_row
    if k * (N + 2) > L:
        raise SystemExit(f"--images-per-row {k} x {N + 2} positions does not fit --seq-len {L}")
    ids = torch.randint(3, V - 2, (B, L), generator=g)
    vm = torch.zeros(B, L, dtype=torch.bool)
    rvm = torch.zeros(B, L, dtype=torch.bool)
    stride = L // k
    for b in range(B):
        for i in range(k):
            s = i * stride + 1
            ids[b, s - 1], ids[b, s + N] = V - 2, V - 1
            ids[b, s : s + N] = 0
            vm[b, s : s + N] = True
            rvm[b, s : s + N] = i % 2 == 1
    labels = ids.masked_fill(vm, -100)
    batch = dict(input_ids=ids, labels=labels, position_ids=torch.arange(L).expand(B, L).contiguous(),
                 segment_ids=torch.ones(B, L, dtype=torch.long), visual_mask=vm, response_visual_mask=rvm)
    batch = {n: t.to(dev) for n, t in batch.items()}
    # the images, as the curated shards hold them (PNG bytes), and their stored fp16 features
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(B * k):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (a.image_size, a.image_size, 3), dtype=np.uint8)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    stored = [enc.encode_images([Image.open(io.BytesIO(p))])[0].cpu().half().numpy().tobytes() for p in pngs]

    def step(feats_KD: torch.Tensor) -> None:
        out = model(**batch, vision_feats=feats_KD, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def precomputed() -> None:
        feats = np.concatenate([np.frombuffer(s, dtype=np.float16).reshape(N, D) for s in stored])
        step(torch.from_numpy(feats).float().to(dev))

    def in_step() -> None:
        ims = [Image.open(io.BytesIO(p)) for p in pngs]
        feats = enc.encode(enc.preprocess(ims).to(dev))  # [B*k, N, D], no grad (frozen)
        step(feats.reshape(-1, D))

    def tower_only() -> None:
        ims = [Image.open(io.BytesIO(p)) for p in pngs]
        enc.encode(enc.preprocess(ims).to(dev))

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(precomputed), timed(in_step)  # warm-up
    times = {"pre": [], "in": [], "tower": []}
    for _ in range(a.repeats):  # interleaved so machine load hits all alike
        times["pre"].append(timed(precomputed))
        times["in"].append(timed(in_step))
        times["tower"].append(timed(tower_only))
    pre, ins, tower = (statistics.median(times[k]) for k in ("pre", "in", "tower"))
    enc_params = sum(p.numel() for p in enc.parameters())
    llm_params = sum(p.numel() for p in model.parameters())
    print(f"{dev}: batch {B}x{L}, {B * k} images ({a.image_size}px -> {N} tokens); "
          f"encoder {enc_params / 1e6:.2f}M, model {llm_params / 1e6:.2f}M params")
    # the proportion that decides the gain: encoder FLOPs per image over LLM training FLOPs per
    # position (embedding lookups excluded; the LM head counted)
    patches = (a.image_size // a.patch) ** 2
    llm_dense = sum(p.numel() for m in model.modules() if not isinstance(m, torch.nn.Embedding)
                    for p in m.parameters(recurse=False))
    ratio = 2 * enc_params * patches / (6 * llm_dense)
    print(f"encoder FLOPs per image / LLM training FLOPs per position: {ratio:.1f} "
          f"(paper: so400m @ 384 px vs 8B: {2 * 400e6 * 729 / (6 * 8e9):.1f}); "
          f"images per 1k positions: {1024 * k / L:.1f} (paper ~5)")
    print(f"step with precomputed features: {pre * 1e3:8.1f} ms")
    print(f"step running the vision tower:  {ins * 1e3:8.1f} ms")
    print(f"  of which decode + encoder alone: {tower * 1e3:8.1f} ms")
    print(f"ratio (in-step / precomputed): {ins / pre:.2f}x  "
          f"(from the parts: {(pre + tower) / pre:.2f}x; on a loaded machine trust the parts)")


if __name__ == "__main__":
    main()
