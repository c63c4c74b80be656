"""Frechet distance between Gaussians fitted to feature sets (the FID formula, any feature extractor).

    FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)

tr((S1 S2)^1/2) is computed as the trace of the square root of the symmetric PSD
matrix S1^1/2 S2 S1^1/2 (same eigenvalues as S1 S2), using only symmetric
eigendecompositions in float64: no scipy, no complex parts to discard, and
rank-deficient covariances (fewer samples than feature dims) stay well defined.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_f64(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def feature_stats(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features (N, D) (numpy or torch), float64; sigma is the unbiased covariance."""
    f = _as_f64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2); >= 0 up to rounding."""
    mu1, mu2 = _as_f64(mu1).ravel(), _as_f64(mu2).ravel()
    s1, s2 = np.atleast_2d(_as_f64(sigma1)), np.atleast_2d(_as_f64(sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1
    tr_cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_cross)
