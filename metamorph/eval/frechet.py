"""Frechet distance between two sets of feature vectors (the FID formula, any feature space).

    python -m metamorph.eval.frechet     # two Gaussian samples: estimate vs the closed form

d^2 = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of
S1^(1/2) S2 S1^(1/2), a symmetric PSD matrix (same eigenvalues as S1 S2), with ``eigh`` instead of
a general ``sqrtm``: no complex parts to discard and stable when a covariance is singular, which
it is whenever there are fewer samples than dimensions (64 generations of 64-dim tokens). With
that few samples the estimate is biased upwards (as FID is); compare runs at the same count.
"""

from __future__ import annotations

import numpy as np


def feature_stats(feats_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of N feature rows (float64)."""
    x = np.asarray(feats_ND, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(S_DD: np.ndarray) -> np.ndarray:
    w, V = np.linalg.eigh((S_DD + S_DD.T) / 2)
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def frechet_distance(mu1: np.ndarray, S1: np.ndarray, mu2: np.ndarray, S2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, S1) and N(mu2, S2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    S1, S2 = np.atleast_2d(np.asarray(S1, np.float64)), np.atleast_2d(np.asarray(S2, np.float64))
    if mu1.shape != mu2.shape or S1.shape != S2.shape or S1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape}/{mu2.shape}, cov {S1.shape}/{S2.shape}")
    r1 = _psd_sqrt(S1)
    M = r1 @ S2 @ r1
    eig = np.linalg.eigvalsh((M + M.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    d2 = float(diff @ diff + np.trace(S1) + np.trace(S2) - 2.0 * tr_sqrt)
    return max(d2, 0.0)  # rounding can leave -1e-12 for identical sets


def frechet_distance_features(a_ND: np.ndarray, b_MD: np.ndarray) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*feature_stats(a_ND), *feature_stats(b_MD))


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    D = 8
    mu2, s1, s2 = np.full(D, 0.5), np.full(D, 1.0), np.full(D, 4.0)
    a = rng.normal(0.0, np.sqrt(s1), (20000, D))
    b = rng.normal(mu2, np.sqrt(s2), (20000, D))
    exact = float(mu2 @ mu2 + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())
    print(f"estimate {frechet_distance_features(a, b):.3f}  closed form {exact:.3f}")
