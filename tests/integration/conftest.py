"""Shared fixtures for integration tests: one local Ray per test session, sized for a 2-core box.

    python -m pytest tests/integration -q -m integration

Tests that need Ray take the ``ray_session`` fixture (and carry ``@pytest.mark.integration``);
Ray starts once, on first use, and stops when the session ends.
"""

from __future__ import annotations

import os

import pytest

# Before Ray starts: its workers inherit these. Offline (nothing downloads in tests), no usage
# stats, no auth on the local cluster, and a fast Ray Train health check so a killed worker is
# noticed in a fraction of a second instead of the default several seconds.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster of our own, never one another process on this
        # machine started (ray.init would otherwise join the newest one it finds in /tmp/ray)
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20,
                 log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(ray_session, tmp_path_factory):
    """One run of the whole default DAG on the smoke preset, shared by every test that only reads
    its outputs (a run takes minutes on 2 cores). Returns {"root", "loaded", "summary"}; the run
    registers its VPiT model as ``metamorph-smoke`` (evaluate.register_as)."""
    from pipelines.commands import execute
    from pipelines.config import load_config
    from pipelines.definitions import get_pipeline

    root = tmp_path_factory.mktemp("smoke-run")
    pipeline = get_pipeline("vpit")
    loaded = load_config(pipeline.stages, preset="smoke",
                         overrides=[f"run_root={root}", "stages.evaluate.register_as=metamorph-smoke"])
    summary = execute(pipeline, loaded, name="smoke-e2e")
    return {"root": root, "loaded": loaded, "summary": summary}


PLAIN_VENV_PACKAGES = ("torch", "transformers", "diffusers", "safetensors")


@pytest.fixture(scope="session")
def plain_venv():
    """A venv with only torch + transformers + diffusers (+ safetensors) at this venv's versions,
    built by pip from the local wheel cache / index and kept under the temp dir between sessions
    (keyed by the versions): the place to prove an export loads without ``metamorph``. Returns
    its python. Override the location with $METAMORPH_PLAIN_VENV."""
    import hashlib
    import importlib.metadata
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    pins = [f"{p}=={importlib.metadata.version(p)}" for p in PLAIN_VENV_PACKAGES]
    tag = hashlib.sha1(" ".join(pins + [sys.version]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("METAMORPH_PLAIN_VENV") or Path(tempfile.gettempdir()) / f"metamorph-plain-venv-{tag}")
    python = root / "bin" / "python"
    if not (root / ".complete").exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        subprocess.run([str(tmp / "bin" / "pip"), "install", "-q", *pins], check=True, timeout=1500)
        (tmp / ".complete").write_text("\n".join(pins) + "\n")
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)  # venv scripts hold absolute paths: use the python binary, not bin/pip
        python = root / "bin" / "python"
    return python
