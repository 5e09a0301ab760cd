"""`curate_image_edit`: InstructPix2Pix-style (input image, instruction, output image) -> edit samples.

    python -c "from pipelines.testing import run_stage; from stages.curate_image_edit import CurateImageEdit as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs')[1])"

User: "<image>\\n{edit instruction}" (the input image), assistant: "<image>" (the edited image, a
generation target). Glue: ``stages/_curation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.data.readers import SourceConfig
from stages._curation import CurationStage, CurationStageConfig


def _sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="world_edit", format="instructpix2pix", path="world:image_edit/data"),
        # the converted form: JSONL beside input/ and output/ folders, its keys named here
        SourceConfig(name="world_edit_jsonl", format="edit_jsonl", path="world:image_edit/edits/edits.jsonl",
                     fields={"source": "input", "instruction": "edit", "target": "output"}),
    ]


@dataclass(kw_only=True)
class CurateImageEditConfig(CurationStageConfig):
    sources: list[SourceConfig] = field(default_factory=_sources)


class CurateImageEdit(CurationStage):
    name = "curate_image_edit"
    version = "4"  # 4: two members per sample (json + images.mp, any WebDataset reader); 3: published layouts (world), lossless image modes, per-source counts; 2: pHash from stepwise box reductions
    family = "image_edit"
    outputs = ("curated_image_edit",)
    config_cls = CurateImageEditConfig
    description = "edit pairs -> image_edit samples (WebDataset shards, Ray Data)"
