"""Shared test setup: offline env, GPU skipping (the Ray fixture is in tests/integration/conftest.py).

    pytest -q                      # everything (unit + integration), see README
    pytest -q -m "not integration" # fast tier, no Ray
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
if "METAMORPH_CLI_CACHE_DIR" not in os.environ:  # remembered CLI resolutions: per test session
    import atexit
    import shutil
    import tempfile

    os.environ["METAMORPH_CLI_CACHE_DIR"] = tempfile.mkdtemp(prefix="metamorph-cli-cache-")
    atexit.register(shutil.rmtree, os.environ["METAMORPH_CLI_CACHE_DIR"], True)  # not one dir left per session

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken: GPU tests cannot run anyway
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
