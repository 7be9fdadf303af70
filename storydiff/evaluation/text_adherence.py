"""Measuring text adherence in the captioned digits world (`storydiff.data.digits`).

`measure_canvas` reads back from an RGB canvas what a caption states about each digit:

* **where the digits are**: ink is the max over channels above `INK_THRESHOLD`; connected blobs of ink smaller
  than `MIN_BLOB_FRACTION` of the largest are noise; blobs of one palette colour form one digit, and digits
  whose boxes intersect are merged (world digits never overlap), so several digits are told apart by colour;
* **colour**: the palette colour nearest (as an RGB direction) to the digit's intensity-weighted mean colour;
* **size**: the height of the digit's bounding box, against a threshold halfway (geometrically) between the
  two sizes;
* **position**: the centre of mass, per axis the nearest of the three layout centres for the measured size;
* **digit**: the project's digit classifier (`storydiff.evaluation.digits`) on the digit's intensity, cropped
  to a square window around its box and resized to the classifier's input, as the 8x8 glyphs were.

`caption_adherence` scores generated canvases against what their prompts stated (per-attribute accuracy, their
mean and the fraction of canvases entirely right); `canvas_frechet_distance` is the Frechet distance between the
classifier features of located digits of generated canvases and of held-out real canvases.

Validation on real held-out canvases (`digits_world_arrays("test", 500, seed=0, ...)`, 32x32, the shipped
classifier; "changed" captions replace every attribute of every digit by another value):

| canvases, captions | digit | colour | position | size | overall | exact |
|---|---|---|---|---|---|---|
| 1 digit, true | 0.978 | 1.000 | 1.000 | 1.000 | 0.994 | 0.978 |
| 1 digit, every attribute changed | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 | 0.000 |
| 1 to 3 digits (1017 digits), true | 0.942 | 1.000 | 1.000 | 1.000 | 0.985 | 0.890 |
| 1 to 3 digits, every attribute changed | 0.125 | 0.243 | 0.116 | 0.175 | 0.165 | 0.000 |

Colour, position and size are read without error; the digit rate is the classifier's (0.981 on the 16x16 test
split; on canvases small digits read at 0.955 and large ones at 0.978, and 0.922 overall at 24x24, 0.992 at 48x48).
On changed multi-digit captions some attributes still agree because each stated digit is scored against the
measured digit that agrees with it most, which may be another digit of the canvas that has the new value.
The Frechet distance of 500 real train-split canvases to the test reference is 6.1 (500 canvases of the test split
with another seed: 3.0); blurring them with a 1-pixel Gaussian gives 40, uniform noise 507.
`tests/test_text_adherence.py` checks these rates with thresholds a little below them.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from storydiff.data.digits import (
    DIGIT_COLOURS,
    DIGIT_SIZE_FRACTIONS,
    DigitAttributes,
    digits_world_arrays,
    layout_centre,
    parse_caption,
)
from storydiff.metrics import frechet_distance

from .digits import DigitClassifier, _images_to_tensor, _logits_and_features, _resolve

ATTRIBUTE_NAMES = ("digit", "colour", "position", "size")
# Intensity (max over channels) above which a pixel is ink.
INK_THRESHOLD = 0.3
# Blobs of ink lighter than this fraction of the heaviest one are noise, not digits or parts of digits.
MIN_BLOB_FRACTION = 0.1
# Bounding-box height (fraction of the canvas side) between small and large: the geometric mean of the two.
SIZE_THRESHOLD = float(np.sqrt(DIGIT_SIZE_FRACTIONS["small"] * DIGIT_SIZE_FRACTIONS["large"]))
# Side of the classifier's crop relative to the longer side of the digit's bounding box. The classifier saw whole
# glyph boxes, and every glyph's ink spans its box's full height; 1.0 reads real canvases best (0.95: 0.974,
# 1.0: 0.978, 1.1: 0.954 class accuracy on 500 held-out 32x32 canvases).
CROP_SCALE = 1.0
_COLOUR_NAMES = tuple(DIGIT_COLOURS)
_COLOUR_DIRECTIONS = np.array([np.array(rgb) / np.linalg.norm(rgb) for rgb in DIGIT_COLOURS.values()])


@dataclass
class _LocatedDigit:
    colour: str
    position: str
    size: str
    mass: float
    ink: np.ndarray  # the digit's own intensity on the canvas (other digits' ink removed), (H, W) in [0, 1]
    window: tuple[float, float, float]  # (centre y, centre x, side) in pixels of the classifier's crop


def _nearest_colour(rgb: np.ndarray) -> str:
    return _COLOUR_NAMES[int(np.argmax(_COLOUR_DIRECTIONS @ rgb))]


def _position(centre_x: float, centre_y: float, size: str, resolution: int) -> str:
    """Per axis, the nearest of the three layout centres for this size."""
    left_x, top_y = layout_centre("top left", size, resolution)
    middle = resolution / 2
    offset = middle - left_x
    column = int(np.clip(np.round((centre_x - middle) / offset), -1, 1))
    row = int(np.clip(np.round((centre_y - middle) / (middle - top_y)), -1, 1))
    vertical = {-1: "top", 0: "", 1: "bottom"}[row]
    horizontal = {-1: "left", 0: "", 1: "right"}[column]
    return " ".join(part for part in (vertical, horizontal) if part) or "centre"


def _crop(ink: np.ndarray, centre_y: float, centre_x: float, side: float, size: int, supersample: int = 4):
    """The square window of `ink` with this centre and side (in pixels), resampled to size x size: bilinear
    samples, `supersample` x `supersample` per output pixel and averaged (antialiased), zero outside the canvas."""
    offsets = (np.arange(size * supersample) + 0.5) / (size * supersample) - 0.5
    rows = centre_y + offsets * side - 0.5  # pixel i is centred at i + 0.5
    columns = centre_x + offsets * side - 0.5
    grid_rows, grid_columns = np.meshgrid(rows, columns, indexing="ij")
    samples = ndimage.map_coordinates(ink, [grid_rows, grid_columns], order=1, mode="constant", cval=0.0)
    return samples.reshape(size, supersample, size, supersample).mean(axis=(1, 3)).astype(np.float32)


def _locate_digits(canvas: np.ndarray) -> list[_LocatedDigit]:
    """Digits on one canvas, float32 (H, W, 3) in [0, 1], without their class."""
    resolution = canvas.shape[0]
    intensity = canvas.max(axis=-1)
    blobs, num_blobs = ndimage.label(intensity > INK_THRESHOLD, structure=np.ones((3, 3)))
    if num_blobs == 0:
        return []
    blob_ids = np.arange(1, num_blobs + 1)
    masses = ndimage.sum_labels(intensity, blobs, blob_ids)
    kept = blob_ids[masses >= MIN_BLOB_FRACTION * masses.max()]

    # group the kept blobs by palette colour, then merge groups whose boxes intersect
    groups: dict[str, list[int]] = {}
    for blob in kept:
        mask = blobs == blob
        groups.setdefault(_nearest_colour(canvas[mask].T @ intensity[mask]), []).append(blob)
    masks = [np.isin(blobs, members) for members in groups.values()]
    merged = True
    while merged:
        merged = False
        boxes = [ndimage.find_objects(mask.astype(np.int32))[0] for mask in masks]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                if all(
                    box_a.start < box_b.stop and box_b.start < box_a.stop for box_a, box_b in zip(boxes[a], boxes[b])
                ):
                    masks[a] = masks[a] | masks.pop(b)
                    merged = True
                    break
            if merged:
                break

    located = []
    all_ink = np.any(masks, axis=0)
    for mask in masks:
        rows, columns = ndimage.find_objects(mask.astype(np.int32))[0]
        weights = intensity * mask
        mass = float(weights.sum())
        ys, xs = np.nonzero(mask)
        centre_y = float((weights[ys, xs] * (ys + 0.5)).sum() / mass)
        centre_x = float((weights[ys, xs] * (xs + 0.5)).sum() / mass)
        size = "large" if (rows.stop - rows.start) > SIZE_THRESHOLD * resolution else "small"
        # The digit's own ink and its faint antialiased rim (one pixel around it), but no other digit's ink.
        own = ndimage.binary_dilation(mask, structure=np.ones((3, 3))) & ~(all_ink & ~mask)
        located.append(
            _LocatedDigit(
                colour=_nearest_colour(canvas[mask].T @ intensity[mask]),
                position=_position(centre_x, centre_y, size, resolution),
                size=size,
                mass=mass,
                ink=intensity * own,
                window=(
                    (rows.start + rows.stop) / 2,
                    (columns.start + columns.stop) / 2,
                    max(rows.stop - rows.start, columns.stop - columns.start) * CROP_SCALE,
                ),
            )
        )
    return located


def _canvases(images) -> np.ndarray:
    """A batch of RGB canvases (numpy NHWC, torch NCHW, list of PIL or arrays) -> float32 (N, H, W, 3) in [0, 1]."""
    if not isinstance(images, (np.ndarray, torch.Tensor)) and hasattr(images, "__iter__"):
        # any sequence (a datasets column too); PIL images in any mode are read as RGB
        images = [image.convert("RGB") if hasattr(image, "convert") else image for image in images]
    tensor = _images_to_tensor(images)
    if tensor.shape[1] != 3:
        raise ValueError(f"Digits-world canvases are RGB (colour is an attribute), got {tensor.shape[1]} channel(s).")
    height, width = tensor.shape[-2:]
    if height != width:
        raise ValueError(f"Digits-world canvases are square, got {height}x{width}.")
    if height < 16:
        raise ValueError(f"Canvases of {height}x{width} are too small to measure; the world draws 24x24 and up.")
    return tensor.permute(0, 2, 3, 1).numpy()


def _one_canvas(image) -> np.ndarray:
    if hasattr(image, "convert"):  # PIL
        return _canvases([image])
    array = image.detach().cpu() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3:
        raise ValueError(f"`image` must be one canvas (H, W, 3) or (3, H, W), got shape {tuple(array.shape)}.")
    return _canvases(array[None])


def _classify(located: list[_LocatedDigit], classifier: DigitClassifier) -> tuple[np.ndarray, np.ndarray]:
    """Class predictions and features of located digits, each cropped at the classifier's input size."""
    size = classifier.config.sample_size
    crops = np.stack([_crop(digit.ink, *digit.window, size) for digit in located]).clip(0.0, 1.0)
    logits, features = _logits_and_features(crops[..., None], classifier, batch_size=512)
    return logits.argmax(axis=1), features


