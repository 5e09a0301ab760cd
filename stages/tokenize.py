"""The `tokenize` stage: mixture -> tokenizer + packed Parquet rows with precomputed vision features.

    metamorph run --preset smoke --only tokenize

Ray Data plan (library code does the work; this module is glue):

1. driver: train the BPE on the mixture's text (or load the checkpoint's tokenizer), save it;
2. one task per mixture shard (fractional CPU): read samples, render them with the chat
   template, truncate over-long ones (never inside an image);
3. an actor pool runs the frozen vision encoder once per kept image (on GPUs when the cluster
   has them) and attaches each sample's N normalised tokens per image as fp16 bytes;
4. driver: streams the samples back in input order (``preserve_order``), packs them
   (first-fit over a window) and writes ``tokenized/part-NNNNN.parquet`` with fixed-size row
   groups. Same input -> byte-identical output.

The driver is the single packer/writer so the output is deterministic and the counts are exact;
it moves every feature byte once (~150 KB per image at paper scale), which a head node streams at
hundreds of MB/s, far below the encoder's cost on the same images.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from pipelines.stage import Stage, StageConfig, StageContext

from metamorph.data.tokenizer import TokenizerConfig

if TYPE_CHECKING:
    import pyarrow as pa

SAMPLE_OK = ("ok", "truncated")


@dataclass(kw_only=True)
class TokenizeConfig(StageConfig):
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Positions per packed row (4096 at paper scale). Longer rows pack more samples per row and
    # truncate fewer, but attention cost grows ~L^2 and the tiny model's step time with it.
    max_length: int = 512
    # Optional system turn rendered before every conversation (None: none, as the paper's data).
    system_prompt: Optional[str] = None
    # Open rows the first-fit packer considers. More = fuller rows (efficiency) but samples drift
    # further from the mixture's order; 64 gives > 95% on the toy mixture.
    pack_window: int = 64
    # Rows per Parquet row group: the training reader's resume and sharding unit, so every
    # training worker needs at least one group (tiny: a few hundred rows -> 16 gives ~20 groups).
    row_group_size: int = 16
    # Rows per part file (a multiple of row_group_size). Bigger files mean fewer opens.
    rows_per_part: int = 1024
    # ---- operational (outside the cache key)
    render_batch_size: int = 256  # samples per tokenizer call inside a shard task
    render_cpus: float = 0.5  # CPUs per shard task (fractional: the encoder pool needs some too)
    num_encoders: int = 1  # vision-encoder actors (one per GPU on a cluster)
    encoder_cpus: float = 0.5  # CPUs per encoder actor; also its torch thread count (min 1)
    encoder_gpus: float = 1.0  # GPUs per encoder actor, used only when the cluster has GPUs
    encode_batch_size: int = 32  # samples per encoder actor call

    def __post_init__(self) -> None:
        if self.max_length < 32:
            raise ValueError(f"tokenize.max_length={self.max_length} must be >= 32 (an image alone takes N+2)")
        for key in ("pack_window", "row_group_size", "rows_per_part", "render_batch_size", "num_encoders", "encode_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"tokenize.{key}={getattr(self, key)} must be > 0")
        if self.rows_per_part % self.row_group_size:
            raise ValueError(
                f"tokenize.rows_per_part={self.rows_per_part} must be a multiple of "
                f"tokenize.row_group_size={self.row_group_size}"
            )
        if self.render_cpus <= 0 or self.encoder_cpus <= 0:
            raise ValueError("tokenize.render_cpus and tokenize.encoder_cpus must be > 0 (fractions allowed)")
        if self.encoder_gpus < 0:
            raise ValueError(f"tokenize.encoder_gpus={self.encoder_gpus} must be >= 0")


# ---- Ray workers -----------------------------------------------------------------------------


def _iter_shard(path: str):
    """(Sample, image payloads) of one curated-sample tar, in file order (as shards.iter_samples)."""
    from metamorph.data.shards import iter_shards

    yield from iter_shards([Path(path)])


@functools.lru_cache(maxsize=4)
def _template(tokenizer_dir: str, n_visual: int, system_prompt: Optional[str]):
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


def __getattr__(name: str) -> Any:  # RENDERED_SCHEMA, built on first use (pyarrow is not imported by `metamorph plan`)
    if name == "RENDERED_SCHEMA":
        return rendered_schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _render_shards(batch: pa.Table, *, tokenizer_dir: str, n_visual: int, max_length: int,
                   system_prompt: Optional[str], batch_size: int) -> pa.Table:
    """Mixture shard paths -> one row per sample (dropped samples kept as rows so they are counted)."""
    import pyarrow as pa

    from metamorph.data.packing import truncate

    tpl = _template(tokenizer_dir, n_visual, system_prompt)
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
        for sample, images in _iter_shard(path):
            pending.append((sample, images))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()
    empty = {"input_ids": [], "labels": [], "visual_mask": [], "response_visual_mask": [], "images": []}
    return pa.Table.from_pylist([{**empty, **r} for r in out], schema=rendered_schema())


class _EncodeImages:
    """Actor: the frozen vision encoder; adds ``vision_feats`` (fp16 bytes) and drops the image bytes."""

    def __init__(self, encoder_dir: str, threads: int):
        import torch

        from metamorph.model.vision import VisionEncoder

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.encoder = VisionEncoder.from_pretrained(encoder_dir).to(self.device)

    def __call__(self, batch):
        import pyarrow as pa

        import torch
        from PIL import Image

        per_sample = batch.column("images").to_pylist()
        flat = [Image.open(io.BytesIO(b)) for imgs in per_sample for b in imgs]
        if flat:
            # fp16 storage halves the rows; on unit-norm 1152-d tokens the round trip keeps
            # cosine > 0.9999 to the fp32 feature (measured), invisible to the cosine loss
            feats = self.encoder.encode_images(flat).to("cpu", dtype=torch.float16).numpy()
        out, i = [], 0
        for imgs in per_sample:
            n = len(imgs)
            out.append(feats[i : i + n].tobytes() if n else b"")
            i += n
        return batch.drop_columns(["images"]).append_column("vision_feats", pa.array(out, type=pa.binary()))


# ---- the stage -------------------------------------------------------------------------------


def _encoder_dims(encoder_dir: Path) -> tuple[int, int]:
    """(N tokens per image, feature dim D) from the saved encoder's config, without its weights."""
    from metamorph.model.vision import CONFIG_FILE, VisionEncoder

    meta = encoder_dir / CONFIG_FILE
    if meta.exists():
        d = json.loads(meta.read_text())
        return int(d["n_tokens"]), int(d["hidden_size"])
    enc = VisionEncoder.from_pretrained(encoder_dir)
    return enc.n_tokens, enc.feature_dim


