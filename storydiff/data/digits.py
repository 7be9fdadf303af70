"""The built-in data: scikit-learn's 8x8 handwritten digits with one fixed train/test split, and the captioned
digits world built from them.

The diffusion models and the evaluation classifier train on the "train" split; generated samples are compared
with the held-out "test" split. Keeping the split in one place keeps those roles from ever overlapping.

The captioned digits world (`digits_world`, `digits_world_arrays`) puts one or more of those glyphs on a black
RGB canvas with four attributes a caption states and `storydiff.evaluation.text_adherence` measures back: the
digit class, its colour (`DIGIT_COLOURS`), its position on a 3x3 layout (`DIGIT_POSITIONS`) and its size
(`DIGIT_SIZES`), e.g. "a small red 7 in the top left corner". The canvas renderer (`render_canvas`) takes
continuous placements (centre and height in pixels), so moving digits and derived conditions use the same
drawing code.
"""

import functools
import json
import re
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_DIGIT_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "test")


def _split_indices(split: str) -> np.ndarray:
    """Sorted indices into scikit-learn's digits of one split (stratified by class, 80/20, seed 0)."""
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_indices, test_indices = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=digits.target
    )
    return np.sort(train_indices if split == "train" else test_indices)


def digits_arrays(split: str = "train", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, resolution, resolution) in [-1, 1] and labels as int64 (N,).

    The 8x8 digits (values 0..16) are upsampled bilinearly. The split is stratified by class, 80/20, seed 0.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {DIGITS_SPLITS}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"`resolution` must be an int >= 8, got {resolution!r}.")
    digits = load_digits()
    chosen = _split_indices(split)
    images = torch.from_numpy(digits.images[chosen].astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    return images, labels


@functools.lru_cache(maxsize=2)
def _cached_glyphs(split: str) -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    chosen = _split_indices(split)
    glyphs = (digits.images[chosen].astype(np.float32) / 16.0).clip(0.0, 1.0)
    glyphs.setflags(write=False)
    labels = digits.target[chosen].astype(np.int64)
    labels.setflags(write=False)
    return glyphs, labels


def digit_glyphs(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The raw 8x8 glyphs of one split as float32 (N, 8, 8) in [0, 1] and their labels as int64 (N,).

    These are what the world draws; the arrays are shared and read-only.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {DIGITS_SPLITS}.")
    return _cached_glyphs(split)


# ----------------------------------------------------------------------------------------------------------------
# The captioned digits world: attributes, layout, renderer, captions.

# Six colours at least 32 degrees apart as RGB directions (the measurer reads colour as a direction, so brightness
# does not matter). Each has a channel at 1, so the glyph's intensity is the canvas' max over channels. Blue is
# lifted towards white to stay visible on black, equally far from cyan and magenta.
DIGIT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.3, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "magenta": (1.0, 0.0, 1.0),
    "cyan": (0.0, 1.0, 1.0),
}
DIGIT_POSITIONS = (
    "centre",
    "left",
    "right",
    "top",
    "bottom",
    "top left",
    "top right",
    "bottom left",
    "bottom right",
)
DIGIT_SIZES = ("small", "large")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Layout, as fractions of the canvas side. A digit's glyph box is square (the 8x8 glyphs are): small digits are
# 0.28 of the side and large ones 0.56 (twice as tall, so the bounding box tells them apart). A position puts the
# box `DIGIT_EDGE_MARGIN` from the edges it names (so "left" means near the left edge for either size), and the
# world jitters centres by up to `DIGIT_POSITION_JITTER` per axis. With these numbers every box stays inside the
# canvas and small digits on neighbouring positions never overlap (0.34 apart > 0.28 + 2 * 0.02).
DIGIT_SIZE_FRACTIONS = {"small": 0.28, "large": 0.56}
DIGIT_EDGE_MARGIN = 0.02
DIGIT_POSITION_JITTER = 0.02
# Below 24 pixels a small digit is under 7 pixels tall: no longer readable by the classifier.
MIN_WORLD_RESOLUTION = 24

# (column, row) of each position on the 3x3 layout; rows grow downwards like image rows.
_POSITION_GRID = {
    "centre": (0, 0),
    "left": (-1, 0),
    "right": (1, 0),
    "top": (0, -1),
    "bottom": (0, 1),
    "top left": (-1, -1),
    "top right": (1, -1),
    "bottom left": (-1, 1),
    "bottom right": (1, 1),
}


@dataclass(frozen=True)
class DigitAttributes:
    """What a caption says about one digit on a canvas, and what the measurer reads back.

    Args:
        digit (`int`): The class, 0..9.
        colour (`str`): A key of `DIGIT_COLOURS`.
        position (`str`): One of `DIGIT_POSITIONS`.
        size (`str`): One of `DIGIT_SIZES`.
    """

    digit: int
    colour: str
    position: str
    size: str

    def __post_init__(self):
        if isinstance(self.digit, bool) or not isinstance(self.digit, (int, np.integer)) or not 0 <= self.digit <= 9:
            raise ValueError(f"`digit` must be an int in 0..9, got {self.digit!r}.")
        object.__setattr__(self, "digit", int(self.digit))
        for name, value, allowed in (
            ("colour", self.colour, tuple(DIGIT_COLOURS)),
            ("position", self.position, DIGIT_POSITIONS),
            ("size", self.size, DIGIT_SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {allowed}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class DigitPlacement:
    """One glyph drawn on a canvas, in continuous pixel coordinates.

    Args:
        glyph (`np.ndarray`): 2-D intensities in [0, 1] (an 8x8 digit, or any other shape).
        colour (`tuple[float, float, float]`): RGB in [0, 1]; the glyph is drawn as intensity * colour.
        centre_xy (`tuple[float, float]`): Centre of the glyph's box in pixels; (0, 0) is the top left corner of
            the canvas and (resolution / 2, resolution / 2) its centre. Boxes may leave the canvas (they are
            clipped), so digits can move in and out of view.
        height_px (`float`): Height of the glyph's box in pixels; the width follows the glyph's aspect ratio.
    """

    glyph: np.ndarray
    colour: tuple[float, float, float]
    centre_xy: tuple[float, float]
    height_px: float

    def __post_init__(self):
        glyph = np.asarray(self.glyph, dtype=np.float32)
        if glyph.ndim != 2 or min(glyph.shape) < 1:
            raise ValueError(f"`glyph` must be a 2-D array of intensities, got shape {glyph.shape}.")
        if not np.isfinite(glyph).all() or glyph.min() < 0.0 or glyph.max() > 1.0:
            raise ValueError("`glyph` intensities must be finite and in [0, 1].")
        colour = tuple(float(c) for c in np.asarray(self.colour, dtype=np.float64).reshape(-1))
        if len(colour) != 3 or not all(0.0 <= c <= 1.0 for c in colour):
            raise ValueError(f"`colour` must be 3 RGB values in [0, 1], got {self.colour!r}.")
        centre = tuple(float(c) for c in np.asarray(self.centre_xy, dtype=np.float64).reshape(-1))
        if len(centre) != 2 or not all(np.isfinite(centre)):
            raise ValueError(f"`centre_xy` must be two finite pixel coordinates (x, y), got {self.centre_xy!r}.")
        if not np.isfinite(self.height_px) or self.height_px <= 0:
            raise ValueError(f"`height_px` must be a positive number of pixels, got {self.height_px!r}.")
        object.__setattr__(self, "glyph", glyph)
        object.__setattr__(self, "colour", colour)
        object.__setattr__(self, "centre_xy", centre)
        object.__setattr__(self, "height_px", float(self.height_px))

    @property
    def width_px(self) -> float:
        return self.height_px * self.glyph.shape[1] / self.glyph.shape[0]

    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the glyph's box in pixels."""
        x, y = self.centre_xy
        return (x - self.width_px / 2, y - self.height_px / 2, x + self.width_px / 2, y + self.height_px / 2)


def _check_resolution(resolution, minimum: int = 1) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < minimum:
        raise ValueError(f"`resolution` must be an int >= {minimum}, got {resolution!r}.")
    return int(resolution)


def render_canvas(placements: Sequence[DigitPlacement], resolution: int = 32, supersample: int = 4) -> np.ndarray:
    """Draw glyphs on a black RGB canvas: float32 (resolution, resolution, 3) in [0, 1].

    Each glyph is resized bilinearly to its box (nothing is drawn outside the box) and every pixel is the mean
    of `supersample` x `supersample` samples, so boxes at any sub-pixel centre and size come out
    antialiased and move smoothly. Glyphs combine by a per-channel maximum, so an overlap never exceeds 1.
    """
    resolution = _check_resolution(resolution)
    if isinstance(placements, DigitPlacement):
        placements = [placements]
    canvas = np.zeros((resolution, resolution, 3), dtype=np.float32)
    for placement in placements:
        if not isinstance(placement, DigitPlacement):
            raise TypeError(f"`placements` must hold DigitPlacement objects, got {type(placement).__name__}.")
        left, top, right, bottom = placement.box()
        columns = np.arange(max(0, int(np.floor(left))), min(resolution, int(np.ceil(right))))
        rows = np.arange(max(0, int(np.floor(top))), min(resolution, int(np.ceil(bottom))))
        if columns.size == 0 or rows.size == 0:
            continue  # entirely off the canvas
        offsets = (np.arange(supersample) + 0.5) / supersample
        sample_x = (columns[:, None] + offsets[None, :]).reshape(-1)
        sample_y = (rows[:, None] + offsets[None, :]).reshape(-1)
        glyph = placement.glyph
        # sample position -> glyph cell; samples outside the box are masked to zero
        u = (sample_x - left) / placement.width_px * glyph.shape[1]
        v = (sample_y - top) / placement.height_px * glyph.shape[0]
        inside = (v[:, None] >= 0) & (v[:, None] < glyph.shape[0]) & (u[None, :] >= 0) & (u[None, :] < glyph.shape[1])
        # bilinear between glyph cell centres (cell i is centred at i + 0.5), edge cells extended to the box edge
        grid_v, grid_u = np.meshgrid(v - 0.5, u - 0.5, indexing="ij")
        values = ndimage.map_coordinates(glyph, [grid_v, grid_u], order=1, mode="nearest")
        samples = np.where(inside, values, 0.0)
        intensity = samples.reshape(rows.size, supersample, columns.size, supersample).mean(axis=(1, 3))
        region = canvas[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
        np.maximum(region, intensity[..., None] * np.asarray(placement.colour, dtype=np.float32), out=region)
    return canvas


def layout_centre(position: str, size: str, resolution: int = 32) -> tuple[float, float]:
    """Nominal centre (x, y) in pixels of a digit of `size` at `position` (before the world's jitter)."""
    if position not in _POSITION_GRID:
        raise ValueError(f"Unknown position {position!r}; choose one of {DIGIT_POSITIONS}.")
    if size not in DIGIT_SIZE_FRACTIONS:
        raise ValueError(f"Unknown size {size!r}; choose one of {DIGIT_SIZES}.")
    resolution = _check_resolution(resolution)
    column, row = _POSITION_GRID[position]
    offset = resolution * (0.5 - DIGIT_SIZE_FRACTIONS[size] / 2 - DIGIT_EDGE_MARGIN)
    return (resolution / 2 + column * offset, resolution / 2 + row * offset)


def digit_height(size: str, resolution: int = 32) -> float:
    """Height in pixels of the glyph box of a digit of `size`."""
    if size not in DIGIT_SIZE_FRACTIONS:
        raise ValueError(f"Unknown size {size!r}; choose one of {DIGIT_SIZES}.")
    return DIGIT_SIZE_FRACTIONS[size] * _check_resolution(resolution)


def placement_for(
    attributes: DigitAttributes,
    glyph: np.ndarray,
    resolution: int = 32,
    rng: Optional[np.random.Generator] = None,
) -> DigitPlacement:
    """Where and how the world draws a digit with these attributes: the layout centre of its position and size,
    jittered by up to `DIGIT_POSITION_JITTER * resolution` pixels per axis when `rng` is given."""
    if not isinstance(attributes, DigitAttributes):
        raise TypeError(f"`attributes` must be DigitAttributes, got {type(attributes).__name__}.")
    resolution = _check_resolution(resolution)
    x, y = layout_centre(attributes.position, attributes.size, resolution)
    if rng is not None:
        jitter_x, jitter_y = rng.uniform(-1.0, 1.0, size=2) * DIGIT_POSITION_JITTER * resolution
        x, y = x + jitter_x, y + jitter_y
    return DigitPlacement(
        glyph=glyph,
        colour=DIGIT_COLOURS[attributes.colour],
        centre_xy=(x, y),
        height_px=digit_height(attributes.size, resolution),
    )


# ----------------------------------------------------------------------------------------------------------------
# Captions. Every template and phrase below is also what `parse_caption` reads, so the two cannot drift apart.

_POSITION_PHRASES = {
    "centre": ("in the centre", "in the middle", "in the center"),
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "near the top", "along the top"),
    "bottom": ("at the bottom", "near the bottom", "along the bottom"),
    "top left": ("in the top left corner", "in the upper left", "at the top left"),
    "top right": ("in the top right corner", "in the upper right", "at the top right"),
    "bottom left": ("in the bottom left corner", "in the lower left", "at the bottom left"),
    "bottom right": ("in the bottom right corner", "in the lower right", "at the bottom right"),
}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# One digit per template; the first is the canonical wording (`caption_for(..., rng=None)`).
CAPTION_TEMPLATES = (
    "a {size} {colour} {digit} {position}",
    "the digit {digit}, {size} and {colour}, {position}",
    "a {colour} {digit} {position}, {size}",
    "{position}, a {size} {colour} {digit}",
    "a {size} {digit} in {colour} {position}",
    "{size} {colour} number {digit} {position}",
)
CAPTION_JOINER = " and "


def _alternation(phrases) -> str:
    # longest first, so "at the top left" is not read as "at the top" followed by junk
    return "|".join(re.escape(phrase) for phrase in sorted(phrases, key=len, reverse=True))


def _template_pattern(template: str) -> "re.Pattern":
    slots = {
        "size": _alternation([word for words in _SIZE_WORDS.values() for word in words]),
        "colour": _alternation(DIGIT_COLOURS),
        "digit": _alternation([str(digit) for digit in range(10)] + list(DIGIT_WORDS)),
        "position": _alternation([phrase for phrases in _POSITION_PHRASES.values() for phrase in phrases]),
    }
    pattern = ""
    for literal, slot in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if slot:
            pattern += f"(?P<{slot}>{slots[slot]})"
    return re.compile(pattern)


_TEMPLATE_PATTERNS = tuple(_template_pattern(template) for template in CAPTION_TEMPLATES)
_PHRASE_TO_POSITION = {phrase: position for position, phrases in _POSITION_PHRASES.items() for phrase in phrases}
_WORD_TO_SIZE = {word: size for size, words in _SIZE_WORDS.items() for word in words}


def _as_attributes_list(attributes_list) -> list[DigitAttributes]:
    if isinstance(attributes_list, DigitAttributes):
        attributes_list = [attributes_list]
    attributes_list = list(attributes_list)
    if len(attributes_list) == 0:
        raise ValueError("A caption needs at least one DigitAttributes.")
    for attributes in attributes_list:
        if not isinstance(attributes, DigitAttributes):
            raise TypeError(f"Expected DigitAttributes, got {type(attributes).__name__}.")
    return attributes_list


def caption_for(
    attributes_list: Union[DigitAttributes, Sequence[DigitAttributes]],
    rng: Optional[Union[np.random.Generator, int]] = None,
) -> str:
    """A caption stating every attribute of every digit, e.g. "a small red 7 in the top left corner".

    With a generator (or an int seed) each digit gets a random template and random wording (numeral or word,
    synonyms of sizes and positions); with `rng=None` every digit gets the canonical wording. Several digits are
    joined with " and ", in the order given.
    """
    attributes_list = _as_attributes_list(attributes_list)
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    parts = []
    for attributes in attributes_list:
        size_words, position_phrases = _SIZE_WORDS[attributes.size], _POSITION_PHRASES[attributes.position]
        if rng is None:
            template, digit, size, position = (
                CAPTION_TEMPLATES[0],
                str(attributes.digit),
                size_words[0],
                position_phrases[0],
            )
        else:
            template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
            digit = str(attributes.digit) if rng.random() < 0.5 else DIGIT_WORDS[attributes.digit]
            size = size_words[rng.integers(len(size_words))]
            position = position_phrases[rng.integers(len(position_phrases))]
        parts.append(template.format(size=size, colour=attributes.colour, digit=digit, position=position))
    return CAPTION_JOINER.join(parts)


def _parse_one(segment: str) -> Optional[DigitAttributes]:
    for pattern in _TEMPLATE_PATTERNS:
        match = pattern.fullmatch(segment)
        if match is not None:
            digit = match["digit"]
            return DigitAttributes(
                digit=int(digit) if digit.isdigit() else DIGIT_WORDS.index(digit),
                colour=match["colour"],
                position=_PHRASE_TO_POSITION[match["position"]],
                size=_WORD_TO_SIZE[match["size"]],
            )
    return None


def _parse_from(text: str, start: int, joins: list[int]) -> Optional[list[DigitAttributes]]:
    # The joiner also occurs inside a template ("large and blue"), so try each place it occurs as the end of
    # the first digit's phrase and keep the reading where every phrase parses.
    for end in [join for join in joins if join > start] + [len(text)]:
        first = _parse_one(text[start:end])
        if first is None:
            continue
        if end == len(text):
            return [first]
        rest = _parse_from(text, end + len(CAPTION_JOINER), joins)
        if rest is not None:
            return [first] + rest
    return None


def parse_caption(text: str) -> list[DigitAttributes]:
    """Read the digits a world caption states (any template and wording `caption_for` writes), in order.

    Case, surrounding spaces, repeated spaces and a final full stop are ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    normalised = " ".join(text.lower().split()).rstrip(".").strip()
    joins = [match.start() for match in re.finditer(re.escape(CAPTION_JOINER), normalised)]
    parsed = _parse_from(normalised, 0, joins) if normalised else None
    if parsed is None:
        raise ValueError(
            f"Cannot read {text!r} as a digits-world caption. Captions look like "
            f"{caption_for(DigitAttributes(7, 'red', 'top left', 'small'))!r}, one phrase per digit joined by "
            f"{CAPTION_JOINER.strip()!r}; colours {tuple(DIGIT_COLOURS)}, positions {DIGIT_POSITIONS}, sizes "
            f"{DIGIT_SIZES}."
        )
    return parsed


# ----------------------------------------------------------------------------------------------------------------
# The world: random attribute sets, drawn from one split's glyphs.

_SPLIT_STREAMS = {"train": 0, "test": 1}


def _boxes_overlap(a: DigitAttributes, b: DigitAttributes, resolution: int) -> bool:
    """Whether the boxes of two digits can overlap anywhere within the world's jitter."""
    (ax, ay), (bx, by) = layout_centre(a.position, a.size, resolution), layout_centre(b.position, b.size, resolution)
    reach = (digit_height(a.size, resolution) + digit_height(b.size, resolution)) / 2
    reach += 2 * DIGIT_POSITION_JITTER * resolution
    return abs(ax - bx) < reach and abs(ay - by) < reach


def _sample_attributes(rng: np.random.Generator, num_digits: int) -> list[DigitAttributes]:
    digits = rng.integers(0, 10, size=num_digits)
    colours = rng.choice(len(DIGIT_COLOURS), size=num_digits, replace=False)
    positions = rng.choice(len(DIGIT_POSITIONS), size=num_digits, replace=False)
    colour_names = list(DIGIT_COLOURS)
    # (Overlaps are checked on a canvas of side 1: the layout scales with the resolution.)
    # Large digits only fit beside few others: redraw the sizes a few times, then make the clashing ones small
    # (small digits on distinct positions never overlap).
    for _ in range(10):
        sizes = [DIGIT_SIZES[index] for index in rng.integers(0, len(DIGIT_SIZES), size=num_digits)]
        attributes = [
            DigitAttributes(int(digit), colour_names[colour], DIGIT_POSITIONS[position], size)
            for digit, colour, position, size in zip(digits, colours, positions, sizes)
        ]
        if not any(_boxes_overlap(a, b, 1) for a, b in combinations(attributes, 2)):
            return attributes
    clashing = {
        i
        for a, b in combinations(range(num_digits), 2)
        if _boxes_overlap(attributes[a], attributes[b], 1)
        for i in (a, b)
    }
    return [
        DigitAttributes(item.digit, item.colour, item.position, "small") if index in clashing else item
        for index, item in enumerate(attributes)
    ]


def _check_world_arguments(split, num_samples, seed, resolution, max_digits) -> None:
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {DIGITS_SPLITS}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive int, got {num_samples!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, np.integer))
        or resolution < MIN_WORLD_RESOLUTION
    ):
        raise ValueError(
            f"`resolution` must be an int >= {MIN_WORLD_RESOLUTION} (smaller digits are not readable), got "
            f"{resolution!r}."
        )
    limit = min(len(DIGIT_COLOURS), len(DIGIT_POSITIONS))
    if isinstance(max_digits, bool) or not isinstance(max_digits, (int, np.integer)) or not 1 <= max_digits <= limit:
        raise ValueError(
            f"`max_digits` must be an int in 1..{limit} (each digit on a canvas has its own colour and position), "
            f"got {max_digits!r}."
        )


def _world_samples(split: str, num_samples: int, seed: int, resolution: int, max_digits: int):
    """Yields (canvas as uint8 (H, W, 3), caption, attributes list) for each sample."""
    _check_world_arguments(split, num_samples, seed, resolution, max_digits)
    glyphs, labels = digit_glyphs(split)
    glyphs_of_class = [np.flatnonzero(labels == digit) for digit in range(NUM_DIGIT_CLASSES)]
    for index in range(num_samples):
        # One stream per sample: sample i is the same whatever num_samples is, and (but for the pixels) whatever
        # the resolution is, because all placements are drawn in fractions of the canvas.
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], max_digits, index])
        num_digits = int(rng.integers(1, max_digits + 1))
        attributes_list = _sample_attributes(rng, num_digits)
        placements = [
            placement_for(attributes, glyphs[rng.choice(glyphs_of_class[attributes.digit])], resolution, rng)
            for attributes in attributes_list
        ]
        canvas = render_canvas(placements, resolution)
        # quantised once here, so the arrays and the Dataset's PNG images hold exactly the same values
        pixels = np.round(canvas * 255.0).astype(np.uint8)
        yield pixels, caption_for(attributes_list, rng), attributes_list


