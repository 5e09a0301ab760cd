"""Test helpers for the training tests: tokenized Parquet shards in the CONTRACTS row format, a
minimal collate, and a small real torch model with the MetaMorph forward signature.

    python -m pytest tests/unit/test_train_loop.py -q

Not the product's collate or model (metamorph.data.packing / metamorph.model): these keep the
generic training tests independent of them and fast (a few ms per step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

VOCAB, DIM, FEAT, N_IMG = 32, 16, 8, 4  # vocab, model width, vision feature dim, tokens/image
PAD = 0


def make_row(rng: np.random.Generator, length: int) -> dict:
    """One packed row: a random prompt, a response that counts up from its last token (easy to
    learn), and half the time a response image whose features depend on the token before it."""
    ids = np.zeros(length, np.int32)
    labels = np.full(length, -100, np.int32)
    vis = np.zeros(length, bool)
    resp_vis = np.zeros(length, bool)
    n = int(rng.integers(length // 2, length + 1))
    prompt = 3
    ids[:prompt] = rng.integers(1, VOCAB, prompt)
    for t in range(prompt, n):
        ids[t] = ids[t - 1] % (VOCAB - 1) + 1  # 1..VOCAB-1, never the pad id
        labels[t] = ids[t]
    feats = np.zeros((0, FEAT), np.float16)
    if rng.random() < 0.5 and n >= prompt + N_IMG + 1:
        s = prompt + 1
        ids[s : s + N_IMG] = PAD
        labels[s : s + N_IMG] = -100
        vis[s : s + N_IMG] = True
        resp_vis[s : s + N_IMG] = True
        base = np.sin(np.arange(N_IMG * FEAT).reshape(N_IMG, FEAT) * 0.1 * ids[s - 1])
        feats = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float16)
    seg = np.zeros(length, np.int32)
    seg[:n] = 1
    pos = np.where(seg > 0, np.arange(length), 0).astype(np.int32)
    return {
        "input_ids": ids.tolist(),
        "labels": labels.tolist(),
        "position_ids": pos.tolist(),
        "segment_ids": seg.tolist(),
        "visual_mask": vis.tolist(),
        "response_visual_mask": resp_vis.tolist(),
        "vision_feats": feats.tobytes(),
        "num_tokens": int(n),
    }


SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("segment_ids", pa.list_(pa.int32())),
        ("visual_mask", pa.list_(pa.bool_())),
        ("response_visual_mask", pa.list_(pa.bool_())),
        ("vision_feats", pa.binary()),
        ("num_tokens", pa.int32()),
    ]
)


def write_shards(out: Path, n_rows: int, length: int = 16, row_group: int = 8, per_file: int = 24, seed: int = 0) -> Path:
    """``tokenized/part-NNNNN.parquet`` files of fixed-size row groups (the last may be short)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = [make_row(rng, length) for _ in range(n_rows)]
    for i, start in enumerate(range(0, n_rows, per_file)):
        table = pa.Table.from_pylist(rows[start : start + per_file], schema=SCHEMA)
        pq.write_table(table, out / f"part-{i:05d}.parquet", row_group_size=row_group)
    return out


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    batch = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in ("input_ids", "labels", "position_ids", "segment_ids")}
    for k in ("visual_mask", "response_visual_mask"):
        batch[k] = torch.tensor([r[k] for r in rows], dtype=torch.bool)
    feats = [np.frombuffer(r["vision_feats"], np.float16).reshape(-1, FEAT) for r in rows]
    batch["vision_feats"] = torch.from_numpy(np.concatenate(feats).astype(np.float32))
    return batch


@dataclass
class Output:
    loss: torch.Tensor
    text_loss: torch.Tensor
    vision_loss: torch.Tensor | None


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mix = nn.Linear(2 * d, d)  # mixes each position with its predecessor (causal)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        h = self.norm(x_BLD)
        prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return x_BLD + torch.tanh(self.mix(torch.cat([h, prev], dim=-1)))


class ToyVPiT(nn.Module):
    """Embeddings + projector for visual positions + causal blocks + LM head + vision head."""

    _no_split_modules = ["Block"]  # what FSDP2 shards one by one, as in HF models

    def __init__(self, n_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.projector = nn.Sequential(nn.Linear(FEAT, DIM), nn.GELU(), nn.Linear(DIM, DIM))
        self.blocks = nn.ModuleList(Block(DIM) for _ in range(n_layers))
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(DIM, VOCAB)
        self.vision_head = nn.Linear(DIM, FEAT)

    def forward(self, input_ids, labels, visual_mask, response_visual_mask, vision_feats, **_) -> Output:
        x_BLD = self.embed(input_ids)
        if vision_feats.numel():
            x_BLD = x_BLD.masked_scatter(visual_mask[..., None], self.projector(vision_feats).to(x_BLD.dtype))
        for block in self.blocks:
            x_BLD = self.drop(block(x_BLD))
        logits = self.lm_head(x_BLD[:, :-1])
        text_loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        vision_loss = None
        target_BL = response_visual_mask[:, 1:]  # position t predicts the response visual token t+1
        if target_BL.any():
            pred_KD = nn.functional.normalize(self.vision_head(x_BLD[:, :-1][target_BL]), dim=-1)
            # feature rows follow visual positions in row-major order; keep the response ones
            want_KD = vision_feats[response_visual_mask[visual_mask]]
            vision_loss = -(pred_KD * want_KD).sum(-1).mean()
        loss = text_loss if vision_loss is None else text_loss + vision_loss
        return Output(loss=loss, text_loss=text_loss, vision_loss=vision_loss)
