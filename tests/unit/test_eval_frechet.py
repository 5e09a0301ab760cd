"""Frechet distance on inputs with a known answer.

    pytest -q tests/unit/test_eval_frechet.py
"""

from __future__ import annotations

import numpy as np
import pytest

from metamorph.eval.frechet import feature_stats, frechet_distance, frechet_distance_features


def test_closed_form_gaussians():
    # diagonal covariances: d^2 = |mu1-mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2))
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = 1.0 + 4.0 + ((s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)


def test_rotation_invariant_full_covariance():
    # the same pair of Gaussians in a rotated basis has the same distance
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    S1, S2 = A @ A.T + 0.1 * np.eye(5), B @ B.T
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    d = frechet_distance(mu1, S1, mu2, S2)
    d_rot = frechet_distance(Q @ mu1, Q @ S1 @ Q.T, Q @ mu2, Q @ S2 @ Q.T)
    assert d == pytest.approx(d_rot, rel=1e-8)
    # and matches the textbook formula with a general matrix square root
    scipy_linalg = pytest.importorskip("scipy.linalg")
    covmean = scipy_linalg.sqrtm(S1 @ S2).real
    textbook = float((mu1 - mu2) @ (mu1 - mu2) + np.trace(S1 + S2 - 2 * covmean))
    assert d == pytest.approx(textbook, rel=1e-6)


def test_identical_sets_zero_and_shift():
    x = np.random.default_rng(1).normal(size=(200, 8))
    assert frechet_distance_features(x, x) == pytest.approx(0.0, abs=1e-9)
    # a pure translation by v adds exactly |v|^2
    v = np.arange(8) / 8.0
    assert frechet_distance_features(x, x + v) == pytest.approx(float(v @ v), rel=1e-9)


def test_samples_converge_to_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, (40000, 4))
    b = rng.normal(0.5, 2.0, (40000, 4))
    want = 4 * 0.25 + 4 * (1 + 4 - 2 * 2)
    assert frechet_distance_features(a, b) == pytest.approx(want, rel=0.03)


def test_singular_covariance_and_bad_shapes():
    # fewer samples than dimensions: singular covariances must still give a finite, >= 0 value
    rng = np.random.default_rng(3)
    d = frechet_distance_features(rng.normal(size=(5, 16)), rng.normal(size=(6, 16)))
    assert np.isfinite(d) and d >= 0
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