def digits_world_arrays(
    split: str = "train", num_samples: int = 1000, seed: int = 0, resolution: int = 32, max_digits: int = 1
) -> tuple[torch.Tensor, list[str], list[list[DigitAttributes]]]:
    """The captioned digits world as arrays, for training without PIL: images float32 (N, 3, H, W) in [-1, 1],
    captions, and each canvas' list of `DigitAttributes`. The same samples as `digits_world` with the same
    arguments (identical pixel values)."""
    images, captions, attributes = [], [], []
    for pixels, caption, attributes_list in _world_samples(split, num_samples, seed, resolution, max_digits):
        images.append(pixels)
        captions.append(caption)
        attributes.append(attributes_list)
    array = np.stack(images).astype(np.float32) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous(), captions, attributes


def attributes_to_json(attributes_list: Sequence[DigitAttributes]) -> str:
    """A list of `DigitAttributes` as a JSON string (a list of dicts)."""
    return json.dumps([attributes.to_dict() for attributes in _as_attributes_list(attributes_list)])


def attributes_from_records(records) -> list[DigitAttributes]:
    """`DigitAttributes` from the `attributes` column of `digits_world` (a list of dicts) or its JSON string."""
    if isinstance(records, str):
        records = json.loads(records)
    return [DigitAttributes(**record) for record in records]


