"""A training step on packed rows: attention per sample span vs one block-diagonal mask per row.

    python bench/packed_attention.py                  # tiny preset shapes: 512-position rows of ~10 samples
    python bench/packed_attention.py --samples-per-row 20 --seq-len 4096 --hidden 128   # paper-like packing

A packed row holds several samples and attention must stay inside each. The mask variant gives
sdpa the row's [L, L] block-diagonal causal mask (what the model did before; what ``eager`` still
does): it computes every score of the row and masks most of them. The span variant
(``metamorph_packed_sdpa``, the model's default now) calls sdpa once per sample, causal inside it.
Both run the same MetaMorph forward + backward + AdamW step on the same batches and must agree to
float rounding (the bench checks the loss and the gradient before timing). Prints the median step
time of each and their ratio (span / mask), then the same for the model's forward alone.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.modeling import PACKED_SDPA, MetaMorphForCausalLM


def packed_batch(rows: int, seq_len: int, per_row: int, n_tokens: int, vision_dim: int, vocab: int,
                 gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Rows of ``per_row`` samples of random lengths (each one image of ``n_tokens`` after a short
    prompt, then an answer), padding at the end, as tokenize's packer lays them out."""
    ids = torch.randint(10, vocab, (rows, seq_len), generator=gen)
    seg = torch.zeros(rows, seq_len, dtype=torch.long)
    pos = torch.zeros(rows, seq_len, dtype=torch.long)
    vis = torch.zeros(rows, seq_len, dtype=torch.bool)
    resp = torch.zeros(rows, seq_len, dtype=torch.bool)
    labels = torch.full((rows, seq_len), -100, dtype=torch.long)
    mean = seq_len * 0.95 / per_row
    for r in range(rows):
        lens = (torch.rand(per_row, generator=gen) * mean + mean / 2).long().clamp(min=n_tokens + 8)
        lens = (lens.float() * min(1.0, seq_len * 0.97 / float(lens.sum()))).long().clamp(min=n_tokens + 8)
        at = 0
        for k, n in enumerate(lens.tolist(), start=1):
            n = min(n, seq_len - at)
            if n < n_tokens + 8:
                break
            seg[r, at : at + n] = k
            pos[r, at : at + n] = torch.arange(n)
            vis[r, at + 2 : at + 2 + n_tokens] = True  # the prompt image
            if k % 3 == 0:  # a third of the samples answer with an image (generation)
                resp[r, at + n - n_tokens - 1 : at + n - 1] = True
                vis[r, at + n - n_tokens - 1 : at + n - 1] = True
            labels[r, at + 2 + n_tokens : at + n] = ids[r, at + 2 + n_tokens : at + n]
            at += n
    feats = torch.nn.functional.normalize(torch.randn(int(vis.sum()), vision_dim, generator=gen), dim=-1)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg, "visual_mask": vis,
            "response_visual_mask": resp, "vision_feats": feats}


def add_model_args(ap: argparse.ArgumentParser, rows: int, vocab: int, steps: int) -> None:
    """The packed rows, model shape and timing arguments the packed-row benches share."""
    ap.add_argument("--rows", type=int, default=rows, help=f"packed rows per step (tiny: micro_batch_size {rows})")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--samples-per-row", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=vocab)
    ap.add_argument("--n-tokens", type=int, default=9)
    ap.add_argument("--vision-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=steps, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (machines are noisy)")
    # 1: as each tiny train worker runs; torch's default pool spins against other processes
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")


def tiny_setup(a: argparse.Namespace) -> tuple[MetaMorphForCausalLM, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(model, its trainable parameters, 8 packed batches) of ``add_model_args``' shape, the model
    set up as train_vpit trains it (and the torch thread count set)."""
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = MetaMorphConfig(
        llm=LLMConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                      intermediate_size=a.hidden * 11 // 4, vocab_size=a.vocab, max_position=a.seq_len),
        vision_dim=a.vision_dim, n_tokens=a.n_tokens, visual_pos_embed=True,
        image_start_id=1, image_end_id=2, pad_id=0, bos_id=3, eos_id=4,
    )
    model = MetaMorphForCausalLM.from_config(cfg, dtype=torch.float32)
    model.set_trainable("vpit")
    gen = torch.Generator().manual_seed(0)
    batches = [packed_batch(a.rows, a.seq_len, a.samples_per_row, a.n_tokens, a.vision_dim, a.vocab, gen)
               for _ in range(8)]
    return model, [p for p in model.parameters() if p.requires_grad], batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, rows=1, vocab=2048, steps=40)
    a = ap.parse_args()
    model, params, batches = tiny_setup(a)
    n_spans = sum(int(b["segment_ids"].max()) for b in batches) / (len(batches) * a.rows)
    variants = {"mask": "sdpa", "span": PACKED_SDPA}

    def forward(impl: str, batch: dict[str, torch.Tensor]):
        model.llm.config._attn_implementation = impl
        return model(**batch, vision_coef=10.0, return_logits=False)

    # the two must compute the same thing
    grads = {}
    for name, impl in variants.items():
        model.zero_grad(set_to_none=True)
        out = forward(impl, batches[0])
        out.loss.backward()
        grads[name] = (float(out.loss.detach()), torch.cat([p.grad.flatten() for p in params]))
    (l_m, g_m), (l_s, g_s) = grads["mask"], grads["span"]
    diff = float((g_m - g_s).abs().max() / g_m.abs().max())
    if abs(l_m - l_s) > 1e-4 * abs(l_m) or diff > 1e-4:
        raise SystemExit(f"the variants disagree: loss {l_m} vs {l_s}, max relative grad difference {diff:.2e}")
    print(f"packed rows of {a.seq_len} positions, {n_spans:.1f} samples each; {a.layers} layers of width "
          f"{a.hidden}; loss {l_m:.5f} vs {l_s:.5f}, max grad difference {diff:.1e} (relative)")

    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def train_step(impl: str, batch: dict[str, torch.Tensor]) -> None:
        forward(impl, batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_only(impl: str, batch: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            forward(impl, batch)

    for label, fn in (("train step", train_step), ("forward", forward_only)):
        times = {name: [] for name in variants}
        for name, impl in variants.items():  # warm-up
            for b in batches[:3]:
                fn(impl, b)
        for _ in range(a.rounds):
            for name, impl in variants.items():
                for i in range(a.steps):
                    t = time.perf_counter()
                    fn(impl, batches[i % len(batches)])
                    times[name].append(time.perf_counter() - t)
        med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
        print(f"{label:>10}: mask {med['mask']:.1f} ms, span {med['span']:.1f} ms -> span / mask "
              f"{med['span'] / med['mask']:.2f}")
    model.llm.config._attn_implementation = PACKED_SDPA


if __name__ == "__main__":
    main()
