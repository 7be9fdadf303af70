"""Procedurally generated E.T.-style samples, written in the E.T. on-disk format.

Every sample has a character that stands still or walks (right, left, forward, backward, diagonals, in
world axes) and a camera that follows it, leads it (pulls out as the character approaches) or ignores it
and does its own motion: basic (push_in, pull_out, boom, trucking), compound (e.g. trucking_right-push_in)
and sequences of such segments (each at least `min_segment_frames` long so that the tagger's smoothing keeps
them). Camera velocities are planned in the camera's own axes, which is what the E.T. tagger reads, while
the rotation stays almost fixed (a slow pan) or looks at the character; so the tagger recovers the plan.
As in E.T., `cam_segments/` and `char_segments/` hold the tagger's output and the captions are written from
those tags (with templates and synonyms instead of E.T.'s LLM).
"""

import os
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm.auto import tqdm

from ..trajectories.export import to_kitti
from ..trajectories.tagging import (
    CAMERA_DOMINANCE_THRESHOLD,
    CAMERA_STATIC_THRESHOLD,
    CHARACTER_DOMINANCE_THRESHOLD,
    CHARACTER_STATIC_THRESHOLD,
    FPS,
    MOTION_PATTERNS,
    label_velocities,
    segments_from_labels,
    tag_camera_motion,
    tag_character_motion,
)
from ..trajectories.validation import check_count, check_real
from .captions import camera_caption, full_caption
from .et import _check_plain_name

ET_FOLDERS = (
    "traj",
    "intrinsics",
    "char",
    "char_raw",
    "cam_segments",
    "char_segments",
    "caption",
    "caption_cam",
    "bounds",
)
RELATIONS = ("follow", "lead", "ignore")
_SPLIT_NAMES = tuple(
    f"{subset}_{split}" for subset in ("full", "mixed", "pure") for split in ("train", "test")
) + tuple(f"clatr_{split}" for split in ("train", "val", "test"))

# class indices (9 c(x) + 3 c(y) + c(z))
STATIC = 0
_CHARACTER_WALKS = (9, 18, 1, 2, 10, 11, 19, 20)  # right, left, forward, backward and the four diagonals
_FOLLOW_WALKS = (9, 18, 1, 10, 19)  # the camera moves with a character walking sideways or away from it
_LEAD_WALKS = (2, 11, 20)  # the character walks towards the camera, which pulls out ahead of it
_BASIC_CAMERA = (1, 2, 3, 6, 9, 18)
_TWO_AXIS_CAMERA = tuple(i for i in range(27) if np.count_nonzero(MOTION_PATTERNS[i]) == 2)
_THREE_AXIS_CAMERA = tuple(i for i in range(27) if np.count_nonzero(MOTION_PATTERNS[i]) == 3)
_YTID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))


@dataclass
class SyntheticSample:
    """One generated sample; `planned_*_labels` are the per-transition classes the generator intended."""

    id: str
    camera_poses: np.ndarray  # (N, 4, 4) camera-to-world, shifted so the character starts at the origin
    character_positions: np.ndarray  # (N, 3), starts at the origin
    character_origin: np.ndarray  # (3,) the shift: char_raw = character_positions + character_origin
    intrinsics: np.ndarray  # (4,) fx, fy, cx, cy in pixels
    bounds: np.ndarray  # (2,) first and last frame of the chunk in its (imaginary) shot
    relation: str  # "follow", "lead" or "ignore"
    planned_camera_labels: np.ndarray  # (N-1,)
    planned_character_labels: np.ndarray  # (N-1,)
    camera_segments: np.ndarray = field(default=None)  # (N-1,) the tagger's output
    character_segments: np.ndarray = field(default=None)
    caption: str = ""
    caption_cam: str = ""
    kitti_text: str = field(default="", repr=False)  # traj/{id}.txt, formatted once


# ----------------------------------------------------------------------------------------------------------- #
# planning helpers


def _segment_lengths(rng: np.random.Generator, total: int, count: int, minimum: int) -> List[int]:
    spare = total - count * minimum
    shares = rng.dirichlet(np.ones(count)) * spare
    lengths = [minimum + int(share) for share in shares]
    lengths[-1] += total - sum(lengths)
    return lengths


def _distinct_sequence(rng: np.random.Generator, count: int, draw) -> List[int]:
    """`count` classes where neighbours differ (so each planned segment stays a separate segment)."""
    classes = [draw()]
    while len(classes) < count:
        candidate = draw()
        if candidate != classes[-1]:
            classes.append(candidate)
    return classes