def _measure(canvases: np.ndarray, classifier: DigitClassifier):
    """Per canvas, a list of (DigitAttributes, mass), and the classifier features of every located digit."""
    located = [_locate_digits(canvas) for canvas in canvases]
    flat = [digit for digits in located for digit in digits]
    if not flat:
        return [[] for _ in located], np.zeros((0, classifier.num_features))
    classes, features = _classify(flat, classifier)
    measured, index = [], 0
    for digits in located:
        row = []
        for digit in digits:
            attributes = DigitAttributes(int(classes[index]), digit.colour, digit.position, digit.size)
            row.append((attributes, digit.mass))
            index += 1
        measured.append(row)
    return measured, features


def measure_canvas(image, classifier: Optional[DigitClassifier] = None) -> list[DigitAttributes]:
    """The digits on one canvas and their attributes, heaviest digit first.

    Args:
        image: One canvas: numpy (H, W, 3) float in [0, 1] or uint8, torch (3, H, W) in [0, 1], or a PIL image.
        classifier: A `DigitClassifier`; the shipped one by default.

    Returns:
        A `DigitAttributes` per located digit (empty when there is no ink).
    """
    measured, _ = _measure(_one_canvas(image), _resolve(classifier))
    return [attributes for attributes, _ in sorted(measured[0], key=lambda item: -item[1])]


