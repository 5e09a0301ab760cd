"""Stage 1 of VPiT: connector pretraining on Ray Train (projector + image-token rows only).

    metamorph run --preset tiny --only train_connector

Builds ``MetaMorphForCausalLM`` from the ``model`` config section (vocab and special-token ids
from the tokenizer; the visual feature dim and tokens per image from the tokenized shards'
metadata, which the vision encoder decided), ``set_trainable("connector")`` (no visual loss), and
trains it with ``metamorph.train.loop`` in a TorchTrainer worker group. Output
``connector_model``: a ``save_pretrained`` dir with the tokenizer saved beside it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from metamorph.model.config import MetaMorphConfig
from metamorph.train.config import TrainConfig
from pipelines.stage import Stage, StageConfig, StageContext
from stages import _llm, _training


@dataclass(kw_only=True)
class TrainConnectorConfig(StageConfig):
    # The model to build. llm.vocab_size, the special-token ids, vision_dim and n_tokens are
    # filled in from the tokenizer and the tokenized shards at run time.
    model: MetaMorphConfig = field(default_factory=MetaMorphConfig)
    # Only the projector and two embedding rows learn: one epoch at a high LR suffices (tiny:
    # ~650 rows / 8 per step = ~80 steps, ~1 min on 2 CPU workers).
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=2e-3, epochs=1.0, checkpoint_every=25, log_every=5)
    )
    scaling: _training.Scaling = field(default_factory=_training.Scaling)


def build_connector_model(model_cfg: MetaMorphConfig, seed: int):
    """Runs in each Ray Train worker: the same seed gives every rank (and every restart) the
    same frozen weights, which the checkpoints leave out."""
    import torch

    from metamorph.model.modeling import MetaMorphForCausalLM

    # fp32 master weights whatever the checkpoint's dtype (Meta ships bf16): FSDP2 needs one dtype
    # across a module's parameters (the heads are fp32) and casts to bf16 for compute itself
    model = MetaMorphForCausalLM.from_config(model_cfg, seed=seed, dtype=torch.float32)
    model.set_trainable("connector")
    return model


class TrainConnector(Stage):
    name = "train_connector"
    version = "2"  # 2: AdamW spares the slot and image-ordinal tables (model.no_weight_decay)
    inputs = ("tokenized", "tokenizer")
    outputs = ("connector_model",)
    config_cls = TrainConnectorConfig
    resumable = True
    description = "stage 1: train the projector (+ <image_start>/<image_end> rows) on Ray Train"

    def validate(self, cfg: TrainConnectorConfig) -> None:
        if cfg.train.weight_decay != 0:
            # set_trainable("connector") marks the whole input-embedding matrix trainable and
            # zeroes the gradient of all but two rows; decay would still shrink every row
            raise ValueError(
                f"train_connector.train.weight_decay={cfg.train.weight_decay}: must be 0 in stage 1 "
                "(the frozen vocabulary rows would decay); the paper uses 0"
            )

    def resources(self, cfg: TrainConnectorConfig) -> dict[str, float]:
        return cfg.scaling.resources()

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.data.packing import read_metadata
        from metamorph.data.tokenizer import load_tokenizer, special_ids

        cfg: TrainConnectorConfig = ctx.cfg
        self.validate(cfg)
        shards = ctx.input("tokenized")
        info = read_metadata(shards)
        tok = load_tokenizer(ctx.input("tokenizer"))
        ids = special_ids(tok)
        model_cfg = dataclasses.replace(
            cfg.model,
            llm=dataclasses.replace(cfg.model.llm, vocab_size=len(tok)),
            vision_dim=int(info["feature_dim"]),
            n_tokens=int(info["n_visual"]),
            image_start_id=ids.image_start,
            image_end_id=ids.image_end,
            pad_id=ids.pad,
            bos_id=ids.bos,
            eos_id=ids.eot,  # generation stops at the end of the assistant turn
        )
        train = dataclasses.replace(cfg.train, seed=cfg.train.seed + ctx.seed)
        out = ctx.output("connector_model")
        stats = _llm.fit_llm(
            ctx,
            train,
            cfg.scaling,
            functools.partial(build_connector_model, model_cfg, train.seed),
            shards,
            feature_dim=model_cfg.vision_dim,
            seq_len=int(info["max_length"]),
            export_dir=out,
        )
        _llm.publish(ctx, out, tok, "connector_model")
        return stats