def _draw_camera_class(rng: np.random.Generator) -> int:
    group = rng.choice(4, p=[0.12, 0.58, 0.24, 0.06])
    if group == 0:
        return STATIC
    pool = (_BASIC_CAMERA, _TWO_AXIS_CAMERA, _THREE_AXIS_CAMERA)[group - 1]
    return int(rng.choice(pool))


def _draw_character_class(rng: np.random.Generator, static_probability: float = 0.3) -> int:
    return STATIC if rng.random() < static_probability else int(rng.choice(_CHARACTER_WALKS))


def _class_velocity(rng: np.random.Generator, label: int, speed: float, spread: float) -> np.ndarray:
    """A velocity whose raw tag is `label`: active axes at comparable speeds (ratio >= 1 - spread)."""
    pattern = MOTION_PATTERNS[label].astype(np.float64)
    return pattern * speed * rng.uniform(1.0 - spread, 1.0, size=3)


def _per_frame(lengths: Sequence[int], values: Sequence) -> np.ndarray:
    return np.concatenate(
        [np.repeat(np.asarray(value)[None], length, axis=0) for length, value in zip(lengths, values)]
    )


def _smooth_gain(rng: np.random.Generator, steps: int, amplitude: float) -> np.ndarray:
    """Slowly varying multiplicative noise per axis, 1 +- amplitude."""
    time = np.arange(steps)[:, None] / FPS
    frequency = rng.uniform(0.1, 0.6, size=(1, 3))
    phase = rng.uniform(0, 2 * np.pi, size=(1, 3))
    return 1.0 + amplitude * np.sin(2 * np.pi * frequency * time + phase)


def _has_margin(velocity: np.ndarray, static_threshold: float, dominance_threshold: float) -> bool:
    """True if noise cannot flip the raw tag: speeds far from the static threshold and dominance ratios far
    from the dominance threshold."""
    speed = np.abs(velocity)
    near_static = (speed > 0.5 * static_threshold) & (speed < 2.0 * static_threshold)
    if near_static.any():
        return False
    active = speed > static_threshold
    for a, b in ((0, 1), (0, 2), (1, 2)):
        both = active[:, a] & active[:, b]
        ratio = np.abs(speed[both, a] - speed[both, b]) / np.maximum(speed[both, a], speed[both, b])
        if (np.abs(ratio - dominance_threshold) < 0.1).any():
            return False
    return True


def _rotation_y(angle: np.ndarray) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(angle), np.ones_like(angle)
    return np.stack(
        [np.stack([cos, zero, sin], -1), np.stack([zero, one, zero], -1), np.stack([-sin, zero, cos], -1)], -2
    )


def _rotation_x(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])


