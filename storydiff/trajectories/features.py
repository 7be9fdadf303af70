"""Camera and character featurisation used by DIRECTOR, with the E.T. statistics.

Poses are camera-to-world matrices in OpenCV axes (x right, y down, z forward). A camera trajectory of N
frames becomes N x 9 features: the 6D rotation (first column of R, then second column) followed by the
translation, where frame 0 holds the absolute position and frames i > 0 the velocity t[i] - t[i-1].
"""

import torch

from .validation import as_float_tensor, check_finite

# E.T. statistics (DIRECTOR's `standardization/0300.yaml`): frame 0 and the velocities are standardised separately.
CAMERA_FRAME0_MEAN = torch.tensor([0.00201079, -0.27488501, -1.23616805])
CAMERA_FRAME0_STD = torch.tensor([1.13433516, 1.19061042, 1.58744263])
CAMERA_VELOCITY_MEAN = torch.tensor([7.93987673e-05, -9.98621393e-05, 4.12940653e-04])
CAMERA_VELOCITY_STD = torch.tensor([0.027841, 0.01819818, 0.03138536])
CHARACTER_VELOCITY_MEAN = torch.tensor([6.676e-05, -5.084e-05, -7.782e-04])
CHARACTER_VELOCITY_STD = torch.tensor([0.0105, 0.006958, 0.01145])

NUM_CAMERA_FEATURES = 9
NUM_CHARACTER_FEATURES = 3


def _trajectory_tensor(value, name: str, frame_shape: tuple, layout: str) -> torch.Tensor:
    """`value` as a finite float tensor of shape `(..., N, *frame_shape)`; `layout` names that shape for errors."""
    tensor = as_float_tensor(value, name)
    if tensor.ndim < len(frame_shape) + 1 or tuple(tensor.shape[-len(frame_shape) :]) != frame_shape:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(tensor.shape)}.")
    if tensor.shape[-len(frame_shape) - 1] == 0:
        raise ValueError(f"{name} has no frames (shape {tuple(tensor.shape)}); at least 1 frame is required.")
    return check_finite(tensor, name)


def poses_to_features(poses) -> torch.Tensor:
    """Camera-to-world poses `(..., N, 4, 4)` -> DIRECTOR features `(..., N, 9)` (not standardised).

    Features are `[R[:, 0], R[:, 1], t_0]` for frame 0 and `[R[:, 0], R[:, 1], t_i - t_{i-1}]` afterwards.
    """
    poses = _trajectory_tensor(poses, "poses", (4, 4), "(..., N, 4, 4)")
    rotation_6d = poses[..., :3, :2].transpose(-1, -2).reshape(*poses.shape[:-2], 6)
    translation = poses[..., :3, 3]
    velocity = torch.cat([translation[..., :1, :], translation[..., 1:, :] - translation[..., :-1, :]], dim=-2)
    return torch.cat([rotation_6d, velocity], dim=-1)


