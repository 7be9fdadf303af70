"""Distribution and alignment metrics on plain feature arrays.

- `frechet_distance`: the distance behind FID and DIRECTOR's FD_CLaTr, the Frechet (2-Wasserstein) distance
  between two Gaussians fitted to feature sets, computed in float64.
- `precision_recall_density_coverage`: the k-NN manifold metrics of Naeem et al. (2020).
- `clatr_score`: DIRECTOR's CLaTr-Score, text-trajectory alignment in a CLaTr embedding space.
- `camera_tag_scores`: DIRECTOR's C-P / C-R / C-F1, per-frame camera-motion classes against the reference.
"""

import numpy as np
from scipy import linalg


def _as_feature_matrix(features, name: str, min_samples: int = 2) -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensors without importing torch here
        features = features.detach().cpu().numpy()
    features = _real_array(features, name)
    if features.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (num_samples, num_features), got shape {features.shape}.")
    if features.shape[0] < min_samples:
        raise ValueError(f"`{name}` needs at least {min_samples} samples, got {features.shape[0]}.")
    if features.shape[1] < 1:
        raise ValueError(f"`{name}` has no feature columns (shape {features.shape}); at least 1 is required.")
    if not np.isfinite(features).all():
        raise ValueError(f"`{name}` contains non-finite values.")
    return features


def _real_array(values, name: str) -> np.ndarray:
    """`values` as a float64 array; strings, objects, booleans and complex numbers are refused, not coerced."""
    array = np.asarray(values)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
    return array.astype(np.float64)


