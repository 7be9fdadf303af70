"""The E.T. motion taggers on hand-built trajectories: every basic class, compounds, dominance rules, the mode
filter and the chunk merging."""

from collections import Counter

import numpy as np
import pytest

from storydiff.trajectories import (
    CAMERA_MOTION_NAMES,
    CHARACTER_MOTION_NAMES,
    camera_motion_name,
    character_motion_name,
    merge_short_chunks,
    mode_filter,
    motion_class,
    segments_from_labels,
    tag_camera_motion,
    tag_character_motion,
)

FPS = 25.0


def rotation_y(angle):
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])


IDENTITY = np.eye(3)


def camera_path(velocities_camera_axes, rotation=IDENTITY, start=(0.0, -0.3, -2.0)):
    """Poses whose camera moves with the given per-step velocities (m/s, in the camera's own axes)."""
    velocities = np.asarray(velocities_camera_axes, dtype=np.float64)
    steps = velocities @ rotation.T / FPS
    positions = np.asarray(start) + np.concatenate([np.zeros((1, 3)), np.cumsum(steps, axis=0)])
    poses = np.tile(np.eye(4), (len(positions), 1, 1))
    poses[:, :3, :3] = rotation
    poses[:, :3, 3] = positions
    return poses


def constant_camera(velocity, num_frames=80, rotation=IDENTITY):
    return camera_path(np.tile(velocity, (num_frames - 1, 1)), rotation)


@pytest.mark.parametrize(
    "velocity, name",
    [
        ((0.0, 0.0, 0.0), "static"),
        ((0.0, 0.0, 0.5), "push_in"),
        ((0.0, 0.0, -0.5), "pull_out"),
        ((0.0, 0.5, 0.0), "boom_bottom"),
        ((0.0, -0.5, 0.0), "boom_top"),
        ((0.5, 0.0, 0.0), "trucking_right"),
        ((-0.5, 0.0, 0.0), "trucking_left"),
    ],
)
def test_every_basic_camera_class(velocity, name):
    labels = tag_camera_motion(constant_camera(velocity))
    assert labels.shape == (79,) and labels.dtype.kind == "i"
    assert {CAMERA_MOTION_NAMES[label] for label in labels} == {name}


def test_class_indices_and_names():
    assert len(CAMERA_MOTION_NAMES) == len(CHARACTER_MOTION_NAMES) == 27
    expected = {0: "static", 1: "push_in", 2: "pull_out", 3: "boom_bottom", 6: "boom_top", 9: "trucking_right"}
    expected.update({18: "trucking_left", 10: "trucking_right-push_in", 4: "boom_bottom-push_in"})
    expected.update({24: "trucking_left-boom_top", 26: "trucking_left-boom_top-pull_out"})
    for index, name in expected.items():
        assert camera_motion_name(index) == name
    assert character_motion_name(9) == "move_right" and character_motion_name(18) == "move_left"
    assert character_motion_name(3) == "move_down" and character_motion_name(6) == "move_up"
    assert character_motion_name(1) == "move_forward" and character_motion_name(2) == "move_backward"
    assert character_motion_name(12) == "move_right-move_down"
    assert motion_class((1, 0, 1)) == 10 and motion_class((-1, -1, -1)) == 26 and motion_class((0, 0, 0)) == 0
    with pytest.raises(ValueError, match="0..26"):
        camera_motion_name(27)
    with pytest.raises(TypeError):
        camera_motion_name(1.5)


def test_tagger_reads_the_cameras_own_axes():
    # yawed by 90 degrees, the camera looks along world +x, so moving along world +x is a push in
    rotation = rotation_y(np.pi / 2)
    world_velocity = np.array([0.6, 0.0, 0.0])
    poses = camera_path(np.tile(world_velocity @ rotation, (59, 1)), rotation)  # camera axes = R^T v
    assert np.allclose(poses[1:, 0, 3] - poses[:-1, 0, 3], 0.6 / FPS)
    assert set(tag_camera_motion(poses)) == {1}


@pytest.mark.parametrize(
    "velocity, name",
    [
        ((0.5, 0.0, 0.45), "trucking_right-push_in"),
        ((-0.5, -0.4, 0.0), "trucking_left-boom_top"),
        ((0.0, 0.3, -0.3), "boom_bottom-pull_out"),
        ((-0.4, 0.45, 0.5), "trucking_left-boom_bottom-push_in"),
    ],
)
def test_compound_camera_classes(velocity, name):
    assert {CAMERA_MOTION_NAMES[label] for label in tag_camera_motion(constant_camera(velocity))} == {name}


