"""Rule-based camera and character motion tagger of E.T. (Courant et al., ECCV 2024).

Per frame t < N-1 the tagger reads a translation velocity (camera: in the camera's own axes, from the
relative pose inv(P_t) @ P_{t+1}; character: in world axes), keeps the axes faster than a static threshold,
drops the clearly slower axis of a pair by the dominance ratio, and encodes the signed pattern as one of 27
classes: `9 c(x) + 3 c(y) + c(z)` with c(0) = 0, c(+1) = 1, c(-1) = 2. The labels are then smoothed with a
mode filter and chunks shorter than 25 frames are merged into their neighbours, exactly as in the public
E.T. processing code (`src/processing/segmentation.py`).
"""

from itertools import product
from typing import List, Tuple

import numpy as np
import torch

from .validation import as_float_array, check_count, check_poses, check_positions, check_real

FPS = 25.0
CAMERA_STATIC_THRESHOLD = 0.02
CAMERA_DOMINANCE_THRESHOLD = 0.4
CHARACTER_STATIC_THRESHOLD = 0.22
CHARACTER_DOMINANCE_THRESHOLD = 0.32
SMOOTHING_WINDOW = 56
MIN_CHUNK_LENGTH = 25
NUM_MOTION_CLASSES = 27

# axis -> (name for +1, name for -1); camera axes are OpenCV (x right, y down, z forward)
_CAMERA_AXIS_NAMES = (("trucking_right", "trucking_left"), ("boom_bottom", "boom_top"), ("push_in", "pull_out"))
_CHARACTER_AXIS_NAMES = (("move_right", "move_left"), ("move_down", "move_up"), ("move_forward", "move_backward"))
# class index -> signed pattern, in the order of itertools.product([0, 1, -1], repeat=3) as in the reference
MOTION_PATTERNS = np.array(list(product([0, 1, -1], repeat=3)), dtype=np.int64)


def _class_names(axis_names) -> Tuple[str, ...]:
    names = []
    for pattern in MOTION_PATTERNS:
        parts = [axis_names[axis][0 if sign > 0 else 1] for axis, sign in enumerate(pattern) if sign != 0]
        names.append("-".join(parts) if parts else "static")
    return tuple(names)


CAMERA_MOTION_NAMES = _class_names(_CAMERA_AXIS_NAMES)
CHARACTER_MOTION_NAMES = _class_names(_CHARACTER_AXIS_NAMES)


def _name(names, index, what) -> str:
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"{what} class index must be an int, got {type(index).__name__}.")
    if not 0 <= index < NUM_MOTION_CLASSES:
        raise ValueError(f"{what} class index must be in 0..{NUM_MOTION_CLASSES - 1}, got {index}.")
    return names[int(index)]


def camera_motion_name(index: int) -> str:
    """Class index (0..26) -> camera motion name, e.g. 10 -> 'trucking_right-push_in'."""
    return _name(CAMERA_MOTION_NAMES, index, "camera motion")


def character_motion_name(index: int) -> str:
    """Class index (0..26) -> character motion name, e.g. 9 -> 'move_right'."""
    return _name(CHARACTER_MOTION_NAMES, index, "character motion")


def motion_class(pattern) -> int:
    """Signed pattern (sx, sy, sz) in {-1, 0, 1}^3 -> class index `9 c(x) + 3 c(y) + c(z)`."""
    pattern = as_float_array(pattern, "motion pattern", (3,))
    code = [0 if s == 0 else (1 if s > 0 else 2) for s in pattern]
    return 9 * code[0] + 3 * code[1] + code[2]


# ----------------------------------------------------------------------------------------------------------- #
# velocities


def camera_velocities(poses, fps: float = FPS) -> np.ndarray:
    """`(N, 4, 4)` camera-to-world poses -> `(N-1, 3)` translation velocities in the camera's own axes:
    `fps * (inv(P_t) @ P_{t+1})[:3, 3] = fps * R_t^T (t_{t+1} - t_t)` (rigid inverse, as in the reference)."""
    poses = check_poses(poses)
    if poses.ndim != 3:
        raise ValueError(f"camera_velocities takes one trajectory of shape (N, 4, 4), got {tuple(poses.shape)}.")
    return _camera_velocities(poses.detach().cpu().double().numpy(), check_real(fps, "fps", above=0))


def _camera_velocities(poses: np.ndarray, fps: float) -> np.ndarray:
    rotation, translation = poses[:-1, :3, :3], poses[:, :3, 3]
    step = translation[1:] - translation[:-1]
    return fps * np.einsum("nji,nj->ni", rotation, step)


