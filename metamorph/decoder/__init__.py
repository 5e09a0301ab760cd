"""The diffusion decoder: a UNet that renders an image from its N vision-encoder tokens.

    python -m metamorph.decoder.train       # a few steps on random data

config.py (DecoderConfig, SamplingConfig), conditioning.py (VisionConditioner: tokens -> UNet
context), pipeline.py (MetaMorphDecoderPipeline, the exported diffusers pipeline), train.py
(DecoderTrainConfig, train_loop, checkpoints), metrics.py (attribute agreement, image grids).
"""

from metamorph.decoder.conditioning import VisionConditioner
from metamorph.decoder.config import DecoderConfig, SamplingConfig
from metamorph.decoder.pipeline import MetaMorphDecoderPipeline
from metamorph.decoder.train import DecoderData, DecoderTrainConfig, train_loop

__all__ = [
    "DecoderConfig",
    "DecoderData",
    "DecoderTrainConfig",
    "MetaMorphDecoderPipeline",
    "SamplingConfig",
    "VisionConditioner",
    "train_loop",
]
