"""The VPiT model library: vision encoder, MetaMorph LLM wrapper, losses, generation, HF export.

    python -m metamorph.model.modeling
"""

from metamorph.model.config import LLMConfig, MetaMorphConfig, VisionConfig

# The torch/transformers modules load on first use, so configs import in milliseconds.
_LAZY = {
    "GenerationConfig": "metamorph.model.generation",
    "GenerationOutput": "metamorph.model.generation",
    "Prompt": "metamorph.model.generation",
    "generate": "metamorph.model.generation",
    "MetaMorphForCausalLM": "metamorph.model.modeling",
    "MetaMorphOutput": "metamorph.model.modeling",
    "VisionEncoder": "metamorph.model.vision",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metamorph.model' has no attribute {name!r}")



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
