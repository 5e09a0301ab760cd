"""`curate_video`: SSv2 / HowTo100M clips -> frame-prediction samples.

    python -c "from pipelines.testing import run_stage; from stages.curate_video import CurateVideo as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs')[1])"

Frames are sampled at ``fps`` (at most ``max_frames``); the first ``prompt_frames`` go in the
prompt with "What happens next?", the answer is the clip's label followed by the remaining
frames as response images. Glue: ``stages/_curation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.data.curate import FramePredictionConfig
from metamorph.data.readers import SourceConfig
from metamorph.data.video import VideoConfig
from stages._curation import CurationStage, CurationStageConfig


def _sources() -> list[SourceConfig]:
    return [SourceConfig(name="world_ssv2", format="ssv2", path="world:video/labels/train.json", video_root="world:video/videos")]


@dataclass(kw_only=True)
class CurateVideoConfig(CurationStageConfig, VideoConfig, FramePredictionConfig):
    sources: list[SourceConfig] = field(default_factory=_sources)
    fps: float = 4.0  # toy clips are 1 s: 4 frames, 2 in the prompt and 2 to predict
    records_per_task: int = 32  # a clip decodes in ~10-50 ms: smaller tasks spread the work

    def __post_init__(self) -> None:
        super().__post_init__()
        VideoConfig.__post_init__(self)
        FramePredictionConfig.__post_init__(self)
        if self.prompt_frames >= self.max_frames:
            raise ValueError(f"prompt_frames={self.prompt_frames} must be < max_frames={self.max_frames}: some frames must be left to predict")


class CurateVideo(CurationStage):
    name = "curate_video"
    version = "4"  # 4: two members per sample (json + images.mp, any WebDataset reader); 3: published layouts (world), lossless image modes, per-source counts; 2: pHash from stepwise box reductions
    family = "video"
    outputs = ("curated_video",)
    config_cls = CurateVideoConfig
    description = "video clips -> frame_prediction samples (WebDataset shards, Ray Data)"