def gaussian_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of a (num_samples, num_features) array, in float64."""
    features = _as_feature_matrix(features, "features")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2)).

    When the product is near singular (fewer samples than features) a small `eps` is added to both diagonals,
    as in the reference FID code (pytorch-fid).
    """
    mean_a, cov_a = _gaussian(mean_a, cov_a, "a")
    mean_b, cov_b = _gaussian(mean_b, cov_b, "b")
    if mean_a.shape != mean_b.shape:
        raise ValueError(
            f"Statistics of different sizes: `mean_a`/`cov_a` describe {mean_a.shape[0]} features, "
            f"`mean_b`/`cov_b` {mean_b.shape[0]}; both Gaussians must have the same number of features."
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.integer, np.floating)) or not 0 <= eps < np.inf:
        raise ValueError(f"`eps` must be a finite number >= 0, got {eps!r}.")
    difference = mean_a - mean_b
    covmean = linalg.sqrtm(cov_a.dot(cov_b))  # (SciPy >= 1.16 deprecates `disp`; the default returns the root)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset).dot(cov_b + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts come from numerical error in sqrtm; large ones mean the inputs are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root.")
        covmean = covmean.real
    return float(difference.dot(difference) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def _gaussian(mean, cov, which: str) -> tuple[np.ndarray, np.ndarray]:
    """Checks one Gaussian's statistics: a finite (d,) mean and a finite, symmetric (d, d) covariance."""
    mean = np.atleast_1d(_real_array(mean, f"mean_{which}"))
    cov = np.atleast_2d(_real_array(cov, f"cov_{which}"))
    if mean.ndim != 1 or mean.shape[0] < 1:
        raise ValueError(f"`mean_{which}` must be a non-empty 1-D vector (num_features,), got shape {mean.shape}.")
    num_features = mean.shape[0]
    if cov.shape != (num_features, num_features):
        raise ValueError(
            f"`cov_{which}` must be a ({num_features}, {num_features}) matrix to match `mean_{which}` "
            f"({num_features} features), got shape {cov.shape}."
        )
    for name, value in ((f"mean_{which}", mean), (f"cov_{which}", cov)):
        if not np.isfinite(value).all():
            raise ValueError(f"`{name}` contains NaN or infinite values; statistics must be finite.")
    if not np.allclose(cov, cov.T, rtol=1e-5, atol=1e-8 * max(1.0, np.abs(cov).max())):
        raise ValueError(f"`cov_{which}` is not symmetric, so it is not a covariance matrix.")
    return mean, cov


def frechet_distance(features_a, features_b) -> float:
    """Frechet distance between Gaussians fitted to two (num_samples, num_features) feature arrays."""
    features_a = _as_feature_matrix(features_a, "features_a")
    features_b = _as_feature_matrix(features_b, "features_b")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"Feature widths differ: {features_a.shape[1]} vs {features_b.shape[1]}.")
    return frechet_distance_from_statistics(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def _pairwise_distances(features_a: np.ndarray, features_b: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(a), len(b)) in float64, clipped at 0 against rounding."""
    squared = (
        np.sum(features_a**2, axis=1)[:, None]
        + np.sum(features_b**2, axis=1)[None, :]
        - 2.0 * features_a @ features_b.T
    )
    return np.sqrt(np.clip(squared, 0.0, None))


def _kth_neighbour_radii(features: np.ndarray, k: int) -> np.ndarray:
    """Distance from each sample to its k-th nearest neighbour in the same set, itself excluded."""
    distances = _pairwise_distances(features, features)
    np.fill_diagonal(distances, 0.0)
    # The sample itself is the 0-th neighbour at distance 0, so the k-th neighbour sits at sorted index k.
    return np.partition(distances, k, axis=1)[:, k]


def _prdc_single(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    real_radii = _kth_neighbour_radii(real, k)
    fake_radii = _kth_neighbour_radii(fake, k)
    real_fake = _pairwise_distances(real, fake)  # (num_real, num_fake)
    inside_real_balls = real_fake < real_radii[:, None]  # fake j inside the k-NN ball of real i
    return {
        "precision": float(inside_real_balls.any(axis=0).mean()),
        "recall": float((real_fake < fake_radii[None, :]).any(axis=1).mean()),
        "density": float(inside_real_balls.sum(axis=0).mean() / k),
        "coverage": float((real_fake.min(axis=1) < real_radii).mean()),
    }


def precision_recall_density_coverage(
    real_features, fake_features, k: int = 3, swap_roles: bool = False, num_splits: int = 1
) -> dict[str, float]:
    """Precision, recall, density and coverage of generated samples (Naeem et al., ICML 2020).

    With `R` the real and `F` the fake (generated) features, `B(x, r)` the open ball of radius `r` around `x` and
    `NND_k(x)` the distance from `x` to its k-th nearest neighbour within its own set:

    - precision = fraction of fakes inside some real ball `B(r, NND_k(r))` (fidelity);
    - recall = fraction of reals inside some fake ball `B(f, NND_k(f))` (diversity);
    - density = mean over fakes of (number of real balls containing it) / k (fidelity, unbounded above);
    - coverage = fraction of reals whose ball contains at least one fake (diversity).

    Distances are Euclidean, computed in float64; "inside" is a strict `<` as in the reference implementation
    (clovaai/generative-evaluation-prdc).

    Args:
        real_features: (num_real, num_features) array or tensor.
        fake_features: (num_fake, num_features) array or tensor.
        k: the neighbourhood size (3 in DIRECTOR).
        swap_roles: if True, the generated features play the real role and vice versa. This reproduces the
            public DIRECTOR code, whose metric callback passes (generated, reference) to a function whose
            signature is (real, fake). Precision and recall (and density and coverage) then trade places
            in meaning; use it only to compare with numbers computed by that code.
        num_splits: split both sets into this many consecutive chunks, compute the metrics per chunk and average
            them (the DIRECTOR code uses 5). 1 computes them on the whole sets.

    Returns:
        dict with float "precision", "recall", "density" and "coverage".
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"`num_splits` must be a positive int, got {num_splits!r}.")
    real = _as_feature_matrix(real_features, "real_features")
    fake = _as_feature_matrix(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature widths differ: real {real.shape[1]} vs fake {fake.shape[1]}.")
    if swap_roles:
        real, fake = fake, real
    real_chunks, fake_chunks = np.array_split(real, num_splits), np.array_split(fake, num_splits)
    smallest = min(min(len(chunk) for chunk in real_chunks), min(len(chunk) for chunk in fake_chunks))
    if smallest <= k:
        raise ValueError(
            f"Each set (or split) needs more than k={k} samples to define k-NN balls; the smallest has {smallest}."
        )
    per_split = [_prdc_single(real_chunk, fake_chunk, k) for real_chunk, fake_chunk in zip(real_chunks, fake_chunks)]
    return {name: float(np.mean([scores[name] for scores in per_split])) for name in per_split[0]}


def clatr_score(trajectory_embeddings, text_embeddings) -> float:
    """CLaTr-Score: 100 x the mean cosine similarity of paired trajectory and caption embeddings, floored at 0.

    Row i of `trajectory_embeddings` is paired with row i of `text_embeddings` (CLaTr's mean embeddings of a
    generated trajectory and of the caption it was generated from). As in the public DIRECTOR code, the clamp
    at 0 applies to the mean, not to each pair: individual negative similarities lower the score.
    """
    trajectory = _as_feature_matrix(trajectory_embeddings, "trajectory_embeddings", min_samples=1)
    text = _as_feature_matrix(text_embeddings, "text_embeddings", min_samples=1)
    if trajectory.shape != text.shape:
        raise ValueError(
            f"`trajectory_embeddings` {trajectory.shape} and `text_embeddings` {text.shape} must be paired row by "
            "row and have the same shape."
        )
    for name, matrix in (("trajectory_embeddings", trajectory), ("text_embeddings", text)):
        if np.any(np.linalg.norm(matrix, axis=1) == 0):
            raise ValueError(f"`{name}` has an all-zero row; its cosine similarity is undefined.")
    trajectory = trajectory / np.linalg.norm(trajectory, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    return float(max(100.0 * np.mean(np.sum(trajectory * text, axis=1)), 0.0))


def _as_label_vector(labels, name: str, num_classes: int) -> np.ndarray:
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    if isinstance(labels, (list, tuple)) and len(labels) > 0 and all(np.ndim(item) == 1 for item in labels):
        labels = np.concatenate([np.asarray(item) for item in labels])  # per-trajectory label lists
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D per-frame labels (or a list of 1-D arrays), got shape {labels.shape}.")
    if labels.size == 0:
        raise ValueError(f"`{name}` is empty.")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.mod(labels, 1) == 0):
            raise TypeError(f"`{name}` must hold integer class indices, got dtype {labels.dtype}.")
        labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"`{name}` has labels outside 0..{num_classes - 1}: min {labels.min()}, max {labels.max()}.")
    return labels.astype(np.int64)


