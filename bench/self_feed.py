"""train_vpit's self_feed: the extra teacher-forced pass over the drawn images' samples vs over whole rows.

    python bench/self_feed.py                    # tiny preset shapes: 2 packed rows of 512, ~10 samples each
    python bench/self_feed.py --rows 1 --samples-per-row 20 --seq-len 4096 --hidden 128

With ``self_feed`` > 0 every training step that draws a response image first runs the model
without gradient to predict that image, then feeds the prediction back as its input
(``MetaMorphForCausalLM._self_fed``). That pass used to run over the whole packed rows; it now
runs only over the samples that hold a drawn image, each from its start up to the image, one
sample per row. Attention never crosses samples, so both give the same predictions (checked
here before timing). Prints the median training step (forward + backward + AdamW) of: teacher
forcing (``self_feed`` 0, the baseline), self_feed over whole rows (the old pass), and self_feed
over the samples' prefixes (the model's pass), with the extra cost of each over the baseline and
the ratio of the two passes, all measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metamorph.model.modeling import _feature_rows

from packed_attention import add_model_args, tiny_setup  # noqa: E402  (bench/ is the script's directory)


@torch.no_grad()
def self_fed_whole_rows(self, x_BLd, vision_feats_KD, visual_mask_BL, response_visual_mask_BL, position_ids_BL,
                        segment_ids_BL, fraction, candidates_BL):
    """The old pass, for comparison: the same draws, one teacher-forced pass over the whole rows."""
    row_R = _feature_rows(visual_mask_BL)[response_visual_mask_BL]
    N = self.config.n_tokens
    n_img = -(-row_R.numel() // N)
    keep_R = (torch.rand(n_img) < fraction).repeat_interleave(N)[: row_R.numel()]
    keep_R &= candidates_BL[response_visual_mask_BL]
    if not bool(keep_R.any()):
        return vision_feats_KD
    x0_BLd = x_BLd.masked_scatter(visual_mask_BL[..., None], self.project(vision_feats_KD).to(x_BLd.dtype))
    attn, attn_kwargs = self._packing(segment_ids_BL, x0_BLd.dtype)
    h_BLd = self.decode(x0_BLd, position_ids_BL, attention_mask=attn, **attn_kwargs)
    before_BL = torch.zeros_like(response_visual_mask_BL)
    before_BL[:, :-1] = response_visual_mask_BL[:, 1:]
    pred_RD = F.normalize(self.predict_visual(h_BLd[before_BL]).float(), dim=-1)
    out_KD = vision_feats_KD.clone()
    out_KD[row_R[keep_R]] = pred_RD[keep_R].to(out_KD.dtype)
    return out_KD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap, rows=2, vocab=600, steps=30)
    ap.add_argument("--fraction", type=float, default=0.5, help="train_vpit.self_feed")
    a = ap.parse_args()
    model, params, batches = tiny_setup(a)
    prefixes = type(model)._self_fed

    # the two passes must feed back the same inputs (same draws: the same torch seed)
    for b in batches[:3]:
        fed = {}
        for name, fn in (("rows", self_fed_whole_rows), ("prefixes", prefixes)):
            x = model.embed_tokens(b["input_ids"])
            torch.manual_seed(1)
            fed[name] = fn(model, x, b["vision_feats"], b["visual_mask"], b["response_visual_mask"], b["position_ids"],
                           b["segment_ids"], a.fraction, b["response_visual_mask"])
        diff = float((fed["rows"] - fed["prefixes"]).abs().max())
        if diff > 1e-5 or not torch.equal(fed["rows"] == b["vision_feats"], fed["prefixes"] == b["vision_feats"]):
            raise SystemExit(f"the two passes feed back different inputs (max difference {diff:.2e})")
    n_resp = sum(int(b["response_visual_mask"].sum()) for b in batches) / len(batches) / a.n_tokens
    print(f"{a.rows} packed rows of {a.seq_len} positions per step, ~{a.samples_per_row} samples each, "
          f"{n_resp:.1f} response images per step drawn at {a.fraction}; the passes agree (max difference {diff:.1e})")

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    variants = {"teacher forcing": (0.0, prefixes), "self_feed, whole rows": (a.fraction, self_fed_whole_rows),
                "self_feed, sample prefixes": (a.fraction, prefixes)}

    def step(name: str, batch: dict[str, torch.Tensor]) -> None:
        fraction, fn = variants[name]
        type(model)._self_fed = fn
        try:
            out = model(**batch, vision_coef=10.0, return_logits=False, self_feed=fraction, self_feed_scope="all")
        finally:
            type(model)._self_fed = prefixes
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {name: [] for name in variants}
    for name in variants:  # warm-up
        for b in batches[:3]:
            step(name, b)
    for _ in range(a.rounds):
        for name in variants:
            for i in range(a.steps):
                t = time.perf_counter()
                step(name, batches[i % len(batches)])
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
    base = med["teacher forcing"]
    for name, ms in med.items():
        print(f"{name:>28}: {ms:6.1f} ms per step ({ms / base:.2f}x teacher forcing)")
    rows_extra = med["self_feed, whole rows"] - base
    pre_extra = med["self_feed, sample prefixes"] - base
    print(f"extra cost of self_feed: whole rows +{rows_extra:.1f} ms, sample prefixes +{pre_extra:.1f} ms; "
          f"step prefixes / whole rows {med['self_feed, sample prefixes'] / med['self_feed, whole rows']:.2f}")


if __name__ == "__main__":
    main()
