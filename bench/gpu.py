"""GPU readiness figures against the card's peak: MFU of a 1B-parameter Llama-config VPiT training
step, and SigLIP so400m-config feature extraction throughput (random weights, nothing downloads).

    python bench/gpu.py                          # on a CUDA machine; prints "skipped" elsewhere
    python bench/gpu.py --peak-tflops 989        # when the card is not in the table below

VPiT step: Llama-3.2-1B's shape (d 2048, 16 layers, 32 heads / 8 KV heads, SwiGLU 8192, vocab
128256 + 2) with the projector and vision head, one packed row of 4096 positions per micro-batch
(half of them visual positions of response images, so both losses run), fp32 master weights with
bf16 autocast, SDPA, AdamW; MFU = tokens/s x training FLOPs per token (metamorph.train.loop.
flops_per_token: 6N plus attention) / peak. SigLIP: so400m's vision tower (1152 wide, 27 layers,
patch 14 at 384 px) in bf16 without grad, the tokenize stage's work; MFU from 2 x params x 729
patches per image (attention FLOPs left out, so a floor).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# dense bf16 peak per card (FLOP/s), from the vendors' datasheets
PEAKS = {"H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12,
         "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def card_peak(name: str, override_tflops: float) -> float:
    if override_tflops:
        return override_tflops * 1e12
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    raise SystemExit(f"unknown card {name!r}: pass --peak-tflops")


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def vpit_step(a, peak: float) -> None:
    from metamorph.model.config import LLMConfig, MetaMorphConfig
    from metamorph.model.modeling import MetaMorphForCausalLM
    from metamorph.train.loop import flops_per_token

    V = 128256 + 2
    cfg = MetaMorphConfig(
        llm=LLMConfig(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                      vocab_size=V, max_position=a.seq_len, rope_theta=500000.0, tie_word_embeddings=True),
        vision_dim=1152, n_tokens=64, image_start_id=V - 2, image_end_id=V - 1, pad_id=0,
    )
    model = MetaMorphForCausalLM.from_config(cfg, seed=0).cuda()
    model.set_trainable("vpit")
    if a.grad_checkpointing:
        model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    B, L, N = a.micro_batch, a.seq_len, 64
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V - 2, (B, L), generator=g)
    vm = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):  # half the row is images: <is> 64 visual <ie>, every other one a response image
        for i, s in enumerate(range(1, L - N - 1, 2 * (N + 2))):
            ids[b, s - 1], ids[b, s + N] = V - 2, V - 1
            ids[b, s : s + N] = 0
            vm[b, s : s + N] = True
    rvm = vm.clone()
    batch = dict(input_ids=ids, labels=ids.masked_fill(vm, -100), position_ids=torch.arange(L).expand(B, L).contiguous(),
                 segment_ids=torch.ones(B, L, dtype=torch.long), visual_mask=vm, response_visual_mask=rvm)
    batch = {k: v.cuda() for k, v in batch.items()}
    feats = torch.nn.functional.normalize(torch.randn(int(vm.sum()), 1152, device="cuda"), dim=-1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch, vision_feats=feats, return_logits=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = timed(step, a.repeats)
    fpt = flops_per_token(model, n_layers=16, hidden=2048, seq_len=L)
    tok_s = B * L / sec
    n = sum(p.numel() for p in model.parameters())
    print(f"VPiT step, {n / 1e9:.2f}B params, {B} x {L} positions: {sec * 1e3:.0f} ms, {tok_s:,.0f} tokens/s, "
          f"MFU {tok_s * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s"
          f"{' (activation checkpointing: recompute not counted)' if a.grad_checkpointing else ''}")
    del model, opt
    torch.cuda.empty_cache()


def siglip_features(a, peak: float) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                             image_size=384, patch_size=14)
    model = SiglipVisionModel(cfg).cuda().to(torch.bfloat16).eval()
    pixels = torch.randn(a.image_batch, 3, 384, 384, device="cuda", dtype=torch.bfloat16)

    @torch.no_grad()
    def encode():
        h = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]  # before the post-layernorm
        grid = h.transpose(1, 2).reshape(h.shape[0], 1152, 27, 27)
        tokens = torch.nn.functional.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
        return torch.nn.functional.normalize(tokens.flatten(2).transpose(1, 2).float(), dim=-1)

    sec = timed(encode, a.repeats)
    n = sum(p.numel() for p in model.parameters())
    img_s = a.image_batch / sec
    print(f"SigLIP so400m-config features, {n / 1e6:.0f}M params, batch {a.image_batch} @ 384 px: "
          f"{img_s:,.0f} images/s, MFU {img_s * 2 * n * 729 / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (matmuls only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--image-batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="the card's dense bf16 peak (default: table)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here: skipped (run it on a GPU machine)")
        return
    name = torch.cuda.get_device_name()
    peak = card_peak(name, a.peak_tflops)
    print(f"{name}: dense bf16 peak {peak / 1e12:.0f} TFLOP/s")
    torch.backends.cuda.matmul.allow_tf32 = True
    vpit_step(a, peak)
    siglip_features(a, peak)


if __name__ == "__main__":
    main()
