"""The `tokenize` stage: mixture -> tokenizer + packed Parquet rows with precomputed vision features.

    metamorph run --preset smoke --only tokenize

Ray Data plan (library code does the work: ``metamorph.data.render``; this module is glue):

1. driver: train the BPE on the mixture's text (or load the checkpoint's tokenizer), save it;
2. one task per mixture shard (fractional CPU): read samples, render them with the chat
   template, truncate over-long ones (never inside an image);
3. an actor pool (``stages._encoders``, shared with train_decoder) runs the frozen vision
   encoder once per kept image (on GPUs when the cluster has them) and attaches each sample's N
   normalised tokens per image as fp16 bytes;
4. driver: streams the samples back in input order (``preserve_order``), packs them
   (first-fit over a window) and writes ``tokenized/part-NNNNN.parquet`` with fixed-size row
   groups. Same input -> byte-identical output.

The driver is the single packer/writer so the output is deterministic and the counts are exact;
it moves every feature byte once (~150 KB per image at paper scale), which a head node streams at
hundreds of MB/s, far below the encoder's cost on the same images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metamorph.data.tokenizer import TokenizerConfig
from pipelines.stage import Stage, StageConfig, StageContext, operational



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
    render_batch_size: int = field(default=256, metadata=operational())  # samples per tokenizer call inside a shard task
    render_cpus: float = field(default=0.5, metadata=operational())  # CPUs per shard task (fractional: the encoder pool needs some too)
    num_encoders: int = field(default=1, metadata=operational())  # vision-encoder actors (one per GPU on a cluster)
    encoder_cpus: float = field(default=0.5, metadata=operational())  # CPUs per encoder actor; also its torch thread count (min 1)
    encoder_gpus: float = field(default=1.0, metadata=operational())  # GPUs per encoder actor, used only when the cluster has GPUs
    encode_batch_size: int = field(default=32, metadata=operational())  # samples per encoder actor call

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


class TokenizeStage(Stage):
    name = "tokenize"
    version = "1"
    inputs = ("mixture", "vision_encoder")
    outputs = ("tokenizer", "tokenized")
    config_cls = TokenizeConfig
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
        from metamorph.data.render import encoder_dims, pack_parts, render_shards, train_texts
        from metamorph.data.tokenizer import build_tokenizer, special_ids

        import ray
        import ray.data

        from metamorph.data.shards import list_shards
        from stages._encoders import encode_with_pool

        cfg: TokenizeConfig = ctx.cfg
        mixture = ctx.input("mixture")
        encoder_dir = ctx.input("vision_encoder")
        n_visual, feature_dim = encoder_dims(encoder_dir)
        if cfg.max_length < n_visual + 16:
            raise ValueError(f"tokenize.max_length={cfg.max_length} cannot hold one image of {n_visual} tokens plus a turn")
        shards = list_shards(mixture, split="train")
        if not shards:
            raise ValueError(f"no shard-train-*.tar under the mixture dir {mixture}")

        tok_dir = ctx.output("tokenizer")
        texts = None if cfg.tokenizer.path else train_texts(mixture, cfg.tokenizer.max_train_samples, cfg.system_prompt)
        tok = build_tokenizer(cfg.tokenizer, texts)
        tok.save_pretrained(tok_dir)
        ids = special_ids(tok)

        ds = ray.data.from_items([{"shard": str(p)} for p in shards], override_num_blocks=len(shards))
        ds.context.execution_options.preserve_order = True  # this dataset only: output order = input order
        # (from_items has started Ray if nobody had) GPUs only where the cluster has them
        gpus = cfg.encoder_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
        ds = ds.map_batches(
            render_shards,
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
        ds = encode_with_pool(ds, str(encoder_dir), num_encoders=cfg.num_encoders, cpus=cfg.encoder_cpus,
                              gpus=gpus, batch_size=cfg.encode_batch_size)

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
        rows = (s for batch in ds.iter_batches(batch_size=256, batch_format="pyarrow") for s in batch.to_pylist())
        stats, parts, digests = pack_parts(rows, out_dir, max_length=cfg.max_length, pad_id=ids.pad, pack_window=cfg.pack_window,
                                  row_group_size=cfg.row_group_size, rows_per_part=cfg.rows_per_part, meta=meta)
        if stats.n_rows == 0:
            raise ValueError(f"tokenize produced no rows from {stats.n_samples} samples (all dropped?)")
        for name, n in parts:
            ctx.record_rows(f"tokenized/{name}", n)
            ctx.record_digest(f"tokenized/{name}", digests[name])

        result = stats.as_dict(n_visual=n_visual)
        result.update(n_parts=len(parts), vocab_size=len(tok), n_visual=n_visual, feature_dim=feature_dim)
        (out_dir / "info.json").write_text(json.dumps({**meta, "stats": result}, indent=2, sort_keys=True))
        return result