@pytest.mark.parametrize(
    "velocity, expected",
    [
        # two active axes: ratio (|a| - |b|) / max > 0.4 keeps a, < -0.4 keeps b, otherwise both
        ((0.5, 0.0, 0.25), 9),  # r_xz = 0.5
        ((0.25, 0.0, 0.5), 1),  # r_xz = -0.5
        ((0.5, 0.0, 0.32), 10),  # r_xz = 0.36
        ((0.0, 0.5, 0.2), 3),  # r_yz = 0.6 drops z
        ((0.0, 0.2, 0.5), 1),  # r_yz = -0.6 drops y
        # three active axes: the three pairwise rules on the original ratios
        ((1.0, 0.5, 0.9), 10),  # r_xy = 0.5 drops y, r_xz = 0.1, r_yz = -0.44 drops y
        ((1.0, 0.8, 0.3), 12),  # r_xz and r_yz drop z
        ((0.3, 1.0, 0.9), 4),  # r_xy and r_xz drop x
        ((1.0, 0.1, 0.05), 9),  # below the static threshold 0.02? no: 0.05 > 0.02, dropped by dominance
        ((1.0, 0.015, 0.0), 9),  # 0.015 < 0.02 is not active at all
    ],
)
def test_camera_dominance_rules(velocity, expected):
    assert set(tag_camera_motion(constant_camera(velocity), postprocess=False)) == {expected}


def test_static_threshold_is_strict_and_in_metres_per_second():
    assert set(tag_camera_motion(constant_camera((0.0, 0.0, 0.019)))) == {0}
    assert set(tag_camera_motion(constant_camera((0.0, 0.0, 0.021)))) == {1}


def character_path(velocity, num_frames=80):
    steps = np.tile(np.asarray(velocity, dtype=np.float64) / FPS, (num_frames - 1, 1))
    return np.concatenate([np.zeros((1, 3)), np.cumsum(steps, axis=0)]) + np.array([1.0, -0.9, 3.0])


@pytest.mark.parametrize(
    "velocity, expected",
    [
        ((0.0, 0.0, 0.0), "static"),
        ((0.2, 0.0, 0.0), "static"),  # below the 0.22 m/s character threshold
        ((1.2, 0.0, 0.0), "move_right"),
        ((-1.2, 0.0, 0.0), "move_left"),
        ((0.0, 0.0, 1.0), "move_forward"),
        ((0.0, 0.0, -1.0), "move_backward"),
        ((0.0, -0.5, 0.0), "move_up"),
        ((0.0, 0.5, 0.0), "move_down"),
        ((1.0, 0.0, 0.9), "move_right-move_forward"),
        ((1.0, 0.0, 0.65), "move_right"),  # ratio 0.35 > 0.32 (a camera, with d = 0.4, would keep both)
    ],
)
def test_character_tagger(velocity, expected):
    labels = tag_character_motion(character_path(velocity))
    assert labels.shape == (79,)
    assert {CHARACTER_MOTION_NAMES[label] for label in labels} == {expected}


def test_camera_and_character_dominance_thresholds_differ():
    velocity = (1.0, 0.0, 0.65)
    assert set(tag_camera_motion(constant_camera(velocity))) == {10}
    assert set(tag_character_motion(character_path(velocity))) == {9}


def naive_mode_filter(labels, window):
    if len(labels) < window:
        return list(labels)
    half = window // 2
    out = []
    for i in range(len(labels)):
        counts = Counter(labels[max(0, i - half) : i + half + 1])
        best = max(counts.values())
        out.append(min(label for label, count in counts.items() if count == best))
    return out


