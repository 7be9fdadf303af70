"""Export camera trajectories: KITTI text (E.T.'s `traj/*.txt`), JSON, and a Blender Python script."""

import json
import os
from typing import Union

import numpy as np
import torch

from .validation import check_poses, check_positions, check_real, find_non_rigid_pose

PathLike = Union[str, os.PathLike]

# OpenCV camera axes (x right, y down, z forward) -> Blender camera axes (x right, y up, looking down -z)
OPENCV_TO_BLENDER_CAMERA = np.diag([1.0, -1.0, -1.0, 1.0])
# E.T. world axes follow OpenCV (y points down, z forward) -> Blender world (z up, y forward): (x, y, z) -> (x, z, -y)
OPENCV_TO_BLENDER_WORLD = np.array(
    [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
)


def _single_trajectory(poses) -> np.ndarray:
    poses = check_poses(poses)
    if poses.ndim != 3:
        raise ValueError(f"expected one trajectory of shape (N, 4, 4), got a batch of shape {tuple(poses.shape)}.")
    return poses.detach().cpu().double().numpy()


def to_kitti(poses) -> str:
    """`(N, 4, 4)` camera-to-world poses -> KITTI text: one line per frame, the 12 floats of the 3x4 matrix."""
    poses = _single_trajectory(poses)
    line = " ".join(["%.6e"] * 12) + "\n"
    return "".join(line % tuple(row) for row in poses[:, :3].reshape(-1, 12).tolist())


def save_kitti(path: PathLike, poses) -> None:
    """Writes `to_kitti(poses)` to `path`."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(to_kitti(poses))


def load_kitti(path: PathLike, atol: float = 1e-3) -> np.ndarray:
    """Reads a KITTI pose file into `(N, 4, 4)` float64 camera-to-world poses.

    Raises `FileNotFoundError` for a missing file and `ValueError` naming the file and line for a corrupt one:
    not 12 numbers, a NaN or infinity, or a rotation that is not one (`R R^T = I` and `det(R) = +1` within
    `atol`, as `check_poses` asks).
    """
    path = os.fspath(path)
    atol = check_real(atol, "atol", above=0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"KITTI trajectory file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            rows = [(number, line.split()) for number, line in enumerate(file, start=1) if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a KITTI text file, it is not valid UTF-8 ({error}).") from None
    if not rows:
        raise ValueError(f"{path}: empty KITTI trajectory file (no poses).")
    try:  # fast path: the whole file at once; on failure find the offending line for the message
        values = np.array([fields for _, fields in rows], dtype=np.float64)
        valid = values.ndim == 2 and values.shape[1] == 12 and np.isfinite(values).all()
    except ValueError:
        valid = False
    if not valid:
        for number, fields in rows:
            _check_kitti_line(path, number, fields)
        values = np.array([[float(field) for field in fields] for _, fields in rows])
    poses = np.tile(np.eye(4), (len(values), 1, 1))
    poses[:, :3] = values.reshape(-1, 3, 4)
    non_rigid = find_non_rigid_pose(torch.from_numpy(poses), atol)
    if non_rigid is not None:
        index, reason = non_rigid
        raise ValueError(f"{path}, line {rows[index][0]}: pose {index} is not a rigid camera pose, {reason}.")
    return poses


def _check_kitti_line(path: str, line_number: int, fields) -> None:
    if len(fields) != 12:
        raise ValueError(f"{path}, line {line_number}: expected 12 numbers (a 3x4 pose), got {len(fields)}.")
    try:
        values = np.array([float(field) for field in fields])
    except ValueError:
        raise ValueError(f"{path}, line {line_number}: not a number in {' '.join(fields)!r}.") from None
    if not np.isfinite(values).all():
        raise ValueError(f"{path}, line {line_number}: NaN or infinite value.")


def to_json(poses, fps: float = 25.0, character=None) -> str:
    """`(N, 4, 4)` camera-to-world poses -> JSON text.

    Keys: `fps`, `convention`, `camera_to_world` (N lists of 4x4 rows) and, if given, `character_positions`
    (N x 3).
    """
    poses = _single_trajectory(poses)
    fps = check_real(fps, "fps", above=0)
    payload = {
        "fps": float(fps),
        "convention": "camera-to-world, OpenCV axes (x right, y down, z forward)",
        "num_frames": len(poses),
        "camera_to_world": poses.tolist(),
    }
    if character is not None:
        payload["character_positions"] = _character(character, len(poses)).tolist()
    return json.dumps(payload)


def save_json(path: PathLike, poses, fps: float = 25.0, character=None) -> None:
    """Writes `to_json(poses, fps, character)` to `path`."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(to_json(poses, fps=fps, character=character))


def _character(character, num_frames: int) -> np.ndarray:
    character = check_positions(character)
    if character.ndim != 2 or character.shape[0] != num_frames:
        raise ValueError(
            f"character trajectory must have shape ({num_frames}, 3) to match the camera, got {tuple(character.shape)}."
        )
    return character.detach().cpu().double().numpy()


def opencv_to_blender(poses) -> np.ndarray:
    """Camera-to-world poses in OpenCV conventions -> Blender `matrix_world`s (z-up world, camera looking -z)."""
    poses = _single_trajectory(poses)
    return OPENCV_TO_BLENDER_WORLD @ poses @ OPENCV_TO_BLENDER_CAMERA


def to_blender_script(
    poses,
    fps: float = 25.0,
    character=None,
    camera_name: str = "DirectorCamera",
    lens_mm: float = 35.0,
) -> str:
    """Returns a Python script for Blender (run with `blender --python script.py` or in the Text Editor) that
    creates a camera, keyframes its pose on every frame, and, if `character` `(N, 3)` is given, adds a sphere
    keyframed along the character path.

    Axes are converted from OpenCV (x right, y down, z forward; world y down) to Blender (camera looks along
    its -z with +y up; world z up): `matrix_world = W @ P @ diag(1, -1, -1, 1)` with W mapping (x, y, z) to
    (x, z, -y).
    """
    matrices = opencv_to_blender(poses)
    fps = check_real(fps, "fps", at_least=1)  # Blender's scene frame rate is a positive int
    lens_mm = check_real(lens_mm, "lens_mm", above=0)
    if not isinstance(camera_name, str) or not camera_name:
        raise ValueError(f"camera_name must be a non-empty string, got {camera_name!r}.")
    num_frames = len(matrices)
    character_points = None
    if character is not None:
        character_points = (_character(character, num_frames) @ OPENCV_TO_BLENDER_WORLD[:3, :3].T).tolist()

    def rounded(value):
        return json.dumps(np.round(np.asarray(value), 6).tolist())

    lines = [
        '"""Camera trajectory exported by storydiff (DIRECTOR). Run inside Blender."""',
        "import bpy",
        "from mathutils import Matrix",
        "",
        f"FPS = {int(round(fps))}",
        f"CAMERA_NAME = {camera_name!r}",
        f"CAMERA_MATRICES = {rounded(matrices)}",
        f"CHARACTER_POSITIONS = {rounded(character_points) if character_points is not None else None}",
        "",
        "scene = bpy.context.scene",
        "scene.render.fps = FPS",
        "scene.frame_start = 1",
        "scene.frame_end = len(CAMERA_MATRICES)",
        "",
        "camera_data = bpy.data.cameras.new(CAMERA_NAME)",
        f"camera_data.lens = {float(lens_mm)}",
        "camera = bpy.data.objects.new(CAMERA_NAME, camera_data)",
        "scene.collection.objects.link(camera)",
        "scene.camera = camera",
        "camera.rotation_mode = 'QUATERNION'",
        "for frame, rows in enumerate(CAMERA_MATRICES, start=1):",
        "    camera.matrix_world = Matrix(rows)",
        "    camera.keyframe_insert(data_path='location', frame=frame)",
        "    camera.keyframe_insert(data_path='rotation_quaternion', frame=frame)",
        "",
        "if CHARACTER_POSITIONS is not None:",
        "    bpy.ops.mesh.primitive_uv_sphere_add(radius=0.25, location=CHARACTER_POSITIONS[0])",
        "    character = bpy.context.active_object",
        "    character.name = 'Character'",
        "    for frame, position in enumerate(CHARACTER_POSITIONS, start=1):",
        "        character.location = position",
        "        character.keyframe_insert(data_path='location', frame=frame)",
        "",
    ]
    return "\n".join(lines)


def save_blender_script(path: PathLike, poses, fps: float = 25.0, character=None, **kwargs) -> None:
    """Writes `to_blender_script(...)` to `path`."""
    with open(path, "w", encoding="utf-8") as file:
        file.write(to_blender_script(poses, fps=fps, character=character, **kwargs))


def load_json_trajectory(path: PathLike) -> np.ndarray:
    """Reads the `camera_to_world` poses back from a file written by `save_json`."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as file:
            payload = json.load(file)
        poses = np.asarray(payload["camera_to_world"], dtype=np.float64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not a storydiff trajectory JSON file ({error}).") from None
    return check_poses(poses).numpy()


__all__ = [
    "to_kitti",
    "save_kitti",
    "load_kitti",
    "to_json",
    "save_json",
    "load_json_trajectory",
    "to_blender_script",
    "save_blender_script",
    "opencv_to_blender",
]