def look_at(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Camera-to-world rotation (OpenCV axes, world y down) whose +z looks from `position` at `target`."""
    fx, fy, fz = (float(v) for v in target - position)
    norm = (fx * fx + fy * fy + fz * fz) ** 0.5
    fx, fy, fz = fx / norm, fy / norm, fz / norm
    # right = (0, 1, 0) x forward, normalised; down = forward x right
    rx, rz = fz, -fx
    norm = (rx * rx + rz * rz) ** 0.5
    rx, rz = rx / norm, rz / norm
    dx, dy, dz = fy * rz, fz * rx - fx * rz, -fy * rx
    return np.array([[rx, dx, fx], [0.0, dy, fy], [rz, dz, fz]])


def _poses(rotations: np.ndarray, positions: np.ndarray) -> np.ndarray:
    poses = np.zeros((len(positions), 4, 4))
    poses[:, :3, :3] = rotations
    poses[:, :3, 3] = positions
    poses[:, 3, 3] = 1.0
    return poses


# ----------------------------------------------------------------------------------------------------------- #
# one sample


def _random_id(rng: np.random.Generator) -> str:
    year = int(rng.integers(1980, 2021))
    ytid = "".join(rng.choice(_YTID_ALPHABET, size=11))
    return f"{year}_{ytid}_{int(rng.integers(0, 60)):05d}_{int(rng.integers(0, 4)):05d}"


def generate_synthetic_sample(
    rng: np.random.Generator,
    num_frames: int,
    min_segment_frames: int = 30,
    pure_probability: float = 0.45,
    sample_id: Optional[str] = None,
    relation: Optional[str] = None,
    transition_frames: int = 8,
) -> SyntheticSample:
    """Generates one sample of `num_frames` frames (tags and captions included).

    Segments last at least `min_segment_frames`; moving segments ease in and out over `transition_frames`
    frames at their boundaries; `relation` forces "follow", "lead" or "ignore" (random by default).
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}."
        )
    num_frames = check_count(num_frames, "num_frames", minimum=2)
    _check_generation_settings(min_segment_frames, pure_probability, transition_frames)
    if sample_id is not None:
        _check_plain_name(sample_id, "sample_id")
    if relation is not None and relation not in RELATIONS:
        raise ValueError(f"relation must be one of {RELATIONS}, got {relation!r}.")
    steps = num_frames - 1
    max_segments = max(1, min(3, steps // min_segment_frames))
    relation = relation or str(rng.choice(RELATIONS, p=[0.3, 0.15, 0.55]))

    for _ in range(100):
        num_segments = (
            1 if (max_segments == 1 or rng.random() < pure_probability) else int(rng.integers(2, max_segments + 1))
        )
        lengths = _segment_lengths(rng, steps, num_segments, min_segment_frames)
        plan = _plan(rng, relation, lengths, steps, min_segment_frames, transition_frames)
        if plan is not None:
            break
    else:  # pragma: no cover - the plans above have wide margins
        raise RuntimeError("could not plan a synthetic sample with safe tagging margins")
    poses, character, planned_camera, planned_character = plan

    character_origin = np.array([rng.uniform(-3, 3), rng.uniform(-1.2, -0.6), rng.uniform(2, 10)])
    width, height = [(1280, 720), (1920, 1080), (1024, 576), (854, 480)][int(rng.integers(4))]
    focal = width * rng.uniform(0.7, 1.5)
    intrinsics = np.array([focal, focal, width / 2, height / 2], dtype=np.float64)
    start = int(rng.integers(0, 600))
    # keep exactly what goes on disk (KITTI keeps 7 significant digits) and tag that, as E.T. tagged its files
    kitti_text = to_kitti(poses)
    sample = SyntheticSample(
        id=sample_id or _random_id(rng),
        camera_poses=_parse_kitti_text(kitti_text),
        character_positions=character,
        character_origin=character_origin,
        intrinsics=intrinsics,
        bounds=np.array([start, start + num_frames - 1], dtype=np.int64),
        relation=relation,
        planned_camera_labels=planned_camera,
        planned_character_labels=planned_character,
        kitti_text=kitti_text,
    )
    sample.camera_segments = tag_camera_motion(sample.camera_poses)
    sample.character_segments = tag_character_motion(character.astype(np.float32))
    sample.caption = full_caption(sample.camera_segments, sample.character_segments, rng)
    sample.caption_cam = camera_caption(sample.camera_segments, rng)
    return sample


def _check_generation_settings(min_segment_frames, pure_probability, transition_frames) -> None:
    check_count(min_segment_frames, "min_segment_frames", minimum=1)
    check_real(pure_probability, "pure_probability", at_least=0, at_most=1)
    check_count(transition_frames, "transition_frames", minimum=0)


def _parse_kitti_text(text: str) -> np.ndarray:
    values = np.array(text.split(), dtype=np.float64).reshape(-1, 3, 4)
    rounded = np.tile(np.eye(4), (len(values), 1, 1))
    rounded[:, :3] = values
    return rounded


def _plan(rng, relation, lengths, steps, min_segment_frames, transition_frames):
    """Returns (poses, character positions, planned camera labels, planned character labels) or None when
    the draw does not leave safe margins around the tagger's thresholds."""
    camera_start = np.array([rng.uniform(-1.0, 1.0), rng.uniform(-0.8, 0.1), -rng.uniform(2.5, 5.0)])
    camera_gain = _smooth_gain(rng, steps, 0.04)
    camera_jitter = np.clip(rng.normal(0, 0.002, size=(steps, 3)), -0.006, 0.006)
    character_gain = _smooth_gain(rng, steps, 0.04)
    character_jitter = np.clip(rng.normal(0, 0.01, size=(steps, 3)), -0.04, 0.04)

    if relation in ("follow", "lead"):
        walks = _FOLLOW_WALKS if relation == "follow" else _LEAD_WALKS
        classes = _distinct_sequence(
            rng, len(lengths), lambda: STATIC if rng.random() < 0.2 else int(rng.choice(walks))
        )
        if all(label == STATIC for label in classes):
            classes[0] = int(rng.choice(walks))
        speeds = [rng.uniform(0.6, 1.4) for _ in classes]
        velocities = [_class_velocity(rng, c, s, 0.15) for c, s in zip(classes, speeds)]
        character_plan = _per_frame(lengths, velocities)
        envelope = _speed_envelope(velocities, lengths, 2.5 * CHARACTER_STATIC_THRESHOLD, transition_frames)
        # the camera keeps its offset to the character: same world velocity, fixed look-at rotation
        rotation = (
            look_at(camera_start, rng.uniform(-0.2, 0.2, size=3)) if rng.random() < 0.5 else _fixed_rotation(rng)
        )
        camera_plan_camera_axes = character_plan @ rotation  # R^T v for each row
        planned_camera = label_velocities(camera_plan_camera_axes, CAMERA_STATIC_THRESHOLD, CAMERA_DOMINANCE_THRESHOLD)
        eased_camera = camera_plan_camera_axes * envelope
        if not _has_margin(eased_camera, CAMERA_STATIC_THRESHOLD, CAMERA_DOMINANCE_THRESHOLD) or not np.array_equal(
            label_velocities(eased_camera, CAMERA_STATIC_THRESHOLD, CAMERA_DOMINANCE_THRESHOLD), planned_camera
        ):
            return None
        character_velocity = character_plan * envelope * character_gain + character_jitter
        camera_world_velocity = character_plan * envelope * _smooth_gain(rng, steps, 0.03) + camera_jitter @ rotation.T
        character = _integrate(character_velocity)
        positions = camera_start + _integrate(camera_world_velocity)
        rotations = np.repeat(rotation[None], steps + 1, axis=0)
    else:
        camera_classes = _distinct_sequence(rng, len(lengths), lambda: _draw_camera_class(rng))
        camera_velocities = [_class_velocity(rng, c, rng.uniform(0.3, 1.2), 0.2) for c in camera_classes]
        camera_plan = _per_frame(lengths, camera_velocities)
        camera_envelope = _speed_envelope(camera_velocities, lengths, 5 * CAMERA_STATIC_THRESHOLD, transition_frames)
        character_segments = 1 if steps < 2 * min_segment_frames or rng.random() < 0.5 else 2
        character_lengths = _segment_lengths(rng, steps, character_segments, min_segment_frames)
        character_classes = _distinct_sequence(rng, character_segments, lambda: _draw_character_class(rng))
        character_velocities = [_class_velocity(rng, c, rng.uniform(0.5, 1.4), 0.15) for c in character_classes]
        character_plan = _per_frame(character_lengths, character_velocities)
        character_envelope = _speed_envelope(
            character_velocities, character_lengths, 2.5 * CHARACTER_STATIC_THRESHOLD, transition_frames
        )
        character = _integrate(character_plan * character_envelope * character_gain + character_jitter)
        camera_velocity = camera_plan * camera_envelope * camera_gain + camera_jitter  # in camera axes
        positions = rotations = None
        if rng.random() < 0.4:
            positions, rotations = _integrate_looking_at(camera_start, camera_velocity, character)
        if positions is None:  # slow pan: translation is still planned in the camera's current axes
            yaw = rng.uniform(-0.15, 0.15) + np.deg2rad(rng.uniform(-4, 4)) * np.arange(steps + 1) / FPS
            rotations = _rotation_y(yaw) @ _rotation_x(rng.uniform(-0.1, 0.1))
            steps_world = np.einsum("nij,nj->ni", rotations[:-1], camera_velocity) / FPS
            positions = camera_start + np.concatenate([np.zeros((1, 3)), np.cumsum(steps_world, axis=0)])
        planned_camera = label_velocities(camera_plan, CAMERA_STATIC_THRESHOLD, CAMERA_DOMINANCE_THRESHOLD)
    planned_character = label_velocities(character_plan, CHARACTER_STATIC_THRESHOLD, CHARACTER_DOMINANCE_THRESHOLD)
    return _poses(rotations, positions), character, planned_camera, planned_character


def _speed_envelope(segment_velocities, lengths, min_speed: float, width: int) -> np.ndarray:
    """Per-frame speed factor `(steps, 1)`: each moving segment slows down smoothly over `width` frames
    towards its boundaries with other segments (camera operators ease in and out of moves), never letting
    an active axis drop below `min_speed`. Scaling a whole velocity keeps its direction, so the tag of every
    frame stays the planned one, while the jump at a boundary becomes smaller."""
    envelope = []
    for index, (velocity, length) in enumerate(zip(segment_velocities, lengths)):
        factor = np.ones(length)
        active = np.abs(velocity)[np.abs(velocity) > 0]
        ramp_length = min(width, length // 2)
        if active.size and ramp_length > 0:
            floor = min(1.0, min_speed / active.min())
            phase = (np.arange(ramp_length) + 0.5) / ramp_length
            ramp = floor + (1.0 - floor) * 0.5 * (1.0 - np.cos(np.pi * phase))  # floor -> 1
            if index > 0:
                factor[:ramp_length] = ramp
            if index < len(lengths) - 1:
                factor[length - ramp_length :] = np.minimum(factor[length - ramp_length :], ramp[::-1])
        envelope.append(factor)
    return np.concatenate(envelope)[:, None]


def _fixed_rotation(rng) -> np.ndarray:
    return _rotation_y(np.array(rng.uniform(-0.14, 0.14))) @ _rotation_x(rng.uniform(-0.09, 0.09))


def _integrate(velocity: np.ndarray) -> np.ndarray:
    return np.concatenate([np.zeros((1, 3)), np.cumsum(velocity / FPS, axis=0)])


def _integrate_looking_at(start, camera_velocity, character, min_distance: float = 1.0):
    """Camera that keeps looking at the character while translating along its own (rotating) axes."""
    positions = [start]
    rotations = []
    aim = np.array([0.0, -0.2, 0.0])
    for step, velocity in enumerate(camera_velocity):
        rotation = look_at(positions[-1], character[step] + aim)
        rotations.append(rotation)
        positions.append(positions[-1] + rotation @ velocity / FPS)
        if np.linalg.norm(positions[-1] - character[step + 1] - aim) < min_distance:
            return None, None
    rotations.append(look_at(positions[-1], character[-1] + aim))
    return np.stack(positions), np.stack(rotations)


# ----------------------------------------------------------------------------------------------------------- #
# writing a dataset


def write_et_sample(root: Union[str, os.PathLike], sample: SyntheticSample) -> None:
    """Writes one sample into the E.T. folders under `root` (the folders must exist)."""
    root = os.fspath(root)
    _check_plain_name(sample.id, "sample id")
    origin = sample.character_origin
    with open(os.path.join(root, "traj", sample.id + ".txt"), "w", encoding="utf-8") as file:
        file.write(sample.kitti_text or to_kitti(sample.camera_poses))
    np.save(os.path.join(root, "intrinsics", sample.id + ".npy"), sample.intrinsics)
    np.save(os.path.join(root, "char", sample.id + ".npy"), sample.character_positions.astype(np.float32))
    np.save(
        os.path.join(root, "char_raw", sample.id + ".npy"), (sample.character_positions + origin).astype(np.float32)
    )
    np.save(os.path.join(root, "cam_segments", sample.id + ".npy"), sample.camera_segments.astype(np.int64))
    np.save(os.path.join(root, "char_segments", sample.id + ".npy"), sample.character_segments.astype(np.int64))
    np.save(os.path.join(root, "bounds", sample.id + ".npy"), sample.bounds)
    for folder, text in (("caption", sample.caption), ("caption_cam", sample.caption_cam)):
        with open(os.path.join(root, folder, sample.id + ".txt"), "w", encoding="utf-8") as file:
            file.write(text)


def _write_split(root: str, name: str, ids: Sequence[str]) -> None:
    with open(os.path.join(root, f"{name}_split.txt"), "w", encoding="utf-8") as file:
        file.writelines(f"{sample_id}\n" for sample_id in sorted(ids))  # POSIX text: every line ends with "\n"


def synthetic_et_is_complete(root) -> bool:
    """Whether `root` holds a finished `make_synthetic_et` run. Split files are written last: without all of them,
    traj/ holds an interrupted generation, which `make_synthetic_et` replaces."""
    return all(os.path.isfile(os.path.join(os.fspath(root), f"{name}_split.txt")) for name in _SPLIT_NAMES)


def make_synthetic_et(
    root: Union[str, os.PathLike],
    num_samples: int,
    seed: int = 0,
    num_frames: Tuple[int, int] = (30, 300),
    test_fraction: float = 0.1,
    min_segment_frames: int = 30,
    pure_probability: float = 0.45,
    transition_frames: int = 8,
    overwrite: bool = False,
    show_progress: Optional[bool] = None,
) -> Dict[str, object]:
    """Writes `num_samples` synthetic samples to `root` in the E.T. on-disk format and returns a summary.

    Folders: traj, intrinsics, char, char_raw, cam_segments, char_segments, caption, caption_cam, bounds
    (E.T.'s precomputed CLIP features `caption_clip/` are not written). Split files:
    `{full,mixed,pure}_{train,test}_split.txt` (pure: the tagger finds one camera segment; mixed: several)
    and `clatr_{train,val,test}_split.txt`. Frames per sample are drawn uniformly from `num_frames`
    (inclusive). A folder left incomplete by an interrupted call (no split files yet) is regenerated; a
    complete one is only replaced with `overwrite=True`. The summary has `ids`, `train_ids`, `test_ids` and the agreement between the tagger and the
    plan (`camera_frame_agreement`, `character_frame_agreement`, `camera_exact_fraction`).
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    low, high = _frame_range(num_frames)
    test_fraction = check_real(test_fraction, "test_fraction", at_least=0)
    if not test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    _check_generation_settings(min_segment_frames, pure_probability, transition_frames)
    root = os.fspath(root)
    complete = synthetic_et_is_complete(root)
    if os.path.isdir(os.path.join(root, "traj")) and os.listdir(os.path.join(root, "traj")):
        if complete and not overwrite:
            raise ValueError(
                f"{root} already holds an E.T. dataset (traj/ is not empty); pass overwrite=True to replace it."
            )
        for folder in ET_FOLDERS:
            shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
        for name in _SPLIT_NAMES:
            if os.path.isfile(os.path.join(root, f"{name}_split.txt")):
                os.remove(os.path.join(root, f"{name}_split.txt"))
    for folder in ET_FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)

    rng = np.random.default_rng(seed)
    ids, pure, agreement = [], [], {"camera": [], "character": [], "exact": []}
    used = set()
    progress = tqdm(
        range(num_samples),
        desc="synthetic E.T.",
        disable=not (show_progress if show_progress is not None else num_samples >= 500),
    )
    for _ in progress:
        sample_id = _random_id(rng)
        while sample_id in used:
            sample_id = _random_id(rng)
        used.add(sample_id)
        sample = generate_synthetic_sample(
            rng,
            int(rng.integers(low, high + 1)),
            min_segment_frames,
            pure_probability,
            sample_id=sample_id,
            transition_frames=transition_frames,
        )
        write_et_sample(root, sample)
        ids.append(sample.id)
        pure.append(len(segments_from_labels(sample.camera_segments)) == 1)
        agreement["camera"].append(np.mean(sample.camera_segments == sample.planned_camera_labels))
        agreement["character"].append(np.mean(sample.character_segments == sample.planned_character_labels))
        agreement["exact"].append(bool(np.all(sample.camera_segments == sample.planned_camera_labels)))

    order = rng.permutation(num_samples)
    num_test = int(round(test_fraction * num_samples)) if num_samples > 1 else 0
    test = set(order[:num_test].tolist())
    train_ids = [ids[i] for i in range(num_samples) if i not in test]
    test_ids = [ids[i] for i in range(num_samples) if i in test]
    is_pure = dict(zip(ids, pure))
    for split, split_ids in (("train", train_ids), ("test", test_ids)):
        _write_split(root, f"full_{split}", split_ids)
        _write_split(root, f"pure_{split}", [i for i in split_ids if is_pure[i]])
        _write_split(root, f"mixed_{split}", [i for i in split_ids if not is_pure[i]])
    num_val = max(1, len(train_ids) // 10) if len(train_ids) > 1 else 0
    _write_split(root, "clatr_train", train_ids[num_val:])
    _write_split(root, "clatr_val", train_ids[:num_val])
    _write_split(root, "clatr_test", test_ids)
    return {
        "root": root,
        "ids": ids,
        "train_ids": train_ids,
        "test_ids": test_ids,
        "num_pure": int(sum(pure)),
        "camera_frame_agreement": float(np.mean(agreement["camera"])),
        "character_frame_agreement": float(np.mean(agreement["character"])),
        "camera_exact_fraction": float(np.mean(agreement["exact"])),
    }


def _frame_range(num_frames) -> Tuple[int, int]:
    if isinstance(num_frames, (int, np.integer)) and not isinstance(num_frames, bool):
        num_frames = (num_frames, num_frames)
    try:
        low, high = (int(n) for n in num_frames)
    except (TypeError, ValueError):
        raise TypeError(f"num_frames must be an int or a (min, max) pair, got {num_frames!r}.") from None
    if not 2 <= low <= high:
        raise ValueError(f"num_frames must satisfy 2 <= min <= max, got ({low}, {high}).")
    return low, high


__all__ = ["SyntheticSample", "generate_synthetic_sample", "make_synthetic_et", "write_et_sample", "look_at"]