def rotation_6d_to_matrix(rotation_6d: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt: `(..., 6)` (two raw columns) -> `(..., 3, 3)` rotation with det +1 (Zhou et al. 2019)."""
    rotation_6d = check_finite(as_float_tensor(rotation_6d, "rotation_6d"), "rotation_6d")
    if rotation_6d.ndim < 1 or rotation_6d.shape[-1] != 6:
        raise ValueError(f"rotation_6d must have shape (..., 6), got {tuple(rotation_6d.shape)}.")
    first, second = rotation_6d[..., :3], rotation_6d[..., 3:6]
    x_axis = torch.nn.functional.normalize(first, dim=-1, eps=1e-8)
    z_axis = torch.nn.functional.normalize(torch.linalg.cross(x_axis, second, dim=-1), dim=-1, eps=1e-8)
    y_axis = torch.linalg.cross(z_axis, x_axis, dim=-1)
    return torch.stack([x_axis, y_axis, z_axis], dim=-1)


def features_to_poses(features) -> torch.Tensor:
    """DIRECTOR features `(..., N, 9)` (not standardised) -> camera-to-world poses `(..., N, 4, 4)`.

    The rotation is rebuilt with Gram-Schmidt (so it is orthonormal even for noisy network outputs) and the
    translation is the cumulative sum of frame 0's position and the velocities.
    """
    features = _trajectory_tensor(features, "features", (NUM_CAMERA_FEATURES,), "(..., N, 9)")
    poses = torch.zeros(*features.shape[:-1], 4, 4, dtype=features.dtype, device=features.device)
    poses[..., :3, :3] = rotation_6d_to_matrix(features[..., :6])
    poses[..., :3, 3] = torch.cumsum(features[..., 6:9], dim=-2)
    poses[..., 3, 3] = 1.0
    return poses


def _stat(stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return stat.to(device=like.device, dtype=like.dtype)


def standardize_camera_features(features) -> torch.Tensor:
    """Standardises the translation channels (6:9): frame 0 with the position statistics, later frames with
    the velocity statistics. Rotation channels are left as they are (as in DIRECTOR)."""
    features = _trajectory_tensor(features, "features", (NUM_CAMERA_FEATURES,), "(..., N, 9)").clone()
    translation = features[..., 6:9]
    translation[..., :1, :] = (translation[..., :1, :] - _stat(CAMERA_FRAME0_MEAN, features)) / _stat(
        CAMERA_FRAME0_STD, features
    )
    translation[..., 1:, :] = (translation[..., 1:, :] - _stat(CAMERA_VELOCITY_MEAN, features)) / _stat(
        CAMERA_VELOCITY_STD, features
    )
    return features


def destandardize_camera_features(features) -> torch.Tensor:
    """Inverse of `standardize_camera_features`."""
    features = _trajectory_tensor(features, "features", (NUM_CAMERA_FEATURES,), "(..., N, 9)").clone()
    translation = features[..., 6:9]
    translation[..., :1, :] = translation[..., :1, :] * _stat(CAMERA_FRAME0_STD, features) + _stat(
        CAMERA_FRAME0_MEAN, features
    )
    translation[..., 1:, :] = translation[..., 1:, :] * _stat(CAMERA_VELOCITY_STD, features) + _stat(
        CAMERA_VELOCITY_MEAN, features
    )
    return features


def encode_character(positions) -> torch.Tensor:
    """Character centre positions `(..., N, 3)` -> standardised velocities `(..., N, 3)`.

    Convention of the reference code (E.T. `char/*.npy` + DIRECTOR's character dataset): the trajectory is
    shifted so frame 0 is the origin, frame 0 keeps that (zero) position and frames i > 0 hold
    c[i] - c[i-1]; then *every* frame, frame 0 included, is standardised with the character velocity
    statistics. Frame 0 of the encoding is therefore always `-CHARACTER_VELOCITY_MEAN / CHARACTER_VELOCITY_STD`.
    """
    positions = _trajectory_tensor(positions, "character positions", (NUM_CHARACTER_FEATURES,), "(..., N, 3)")
    shifted = positions - positions[..., :1, :]
    velocity = torch.cat([shifted[..., :1, :], shifted[..., 1:, :] - shifted[..., :-1, :]], dim=-2)
    return (velocity - _stat(CHARACTER_VELOCITY_MEAN, velocity)) / _stat(CHARACTER_VELOCITY_STD, velocity)


def decode_character(encoded) -> torch.Tensor:
    """Inverse of `encode_character`: positions relative to frame 0 (the original offset is lost)."""
    encoded = _trajectory_tensor(encoded, "encoded character", (NUM_CHARACTER_FEATURES,), "(..., N, 3)")
    velocity = encoded * _stat(CHARACTER_VELOCITY_STD, encoded) + _stat(CHARACTER_VELOCITY_MEAN, encoded)
    velocity = torch.cat([torch.zeros_like(velocity[..., :1, :]), velocity[..., 1:, :]], dim=-2)
    return torch.cumsum(velocity, dim=-2)
