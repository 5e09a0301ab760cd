"""`curate_understanding`: LLaVA/Cambrian image QA and VideoQA -> curated ``image_qa``/``video_qa`` samples.

    python -c "from pipelines.testing import run_stage; from stages.curate_understanding import CurateUnderstanding as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs')[1])"

Format ``llava`` (JSONL or JSON array; ``videoqa`` is the same reader): image records, and video
records (a ``video`` key; frames sampled at ``fps``, at most ``max_frames``, each frame one prompt
image). Glue: ``stages/_curation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.data.readers import SourceConfig
from metamorph.data.video import VideoConfig
from stages._curation import CurationStage, CurationStageConfig


def _sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="world_llava", format="llava", path="world:understanding/llava.jsonl", image_root="world:understanding/images"),
        # LLaVA-Video-178K's layout: the LLaVA record with a ``video`` key
        SourceConfig(name="world_videoqa", format="llava", path="world:understanding/videoqa.jsonl", video_root="world:understanding/videos"),
    ]


@dataclass(kw_only=True)
class CurateUnderstandingConfig(CurationStageConfig, VideoConfig):
    sources: list[SourceConfig] = field(default_factory=_sources)
    resize: str = "pad"  # questions about position/edges must stay answerable: never crop away
    fps: float = 4.0  # toy clips are 1 s: 4 frames show the direction of motion

    def __post_init__(self) -> None:
        super().__post_init__()
        VideoConfig.__post_init__(self)


class CurateUnderstanding(CurationStage):
    name = "curate_understanding"
    version = "4"  # 4: two members per sample (json + images.mp, any WebDataset reader); 3: published layouts (world), lossless image modes, per-source counts; 2: pHash from stepwise box reductions
    family = "understanding"
    outputs = ("curated_understanding",)
    config_cls = CurateUnderstandingConfig
    description = "image/video QA -> image_qa, video_qa samples (WebDataset shards, Ray Data)"
