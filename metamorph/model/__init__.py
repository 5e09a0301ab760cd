"""The VPiT model library: vision encoder, MetaMorph LLM wrapper, losses, generation.

    python -m metamorph.model.modeling
"""

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, GenerationOutput, Prompt, generate
from metamorph.model.modeling import MetaMorphForCausalLM, MetaMorphOutput
from metamorph.model.vision import VisionConfig, VisionEncoder

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "LLMConfig",
    "MetaMorphConfig",
    "MetaMorphForCausalLM",
    "MetaMorphOutput",
    "Prompt",
    "VisionConfig",
    "VisionEncoder",
    "generate",
]
