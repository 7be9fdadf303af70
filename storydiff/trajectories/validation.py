"""Input checks shared by the taggers, the exporters and the DIRECTOR pipeline.

They raise `TypeError` for a wrong type and `ValueError` for a wrong shape, non-finite values, non-rigid
poses or a trajectory longer than a model can take, each with a message that says what is allowed.
"""

from typing import Optional

import torch

from .features import as_float_tensor


def _check_length(num_frames: int, max_frames: Optional[int], what: str) -> None:
    if num_frames < 1:
        raise ValueError(f"{what} has no frames; at least 1 frame is required.")
    if max_frames is not None and num_frames > max_frames:
        raise ValueError(
            f"{what} has {num_frames} frames, longer than the model's maximum of {max_frames} frames; "
            f"crop or subsample it to at most {max_frames} frames."
        )


def check_poses(poses, max_frames: Optional[int] = None, atol: float = 1e-3, name: str = "camera trajectory"):
    """Validates camera-to-world poses of shape `(N, 4, 4)` or `(B, N, 4, 4)` and returns them as a float tensor.

    Each pose must be finite and rigid: `R @ R.T = I` and `det(R) = +1` within `atol`, last row `0 0 0 1`.
    """
    poses = as_float_tensor(poses, name)
    if poses.ndim not in (3, 4) or poses.shape[-2:] != (4, 4):
        raise ValueError(
            f"{name} must have shape (N, 4, 4) or (batch, N, 4, 4) (camera-to-world matrices), "
            f"got {tuple(poses.shape)}."
        )
    _check_length(poses.shape[-3], max_frames, name)
    if not torch.isfinite(poses).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    poses64 = poses.detach().to("cpu", torch.float64)
    last_row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    row_error = (poses64[..., 3, :] - last_row).abs().amax(dim=-1)
    if (row_error > atol).any():
        index = _first_bad_index(row_error > atol)
        raise ValueError(f"{name}: pose {index} is not rigid, its last row must be [0, 0, 0, 1].")
    rotation = poses64[..., :3, :3]
    identity = torch.eye(3, dtype=torch.float64)
    orthogonality_error = (rotation @ rotation.transpose(-1, -2) - identity).abs().amax(dim=(-1, -2))
    if (orthogonality_error > atol).any():
        index = _first_bad_index(orthogonality_error > atol)
        raise ValueError(
            f"{name}: pose {index} is not rigid, its rotation is not orthonormal "
            f"(max |R R^T - I| = {orthogonality_error.max().item():.3g} > {atol})."
        )
    # explicit triple product: much faster than torch.linalg.det on many small matrices
    determinant = (rotation[..., :, 0] * torch.linalg.cross(rotation[..., :, 1], rotation[..., :, 2], dim=-1)).sum(-1)
    if ((determinant - 1.0).abs() > atol).any():
        index = _first_bad_index((determinant - 1.0).abs() > atol)
        raise ValueError(
            f"{name}: pose {index} is a reflection (det(R) = {determinant[index].item():.3g}), not a rotation."
        )
    return poses


def check_positions(positions, max_frames: Optional[int] = None, name: str = "character trajectory"):
    """Validates character positions of shape `(N, 3)` or `(B, N, 3)` and returns them as a float tensor."""
    positions = as_float_tensor(positions, name)
    if positions.ndim not in (2, 3) or positions.shape[-1] != 3:
        raise ValueError(
            f"{name} must have shape (N, 3) or (batch, N, 3) (x, y, z per frame), got {tuple(positions.shape)}."
        )
    _check_length(positions.shape[-2], max_frames, name)
    if not torch.isfinite(positions).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return positions


def _first_bad_index(mask: torch.Tensor):
    index = tuple(int(i) for i in torch.nonzero(mask)[0])
    return index[0] if len(index) == 1 else index