def character_velocities(positions, fps: float = FPS) -> np.ndarray:
    """`(N, 3)` positions -> `(N-1, 3)` world-axis velocities `fps * (c_{t+1} - c_t)`."""
    positions = as_float_array(positions, "character positions", (None, 3))
    return _character_velocities(positions, check_real(fps, "fps", above=0))


def _character_velocities(positions: np.ndarray, fps: float) -> np.ndarray:
    return fps * (positions[1:] - positions[:-1])


def _dominance_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    largest = np.maximum(a, b)
    return np.divide(a - b, largest, out=np.zeros_like(largest), where=largest != 0)


def label_velocities(velocities, static_threshold: float, dominance_threshold: float) -> np.ndarray:
    """Per-frame classes of `(M, 3)` velocities (the raw tagger, before any smoothing).

    `static_threshold` (>= 0) is the speed an axis must exceed to count as moving; `dominance_threshold`
    (in [0, 1]) is the relative speed difference above which the slower of two moving axes is dropped.
    """
    velocity = as_float_array(velocities, "velocities", (None, 3))
    static_threshold = check_real(static_threshold, "static_threshold", at_least=0)
    dominance_threshold = check_real(dominance_threshold, "dominance_threshold", at_least=0, at_most=1)
    speed = np.abs(velocity)
    active = speed > static_threshold
    r_xy = _dominance_ratio(speed[:, 0], speed[:, 1])
    r_xz = _dominance_ratio(speed[:, 0], speed[:, 2])
    r_yz = _dominance_ratio(speed[:, 1], speed[:, 2])
    d = dominance_threshold
    keep = active.copy()
    x_on, y_on, z_on = active[:, 0], active[:, 1], active[:, 2]

    # exactly two active axes: the clearly slower one is dropped
    xy = x_on & y_on & ~z_on
    keep[xy & (r_xy > d), 1] = False
    keep[xy & (r_xy < -d), 0] = False
    xz = x_on & ~y_on & z_on
    keep[xz & (r_xz > d), 2] = False
    keep[xz & (r_xz < -d), 0] = False
    yz = ~x_on & y_on & z_on
    keep[yz & (r_yz > d), 2] = False
    keep[yz & (r_yz < -d), 1] = False
    # three active axes: the three pairwise rules, each on the original ratios
    xyz = x_on & y_on & z_on
    keep[xyz & (r_xy > d), 1] = False
    keep[xyz & (r_xy < -d), 0] = False
    keep[xyz & (r_xz > d), 2] = False
    keep[xyz & (r_xz < -d), 0] = False
    keep[xyz & (r_yz > d), 2] = False
    keep[xyz & (r_yz < -d), 1] = False

    code = np.where(keep, np.where(velocity > 0, 1, 2), 0)
    return (9 * code[:, 0] + 3 * code[:, 1] + code[:, 2]).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------- #
# post-processing


def _label_vector(labels) -> np.ndarray:
    """Per-frame labels as a 1-D int64 array; whole-number floats are accepted, anything else is refused."""
    labels = np.asarray(labels.detach().cpu() if hasattr(labels, "detach") else labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of per-frame classes, got shape {labels.shape}.")
    if labels.size == 0 or np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.floating):
        raise TypeError(f"labels must hold integer classes, got dtype {labels.dtype}.")
    if not np.all(np.mod(labels, 1) == 0):
        raise ValueError("labels must hold integer classes, got fractional, NaN or infinite values.")
    return labels.astype(np.int64)


def mode_filter(labels, window: int = SMOOTHING_WINDOW) -> np.ndarray:
    """Sliding mode over `[i - window//2, i + window//2]` (clipped at the ends); ties go to the smallest label.

    Returns the labels unchanged when there are fewer than `window` of them (as in the reference).
    """
    labels = _label_vector(labels)
    window = check_count(window, "window", minimum=1)
    if len(labels) < window:
        return labels.copy()
    values, codes = np.unique(labels, return_inverse=True)
    one_hot = np.zeros((len(labels) + 1, len(values)), dtype=np.int64)
    one_hot[np.arange(1, len(labels) + 1), codes] = 1
    counts = np.cumsum(one_hot, axis=0)
    half = window // 2
    index = np.arange(len(labels))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(labels))
    window_counts = counts[high] - counts[low]
    return values[np.argmax(window_counts, axis=1)]  # argmax takes the first maximum: the smallest label


def segments_from_labels(labels) -> List[Tuple[int, int, int]]:
    """Per-frame labels -> `[(start, end, label), ...]` runs with `end` exclusive (`labels[start:end] == label`)."""
    labels = _label_vector(labels)
    if len(labels) == 0:
        return []
    boundaries = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(labels)]])
    return [(int(s), int(e), int(labels[s])) for s, e in zip(starts, ends)]


