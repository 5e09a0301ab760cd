"""The import rules of docs/ARCHITECTURE.md, checked on the source (ast, no imports, ~0.5 s):

* ``metamorph/`` (the library) imports neither ray, mlflow, ``stages`` nor ``pipelines``;
* ``stages/`` and ``pipelines/`` import torch / transformers / diffusers / ray / mlflow only
  inside functions (the CLI stays import-light);
* no import circles among our modules (``pipelines``, ``stages``, ``metamorph``), counting the
  imports inside functions too: a deferred import hides a circle from Python, not from a reader.

Plus the cache-key rule: fields kept out of cache keys are declared as field metadata, and a
misspelt declaration fails.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("metamorph", "pipelines", "stages")
HEAVY = ("torch", "transformers", "diffusers", "ray", "mlflow")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module top level?) of every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    for n in tree.body:  # `if TYPE_CHECKING:` / try blocks at top level count as top level
        if isinstance(n, (ast.If, ast.Try)):
            top |= {id(c) for c in ast.walk(n)}
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # ``from pkg import x``: the module pkg.x if x is one, else pkg itself (x is a name in it)
            out += [(f"{base}.{a.name}", id(node) in top) for a in node.names]
    return out


def _ours(name: str) -> str | None:
    """The longest prefix of ``name`` that is one of our modules."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        deps = {_ours(m) for m, _ in _imports(name, path)} - {None, name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[v] = min(low[v], index[w])
    return out


def test_the_library_imports_no_ray_mlflow_stages_or_pipelines():
    bad = [
        f"{name} imports {mod}"
        for name, path in MODULES.items() if name.startswith("metamorph")
        for mod, _ in _imports(name, path)
        if mod.split(".")[0] in ("ray", "mlflow", "stages", "pipelines")
    ]
    assert bad == []


def test_glue_imports_heavy_libraries_only_inside_functions():
    bad = [
        f"{name} imports {mod} at module level"
        for name, path in MODULES.items() if name.startswith(("stages", "pipelines"))
        for mod, top in _imports(name, path)
        if top and mod.split(".")[0] in HEAVY
    ]
    assert bad == []


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    # the check above can fail: a two-module and a three-module circle beside a clean chain
    graph = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}}
    assert sorted(_cycles(graph)) == [["a", "b"], ["c", "d", "e"]]


def test_relative_imports_resolve_to_our_modules():
    # modeling_metamorph imports modeling relatively (it is saved as remote code): the graph sees it
    assert "metamorph.model.modeling" in _graph()["metamorph.model.modeling_metamorph"]


# ---- cache-excluded fields: field metadata, checked


def test_operational_fields_come_from_field_metadata():
    from metamorph.fields import operational_paths
    from pipelines.cache import cache_config
    from stages.curate_generation import CurateGenerationConfig
    from stages.train_vpit import TrainVPiTConfig

    cfg = TrainVPiTConfig()
    paths = operational_paths(cfg)
    assert {"train.log_every", "train.checkpoint_every", "scaling.cpus_per_worker", "scaling.max_failures"} <= paths
    assert "scaling.num_workers" not in paths and "vision_coef" not in paths  # they change the weights
    plain = cache_config(cfg)
    assert "log_every" not in plain["train"] and plain["scaling"] == {"num_workers": 2, "use_gpu": False}
    # a subclass that only redeclares the default keeps its base's mark
    assert "records_per_task" in operational_paths(CurateGenerationConfig())


def test_a_misspelt_cache_exclusion_fails():
    from metamorph.fields import operational_paths
    from pipelines.stage import Stage

    @dataclasses.dataclass
    class Cfg:
        workers: int = dataclasses.field(default=1, metadata={"operationl": True})

    with pytest.raises(ValueError, match="workers.*operationl"):
        operational_paths(Cfg())
    with pytest.raises(TypeError, match="declared on the config dataclass"):
        type("Old", (Stage,), {"operational": frozenset({"workers"})})  # the retired string list


def test_remote_code_files_import_nothing_of_metamorph():
    # exports carry copies of these files and load in a venv without metamorph
    files = [ROOT / "metamorph" / "model" / f for f in ("configuration_metamorph.py", "modeling_metamorph.py",
                                                       "modeling.py", "config.py", "generation.py")]
    files += [ROOT / "metamorph" / "decoder" / f for f in ("pipeline.py", "conditioning.py", "config.py")]
    bad = [f"{p.relative_to(ROOT)} imports {mod}" for p in files for mod, _ in _imports("x", p)
           if mod.split(".")[0] in ("metamorph", "stages", "pipelines")]
    assert bad == []
    from metamorph.decoder.config import DecoderTrainConfig
    from metamorph.fields import operational_paths

    assert {"log_every", "sample_every", "checkpoint_every", "keep_last"} == operational_paths(DecoderTrainConfig())
