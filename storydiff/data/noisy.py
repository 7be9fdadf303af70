"""Corrupted versions of storydiff's data worlds, with the truth kept beside the corruption.

Coherence-aware diffusion learns from noisy condition data; to measure what it gains, the noise must be known. Two
worlds:

* `noisy_digit_labels`: scikit-learn's digits (`storydiff.data.digits.digits_arrays`) with a known fraction of the
  labels replaced by a different, random class.
* `noisy_digits_world`: the captioned digits world (`storydiff.data.digits.digits_world`) with a known fraction of
  the captions made *wrong* (the caption of another canvas that shows other digits in other colours) or *vague*
  (a caption that says nothing the caption-adherence measurer could check, see `VAGUE_CAPTIONS`).

Both are deterministic given their arguments, and the corrupted rows are an exact count (`round(fraction * N)`),
not a random number of them.
"""

from typing import Optional

import numpy as np
import torch

from storydiff.data.digits import NUM_DIGIT_CLASSES, attributes_from_records, digits_arrays, digits_world

# Captions that keep almost no information about a canvas: no digit, colour, position or size, so that
# `storydiff.data.digits.parse_caption` cannot read them and `caption_adherence` cannot count them as describing
# anything. (A colour-only caption would still carry one of the four attributes: not vague enough to be a clean
# "says nothing" class.)
VAGUE_CAPTIONS = (
    "a digit",
    "a number on a canvas",
    "a handwritten digit",
    "a picture of a number",
    "a digit on a black background",
    "a number",
)
CORRUPTIONS = ("none", "wrong", "vague")

# Separate random streams per use, so that changing one fraction does not reshuffle the other choices.
_LABEL_STREAM, _WORLD_STREAM = 101, 102


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {value!r}.")
    return float(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    return int(seed)


def noisy_digit_labels(
    fraction: float, seed: int = 0, split: str = "train", resolution: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The digits of one split with `round(fraction * N)` labels replaced by a different class, drawn uniformly.

    Returns:
        `(images, given_labels, true_labels)`: images float32 (N, 1, resolution, resolution) in [-1, 1] (as
        `digits_arrays`), the labels a noisy data set would give (int64 (N,)) and the true ones.
    """
    fraction = _check_fraction("fraction", fraction)
    rng = np.random.default_rng([_check_seed(seed), _LABEL_STREAM])
    images, true_labels = digits_arrays(split, resolution)
    num_samples = len(true_labels)
    corrupted = rng.permutation(num_samples)[: round(fraction * num_samples)]
    # adding 1..9 modulo 10 gives every other class with equal probability, never the true one
    shifts = rng.integers(1, NUM_DIGIT_CLASSES, size=len(corrupted))
    given = true_labels.clone()
    given[torch.from_numpy(corrupted)] = (true_labels[torch.from_numpy(corrupted)] + torch.from_numpy(shifts)) % 10
    return images, given, true_labels


def _digit_colour_pairs(records) -> set:
    return {(item.digit, item.colour) for item in attributes_from_records(records)}


def noisy_digits_world(
    num_samples: int = 1000,
    resolution: int = 32,
    fraction_wrong: float = 0.2,
    fraction_vague: float = 0.2,
    seed: int = 0,
    split: str = "train",
    max_digits: int = 1,
    world_seed: Optional[int] = None,
):
    """The captioned digits world with a known fraction of its captions corrupted.

    Args:
        num_samples (`int`): Canvases (the first `num_samples` of `digits_world(split, ..., seed=world_seed)`).
        resolution (`int`, defaults to 32): Canvas side in pixels; 32 is what the shipped digits text-to-image
            model is trained at.
        fraction_wrong (`float`): Fraction of captions replaced by the caption of another canvas that shares no
            (digit, colour) pair with this one, so it states a different digit in a different colour.
        fraction_vague (`float`): Fraction of captions replaced by one of `VAGUE_CAPTIONS`.
        seed (`int`): Chooses which rows are corrupted and how.
        split (`str`): "train" or "test" (the glyphs' split).
        max_digits (`int`, defaults to 1): Digits per canvas, as `digits_world`.
        world_seed (`int`, *optional*): Seed of the canvases; `seed` when None.

    Returns:
        A `datasets.Dataset` with columns `image` (RGB PIL), `text` (the given caption), `true_text` (the canvas'
        own caption) and `corruption` ("none", "wrong" or "vague").
    """
    import datasets

    fraction_wrong = _check_fraction("fraction_wrong", fraction_wrong)
    fraction_vague = _check_fraction("fraction_vague", fraction_vague)
    if fraction_wrong + fraction_vague > 1.0:
        raise ValueError(f"`fraction_wrong` + `fraction_vague` must be <= 1, got {fraction_wrong} + {fraction_vague}.")
    seed = _check_seed(seed)
    world = digits_world(split, num_samples, seed if world_seed is None else world_seed, resolution, max_digits)
    true_captions = world["text"]
    records = world["attributes"]
    rng = np.random.default_rng([seed, _WORLD_STREAM])
    order = rng.permutation(num_samples)
    num_wrong, num_vague = round(fraction_wrong * num_samples), round(fraction_vague * num_samples)
    corruption = np.array(["none"] * num_samples, dtype=object)
    corruption[order[:num_wrong]] = "wrong"
    corruption[order[num_wrong : num_wrong + num_vague]] = "vague"

    captions = list(true_captions)
    pairs = [_digit_colour_pairs(record) for record in records]
    for index in np.flatnonzero(corruption == "wrong"):
        captions[index] = true_captions[_different_canvas(rng, pairs, index)]
    for index in np.flatnonzero(corruption == "vague"):
        captions[index] = VAGUE_CAPTIONS[rng.integers(len(VAGUE_CAPTIONS))]

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "true_text": datasets.Value("string"),
            "corruption": datasets.Value("string"),
        }
    )
    rows = {"image": world["image"], "text": captions, "true_text": true_captions, "corruption": list(corruption)}
    return datasets.Dataset.from_dict(rows, features=features)


def _shares_digit_or_colour(first: set, second: set) -> bool:
    digits, colours = {digit for digit, _ in first}, {colour for _, colour in first}
    return any(digit in digits or colour in colours for digit, colour in second)


def _different_canvas(rng: np.random.Generator, pairs: list, index: int) -> int:
    """A random other canvas none of whose digits or colours appear on canvas `index`: its caption is wrong about
    both. Random draws find one at once in a large world; a full scan covers small ones."""
    for _ in range(100):
        other = int(rng.integers(len(pairs)))
        if not _shares_digit_or_colour(pairs[other], pairs[index]):
            return other
    candidates = [other for other in range(len(pairs)) if not _shares_digit_or_colour(pairs[other], pairs[index])]
    if not candidates:
        raise ValueError(
            f"No canvas among {len(pairs)} shows other digits in other colours than canvas {index}: use more "
            "`num_samples` to make wrong captions."
        )
    return candidates[int(rng.integers(len(candidates)))]
