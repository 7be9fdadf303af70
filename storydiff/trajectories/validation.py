"""Input checks shared by the featurisation, the taggers, the exporters, the E.T. reader and the DIRECTOR pipeline.

They raise `TypeError` for a wrong type and `ValueError` for a wrong shape, non-finite values, non-rigid
poses or a trajectory longer than a model can take, each with a message that says what is allowed.
"""

import math
from typing import Optional, Tuple

import numpy as np
import torch

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def as_float_tensor(value, name: str = "input") -> torch.Tensor:
    """Returns `value` (torch tensor, numpy array or nested list) as a floating point tensor."""
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(np.ascontiguousarray(value))
    elif isinstance(value, (list, tuple)):
        try:
            tensor = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a numeric array, got a list that is not one ({error}).") from None
    else:
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}.")
    if tensor.dtype == torch.bool or not (tensor.is_floating_point() or tensor.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {tensor.dtype}.")
    if not tensor.is_floating_point():
        tensor = tensor.to(torch.float32)
    return tensor


def check_finite(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """Raises `ValueError` naming the first NaN or infinite entry of `tensor`; returns `tensor` unchanged."""
    finite = torch.isfinite(tensor)
    if not finite.all():
        index = _first_bad_index(~finite)
        raise ValueError(
            f"{name} contains NaN or infinite values (first at index {index}: {tensor[index].item()}); "
            "all values must be finite."
        )
    return tensor


def as_float_array(value, name: str, shape: Tuple[Optional[int], ...]) -> np.ndarray:
    """`value` as a finite float64 numpy array of `shape` (`None` = any size), e.g. `(None, 3)` for `(M, 3)`."""
    tensor = as_float_tensor(value, name)
    expected = "(" + ", ".join("M" if size is None else str(size) for size in shape) + ")"
    if tensor.ndim != len(shape) or any(size is not None and size != got for size, got in zip(shape, tensor.shape)):
        raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}.")
    return check_finite(tensor.detach().cpu().double(), name).numpy()


def check_real(
    value,
    name: str,
    *,
    above: Optional[float] = None,
    at_least: Optional[float] = None,
    at_most: Optional[float] = None,
) -> float:
    """A finite real scalar within the given bounds (`above` is exclusive), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    value = float(value)
    allowed = " and ".join(
        text
        for bound, text in ((above, f"> {above}"), (at_least, f">= {at_least}"), (at_most, f"<= {at_most}"))
        if bound is not None
    )
    if (
        not math.isfinite(value)
        or (above is not None and not value > above)
        or (at_least is not None and value < at_least)
        or (at_most is not None and value > at_most)
    ):
        raise ValueError(f"{name} must be a finite number{' ' + allowed if allowed else ''}, got {value}.")
    return value


def check_count(value, name: str, minimum: int = 1) -> int:
    """An int (not a bool) >= `minimum`, returned as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}.")
    return int(value)


def _check_length(num_frames: int, max_frames: Optional[int], what: str) -> None:
    if num_frames < 1:
        raise ValueError(f"{what} has no frames; at least 1 frame is required.")
    if max_frames is not None and num_frames > max_frames:
        raise ValueError(
            f"{what} has {num_frames} frames, longer than the model's maximum of {max_frames} frames; "
            f"crop or subsample it to at most {max_frames} frames."
        )


def find_non_rigid_pose(poses: torch.Tensor, atol: float = 1e-3):
    """`(index, reason)` of the first pose in `(..., 4, 4)` finite `poses` that is not rigid within `atol`, or None.

    A rigid pose has the last row `0 0 0 1` and a rotation with `R @ R.T = I` and `det(R) = +1`.
    """
    poses64 = poses.detach().to("cpu", torch.float64)
    last_row = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    row_error = (poses64[..., 3, :] - last_row).abs().amax(dim=-1)
    if (row_error > atol).any():
        return _first_bad_index(row_error > atol), "its last row must be [0, 0, 0, 1]"
    rotation = poses64[..., :3, :3]
    identity = torch.eye(3, dtype=torch.float64)
    orthogonality_error = (rotation @ rotation.transpose(-1, -2) - identity).abs().amax(dim=(-1, -2))
    if (orthogonality_error > atol).any():
        index = _first_bad_index(orthogonality_error > atol)
        return index, (
            f"its rotation is not orthonormal (max |R R^T - I| = {orthogonality_error[index].item():.6g} > {atol})"
        )
    # explicit triple product: much faster than torch.linalg.det on many small matrices
    determinant = (rotation[..., :, 0] * torch.linalg.cross(rotation[..., :, 1], rotation[..., :, 2], dim=-1)).sum(-1)
    if ((determinant - 1.0).abs() > atol).any():
        index = _first_bad_index((determinant - 1.0).abs() > atol)
        value = determinant[index].item()
        kind = "a reflection, not a rotation" if value < 0 else "a rotation has det(R) = +1"
        return index, f"det(R) = {value:.6g} ({kind})"
    return None


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
    non_rigid = find_non_rigid_pose(poses, atol)
    if non_rigid is not None:
        index, reason = non_rigid
        raise ValueError(f"{name}: pose {index} is not rigid, {reason}.")
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
