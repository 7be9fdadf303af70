"""Distribution and alignment metrics on plain feature arrays.

`frechet_distance` is the distance behind FID and DIRECTOR's FD_CLaTr: the Frechet (2-Wasserstein) distance
between two Gaussians fitted to feature sets, computed in float64.
"""

import numpy as np
from scipy import linalg


def _as_feature_matrix(features, name: str) -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensors without importing torch here
        features = features.detach().cpu().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (num_samples, num_features), got shape {features.shape}.")
    if features.shape[0] < 2:
        raise ValueError(f"`{name}` needs at least 2 samples to estimate a covariance, got {features.shape[0]}.")
    if not np.isfinite(features).all():
        raise ValueError(f"`{name}` contains non-finite values.")
    return features


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a (num_samples, num_features) array, in float64."""
    features = _as_feature_matrix(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    When the product is near singular (fewer samples than features) a small `eps` is added to both diagonals,
    as in the reference FID code (pytorch-fid).
    """
    mean_a, mean_b = np.atleast_1d(mean_a), np.atleast_1d(mean_b)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    if mean_a.shape != mean_b.shape or cov_a.shape != cov_b.shape:
        raise ValueError(f"Statistics of different sizes: means {mean_a.shape} vs {mean_b.shape}.")
    difference = mean_a - mean_b
    covmean, _ = linalg.sqrtm(cov_a.dot(cov_b), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset).dot(cov_b + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts come from numerical error in sqrtm; large ones mean the inputs are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root.")
        covmean = covmean.real
    return float(difference.dot(difference) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two (num_samples, num_features) feature arrays."""
    features_a = _as_feature_matrix(features_a, "features_a")
    features_b = _as_feature_matrix(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"Feature widths differ: {features_a.shape[1]} vs {features_b.shape[1]}.")
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))