def merge_short_chunks(labels, min_length: int = MIN_CHUNK_LENGTH) -> np.ndarray:
    """Repeatedly takes the shortest chunk (the first one on ties) and, while it is shorter than `min_length`,
    gives its frames to its neighbours: an end chunk to its single neighbour, a middle chunk ceil(len/2) to the
    left and floor(len/2) to the right. Neighbours that end up with the same label are *not* fused into one
    chunk (as in the reference), so their lengths keep counting separately."""
    labels = _label_vector(labels)
    min_length = check_count(min_length, "min_length", minimum=0)
    chunks = [[label, start, end] for start, end, label in segments_from_labels(labels)]
    while len(chunks) > 1:
        lengths = [end - start for _, start, end in chunks]
        index = int(np.argmin(lengths))
        length = lengths[index]
        if length >= min_length:
            break
        if index == 0:
            chunks[1][1] -= length
        elif index == len(chunks) - 1:
            chunks[-2][2] += length
        else:
            chunks[index - 1][2] += (length + 1) // 2
            chunks[index + 1][1] -= length // 2
        chunks.pop(index)
    merged = np.empty(len(labels), dtype=np.int64)
    for label, start, end in chunks:
        merged[start:end] = label
    return merged


def postprocess_labels(labels, window: int = SMOOTHING_WINDOW, min_length: int = MIN_CHUNK_LENGTH) -> np.ndarray:
    """Mode filter, then merging of short chunks."""
    return merge_short_chunks(mode_filter(labels, window), min_length)


# ----------------------------------------------------------------------------------------------------------- #
# taggers


def _check_tagger_settings(fps, smoothing_window, min_chunk_length) -> float:
    """Checks the settings the per-trajectory loop uses, once, before any work; returns `fps` as a float."""
    check_count(smoothing_window, "smoothing_window", minimum=1)
    check_count(min_chunk_length, "min_chunk_length", minimum=0)
    return check_real(fps, "fps", above=0)


def _per_trajectory(array: torch.Tensor, batched: bool, tag_one):
    if not batched:
        return tag_one(array.detach().cpu().double().numpy())
    return np.stack([tag_one(sample) for sample in array.detach().cpu().double().numpy()])


def tag_camera_motion(
    poses,
    postprocess: bool = True,
    fps: float = FPS,
    static_threshold: float = CAMERA_STATIC_THRESHOLD,
    dominance_threshold: float = CAMERA_DOMINANCE_THRESHOLD,
    smoothing_window: int = SMOOTHING_WINDOW,
    min_chunk_length: int = MIN_CHUNK_LENGTH,
) -> np.ndarray:
    """Camera motion class per frame transition: `(N, 4, 4)` c2w poses -> int array of length N-1
    (`(B, N, 4, 4)` -> `(B, N-1)`). Names: `CAMERA_MOTION_NAMES[label]`.

    With `postprocess=False` the raw per-frame labels are returned (no mode filter, no chunk merging).
    """
    poses = check_poses(poses)
    fps = _check_tagger_settings(fps, smoothing_window, min_chunk_length)
    if poses.shape[-3] < 2:
        raise ValueError("the camera tagger needs at least 2 frames (it labels the N-1 frame transitions).")

    def tag_one(sample):
        labels = label_velocities(_camera_velocities(sample, fps), static_threshold, dominance_threshold)
        return postprocess_labels(labels, smoothing_window, min_chunk_length) if postprocess else labels

    return _per_trajectory(poses, poses.ndim == 4, tag_one)


def tag_character_motion(
    positions,
    postprocess: bool = True,
    fps: float = FPS,
    static_threshold: float = CHARACTER_STATIC_THRESHOLD,
    dominance_threshold: float = CHARACTER_DOMINANCE_THRESHOLD,
    smoothing_window: int = SMOOTHING_WINDOW,
    min_chunk_length: int = MIN_CHUNK_LENGTH,
) -> np.ndarray:
    """Character motion class per frame transition: `(N, 3)` positions (world axes) -> int array of length
    N-1 (`(B, N, 3)` -> `(B, N-1)`). Names: `CHARACTER_MOTION_NAMES[label]`."""
    positions = check_positions(positions)
    fps = _check_tagger_settings(fps, smoothing_window, min_chunk_length)
    if positions.shape[-2] < 2:
        raise ValueError("the character tagger needs at least 2 frames (it labels the N-1 frame transitions).")

    def tag_one(sample):
        labels = label_velocities(_character_velocities(sample, fps), static_threshold, dominance_threshold)
        return postprocess_labels(labels, smoothing_window, min_chunk_length) if postprocess else labels

    return _per_trajectory(positions, positions.ndim == 3, tag_one)