def _train_texts(mixture: Path, limit: int, system_prompt: Optional[str]):
    from metamorph.data.chat import corpus_texts
    from metamorph.data.shards import iter_samples

    for i, (sample, _) in enumerate(iter_samples(mixture, split="train")):
        if limit and i >= limit:
            return
        if system_prompt:
            yield from corpus_texts([{"role": "system", "content": system_prompt}])
        yield from corpus_texts(sample.conversation)


class TokenizeStage(Stage):
    name = "tokenize"
    version = "1"
    inputs = ("mixture", "vision_encoder")
    outputs = ("tokenizer", "tokenized")
    config_cls = TokenizeConfig
    operational = frozenset(
        {"render_batch_size", "render_cpus", "num_encoders", "encoder_cpus", "encoder_gpus", "encode_batch_size"}
    )
    description = "tokenizer + chat template + packed Parquet rows with precomputed fp16 vision features"

    def fingerprint(self, cfg: TokenizeConfig) -> dict[str, Any]:
        if cfg.tokenizer.path is None:
            return {}
        h = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            p = Path(cfg.tokenizer.path) / name
            if p.exists():
                h.update(name.encode() + p.read_bytes())
        return {"tokenizer": h.hexdigest()}

    def validate(self, cfg: TokenizeConfig) -> None:
        if cfg.tokenizer.path is not None and not Path(cfg.tokenizer.path).is_dir():
            raise ValueError(f"tokenize.tokenizer.path={cfg.tokenizer.path} is not a directory")

    def resources(self, cfg: TokenizeConfig) -> dict[str, float]:
        return {"CPU": cfg.render_cpus + cfg.num_encoders * cfg.encoder_cpus}

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.data.packing import Packer, PackingStats, PackSample, PartWriter
        from metamorph.data.tokenizer import build_tokenizer, special_ids

        import ray
        import ray.data

        from metamorph.data.shards import list_shards

        cfg: TokenizeConfig = ctx.cfg
        mixture = ctx.input("mixture")
        encoder_dir = ctx.input("vision_encoder")
        n_visual, feature_dim = _encoder_dims(encoder_dir)
        if cfg.max_length < n_visual + 16:
            raise ValueError(f"tokenize.max_length={cfg.max_length} cannot hold one image of {n_visual} tokens plus a turn")
        shards = list_shards(mixture, split="train")
        if not shards:
            raise ValueError(f"no shard-train-*.tar under the mixture dir {mixture}")

        tok_dir = ctx.output("tokenizer")
        texts = None if cfg.tokenizer.path else _train_texts(mixture, cfg.tokenizer.max_train_samples, cfg.system_prompt)
        tok = build_tokenizer(cfg.tokenizer, texts)
        tok.save_pretrained(tok_dir)
        ids = special_ids(tok)

        ds = ray.data.from_items([{"shard": str(p)} for p in shards], override_num_blocks=len(shards))
        ds.context.execution_options.preserve_order = True  # this dataset only: output order = input order
        # (from_items has started Ray if nobody had) GPUs only where the cluster has them
        gpus = cfg.encoder_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        ds = ds.map_batches(
            _render_shards,
            batch_size=1,  # one shard per call
            batch_format="pyarrow",
            fn_kwargs=dict(
                tokenizer_dir=str(tok_dir),
                n_visual=n_visual,
                max_length=cfg.max_length,
                system_prompt=cfg.system_prompt,
                batch_size=cfg.render_batch_size,
            ),
            num_cpus=cfg.render_cpus,
        )
        ds = ds.map_batches(
            _EncodeImages,
            fn_constructor_kwargs=dict(encoder_dir=str(encoder_dir), threads=int(cfg.encoder_cpus)),
            batch_size=cfg.encode_batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=cfg.num_encoders),
            num_cpus=cfg.encoder_cpus,
            num_gpus=gpus,
        )

        out_dir = ctx.output("tokenized")
        meta = {
            "max_length": cfg.max_length,
            "n_visual": n_visual,
            "feature_dim": feature_dim,
            "vocab_size": len(tok),
            "pad_id": ids.pad,
            "image_start_id": ids.image_start,
            "image_end_id": ids.image_end,
            "eot_id": ids.eot,
            "bos_id": ids.bos,
            "row_group_size": cfg.row_group_size,
        }
        stats = PackingStats(max_length=cfg.max_length)
        packer = Packer(cfg.max_length, ids.pad, cfg.pack_window)
        with PartWriter(out_dir, cfg.row_group_size, cfg.rows_per_part, metadata=meta) as writer:
            for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow"):
                for s in batch.to_pylist():
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
        if stats.n_rows == 0:
            raise ValueError(f"tokenize produced no rows from {stats.n_samples} samples (all dropped?)")
        for name, n in writer.parts:
            ctx.record_rows(f"tokenized/{name}", n)

        result = stats.as_dict(n_visual=n_visual)
        result.update(n_parts=len(writer.parts), vocab_size=len(tok), n_visual=n_visual, feature_dim=feature_dim)
        (out_dir / "info.json").write_text(json.dumps({**meta, "stats": result}, indent=2, sort_keys=True))
        return result
