"""Trajectory helpers refuse non-finite values, wrong shapes and meaningless settings with errors that say what is
allowed, instead of returning NaN poses or silently reshaping."""

import json
import re

import numpy as np
import pytest
import torch

from storydiff.trajectories import (
    camera_velocities,
    character_velocities,
    decode_character,
    destandardize_camera_features,
    encode_character,
    features_to_poses,
    label_velocities,
    merge_short_chunks,
    mode_filter,
    motion_class,
    poses_to_features,
    rotation_6d_to_matrix,
    segments_from_labels,
    standardize_camera_features,
    tag_camera_motion,
    tag_character_motion,
    to_blender_script,
    to_json,
)


def _poses(num_frames: int = 6) -> torch.Tensor:
    poses = torch.eye(4).repeat(num_frames, 1, 1)
    poses[:, 2, 3] = torch.linspace(0, 1, num_frames)
    return poses


def _with_bad_value(tensor: torch.Tensor, value: float) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[tensor.numel() // 2] = value
    return tensor


FEATURISERS = [
    (poses_to_features, lambda: _poses(), "poses"),
    (features_to_poses, lambda: poses_to_features(_poses()), "features"),
    (standardize_camera_features, lambda: poses_to_features(_poses()), "features"),
    (destandardize_camera_features, lambda: poses_to_features(_poses()), "features"),
    (encode_character, lambda: torch.randn(6, 3), "character positions"),
    (decode_character, lambda: torch.randn(6, 3), "encoded character"),
    (rotation_6d_to_matrix, lambda: torch.randn(6, 6), "rotation_6d"),
]


@pytest.mark.parametrize("function, make_input, name", FEATURISERS, ids=[f.__name__ for f, _, _ in FEATURISERS])
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_featurisation_refuses_non_finite_input(function, make_input, name, bad_value, as_numpy):
    good = make_input()
    function(good)  # the finite input is fine
    bad = _with_bad_value(good, bad_value)
    with pytest.raises(ValueError, match=rf"{name} contains NaN or infinite values \(first at index .*must be finite"):
        function(bad.numpy() if as_numpy else bad)


def test_featurisation_refuses_batched_non_finite_input_and_names_the_entry():
    features = poses_to_features(_poses()).repeat(2, 1, 1)
    features[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"first at index \(1, 3, 7\): nan"):
        features_to_poses(features)


@pytest.mark.parametrize(
    "function, empty",
    [
        (poses_to_features, torch.zeros(0, 4, 4)),
        (features_to_poses, torch.zeros(2, 0, 9)),
        (encode_character, torch.zeros(0, 3)),
        (decode_character, torch.zeros(0, 3)),
    ],
)
def test_featurisation_refuses_trajectories_without_frames(function, empty):
    with pytest.raises(ValueError, match="has no frames"):
        function(empty)


@pytest.mark.parametrize("shape", [(6, 9), (5,), (3, 6, 5), ()])
def test_rotation_6d_to_matrix_says_the_expected_shape(shape):
    with pytest.raises(ValueError, match=r"rotation_6d must have shape \(\.\.\., 6\)"):
        rotation_6d_to_matrix(torch.ones(shape))


def test_features_round_trip_still_holds():
    poses = _poses()
    assert torch.allclose(features_to_poses(poses_to_features(poses)), poses, atol=1e-6)
    positions = torch.cumsum(torch.randn(7, 3) * 0.01, dim=0)
    assert torch.allclose(decode_character(encode_character(positions)), positions - positions[0], atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- #
# the tagger's building blocks


@pytest.mark.parametrize("shape", [(5, 6), (3, 5), (12,), (2, 4, 3), (4, 2)])
def test_label_velocities_says_the_expected_shape(shape):
    # (3, 5) and (5, 6) used to be reshaped silently into (M, 3) rows of mixed frames
    with pytest.raises(ValueError, match=re.escape(f"velocities must have shape (M, 3), got {tuple(shape)}.")):
        label_velocities(np.ones(shape), 0.02, 0.4)


def test_label_velocities_refuses_non_finite_velocities_and_bad_thresholds():
    velocities = np.ones((4, 3))
    velocities[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"velocities contains NaN or infinite values \(first at index \(2, 1\)"):
        label_velocities(velocities, 0.02, 0.4)
    good = np.ones((4, 3))
    with pytest.raises(ValueError, match="static_threshold must be a finite number >= 0"):
        label_velocities(good, -0.1, 0.4)
    with pytest.raises(ValueError, match="static_threshold must be a finite number"):
        label_velocities(good, float("nan"), 0.4)
    with pytest.raises(ValueError, match="dominance_threshold must be a finite number >= 0 and <= 1"):
        label_velocities(good, 0.02, 1.5)
    with pytest.raises(TypeError, match="dominance_threshold must be a real number"):
        label_velocities(good, 0.02, "0.4")
    assert label_velocities(np.zeros((0, 3)), 0.02, 0.4).shape == (0,)


def test_velocity_helpers_check_their_trajectory_and_fps():
    with pytest.raises(ValueError, match=r"character positions must have shape \(M, 3\)"):
        character_velocities(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="character positions contains NaN"):
        character_velocities(np.array([[0.0, 0.0, 0.0], [np.inf, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        character_velocities(np.zeros((5, 3)), fps=0)
    with pytest.raises(ValueError, match=r"one trajectory of shape \(N, 4, 4\)"):
        camera_velocities(_poses()[None])
    sheared = _poses()
    sheared[2, 0, 1] = 0.5
    with pytest.raises(ValueError, match="pose 2 is not rigid"):
        camera_velocities(sheared)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        camera_velocities(_poses(), fps=float("inf"))
    assert np.allclose(camera_velocities(_poses(), fps=25.0)[:, 2], 5.0)


def test_label_post_processing_refuses_labels_that_are_not_per_frame_classes():
    for function in (mode_filter, merge_short_chunks, segments_from_labels):
        with pytest.raises(ValueError, match=r"labels must be a 1-D array of per-frame classes, got shape \(2, 3\)"):
            function(np.zeros((2, 3), dtype=np.int64))  # used to be flattened silently
        with pytest.raises(ValueError, match="fractional, NaN or infinite"):
            function(np.array([0.0, 1.5, 2.0]))
        with pytest.raises(TypeError, match="must hold integer classes"):
            function(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        mode_filter(np.zeros(60, dtype=np.int64), window=0)
    with pytest.raises(ValueError, match="min_length must be an int >= 0"):
        merge_short_chunks(np.zeros(5, dtype=np.int64), min_length=-1)
    assert segments_from_labels(np.array([1.0, 1.0, 2.0])) == [(0, 2, 1), (2, 3, 2)]


def test_motion_class_needs_a_three_axis_pattern():
    assert motion_class((1, 0, -1)) == 9 + 2
    with pytest.raises(ValueError, match=r"motion pattern must have shape \(3\)"):
        motion_class((1, 0))
    with pytest.raises(ValueError, match="motion pattern contains NaN"):
        motion_class((np.nan, 0, 0))


def test_taggers_check_their_settings_before_tagging():
    positions = np.cumsum(np.full((40, 3), 0.02), axis=0)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        tag_camera_motion(_poses(40), fps=0)
    with pytest.raises(ValueError, match="smoothing_window must be an int >= 1"):
        tag_camera_motion(_poses(40), smoothing_window=0)
    with pytest.raises(ValueError, match="min_chunk_length must be an int >= 0"):
        tag_character_motion(positions, min_chunk_length=-5)
    with pytest.raises(ValueError, match="static_threshold must be a finite number >= 0"):
        tag_character_motion(positions, static_threshold=float("nan"))


# ----------------------------------------------------------------------------------------------------------- #
# exports


def test_exports_refuse_settings_that_would_write_broken_files():
    poses = _poses()
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        to_json(poses, fps=float("nan"))  # json.dumps would write the non-JSON token NaN
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        to_json(poses, fps=0)
    assert json.loads(to_json(poses, fps=24))["fps"] == 24.0
    with pytest.raises(ValueError, match="fps must be a finite number >= 1"):
        to_blender_script(poses, fps=0)
    with pytest.raises(ValueError, match="fps must be a finite number >= 1"):
        to_blender_script(poses, fps=float("inf"))  # int(round(inf)) used to raise OverflowError
    with pytest.raises(ValueError, match="lens_mm must be a finite number > 0"):
        to_blender_script(poses, lens_mm=-35)
    with pytest.raises(ValueError, match="camera_name must be a non-empty string"):
        to_blender_script(poses, camera_name="")
