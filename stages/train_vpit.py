"""Stage 2 of VPiT: visual-predictive instruction tuning on Ray Train (everything but the encoder).

    metamorph run --preset tiny --only train_vpit

Starts from ``train_connector``'s export (weights, config, tokenizer: one dir),
``set_trainable("vpit")``, adds the visual loss (``vision_coef`` x -cosine on response-image
tokens: this stage's knob, passed to the loss as an argument) and trains with
``metamorph.train.loop`` in a TorchTrainer worker group (``_training.fit``). Output
``vpit_model``: a ``save_pretrained`` dir with the tokenizer beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from metamorph.train.config import TrainConfig
from pipelines.stage import Stage, StageConfig, StageContext
from stages import _llm, _training


@dataclass(kw_only=True)
class TrainVPiTConfig(StageConfig):
    # Weight of the visual term (-mean cosine) against text CE; the paper uses 1.0. The one home
    # of this value: it reaches the model's loss as an argument (train_loop's loss_args).
    vision_coef: float = 1.0
    # Fraction of response images (crops, generated images, frames) fed back as the model's own
    # predictions instead of the true features, as generation feeds them (scheduled sampling;
    # the loss's self_feed argument). One extra forward without gradient on each step that draws one.
    # 0: teacher forcing throughout (the paper).
    self_feed: float = 0.0
    # Which response images self_feed may feed back: "all", or "read": only images an answer
    # reads (followed in their sample by answer text: visual-thinking crops), not generated
    # images, edits or predicted frames, which nothing after them reads in their turn.
    self_feed_scope: str = "all"
    scaling: _training.Scaling = field(default_factory=_training.Scaling)
    # Everything trains from a random-init LLM in `tiny`, so several epochs (paper: 1 epoch of a
    # pretrained 8B): ~4 x 80 steps, a few minutes on 2 CPU workers.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=3e-3, epochs=4.0, checkpoint_every=50, log_every=10)
    )

    def __post_init__(self) -> None:
        if self.vision_coef < 0:
            raise ValueError(f"train_vpit.vision_coef={self.vision_coef} must be >= 0")
        if not 0.0 <= self.self_feed <= 1.0:
            raise ValueError(f"train_vpit.self_feed={self.self_feed} must be in [0, 1]")
        if self.self_feed_scope not in ("all", "read"):  # metamorph.model.modeling.SELF_FEED_SCOPES
            raise ValueError(f"train_vpit.self_feed_scope={self.self_feed_scope!r} must be 'all' or 'read'")


def build_vpit_model(connector_dir: str):
    """Runs in each Ray Train worker: load the connector export, train everything."""
    import torch

    from metamorph.model.modeling_metamorph import load_vpit

    model = load_vpit(connector_dir, dtype=torch.float32)  # fp32 master weights
    model.set_trainable("vpit")
    return model


class TrainVPiT(Stage):
    name = "train_vpit"
    version = "2"  # 2: AdamW spares the slot and image-ordinal tables (model.no_weight_decay)
    inputs = ("tokenized", "connector_model")
    outputs = ("vpit_model",)
    config_cls = TrainVPiTConfig
    resumable = True
    description = "stage 2: VPiT, LLM + projector + vision head with the visual loss, on Ray Train"

    def resources(self, cfg: TrainVPiTConfig) -> dict[str, float]:
        return cfg.scaling.resources()

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.data.packing import read_metadata
        from metamorph.data.tokenizer import load_tokenizer

        cfg: TrainVPiTConfig = ctx.cfg
        shards = ctx.input("tokenized")
        connector = ctx.input("connector_model")
        info = read_metadata(shards)
        tok = load_tokenizer(connector)
        model_dim = json.loads((connector / "config.json").read_text())["vision_dim"]
        if model_dim != int(info["feature_dim"]):
            raise ValueError(
                f"connector_model expects {model_dim}-dim visual features but the tokenized shards hold "
                f"{info['feature_dim']}-dim ones: both stages must read the same tokenize output"
            )
        train = dataclasses.replace(cfg.train, seed=cfg.train.seed + ctx.seed)
        out = ctx.output("vpit_model")
        stats = _llm.fit_llm(
            ctx,
            train,
            cfg.scaling,
            functools.partial(build_vpit_model, str(connector.resolve())),
            shards,
            feature_dim=int(info["feature_dim"]),
            seq_len=int(info["max_length"]),
            export_dir=out,
            loss_args={"vision_coef": cfg.vision_coef, "self_feed": cfg.self_feed,
                       "self_feed_scope": cfg.self_feed_scope},
        )
        _llm.publish(ctx, out, tok, "vpit_model")
        return stats
