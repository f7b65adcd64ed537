"""Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, "GANs Trained by
a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", Eq. 6: the FID formula).

d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

Tr((S_1 S_2)^(1/2)) is computed as Tr((A S_2 A)^(1/2)) with A = S_1^(1/2): the two matrices are
similar, and the second is symmetric positive semi-definite, so both square roots come from `eigh`
with tiny negative eigenvalues (round-off of rank-deficient covariances) clipped to zero. Unlike a
general `sqrtm`, this never returns complex values or NaN for singular covariances. All in float64.
"""

from __future__ import annotations

import numpy as np
import torch



def _float64(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (symmetrized first against round-off)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64, covariance with the N - 1 divisor."""
    features = _float64(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Fréchet distance needs features of shape (N, D) with N >= 2; got {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mean_a, covariance_a, mean_b, covariance_b) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mean_a, covariance_a) and N(mean_b, covariance_b)."""
    mean_a, mean_b = _float64(mean_a).reshape(-1), _float64(mean_b).reshape(-1)
    covariance_a, covariance_b = _float64(covariance_a), _float64(covariance_b)
    dim = mean_a.shape[0]
    for name, value, shape in (("mean_b", mean_b, (dim,)), ("covariance_a", covariance_a, (dim, dim)),
                               ("covariance_b", covariance_b, (dim, dim))):
        if value.shape != shape:
            raise ValueError(f"frechet_distance: {name} must have shape {shape} to match mean_a; got {value.shape}")
    root_a = _psd_sqrt(covariance_a)
    cross = root_a @ covariance_b @ root_a  # similar to S_a S_b, symmetric PSD
    cross_eigenvalues = np.linalg.eigvalsh((cross + cross.T) / 2)
    trace_sqrt = float(np.sqrt(np.clip(cross_eigenvalues, 0.0, None)).sum())
    distance = float(((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a) + np.trace(covariance_b) - 2 * trace_sqrt)
    return max(distance, 0.0)  # round-off can leave -1e-12 for identical inputs


def frechet_distance_of_features(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