def measure_canvases(images, classifier: Optional[DigitClassifier] = None) -> list[list[DigitAttributes]]:
    """`measure_canvas` of a batch (numpy (N, H, W, 3), torch (N, 3, H, W) or a list of PIL images), in one
    classifier pass."""
    measured, _ = _measure(_canvases(images), _resolve(classifier))
    return [[attributes for attributes, _ in sorted(row, key=lambda item: -item[1])] for row in measured]


def _stated(item) -> list[DigitAttributes]:
    if isinstance(item, str):
        return parse_caption(item)
    if isinstance(item, DigitAttributes):
        return [item]
    stated = list(item)
    if not stated or not all(isinstance(attributes, DigitAttributes) for attributes in stated):
        raise ValueError(
            "Each entry of `attributes_lists` must be a caption, a DigitAttributes or a non-empty list of them."
        )
    return stated


def _match(stated: list[DigitAttributes], measured: list[tuple[DigitAttributes, float]]) -> list:
    """For each stated digit, the measured digit it is scored against (or None): the assignment that agrees on
    the most attributes, the heavier digit on ties."""
    if not measured:
        return [None] * len(stated)
    total_mass = sum(mass for _, mass in measured)
    agreement = np.array(
        [
            [
                sum(getattr(s, name) == getattr(m, name) for name in ATTRIBUTE_NAMES) + 1e-3 * mass / total_mass
                for m, mass in measured
            ]
            for s in stated
        ]
    )
    stated_rows, measured_columns = linear_sum_assignment(agreement, maximize=True)
    matched = [None] * len(stated)
    for row, column in zip(stated_rows, measured_columns):
        matched[row] = measured[column][0]
    return matched