def digits_world(
    split: str = "train", num_samples: int = 1000, seed: int = 0, resolution: int = 32, max_digits: int = 1
):
    """The captioned digits world as a `datasets.Dataset` with columns `image` (RGB PIL images), `text` (the
    caption) and `attributes` (per canvas, a list of {"digit", "colour", "position", "size"} dicts; turn a row's
    into `DigitAttributes` with `attributes_from_records`).

    Glyphs of the "train" split come only from the digits train split, "test" ones only from the held-out split.
    Deterministic given all arguments; sample i does not depend on `num_samples`. Each canvas holds 1 to
    `max_digits` digits, uniformly; digits on one canvas have distinct colours and positions and boxes that do
    not overlap (so they can be told apart by colour).
    """
    import datasets
    import PIL.Image

    rows = {"image": [], "text": [], "attributes": []}
    for pixels, caption, attributes_list in _world_samples(split, num_samples, seed, resolution, max_digits):
        rows["image"].append(PIL.Image.fromarray(pixels))
        rows["text"].append(caption)
        rows["attributes"].append([attributes.to_dict() for attributes in attributes_list])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "attributes": datasets.List(
                {
                    "digit": datasets.Value("int64"),
                    "colour": datasets.Value("string"),
                    "position": datasets.Value("string"),
                    "size": datasets.Value("string"),
                }
            ),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)
