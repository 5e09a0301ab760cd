"""`vision_encoder` stage: materialise the frozen SigLIP encoder every later stage loads.

    python -c "from pipelines.testing import run_stage; from stages.vision_encoder import VisionEncoderStage as S; print(run_stage(S(), S.config_cls(), root='runs/dev'))"

Builds the random-init encoder from the config (smoke/tiny: seeded, so reruns are identical) or
loads `path` (cluster: a SigLIP checkpoint), and writes `VisionEncoder.save_pretrained` into the
`vision_encoder` artifact, so `tokenize`, `train_decoder` and `evaluate` share one set of weights
and one feature recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metamorph.model.config import VisionConfig
from pipelines.stage import Stage, StageContext


class VisionEncoderStage(Stage):
    name = "vision_encoder"
    version = "1"
    inputs = ()
    outputs = ("vision_encoder",)
    config_cls = VisionConfig
    description = "frozen SigLIP vision encoder (built from config or loaded from a path)"

    def validate(self, cfg: VisionConfig) -> None:
        if cfg.path is not None and not Path(cfg.path).is_dir():
            raise ValueError(f"vision_encoder.path={cfg.path!r} is not a directory (a SigLIP checkpoint dir)")

    def fingerprint(self, cfg: VisionConfig) -> dict[str, Any]:
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

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.model.vision import VisionEncoder

        enc = VisionEncoder.from_config(ctx.cfg)
        enc.save_pretrained(ctx.output("vision_encoder"))
        return {
            "n_params": float(sum(p.numel() for p in enc.parameters())),
            "feature_dim": float(enc.feature_dim),
            "n_tokens": float(enc.n_tokens),
            "image_size": float(enc.image_size),
        }
