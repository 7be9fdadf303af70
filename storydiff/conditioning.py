"""Condition images for ControlNets: computed maps (Canny edges, soft edges, a depth-style map, coarse position and
colour masks) and `prepare_condition`, which turns any user map into the tensor a ControlNet takes.

A ControlNet is only as good as the alignment between its condition and the image it was trained on, so
`prepare_condition` resizes with the geometry of the training images' preprocessing
(`storydiff.training.text_image_data.image_to_tensor`: shorter side to the target, centre crop). A condition
prepared here lands on the same pixels as the image content it describes, for any channel count (segmentation,
depth, pose, ...), and the resampling is chosen per map: nearest for label maps (no label value is invented),
bilinear or area for continuous maps.

Inputs are one image (or a list of them for the map functions): a PIL image, a numpy array (H, W) or (H, W, C), or
a torch tensor (H, W) or (C, H, W). Values are uint8 (0..255), uint16 (0..65535), bool, or float in [0, 1].
`output_type` picks what comes back: "np" (numpy, (H, W) for one channel), "pil" or "pt" (float32 (C, H, W) in
[0, 1], ready for `prepare_condition` or a ControlNet).

Only `canny_edges` needs OpenCV (opencv-python-headless, a storydiff dependency); the rest uses numpy and scipy.
"""

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

ImageLike = Union[Image.Image, np.ndarray, torch.Tensor]
OUTPUT_TYPES = ("np", "pil", "pt")
RESAMPLE_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "area": Image.BOX}
DEPTH_METHODS = ("distance", "luminance")