def camera_tag_scores(predicted_labels, target_labels, num_classes: int = 27) -> dict[str, float]:
    """C-P / C-R / C-F1: per-frame camera-motion classes of generated trajectories against the reference segments.

    `predicted_labels` are what `storydiff.trajectories.tag_camera_motion` reads from the generated trajectories,
    `target_labels` the ground-truth camera segments (both N-1 per trajectory of N frames), either as one 1-D
    array of concatenated frames or as lists of per-trajectory 1-D arrays (which are concatenated).

    Precision, recall and F1 are computed per class and averaged with weights proportional to each class's
    support in the targets (sklearn's `average="weighted"`, torchmetrics' `average="weighted"`), with 0 for
    classes that are never predicted (zero_division=0), as in the DIRECTOR code.

    Returns:
        dict with float "precision", "recall" and "f1" in [0, 1].
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"`num_classes` must be a positive int, got {num_classes!r}.")
    predicted = _as_label_vector(predicted_labels, "predicted_labels", num_classes)
    target = _as_label_vector(target_labels, "target_labels", num_classes)
    if predicted.shape != target.shape:
        raise ValueError(
            f"`predicted_labels` ({predicted.shape[0]} frames) and `target_labels` ({target.shape[0]} frames) must "
            "have the same number of frames."
        )
    true_positives = np.bincount(target[predicted == target], minlength=num_classes).astype(np.float64)
    predicted_counts = np.bincount(predicted, minlength=num_classes).astype(np.float64)
    support = np.bincount(target, minlength=num_classes).astype(np.float64)
    precision = np.divide(true_positives, predicted_counts, out=np.zeros(num_classes), where=predicted_counts > 0)
    recall = np.divide(true_positives, support, out=np.zeros(num_classes), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(num_classes), where=denominator > 0)
    weights = support / support.sum()
    return {
        "precision": float(np.dot(weights, precision)),
        "recall": float(np.dot(weights, recall)),
        "f1": float(np.dot(weights, f1)),
    }