def test_mode_filter_matches_a_naive_sliding_mode():
    rng = np.random.default_rng(0)
    for length in (56, 57, 80, 150):
        for _ in range(5):
            labels = np.repeat(rng.integers(0, 27, size=length // 4 + 1), rng.integers(1, 9, size=length // 4 + 1))
            labels = labels[:length] if len(labels) >= length else np.resize(labels, length)
            assert mode_filter(labels, 56).tolist() == naive_mode_filter(labels.tolist(), 56)


def test_mode_filter_removes_spikes_and_is_skipped_for_short_sequences():
    labels = np.array([1] * 50 + [9] * 3 + [1] * 47)
    assert set(mode_filter(labels)) == {1}
    short = np.array([1] * 20 + [9] * 3 + [1] * 32)  # 55 labels < window 56: unchanged
    assert mode_filter(short).tolist() == short.tolist()
    assert mode_filter(np.array([2] * 28 + [1] * 28)).tolist()[27:29] == [1, 1]  # ties go to the smaller class


def test_merge_end_chunks_into_their_single_neighbour():
    assert merge_short_chunks([1] * 10 + [9] * 40).tolist() == [9] * 50
    assert merge_short_chunks([9] * 40 + [2] * 24).tolist() == [9] * 64
    assert merge_short_chunks([9] * 40 + [2] * 25).tolist() == [9] * 40 + [2] * 25  # 25 is long enough


@pytest.mark.parametrize("length, left, right", [(5, 3, 2), (4, 2, 2), (1, 1, 0), (24, 12, 12)])
def test_merge_middle_chunk_splits_ceil_left_floor_right(length, left, right):
    merged = merge_short_chunks([1] * 30 + [9] * length + [2] * 30)
    assert merged.tolist() == [1] * (30 + left) + [2] * (30 + right)


def test_merge_takes_shortest_first_and_does_not_fuse_equal_neighbours():
    # B (5) merges first into A(13) | A(12) which stay two chunks, so A(12) and then A(19) are merged too
    labels = [1] * 10 + [9] * 5 + [1] * 10 + [2] * 100
    assert merge_short_chunks(labels).tolist() == [2] * 125
    # the shortest chunk goes first: the 3-frame chunk, then nothing else is short
    labels = [1] * 30 + [9] * 3 + [2] * 26 + [1] * 30
    assert merge_short_chunks(labels).tolist() == [1] * 32 + [2] * 27 + [1] * 30


def test_postprocessing_removes_a_short_segment_that_the_raw_tagger_sees():
    velocities = [(0.5, 0.0, 0.0)] * 60 + [(0.0, 0.0, 0.5)] * 20 + [(0.5, 0.0, 0.0)] * 60
    poses = camera_path(velocities)
    raw = tag_camera_motion(poses, postprocess=False)
    assert [label for _, _, label in segments_from_labels(raw)] == [9, 1, 9]
    assert set(tag_camera_motion(poses)) == {9}


def test_sequential_segments_survive_postprocessing():
    velocities = [(0.5, 0.0, 0.0)] * 40 + [(0.0, 0.0, 0.5)] * 35 + [(0.0, -0.4, 0.0)] * 44
    labels = tag_camera_motion(camera_path(velocities))
    assert segments_from_labels(labels) == [(0, 40, 9), (40, 75, 1), (75, 119, 6)]


def test_short_sequence_skips_the_mode_filter_but_merges():
    velocities = [(0.5, 0.0, 0.0)] * 30 + [(0.0, 0.0, 0.5)] * 10 + [(0.5, 0.0, 0.0)] * 9
    labels = tag_camera_motion(camera_path(velocities))  # 49 transitions < 56
    assert labels.tolist() == [9] * 49


def test_batched_tagging_matches_single():
    single = [constant_camera((0.5, 0.0, 0.0), 60), constant_camera((0.0, 0.0, -0.5), 60)]
    batched = tag_camera_motion(np.stack(single))
    assert batched.shape == (2, 59)
    assert batched[0].tolist() == tag_camera_motion(single[0]).tolist()
    assert tag_character_motion(np.stack([character_path((1, 0, 0), 60)] * 3)).shape == (3, 59)


def test_segments_from_labels():
    assert segments_from_labels([1, 1, 9, 9, 9, 0]) == [(0, 2, 1), (2, 5, 9), (5, 6, 0)]
    assert segments_from_labels([]) == []


def test_tagger_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 frames"):
        tag_camera_motion(np.eye(4)[None])
    with pytest.raises(ValueError, match=r"\(N, 4, 4\)"):
        tag_camera_motion(np.zeros((10, 3, 4)))
    poses = constant_camera((0.5, 0, 0), 10)
    poses[3, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tag_camera_motion(poses)
    with pytest.raises(ValueError, match="not rigid"):
        tag_camera_motion(constant_camera((0.5, 0, 0), 10) * np.array([1.1, 1, 1, 1])[:, None])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        tag_character_motion(np.zeros((10, 2)))
    with pytest.raises(TypeError):
        tag_character_motion("not a trajectory")


def naive_label(velocity, static_threshold, dominance_threshold):
    """The rules of the research brief, one frame at a time."""

    def ratio(a, b):
        return 0.0 if max(a, b) == 0 else (a - b) / max(a, b)

    speed = [abs(v) for v in velocity]
    keep = [s > static_threshold for s in speed]
    d = dominance_threshold
    pairs = {(0, 1): ratio(speed[0], speed[1]), (0, 2): ratio(speed[0], speed[2]), (1, 2): ratio(speed[1], speed[2])}
    if sum(keep) == 2:
        a, b = [axis for axis in range(3) if keep[axis]]
        if pairs[(a, b)] > d:
            keep[b] = False
        elif pairs[(a, b)] < -d:
            keep[a] = False
    elif sum(keep) == 3:
        original = list(keep)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            if original[a] and original[b]:
                if pairs[(a, b)] > d:
                    keep[b] = False
                elif pairs[(a, b)] < -d:
                    keep[a] = False
    code = [0 if not k else (1 if v > 0 else 2) for k, v in zip(keep, velocity)]
    return 9 * code[0] + 3 * code[1] + code[2]


def test_vectorised_labels_match_a_per_frame_implementation():
    from storydiff.trajectories import label_velocities

    rng = np.random.default_rng(0)
    velocities = rng.normal(0, 0.05, size=(3000, 3)) * rng.choice([0.0, 0.3, 1.0, 3.0], size=(3000, 3))
    velocities[:100] = np.round(velocities[:100], 2)  # exact ties and zeros
    for s, d in ((0.02, 0.4), (0.22, 0.32)):
        expected = [naive_label(v, s, d) for v in (velocities * (10 if s > 0.1 else 1))]
        assert label_velocities(velocities * (10 if s > 0.1 else 1), s, d).tolist() == expected
