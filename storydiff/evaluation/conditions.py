"""Condition fidelity of ControlNet samples: how well a generated image follows the condition it was given.

`edge_iou` is the paper's measure for edge-like conditions (ControlNet reports IoU between the condition and the map
re-detected from the generated image): Canny edges of each generated image against the condition edge map, with a
small tolerance because a one-pixel shift of an otherwise perfect outline would score near zero at 32x32.
"""

from typing import Optional

import numpy as np
from scipy import ndimage

from storydiff.conditioning import canny_edges


def _as_images(images) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 3) or (N, H, W, 1) in [0, 1], got shape {array.shape}.")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
        raise ValueError("images must be finite and in [0, 1].")
    return array


def edge_iou(
    images,
    condition_edges,
    tolerance: int = 1,
    thresholds: tuple[float, float] = (100, 200),
    per_image: bool = False,
) -> float | np.ndarray:
    """Intersection over union of the Canny edges of generated `images` and the `condition_edges` they were given.

    Args:
        images: (N, H, W, 3) generated images in [0, 1].
        condition_edges: (N, H, W) edge maps (any value > 0.5 of the maximum is an edge; 0/1 or 0/255).
        tolerance (`int`): Both edge maps are dilated by a (2 * tolerance + 1) square before the IoU, so edges a
            pixel apart count as matching; 0 is the exact pixel IoU.
        thresholds: Canny's hysteresis thresholds for the generated images (those the conditions were made with).
        per_image (`bool`): Return the IoU of every image instead of the mean. An image where neither map has an
            edge scores 1.

    Returns:
        The mean IoU over images (or the per-image array).
    """
    images = _as_images(images)
    edges = np.asarray(condition_edges, dtype=np.float32)
    if edges.ndim == 4 and edges.shape[1] == 1:
        edges = edges[:, 0]
    if edges.shape != images.shape[:3]:
        raise ValueError(f"condition_edges must be (N, H, W) matching images {images.shape[:3]}, got {edges.shape}.")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0 (pixels), got {tolerance!r}.")
    structure: Optional[np.ndarray] = np.ones((2 * tolerance + 1,) * 2, dtype=bool) if tolerance else None
    scores = []
    for image, edge in zip(images, edges):
        generated = canny_edges(image, *thresholds) > 0
        given = edge > 0.5 * max(float(edge.max()), 1e-8) if edge.max() > 0 else np.zeros_like(edge, dtype=bool)
        if structure is not None:
            generated = ndimage.binary_dilation(generated, structure)
            given = ndimage.binary_dilation(given, structure)
        union = np.logical_or(generated, given).sum()
        scores.append(1.0 if union == 0 else np.logical_and(generated, given).sum() / union)
    scores = np.asarray(scores, dtype=np.float64)
    return scores if per_image else float(scores.mean())
