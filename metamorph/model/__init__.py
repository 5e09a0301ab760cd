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



_REGISTRY = {"done": False, "busy": False}


def _register() -> None:
    """Register the export's classes with the transformers Auto classes (idempotent, re-entrant:
    importing ``modeling_metamorph`` imports ``modeling``, whose last line calls this again)."""
    if _REGISTRY["done"] or _REGISTRY["busy"]:
        return
    _REGISTRY["busy"] = True
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        from metamorph.model.configuration_metamorph import MODEL_TYPE, MetaMorphVPiTConfig
        from metamorph.model.modeling_metamorph import MetaMorphVPiTForCausalLM

        AutoConfig.register(MODEL_TYPE, MetaMorphVPiTConfig, exist_ok=True)
        AutoModelForCausalLM.register(MetaMorphVPiTConfig, MetaMorphVPiTForCausalLM, exist_ok=True)
        _REGISTRY["done"] = True
    finally:
        _REGISTRY["busy"] = False


# No registration here: this package must import without torch/transformers (the CLI imports
# configs from it). ``metamorph/__init__`` registers once transformers is imported from outside
# our modules; our own loaders call ``metamorph.register_auto_classes()`` themselves.

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