def caption_adherence(
    images,
    attributes_lists: Sequence[Union[str, DigitAttributes, Sequence[DigitAttributes]]],
    classifier: Optional[DigitClassifier] = None,
) -> dict[str, float]:
    """How well canvases show what their captions state.

    Each stated digit is compared with the measured digit that agrees with it most (one measured digit per
    stated one); a stated digit with no measured digit left is wrong on every attribute.

    Args:
        images: The canvases (numpy (N, H, W, 3) in [0, 1] or uint8, torch (N, 3, H, W), or a list of PIL images).
        attributes_lists: Per canvas, what was asked for: a world caption, a `DigitAttributes` or a list of them.
        classifier: A `DigitClassifier`; the shipped one by default.

    Returns:
        `digit`, `colour`, `position`, `size`: the fraction of stated digits whose attribute is right; `overall`:
        their mean; `exact`: the fraction of canvases with the stated number of digits and every attribute right;
        `count`: the fraction with the stated number of digits; `num_images`, `num_digits`.
    """
    canvases = _canvases(images)
    if isinstance(attributes_lists, (str, DigitAttributes)):
        raise TypeError("`attributes_lists` needs one entry per image (a list), not a single caption.")
    stated_lists = [_stated(item) for item in attributes_lists]
    if len(stated_lists) != canvases.shape[0]:
        raise ValueError(f"Got {canvases.shape[0]} images but {len(stated_lists)} attribute lists.")
    measured_lists, _ = _measure(canvases, _resolve(classifier))
    correct = dict.fromkeys(ATTRIBUTE_NAMES, 0)
    exact = count = 0
    for stated, measured in zip(stated_lists, measured_lists):
        right_count = len(measured) == len(stated)
        all_right = right_count
        for s, m in zip(stated, _match(stated, measured)):
            for name in ATTRIBUTE_NAMES:
                right = m is not None and getattr(s, name) == getattr(m, name)
                correct[name] += right
                all_right &= right
        exact += all_right
        count += right_count
    num_digits = sum(len(stated) for stated in stated_lists)
    scores = {name: correct[name] / num_digits for name in ATTRIBUTE_NAMES}
    scores["overall"] = float(np.mean([scores[name] for name in ATTRIBUTE_NAMES]))
    scores["exact"] = exact / len(stated_lists)
    scores["count"] = count / len(stated_lists)
    scores["num_images"] = len(stated_lists)
    scores["num_digits"] = num_digits
    return scores


def _digit_features(canvases: np.ndarray, classifier: DigitClassifier) -> np.ndarray:
    """Classifier features of every located digit; a canvas without ink counts as one empty crop."""
    located = [_locate_digits(canvas) for canvas in canvases]
    resolution = canvases.shape[1]
    empty = _LocatedDigit("red", "centre", "small", 0.0, np.zeros(canvases.shape[1:3], np.float32), (16, 16, 16))
    empty.window = (resolution / 2, resolution / 2, resolution / 2)
    flat = [digit for digits in located for digit in digits] + [empty for digits in located if not digits]
    return _classify(flat, classifier)[1]


_reference_cache: dict = {}


def canvas_frechet_distance(
    images,
    split: str = "test",
    num_reference: int = 500,
    classifier: Optional[DigitClassifier] = None,
    max_digits: int = 1,
    seed: int = 0,
) -> float:
    """Frechet distance between the classifier features of the digits located on `images` and on real world
    canvases (`digits_world_arrays(split, num_reference, seed, resolution, max_digits)` at the images'
    resolution; the held-out split by default).

    Every located digit contributes its features (a canvas with no ink contributes those of an empty crop).
    Like FID the estimate is biased upwards for few samples: compare numbers computed from equal counts.
    """
    classifier = _resolve(classifier)
    canvases = _canvases(images)
    resolution = canvases.shape[1]
    key = (id(classifier), split, num_reference, resolution, max_digits, seed)
    if key not in _reference_cache:
        reference, _, _ = digits_world_arrays(split, num_reference, seed, resolution, max_digits)
        reference_canvases = ((reference + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
        _reference_cache.clear()  # one reference at a time: they are cheap to rebuild and keyed by id()
        _reference_cache[key] = (classifier, _digit_features(reference_canvases, classifier))
    return frechet_distance(_digit_features(canvases, classifier), _reference_cache[key][1])


__all__ = [
    "ATTRIBUTE_NAMES",
    "caption_adherence",
    "canvas_frechet_distance",
    "measure_canvas",
    "measure_canvases",
]
