"""The VPiT model library: vision encoder, MetaMorph LLM wrapper, losses, generation, HF export.

    python -m metamorph.model.modeling
"""

from metamorph.model.config import LLMConfig, MetaMorphConfig
from metamorph.model.generation import GenerationConfig, GenerationOutput, Prompt, generate
from metamorph.model.modeling import MetaMorphForCausalLM, MetaMorphOutput
from metamorph.model.vision import VisionConfig, VisionEncoder



def _register() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from metamorph.model.configuration_metamorph import MODEL_TYPE, MetaMorphVPiTConfig
    from metamorph.model.modeling_metamorph import MetaMorphVPiTForCausalLM

    AutoConfig.register(MODEL_TYPE, MetaMorphVPiTConfig, exist_ok=True)
    AutoModelForCausalLM.register(MetaMorphVPiTConfig, MetaMorphVPiTForCausalLM, exist_ok=True)


_register()  # `import metamorph` leads here once transformers is imported (see metamorph/__init__)

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
