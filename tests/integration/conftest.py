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
