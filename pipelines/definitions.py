"""The pipelines this project ships: an explicit registry of stage instances, wired by artifacts.

    metamorph stages          # lists them with inputs, outputs and config fields

Adding a stage: write ``stages/<name>.py`` (a Stage subclass and its config dataclass), add it to
a pipeline below, and give it preset values in ``conf/presets/*.yaml``.
"""

from __future__ import annotations

from typing import Callable

from pipelines.graph import Pipeline


def vpit_pipeline() -> Pipeline:
    """The MetaMorph DAG: curate -> mix -> tokenize -> connector -> VPiT, decoder, judge, evaluate."""
    from stages.curate_generation import CurateGeneration
    from stages.curate_image_edit import CurateImageEdit
    from stages.curate_understanding import CurateUnderstanding
    from stages.curate_video import CurateVideo
    from stages.curate_visual_thinking import CurateVisualThinking
    from stages.evaluate import EvaluateStage
    from stages.mix import MixStage
    from stages.tokenize import TokenizeStage
    from stages.train_connector import TrainConnector
    from stages.train_decoder import TrainDecoder
    from stages.train_judge import TrainJudgeStage
    from stages.train_vpit import TrainVPiT
    from stages.vision_encoder import VisionEncoderStage
    from stages.world import WorldStage

    return Pipeline(
        name="vpit",
        stages=[
            WorldStage(),
            CurateUnderstanding(),
            CurateGeneration(),
            CurateVideo(),
            CurateVisualThinking(),
            CurateImageEdit(),
            MixStage(),
            VisionEncoderStage(),
            TokenizeStage(),
            TrainConnector(),
            TrainVPiT(),
            TrainDecoder(),
            TrainJudgeStage(),
            EvaluateStage(),
        ],
        targets=("evaluate",),
    )


PIPELINES: dict[str, Callable[[], Pipeline]] = {"vpit": vpit_pipeline}


def get_pipeline(name: str) -> Pipeline:
    try:
        factory = PIPELINES[name]
    except KeyError:
        raise ValueError(f"unknown pipeline {name!r}; known: {sorted(PIPELINES)}") from None
    return factory()
