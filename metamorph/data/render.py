"""Tokenize's library half: curated samples -> rendered token rows (chat template, truncation,
image slots), and the packing of rows with their vision features into Parquet parts.

    python -m pytest tests/integration/test_tokenize_stage.py -q -m integration

``render_shards`` is the body of tokenize's per-shard Ray task (one call per mixture shard, a
pyarrow batch of shard paths in, ``rendered_schema()`` rows out); ``pack_parts`` runs on the driver
over the encoded rows in input order, so the output is byte-identical whatever the scheduling.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

if TYPE_CHECKING:  # pyarrow is imported where used: `metamorph plan` imports the tokenize stage
    import pyarrow as pa

SAMPLE_OK = ("ok", "truncated")


@functools.lru_cache(maxsize=4)
def chat_template(tokenizer_dir: str, n_visual: int, system_prompt: Optional[str]):
    """One ChatTemplate per worker process (loading a tokenizer costs ~50 ms)."""
    from metamorph.data.chat import ChatTemplate
    from metamorph.data.tokenizer import load_tokenizer

    return ChatTemplate(load_tokenizer(tokenizer_dir), n_visual, system_prompt)


# One row per sample between the Ray operators; explicit so a block of only dropped samples
# (empty lists) has the same Arrow types as any other block.
@functools.cache
def rendered_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("status", pa.string()),  # ok | truncated | dropped_too_long | dropped_no_targets
            ("input_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.int32())),
            ("visual_mask", pa.list_(pa.bool_())),
            ("response_visual_mask", pa.list_(pa.bool_())),
            ("images", pa.list_(pa.binary())),  # encoded bytes of the kept images, in order
        ]
    )



def render_shards(batch: pa.Table, *, tokenizer_dir: str, n_visual: int, max_length: int,
                  system_prompt: Optional[str], batch_size: int) -> pa.Table:
    """Mixture shard paths -> one row per sample (dropped samples kept as rows so they are counted)."""
    import pyarrow as pa

    from metamorph.data.packing import truncate
    from metamorph.data.shards import iter_shards

    tpl = chat_template(tokenizer_dir, n_visual, system_prompt)
    out: list[dict[str, Any]] = []
    pending: list[tuple[Any, list[bytes]]] = []

    def flush() -> None:
        rendered = tpl.render_batch([s.conversation for s, _ in pending])
        for (sample, images), r in zip(pending, rendered):
            kept, status = truncate(r, max_length)
            row = {"id": sample.id, "status": status}
            if kept is not None:
                row.update(
                    input_ids=kept.input_ids,
                    labels=kept.labels,
                    visual_mask=kept.visual_mask,
                    response_visual_mask=kept.response_visual_mask,
                    images=images[: len(kept.image_starts)],  # images past a truncation are gone
                )
            out.append(row)
        pending.clear()

    for path in batch.column("shard").to_pylist():
        for sample, images in iter_shards([Path(path)]):
            pending.append((sample, images))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    empty = {"input_ids": [], "labels": [], "visual_mask": [], "response_visual_mask": [], "images": []}
    return pa.Table.from_pylist([{**empty, **r} for r in out], schema=rendered_schema())


def encoder_dims(encoder_dir: Path) -> tuple[int, int]:
    """(N tokens per image, feature dim D) from the saved encoder's config, without its weights."""
    from metamorph.model.vision import CONFIG_FILE, VisionEncoder

    meta = encoder_dir / CONFIG_FILE
    if meta.exists():
        d = json.loads(meta.read_text())
        return int(d["n_tokens"]), int(d["hidden_size"])
    enc = VisionEncoder.from_pretrained(encoder_dir)
    return enc.n_tokens, enc.feature_dim


def train_texts(mixture: Path, limit: int, system_prompt: Optional[str]):
    """The BPE training corpus: the texts of the first ``limit`` training samples (0: all)."""
    from metamorph.data.tokenizer import corpus_texts
    from metamorph.data.shards import iter_samples

    for i, (sample, _) in enumerate(iter_samples(mixture, split="train")):
        if limit and i >= limit:
            return
        if system_prompt:
            yield from corpus_texts([{"role": "system", "content": system_prompt}])
        yield from corpus_texts(sample.conversation)


def pack_parts(rows: Iterable[dict[str, Any]], out_dir: Path, *, max_length: int, pad_id: int, pack_window: int,
               row_group_size: int, rows_per_part: int, meta: dict[str, Any]):
    """Pack rendered rows (with ``vision_feats``) first-fit into ``max_length`` rows and write
    them as Parquet parts; return (``PackingStats``, [(part name, rows)], {part name: digest taken
    while writing})."""
    from metamorph.data.packing import Packer, PackingStats, PackSample, PartWriter

    stats = PackingStats(max_length=max_length)
    packer = Packer(max_length, pad_id, pack_window)
    with PartWriter(out_dir, row_group_size, rows_per_part, metadata=meta) as writer:
        for s in rows:
            stats.add_sample(s["status"])
            if s["status"] not in SAMPLE_OK:
                continue
            sample = PackSample(
                id=s["id"],
                input_ids=s["input_ids"],
                labels=s["labels"],
                visual_mask=s["visual_mask"],
                response_visual_mask=s["response_visual_mask"],
                vision_feats=s["vision_feats"],
            )
            for row in packer.add(sample):
                writer.write(row)
                stats.add_row(row)
        for row in packer.flush():
            writer.write(row)
            stats.add_row(row)
    return stats, writer.parts, writer.digests
