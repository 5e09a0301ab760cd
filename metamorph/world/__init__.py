"""The toy world: a procedural source of every data family, written in the real upstream formats.

    python -c "from metamorph.world import WorldConfig, write_world; print(write_world('/tmp/world', WorldConfig(), seed=0))"

Scenes of 1-3 shapes with exact attributes (attributes.py), anti-aliased renders (render.py),
moving-object clips in mp4 (video.py), question/caption/instruction text (text.py), and one
generator per family plus ``write_world`` (families.py). The layout it writes is the "Upstream
formats" section of docs/CONTRACTS.md; every record carries its ground truth in ``meta``.
"""

from metamorph.world.config import WorldConfig

# families (numpy, PIL, PyAV, pyarrow) loads on first use: `metamorph plan` needs the config only
_LAZY = {"FAMILIES": "metamorph.world.families", "write_world": "metamorph.world.families"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metamorph.world' has no attribute {name!r}")

__all__ = ["FAMILIES", "WorldConfig", "write_world"]
