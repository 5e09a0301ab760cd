"""`curate_generation`: captioned images (img2dataset tars, Parquet) -> text-to-image samples.

    python -c "from pipelines.testing import run_stage; from stages.curate_generation import CurateGeneration as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs')[1])"

User: "Generate an image of {caption}." (one of a few templates, chosen by id), assistant: the
image as a response (a generation target). Duplicates are by image: the same picture with another
caption adds nothing to learn. Glue: ``stages/_curation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.data.readers import SourceConfig
from stages._curation import CurationStage, CurationStageConfig


def _sources() -> list[SourceConfig]:
    return [SourceConfig(name="world_gen", format="img2dataset", path="world:generation")]


@dataclass(kw_only=True)
class CurateGenerationConfig(CurationStageConfig):
    sources: list[SourceConfig] = field(default_factory=_sources)
    dedup: str = "images"  # one caption per picture
    # a captioned image costs ~1.5 ms at 256-384 px: 512 make tasks of ~0.5-1 s, so Ray's ~15 ms
    # per task (scheduling, block handling, a cold start) stays near 2% (256: -3% throughput)
    records_per_task: int = 512


class CurateGeneration(CurationStage):
    name = "curate_generation"
    version = "4"  # 4: two members per sample (json + images.mp, any WebDataset reader); 3: published layouts (world), lossless image modes, per-source counts; 2: pHash from stepwise box reductions
    family = "generation"
    outputs = ("curated_generation",)
    config_cls = CurateGenerationConfig
    description = "captioned images -> t2i samples (WebDataset shards, Ray Data)"
