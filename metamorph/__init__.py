"""MetaMorph / VPiT: the library (model, data formats, toy world, training loop, decoder, eval).

    python -c "import metamorph, transformers; print(transformers.AutoConfig.for_model('metamorph'))"

Importing ``metamorph`` registers the exported model classes with transformers
(``AutoConfig`` / ``AutoModelForCausalLM`` for ``model_type: metamorph``), so exports load
without ``trust_remote_code``. The registration waits until transformers is imported (it is
heavy; importing metamorph stays cheap): right away when it already is, else on its import.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def register_auto_classes() -> None:
    """Register ``MetaMorphVPiTConfig`` / ``MetaMorphVPiTForCausalLM`` with the transformers Auto
    classes (idempotent; imports torch and transformers)."""
    from metamorph.model import _register

    _register()


def _ours_initializing() -> bool:
    """True while one of our modules is half-imported (registering now would import it again)."""
    return any(
        name.startswith("metamorph.") and getattr(getattr(mod, "__spec__", None), "_initializing", False)
        for name, mod in list(sys.modules.items())
    )


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register_auto_classes`` once ``transformers`` has finished importing."""

    def find_spec(self, name, path, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding us
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            if _ours_initializing():  # registering now would import a half-imported module
                sys.meta_path.insert(0, _WhenSafe())
            else:
                register_auto_classes()

        spec.loader.exec_module = exec_then_register
        return spec


class _WhenSafe(importlib.abc.MetaPathFinder):
    """Registers at the first import that happens after our half-imported modules finished
    (transformers was imported from inside one of them). Our own loaders also call
    ``register_auto_classes()`` themselves, so they never depend on this timing."""

    def find_spec(self, name, path, target=None):
        if not _ours_initializing():
            sys.meta_path.remove(self)
            register_auto_classes()
        return None


if "transformers" in sys.modules:
    register_auto_classes()
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport())
