"""The `world` stage: render the toy world into the `world` artifact, in every upstream format.

    python -c "from pipelines.testing import run_stage; from stages.world import WorldStage, WorldStageConfig; print(run_stage(WorldStage(), WorldStageConfig(), root='/tmp/runs'))"

No inputs. The output dir holds understanding/, generation/, video/, visual_thinking/ and
image_edit/ laid out as docs/CONTRACTS.md ("Upstream formats") says, plus world.json (config,
seed, counts, vocabularies). The work is one process: the tiny preset (~6.6k records, 600 mp4
clips) renders in ~4 s on one core, far below the cost of scheduling Ray tasks for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from metamorph.world import WorldConfig
from pipelines.stage import Stage, StageConfig, StageContext


@dataclass(kw_only=True)
class WorldStageConfig(WorldConfig, StageConfig):
    """The library's WorldConfig as a stage config (fields and validation: metamorph/world/config.py)."""


class WorldStage(Stage):
    name = "world"
    version = "2"  # 2: the published layouts (LLaVA-Video records, Visual-CoT metadata + viscot_363k.json, edit JSONL, img2dataset sidecars)
    inputs = ()
    outputs = ("world",)
    config_cls = WorldStageConfig
    description = "procedural toy world: scenes, clips, questions, captions, edits in upstream formats"

    def validate(self, cfg: WorldStageConfig) -> None:
        from metamorph.world.video import codec_available  # PyAV: only when the stage is about to run

        if (cfg.n_video or cfg.n_videoqa) and not codec_available(cfg.video_codec):
            raise ValueError(f"world.video_codec={cfg.video_codec!r} is not in this PyAV build; use 'mpeg4'")

    def run(self, ctx: StageContext) -> dict[str, float]:
        from metamorph.world import families as F
        from metamorph.world.families import write_world

        out = ctx.output("world")
        stats = write_world(out, ctx.cfg, seed=ctx.seed)
        # row counts of the non-Parquet record files, for the manifest's file list
        ctx.record_rows(f"world/{F.LLAVA_JSONL}", int(stats["n_understanding"]))
        ctx.record_rows(f"world/{F.VIDEOQA_JSONL}", int(stats["n_videoqa"]))
        ctx.record_rows(f"world/{F.SSV2_LABELS}", int(stats["n_video"]))
        ctx.record_rows(f"world/{F.VISCOT_JSONL}", int(stats["n_viscot_metadata"]))
        ctx.record_rows(f"world/{F.VISCOT_363K}", int(stats["n_viscot_363k"]))
        ctx.record_rows(f"world/{F.EDIT_JSONL}", int(stats["n_edit_jsonl"]))
        n_gen, per_tar = int(stats["n_generation"]), ctx.cfg.shard_size
        for j, tar in enumerate(sorted((out / F.GENERATION_DIR).glob("*.tar"))):
            ctx.record_rows(f"world/{F.GENERATION_DIR}/{tar.name}", min(per_tar, n_gen - j * per_tar))
        return stats
