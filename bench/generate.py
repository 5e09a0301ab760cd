"""Generation throughput with the KV cache vs without (the official code has none), same run.

    python bench/generate.py                       # tiny-preset model, N=16, CPU
    python bench/generate.py --n-tokens 64 --prompt-len 256 --hidden 256 --layers 8 --vision-dim 256
    python bench/generate.py --paper               # the paper's proportions, scaled to a CPU

``--paper``: a 1024-position prompt (the paper's prompts run 1-4k positions), 64 visual steps,
and a Llama-3.1-8B-shaped LLM scaled down (4 layers of width 128, 4 query heads per KV head as
in GQA-8/32, SwiGLU 3.5x, 1152-dim vision features): the cache's gain depends mostly on prompt
length and steps, which are the paper's here, not on width.

One request = a prompt that ends in <image_start> (a forced text-to-image answer), N visual steps
fed back through the projector, then `--text-tokens` text tokens. Throughput counts every
generated position (visual steps + text tokens). Without a cache each step re-runs the whole
sequence, so the gap grows with prompt length and N. Prints both rates and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, Prompt
from metamorph.model.modeling import MetaMorphForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--vision-dim", type=int, default=64)
    ap.add_argument("--n-tokens", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--text-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # 1 by default: on a shared 2-core box, torch's default thread pool spins against other
    # processes and made the same run 20x slower (15 vs 320 tokens/s measured)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ap.add_argument("--paper", action="store_true", help="the paper's proportions (see the module doc)")
    a = ap.parse_args()
    if a.paper:
        a.hidden, a.layers, a.heads, a.vocab, a.vision_dim = 128, 4, 4, 1024, 1152
        a.n_tokens, a.prompt_len, a.text_tokens = 64, 1024, 8
    if a.threads:
        torch.set_num_threads(a.threads)

    V = a.vocab
    cfg = MetaMorphConfig(
        llm=LLMConfig(hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                      num_kv_heads=max(1, a.heads // 4) if a.paper else max(1, a.heads // 2),
                      intermediate_size=a.hidden * 7 // 2 if a.paper else a.hidden * 11 // 4, vocab_size=V,
                      max_position=4096),
        vision_dim=a.vision_dim, n_tokens=a.n_tokens, image_start_id=V - 2, image_end_id=V - 1,
    )
    model = MetaMorphForCausalLM.from_config(cfg, seed=0).to(a.device)
    g = torch.Generator().manual_seed(0)
    prompt = Prompt(input_ids=torch.randint(3, V - 2, (a.prompt_len - 1,), generator=g).tolist() + [V - 2])
    n_gen = a.n_tokens + a.text_tokens

    def run(use_cache: bool) -> float:
        gc = GenerationConfig(max_new_tokens=a.text_tokens, use_cache=use_cache, force_image_end=True)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(prompt, gc)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        assert len(out.images) == 1 and out.images[0].shape[0] == a.n_tokens
        return n_gen / (time.perf_counter() - t)

    run(True), run(False)  # warm-up (allocator, kernels)
    rates = {True: [], False: []}
    for _ in range(a.repeats):  # interleaved so machine load hits both alike
        for uc in (True, False):
            rates[uc].append(run(uc))
    cached, plain = statistics.median(rates[True]), statistics.median(rates[False])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {n_params / 1e6:.2f}M params on {a.device}; prompt {a.prompt_len} tokens, "
          f"1 image of {a.n_tokens} visual steps + {a.text_tokens} text tokens")
    print(f"with KV cache:    {cached:8.1f} tokens/s")
    print(f"without KV cache: {plain:8.1f} tokens/s")
    print(f"ratio (cache / no cache): {cached / plain:.2f}x")


if __name__ == "__main__":
    main()
