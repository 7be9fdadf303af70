"""Metrics against independent computations: scipy for Frechet, brute force for PRDC, sklearn for the tag scores."""

import numpy as np
import pytest
import torch
from scipy import linalg
from sklearn.metrics import precision_recall_fscore_support

from storydiff.metrics import (
    camera_tag_scores,
    clatr_score,
    frechet_distance,
    precision_recall_density_coverage,
)


def _frechet_direct(a, b):
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((C_a C_b)^1/2) through the symmetric form C_a^1/2 C_b C_a^1/2, whose square root is real.
    root_a = linalg.sqrtm(cov_a).real
    cross = linalg.sqrtm(root_a @ cov_b @ root_a).real
    return np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross)


def test_frechet_distance_matches_direct_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.7
    assert frechet_distance(a, b) == pytest.approx(_frechet_direct(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(frechet_distance(a, b))


def _prdc_brute_force(real, fake, k):
    def radii(points):
        out = []
        for i, p in enumerate(points):
            distances = sorted(np.linalg.norm(p - q) for j, q in enumerate(points) if j != i)
            out.append(distances[k - 1])
        return out

    real_radii, fake_radii = radii(real), radii(fake)
    precision = np.mean([any(np.linalg.norm(f - r) < rr for r, rr in zip(real, real_radii)) for f in fake])
    recall = np.mean([any(np.linalg.norm(r - f) < fr for f, fr in zip(fake, fake_radii)) for r in real])
    density = np.mean([sum(np.linalg.norm(f - r) < rr for r, rr in zip(real, real_radii)) for f in fake]) / k
    coverage = np.mean([min(np.linalg.norm(r - f) for f in fake) < rr for r, rr in zip(real, real_radii)])
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(40, 4))
    fake = rng.normal(size=(33, 4)) * 1.3 + 0.4
    got = precision_recall_density_coverage(real, fake, k=k)
    expected = _prdc_brute_force(real, fake, k)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], abs=1e-12), name


def test_prdc_swap_roles_and_splits():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(50, 3)), rng.normal(size=(50, 3)) + 0.8
    swapped = precision_recall_density_coverage(real, fake, swap_roles=True)
    assert swapped == precision_recall_density_coverage(fake, real)
    assert swapped["precision"] != precision_recall_density_coverage(real, fake)["precision"]
    split = precision_recall_density_coverage(real, fake, num_splits=5)
    per_chunk = [_prdc_brute_force(real[i * 10 : (i + 1) * 10], fake[i * 10 : (i + 1) * 10], 3) for i in range(5)]
    for name in split:
        assert split[name] == pytest.approx(np.mean([chunk[name] for chunk in per_chunk]), abs=1e-12)


def test_prdc_identical_sets_are_perfect():
    real = np.random.default_rng(2).normal(size=(30, 5))
    scores = precision_recall_density_coverage(real, real.copy())
    # Each point lies at distance 0 from itself, strictly inside its own ball.
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["coverage"] == 1.0


def test_prdc_bad_input():
    real = np.zeros((10, 3))
    with pytest.raises(ValueError, match="more than k"):
        precision_recall_density_coverage(real[:3], real, k=3)
    with pytest.raises(ValueError, match="widths differ"):
        precision_recall_density_coverage(real, np.zeros((10, 4)))
    with pytest.raises(ValueError, match="`k`"):
        precision_recall_density_coverage(real, real, k=0)
    with pytest.raises(ValueError, match="2-D"):
        precision_recall_density_coverage(real[0], real)


def test_clatr_score_is_100_mean_cosine_clamped_on_the_mean():
    rng = np.random.default_rng(3)
    trajectory, text = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    cosines = [np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(trajectory, text)]
    assert clatr_score(trajectory, text) == pytest.approx(max(100 * np.mean(cosines), 0.0))
    assert clatr_score(text * 3.0, text) == pytest.approx(100.0)
    assert clatr_score(-text, text) == 0.0
    # One opposed pair lowers the mean rather than being clamped on its own.
    mixed_trajectory = np.concatenate([text[:3], -text[3:4]])
    assert clatr_score(mixed_trajectory, text[:4]) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="same shape"):
        clatr_score(trajectory[:5], text)
    with pytest.raises(ValueError, match="all-zero"):
        clatr_score(np.zeros((2, 8)), text[:2])


def test_camera_tag_scores_match_sklearn_weighted():
    rng = np.random.default_rng(4)
    target = rng.choice([0, 1, 2, 9, 18, 10], size=500)
    predicted = np.where(rng.random(500) < 0.6, target, rng.choice([0, 1, 6, 9, 26], size=500))
    got = camera_tag_scores(predicted, target)
    precision, recall, f1, _ = precision_recall_fscore_support(target, predicted, average="weighted", zero_division=0)
    assert got["precision"] == pytest.approx(precision)
    assert got["recall"] == pytest.approx(recall)
    assert got["f1"] == pytest.approx(f1)
    # A list of per-trajectory label arrays is concatenated.
    assert camera_tag_scores([predicted[:200], predicted[200:]], [target[:200], target[200:]]) == got
    assert camera_tag_scores(target, target) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_camera_tag_scores_bad_input():
    with pytest.raises(ValueError, match="same number of frames"):
        camera_tag_scores(np.zeros(5, int), np.zeros(6, int))
    with pytest.raises(ValueError, match="outside 0..26"):
        camera_tag_scores(np.full(3, 27), np.zeros(3, int))
    with pytest.raises(TypeError, match="integer"):
        camera_tag_scores(np.full(3, 0.5), np.zeros(3, int))
    with pytest.raises(ValueError, match="1-D"):
        camera_tag_scores(np.zeros((2, 3), int), np.zeros((2, 3), int))