# PIL modes whose pixels numpy reads as they are; palette ("P"), bilevel and the other colour spaces are converted
_PIL_MODES_KEPT = ("L", "LA", "RGB", "RGBA", "I;16", "F")
# ITU-R 601 luma, the weights PIL's convert("L") uses
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _as_float_array(image, name: str) -> np.ndarray:
    """One image as float32 (H, W, C) in [0, 1], or a ValueError that says what is allowed."""
    if isinstance(image, Image.Image):
        if image.mode == "1":
            image = image.convert("L")
        elif image.mode in ("P", "PA"):
            # a palette image's colours are its meaning (e.g. colour-coded segmentation); keep transparency if any
            image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
        elif image.mode not in _PIL_MODES_KEPT:
            image = image.convert("RGB")
        array = np.asarray(image)
    elif isinstance(image, torch.Tensor):
        if image.ndim not in (2, 3):
            raise ValueError(
                f"A torch `{name}` must be (H, W) or (C, H, W), got shape {tuple(image.shape)}; "
                "pass a batch as a list of images."
            )
        tensor = image.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # numpy has no bfloat16
        array = (tensor.permute(1, 2, 0) if tensor.ndim == 3 else tensor).numpy()
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(
                f"A numpy `{name}` must be (H, W) or (H, W, C), got shape {image.shape}; "
                "pass a batch as a list of images."
            )
        array = image
    else:
        raise TypeError(f"`{name}` must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}.")
    if array.ndim == 2:
        array = array[:, :, None]
    if 0 in array.shape:
        raise ValueError(f"`{name}` is empty: (H, W, C) = {array.shape}.")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"`{name}` has dtype {array.dtype}; use uint8 (0..255), uint16 (0..65535), bool or float in [0, 1]."
        )
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` has non-finite values (NaN or inf).")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"A float `{name}` must be in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "map a [-1, 1] image with (x + 1) / 2, or normalise the map first."
        )
    return array


def _colour_channels(array: np.ndarray, name: str) -> np.ndarray:
    """The grey or RGB channels of an image, alpha dropped: edges of transparency are not edges of the picture."""
    channels = array.shape[2]
    if channels in (2, 4):
        return array[:, :, : channels - 1]
    if channels in (1, 3):
        return array
    raise ValueError(
        f"`{name}` must be grey or RGB, optionally with alpha (1 to 4 channels), got {channels} channels."
    )


def _luminance(colour: np.ndarray) -> np.ndarray:
    return colour[:, :, 0] if colour.shape[2] == 1 else colour @ _LUMA_WEIGHTS


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")


def _check_sigma(sigma, name: str) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0 (0: no blur), got {sigma!r}.")
    return float(sigma)


def _emit(array: np.ndarray, output_type: str):
    """A float32 map in [0, 1], (H, W) or (H, W, C), as numpy ((H, W) for one channel), PIL or torch (C, H, W)."""
    if array.ndim == 2:
        array = array[:, :, None]
    if output_type == "pt":
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    if output_type == "np":
        return array[:, :, 0] if array.shape[2] == 1 else array
    if array.shape[2] not in (1, 3):
        raise ValueError(f"A PIL image holds 1 or 3 channels, this map has {array.shape[2]}; use output_type 'np'.")
    pixels = np.rint(array * 255.0).astype(np.uint8)
    return Image.fromarray(pixels[:, :, 0] if array.shape[2] == 1 else pixels)


def canny_edges(
    image: Union[ImageLike, Sequence[ImageLike]],
    low_threshold: float = 100,
    high_threshold: float = 200,
    *,
    aperture_size: int = 3,
    l2_gradient: bool = False,
    output_type: str = "np",
):
    """OpenCV's Canny edges: the condition of the Canny ControlNets.

    Like the ControlNet Canny annotator, Canny runs on the 8-bit RGB image itself (OpenCV takes the strongest
    channel's gradient), so an edge between two colours of equal brightness is still found.

    Args:
        image: One image (grey or RGB, alpha is ignored) or a list of images, which gives a list back.
        low_threshold (`float`), high_threshold (`float`): Hysteresis thresholds on the gradient magnitude of the
            0..255 image; 0 <= low <= high. Pixels above `high_threshold` start edges, pixels above
            `low_threshold` extend them.
        aperture_size (`int`): Sobel aperture, 3, 5 or 7.
        l2_gradient (`bool`): Use the L2 gradient magnitude instead of OpenCV's default L1.
        output_type (`str`): "np": uint8 (H, W) with edges at 255; "pil": an "L" image; "pt": float32 (1, H, W)
            with edges at 1.
    """
    _check_output_type(output_type)
    for name, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if not 0 <= low_threshold <= high_threshold:
        # OpenCV would swap them silently; a swapped pair is more likely a mistake than a wish
        raise ValueError(
            f"Canny thresholds must satisfy 0 <= low_threshold <= high_threshold, got {low_threshold} and "
            f"{high_threshold}."
        )
    if aperture_size not in (3, 5, 7):
        raise ValueError(f"`aperture_size` must be 3, 5 or 7, got {aperture_size!r}.")
    if isinstance(image, (list, tuple)):
        kwargs = {"aperture_size": aperture_size, "l2_gradient": l2_gradient, "output_type": output_type}
        return [canny_edges(one, low_threshold, high_threshold, **kwargs) for one in image]
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "canny_edges needs OpenCV (a storydiff dependency, missing from this environment): "
            "pip install opencv-python-headless. Or use edge_map, which needs no OpenCV."
        ) from error
    colour = _colour_channels(_as_float_array(image, "image"), "image")
    pixels = np.rint(colour * 255.0).astype(np.uint8)
    pixels = np.ascontiguousarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    edges = cv2.Canny(
        pixels, float(low_threshold), float(high_threshold), apertureSize=aperture_size, L2gradient=bool(l2_gradient)
    )
    if output_type == "np":
        return edges
    return _emit(edges.astype(np.float32) / 255.0, output_type)


def edge_map(image: Union[ImageLike, Sequence[ImageLike]], *, blur_sigma: float = 1.0, output_type: str = "np"):
    """A soft edge map (a sketch/HED-style condition) without OpenCV: the Sobel gradient magnitude in [0, 1].

    The image is blurred first (`blur_sigma` pixels, 0 for none) so that noise and single-pixel texture do not
    dominate; the magnitude is the largest over the colour channels, divided by the image's own maximum, so the
    strongest edge is 1 (a flat image gives zeros). It is a gradient, not a learned edge detector: expect
    texture edges that HED would suppress.

    Args:
        image: One image (grey or RGB, alpha is ignored) or a list of images, which gives a list back.
        blur_sigma (`float`): Standard deviation in pixels of the Gaussian blur applied first.
        output_type (`str`): "np": float32 (H, W); "pil": an "L" image; "pt": float32 (1, H, W).
    """
    _check_output_type(output_type)
    blur_sigma = _check_sigma(blur_sigma, "blur_sigma")
    if isinstance(image, (list, tuple)):
        return [edge_map(one, blur_sigma=blur_sigma, output_type=output_type) for one in image]
    colour = _colour_channels(_as_float_array(image, "image"), "image")
    if blur_sigma > 0:
        colour = ndimage.gaussian_filter(colour, sigma=(blur_sigma, blur_sigma, 0), mode="nearest")
    # "nearest" padding: the image border itself is not an edge
    gradient_x = ndimage.sobel(colour, axis=1, mode="nearest")
    gradient_y = ndimage.sobel(colour, axis=0, mode="nearest")
    magnitude = np.hypot(gradient_x, gradient_y).max(axis=2)
    peak = float(magnitude.max())
    # below this a "gradient" is float rounding of a flat image; normalising it would draw noise at full strength
    edges = magnitude / peak if peak > 1e-6 else np.zeros_like(magnitude)
    return _emit(edges.astype(np.float32), output_type)


def depth_style_map(
    image: Union[ImageLike, Sequence[ImageLike]],
    *,
    method: str = "distance",
    threshold: float = 0.5,
    blur_sigma: float = 0.0,
    output_type: str = "np",
):
    """A depth-like single-channel map computed by a formula, near = 1 (the convention of depth ControlNets).

    This is a stand-in for a depth condition where no depth estimator is available or needed (the digits world,
    tests), not a depth estimator: it knows nothing about 3-D geometry.

    - "distance": for ink on a dark background (a digits world canvas, or a foreground mask). Pixels whose brightest
      colour channel is above `threshold` are foreground; each one's value is its distance to the nearest
      background pixel, divided by the largest such distance, so every object bulges towards the viewer and thick
      strokes come nearer than thin ones. Background is 0; an image that is all foreground is all 1.
    - "luminance": brightness as nearness, stretched to [0, 1] (a flat image gives zeros). A crude guess for photos.

    Args:
        image: One image (grey or RGB, alpha is ignored; a bool mask works for "distance") or a list of images,
            which gives a list back.
        method (`str`): "distance" or "luminance".
        threshold (`float`): Foreground threshold in [0, 1] of the "distance" method.
        blur_sigma (`float`): Standard deviation in pixels of a Gaussian blur of the map (0: none), to soften the
            terraces of the distance transform.
        output_type (`str`): "np": float32 (H, W); "pil": an "L" image; "pt": float32 (1, H, W).
    """
    _check_output_type(output_type)
    if method not in DEPTH_METHODS:
        raise ValueError(f"`method` must be one of {DEPTH_METHODS}, got {method!r}.")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"`threshold` must be a number in [0, 1), got {threshold!r}.")
    blur_sigma = _check_sigma(blur_sigma, "blur_sigma")
    if isinstance(image, (list, tuple)):
        kwargs = {"method": method, "threshold": threshold, "blur_sigma": blur_sigma, "output_type": output_type}
        return [depth_style_map(one, **kwargs) for one in image]
    colour = _colour_channels(_as_float_array(image, "image"), "image")
    if method == "distance":
        foreground = colour.max(axis=2) > threshold
        if foreground.all():
            depth = np.ones(foreground.shape, dtype=np.float32)  # no background to measure a distance to
        else:
            depth = ndimage.distance_transform_edt(foreground).astype(np.float32)
    else:
        depth = _luminance(colour)
        depth = depth - depth.min()
    if blur_sigma > 0:
        depth = ndimage.gaussian_filter(depth, sigma=blur_sigma, mode="nearest")
    peak = float(depth.max())
    depth = depth / peak if peak > 1e-6 else np.zeros_like(depth)
    return _emit(depth.astype(np.float32), output_type)


def position_mask(
    boxes: Sequence[Sequence[float]],
    resolution: Union[int, tuple[int, int]],
    colours: Optional[Sequence[Sequence[float]]] = None,
    *,
    output_type: str = "np",
):
    """A coarse position (and colour) mask: each box filled, the condition of a "where and which colour" ControlNet.

    Boxes are `(left, top, right, bottom)` in pixels, the convention of `DigitPlacement.box()` in
    `storydiff.data.digits`: (0, 0) is the top left corner of the canvas and boxes may be fractional or leave it.
    A pixel is filled by the fraction of its area inside the box, so sub-pixel positions stay visible, and boxes
    combine by a per-channel maximum, as glyphs do on a digits world canvas.

    Args:
        boxes: `(left, top, right, bottom)` per object.
        resolution (`int` or `(height, width)`): The canvas size in pixels.
        colours: One colour per box (e.g. RGB in [0, 1]: `DIGIT_COLOURS[attributes.colour]`), all with the same
            number of channels; None gives a one-channel mask of 1s. No boxes give an all-zero mask with 1 channel,
            or 3 (RGB) if `colours` is given.
        output_type (`str`): "np": float32 (H, W) for one channel, else (H, W, C); "pil": an "L" or "RGB" image;
            "pt": float32 (C, H, W).
    """
    _check_output_type(output_type)
    height, width = (resolution, resolution) if not isinstance(resolution, (tuple, list)) else tuple(resolution)
    for value in (height, width):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`resolution` must be a positive int or (height, width) of them, got {resolution!r}.")
    boxes = [np.asarray(box, dtype=np.float64).reshape(-1) for box in boxes]
    for index, box in enumerate(boxes):
        if box.size != 4 or not np.isfinite(box).all() or box[0] > box[2] or box[1] > box[3]:
            raise ValueError(
                f"Box {index} must be 4 finite pixel coordinates (left, top, right, bottom) with left <= right and "
                f"top <= bottom, got {box.tolist()}."
            )
    if colours is None:
        colours = np.ones((len(boxes), 1), dtype=np.float32)
    else:
        colours = [np.asarray(colour, dtype=np.float32).reshape(-1) for colour in colours]
        if len(colours) != len(boxes):
            raise ValueError(f"Got {len(boxes)} boxes but {len(colours)} colours; give one colour per box.")
        if len({colour.size for colour in colours}) > 1 or any(colour.size == 0 for colour in colours):
            raise ValueError(
                f"All colours must have the same, non-zero number of channels, got {[c.size for c in colours]}."
            )
        if any(not np.isfinite(colour).all() or colour.min() < 0 or colour.max() > 1 for colour in colours):
            raise ValueError("Colour values must be finite and in [0, 1].")
        colours = np.stack(colours) if colours else np.zeros((0, 3), dtype=np.float32)
    mask = np.zeros((height, width, colours.shape[1]), dtype=np.float32)
    columns, rows = np.arange(width), np.arange(height)
    for (left, top, right, bottom), colour in zip(boxes, colours):
        # the length of each pixel's [i, i + 1) inside [left, right), per axis; their product is the area covered
        cover_x = np.clip(np.minimum(right, columns + 1) - np.maximum(left, columns), 0.0, 1.0)
        cover_y = np.clip(np.minimum(bottom, rows + 1) - np.maximum(top, rows), 0.0, 1.0)
        coverage = (cover_y[:, None] * cover_x[None, :]).astype(np.float32)
        np.maximum(mask, coverage[:, :, None] * colour, out=mask)
    return _emit(mask, output_type)


def prepare_condition(
    condition: ImageLike,
    height: int,
    width: int,
    *,
    channels: Optional[int] = None,
    resample: str = "nearest",
    center_crop: bool = True,
) -> torch.Tensor:
    """Any condition map (segmentation, depth, pose, edges, masks; any channel count) as float32 (C, H, W) in
    [0, 1] at the model's resolution, aligned with the image it conditions.

    The geometry is that of the training images' preprocessing (`image_to_tensor` of
    `storydiff.training.text_image_data`): the smallest scale at which the map covers `height` x `width` (the
    shorter side to the target, for a square target), then a centre crop (or the top left one with
    `center_crop=False`). Values are kept as they are: nothing is normalised, and channels are never added or
    dropped.

    Args:
        condition: A PIL image, a numpy array (H, W) or (H, W, C), or a torch tensor (H, W) or (C, H, W); uint8,
            uint16, bool or float in [0, 1].
        height (`int`), width (`int`): The target size in pixels.
        channels (`int`, *optional*): The channel count the ControlNet expects (its `conditioning_channels`); a
            condition with another count is an error, never broadcast.
        resample (`str`): "nearest" for label maps and masks (every output value is an input value), "bilinear" or
            "area" (a box average, best when shrinking) for continuous maps such as depth or soft edges.
        center_crop (`bool`): Crop the centre (True) or the top left corner, as the image preprocessing does.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if resample not in RESAMPLE_FILTERS:
        raise ValueError(f"`resample` must be one of {tuple(RESAMPLE_FILTERS)}, got {resample!r}.")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise ValueError(f"`channels` must be a positive int or None, got {channels!r}.")
    array = _as_float_array(condition, "condition")
    found = array.shape[2]
    if channels is not None and found != channels:
        raise ValueError(
            f"condition has {found} channel{'s' if found != 1 else ''}, the ControlNet expects {channels} "
            "(conditioning_channels); convert the map to that many channels first."
        )
    source_height, source_width = array.shape[:2]
    # image_to_tensor's rule, with a rectangle: scale to cover the target, round like it does, then crop
    scale = max(height / source_height, width / source_width)
    resized_width = max(width, round(source_width * scale))
    resized_height = max(height, round(source_height * scale))
    if (resized_height, resized_width) != (source_height, source_width):
        # PIL per channel, in float ("F" images): the same sampling grid as the image's PIL resize, any channel
        # count and no 8-bit rounding of the values
        array = np.stack(
            [
                np.asarray(
                    Image.fromarray(np.ascontiguousarray(array[:, :, c])).resize(
                        (resized_width, resized_height), RESAMPLE_FILTERS[resample]
                    )
                )
                for c in range(found)
            ],
            axis=2,
        )
    left, top = ((resized_width - width) // 2, (resized_height - height) // 2) if center_crop else (0, 0)
    array = np.clip(array[top : top + height, left : left + width], 0.0, 1.0)  # float rounding of the filters
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
