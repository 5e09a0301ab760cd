"""`vision_encoder` stage: materialise the frozen SigLIP encoder every later stage loads.

    python -c "from pipelines.testing import run_stage; from stages.vision_encoder import VisionEncoderStage as S; print(run_stage(S(), S.config_cls(), root='runs/dev'))"

Builds the encoder from the config (seeded, so reruns are identical) and, when
`pretrain.steps > 0` (tiny), pretrains it on toy-world image-caption pairs with the SigLIP sigmoid
loss, then scores held-out linear probes per attribute (colour, shape, size, position, count),
logs them as MLflow metrics `probe/<attribute>` and fails naming any attribute below its
`pretrain.probe_floors` entry. With `path` (cluster: a SigLIP checkpoint) it loads the checkpoint
and neither pretrains nor probes. The algorithm is `metamorph/model/vision_pretrain.py`; this
stage writes `VisionEncoder.save_pretrained` into the `vision_encoder` artifact, so `tokenize`,
`train_decoder` and `evaluate` share one set of weights and one feature recipe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metamorph.model.config import VisionConfig, VisionPretrainConfig
from pipelines.stage import Stage, StageContext


@dataclass(kw_only=True)
class VisionEncoderConfig(VisionConfig):
    # pretraining + probes of a config-built encoder (ignored with `path`); steps=0 keeps the random init
    pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)

    def encoder_config(self) -> VisionConfig:
        """The encoder's own config (what save_pretrained records), without the pretraining recipe."""
        return VisionConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VisionConfig)})


class VisionEncoderStage(Stage):
    name = "vision_encoder"
    version = "2"
    inputs = ()
    outputs = ("vision_encoder",)
    config_cls = VisionEncoderConfig
    description = "frozen SigLIP vision encoder (built and pretrained on toy image-caption pairs, or loaded from a path)"

    def validate(self, cfg: VisionEncoderConfig) -> None:
        if cfg.path is not None and not Path(cfg.path).is_dir():
            raise ValueError(f"vision_encoder.path={cfg.path!r} is not a directory (a SigLIP checkpoint dir)")

    def fingerprint(self, cfg: VisionEncoderConfig) -> dict[str, Any]:
        # a checkpoint replaced in place must invalidate the cache: key on its files' sizes/mtimes
        if cfg.path is None:
            return {}
        root = Path(cfg.path)
        return {
            "checkpoint": sorted(
                (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*")
                if p.is_file() and p.suffix in (".safetensors", ".json", ".bin")
            )
        }

    def resources(self, cfg: VisionEncoderConfig) -> dict[str, float]:
        return {"CPU": 1.0} if cfg.path is None else {}  # the pretraining task

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.model import vision_pretrain
        from metamorph.model.vision import VisionEncoder
        from stages._training import ray_is_up, start_task

        cfg: VisionEncoderConfig = ctx.cfg
        pcfg = cfg.pretrain
        enc = VisionEncoder.from_config(cfg.encoder_config())
        stats: dict[str, float] = {}
        if cfg.path is None:
            if ray_is_up():
                # a Ray task holding its CPU: in the driver's thread it shared both cores with the
                # curations' Ray Data workers (tiny: 46 s inside the DAG, 36 s alone); seeded, so
                # the encoder is the same wherever it trains
                enc, pstats, probes = start_task(_pretrain_and_probe, enc, pcfg, cpus=1,
                                                 logger=vision_pretrain.__name__)()
            else:
                enc, pstats, probes = _pretrain_and_probe(enc, pcfg)
            stats.update(pstats)
            if probes:
                stats.update({f"probe/{a}": v for a, v in probes.items()})
                ctx.log_metrics({f"probe/{a}": v for a, v in probes.items()})
                vision_pretrain.check_floors(probes, pcfg.probe_floors)
        enc.save_pretrained(ctx.output("vision_encoder"))
        return {
            **stats,
            "n_params": float(sum(p.numel() for p in enc.parameters())),
            "feature_dim": float(enc.feature_dim),
            "n_tokens": float(enc.n_tokens),
            "image_size": float(enc.image_size),
        }


def _pretrain_and_probe(enc: Any, pcfg: VisionPretrainConfig) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Pretrain ``enc`` and fit the attribute probes on one torch thread (this tiny tower gains
    nothing from two, and on a busy machine two threads spin: measured 0.09 CPU-s per 128-pair
    step on one). Returns (encoder, pretrain stats, probe accuracies)."""
    from metamorph.model import vision_pretrain
    from metamorph.threads import torch_threads

    stats: dict[str, float] = {}
    probes: dict[str, float] = {}
    with torch_threads(1):
        if pcfg.steps:
            stats.update(vision_pretrain.pretrain(enc, pcfg))
        if pcfg.probe_train and pcfg.probe_test:
            probes = vision_pretrain.probe_attributes(enc, pcfg)
    return enc, stats, probes
