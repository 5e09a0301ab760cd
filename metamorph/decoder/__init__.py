"""The diffusion decoder: a UNet that renders an image from its N vision-encoder tokens.

    python -m metamorph.decoder.train       # a few steps on random data

config.py (DecoderConfig, SamplingConfig), conditioning.py (VisionConditioner: tokens -> UNet
context), pipeline.py (MetaMorphDecoderPipeline, the exported diffusers pipeline), train.py
(DecoderTrainConfig, train_loop, checkpoints), metrics.py (attribute agreement, image grids).
"""

from metamorph.decoder.config import DecoderConfig, DecoderTrainConfig, SamplingConfig

# The torch/diffusers modules load on first use, so configs import in milliseconds.
_LAZY = {
    "VisionConditioner": "metamorph.decoder.conditioning",
    "MetaMorphDecoderPipeline": "metamorph.decoder.pipeline",
    "DecoderData": "metamorph.decoder.train",
    "train_loop": "metamorph.decoder.train",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metamorph.decoder' has no attribute {name!r}")

__all__ = [
    "DecoderConfig",
    "DecoderData",
    "DecoderTrainConfig",
    "MetaMorphDecoderPipeline",
    "SamplingConfig",
    "VisionConditioner",
    "train_loop",
]
