"""`curate_visual_thinking`: Visual-CoT style (question, answer, bbox) -> visual-thinking samples.

    python -c "from pipelines.testing import run_stage; from stages.curate_visual_thinking import CurateVisualThinking as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs')[1])"

User: "<image>\\nThink visually before you answer: {question}"; assistant: "<image>\\n{answer}",
where the response image is the bbox crop (source convention ``bbox_format``, checked against
the original image) resized to ``image_size``. Glue: ``stages/_curation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.data.readers import SourceConfig
from stages._curation import CurationStage, CurationStageConfig


def _sources() -> list[SourceConfig]:
    return [
        # Visual-CoT's two published forms: metadata JSONL (images under cot/<dataset>/) and the
        # converted viscot_363k.json (image paths relative to the folder holding cot/)
        SourceConfig(name="world_viscot", format="viscot", path="world:visual_thinking/metadata",
                     image_root="world:visual_thinking/cot", bbox_format="xyxy"),
        SourceConfig(name="world_viscot363k", format="viscot", path="world:visual_thinking/viscot_363k.json",
                     image_root="world:visual_thinking"),
    ]


@dataclass(kw_only=True)
class CurateVisualThinkingConfig(CurationStageConfig):
    sources: list[SourceConfig] = field(default_factory=_sources)
    resize: str = "pad"  # the whole scene stays visible, so the box stays meaningful


class CurateVisualThinking(CurationStage):
    name = "curate_visual_thinking"
    version = "4"  # 4: two members per sample (json + images.mp, any WebDataset reader); 3: published layouts (world), lossless image modes, per-source counts; 2: pHash from stepwise box reductions
    family = "visual_thinking"
    outputs = ("curated_visual_thinking",)
    config_cls = CurateVisualThinkingConfig
    description = "question + bbox -> visual_thinking samples (crop as response image)"
