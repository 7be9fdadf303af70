"""The metric functions refuse statistics and features that cannot describe what they measure, saying what is allowed."""

import numpy as np
import pytest
import torch

from storydiff.metrics import (
    camera_tag_scores,
    clatr_score,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    precision_recall_density_coverage,
)


@pytest.fixture
def statistics():
    rng = np.random.default_rng(0)
    mean_a, cov_a = gaussian_statistics(rng.normal(size=(50, 3)))
    mean_b, cov_b = gaussian_statistics(rng.normal(size=(40, 3)) + 1.0)
    return mean_a, cov_a, mean_b, cov_b


def test_frechet_from_statistics_still_matches_frechet_distance(statistics):
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 4)), rng.normal(size=(50, 4)) * 2
    expected = frechet_distance(a, b)
    assert frechet_distance_from_statistics(*gaussian_statistics(a), *gaussian_statistics(b)) == pytest.approx(
        expected
    )
    one_feature = frechet_distance_from_statistics(0.0, 1.0, 1.0, 1.0)  # scalars: one-feature Gaussians
    assert one_feature == pytest.approx(1.0)
    mean_a, cov_a, mean_b, cov_b = statistics
    torch_args = [torch.from_numpy(x) for x in statistics]
    assert frechet_distance_from_statistics(*torch_args) == pytest.approx(
        frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)
    )


def test_frechet_from_statistics_refuses_a_covariance_that_does_not_match_its_mean(statistics):
    mean_a, cov_a, mean_b, cov_b = statistics
    # means of the same size but a (2, 2) covariance: used to fail deep in numpy or give a number
    with pytest.raises(ValueError, match=r"`cov_a` must be a \(3, 3\) matrix to match `mean_a` \(3 features\)"):
        frechet_distance_from_statistics(mean_a, cov_a[:2, :2], mean_b, cov_b)
    with pytest.raises(ValueError, match=r"`cov_b` must be a \(3, 3\) matrix .* got shape \(3, 2\)"):
        frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b[:, :2])


def test_frechet_from_statistics_refuses_gaussians_of_different_sizes(statistics):
    mean_a, cov_a, _, _ = statistics
    with pytest.raises(ValueError, match="`mean_a`/`cov_a` describe 3 features, `mean_b`/`cov_b` 2"):
        frechet_distance_from_statistics(mean_a, cov_a, mean_a[:2], cov_a[:2, :2])


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("which", ["mean_a", "cov_a", "mean_b", "cov_b"])
def test_frechet_from_statistics_refuses_non_finite_statistics(statistics, bad_value, which):
    arguments = dict(zip(["mean_a", "cov_a", "mean_b", "cov_b"], (x.copy() for x in statistics)))
    arguments[which].flat[0] = bad_value
    if which.startswith("cov"):
        arguments[which].T.flat[0] = bad_value  # keep it symmetric: the non-finite value is what must be caught
    with pytest.raises(ValueError, match=rf"`{which}` contains NaN or infinite values"):
        frechet_distance_from_statistics(**arguments)


def test_frechet_from_statistics_refuses_other_statistics_that_are_not_a_gaussian(statistics):
    mean_a, cov_a, mean_b, cov_b = statistics
    with pytest.raises(ValueError, match="`mean_a` must be a non-empty 1-D vector"):
        frechet_distance_from_statistics(np.zeros((3, 1)), cov_a, mean_b, cov_b)
    with pytest.raises(ValueError, match="`mean_a` must be a non-empty 1-D vector"):
        frechet_distance_from_statistics(np.zeros(0), np.zeros((0, 0)), np.zeros(0), np.zeros((0, 0)))
    asymmetric = cov_b.copy()
    asymmetric[0, 1] += 1.0
    with pytest.raises(ValueError, match="`cov_b` is not symmetric"):
        frechet_distance_from_statistics(mean_a, cov_a, mean_b, asymmetric)
    with pytest.raises(TypeError, match="`mean_a` must hold real numbers"):
        frechet_distance_from_statistics(np.array(["1", "2", "3"]), cov_a, mean_b, cov_b)
    for eps in (-1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`eps` must be a finite number >= 0"):
            frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b, eps=eps)


def test_feature_metrics_refuse_features_without_columns():
    empty_columns = np.zeros((10, 0))
    with pytest.raises(ValueError, match=r"`features_a` has no feature columns \(shape \(10, 0\)\)"):
        frechet_distance(empty_columns, empty_columns)
    with pytest.raises(ValueError, match="`features` has no feature columns"):
        gaussian_statistics(empty_columns)
    with pytest.raises(ValueError, match="`real_features` has no feature columns"):
        precision_recall_density_coverage(empty_columns, empty_columns)
    with pytest.raises(ValueError, match="`trajectory_embeddings` has no feature columns"):
        clatr_score(np.zeros((2, 0)), np.zeros((2, 0)))


def test_feature_metrics_refuse_features_that_are_not_real_numbers():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(10, 2))
    with pytest.raises(TypeError, match="`features_b` must hold real numbers, got dtype bool"):
        frechet_distance(real, real > 0)  # used to be cast to 0.0 / 1.0 silently
    with pytest.raises(TypeError, match="`fake_features` must hold real numbers, got dtype complex128"):
        precision_recall_density_coverage(real, real + 1j)  # used to drop the imaginary part with a warning
    with pytest.raises(TypeError, match="`text_embeddings` must hold real numbers"):
        clatr_score(real, np.full((10, 2), "x"))


def test_feature_metrics_keep_their_existing_checks():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Feature widths differ"):
        frechet_distance(rng.normal(size=(10, 2)), rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        frechet_distance(np.zeros((0, 2)), rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match="needs at least 1 samples"):
        clatr_score(np.zeros((0, 4)), np.zeros((0, 4)))
    with pytest.raises(ValueError, match="`target_labels` is empty"):
        camera_tag_scores([1], [])
