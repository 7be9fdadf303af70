"""Captioned moving digits: the digits world in time, for training and measuring a Video LDM in miniature.

Each video shows one glyph of the digits world (`storydiff.data.digits`) moving in a straight line at constant
speed across a black canvas, with a caption that states it, e.g. "a large red 3 moves quickly to the left". The
attributes are those of a world digit without the position (which now changes) plus a direction
(`MOTION_DIRECTIONS`) and a speed (`MOTION_SPEEDS`); `storydiff.evaluation.video` measures them back.

Three ways to get the set, all with the same pixels:

* `moving_digits_arrays`: float32 tensors (N, 3, F, H, W) in [-1, 1], the layout of diffusers' video UNets;
* `moving_digits`: a `datasets.Dataset` with a `frames` column (a list of RGB PIL images per video);
* `write_moving_digits_folder`: a video folder on disk (`<video_id>/frame_000.png ...` and a `metadata.jsonl` of
  `{"video": ..., "text": ...}` lines), which `load_video_folder` reads, as it reads a user's own videos.
"""

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from storydiff.atomic_files import atomic_write

from .digits import (
    _SIZE_WORDS,
    _SPLIT_STREAMS,
    DIGIT_COLOURS,
    DIGIT_EDGE_MARGIN,
    DIGIT_SIZE_FRACTIONS,
    DIGIT_SIZES,
    DIGIT_WORDS,
    DIGITS_SPLITS,
    MIN_WORLD_RESOLUTION,
    NUM_DIGIT_CLASSES,
    DigitPlacement,
    _alternation,
    digit_glyphs,
    digit_height,
    render_canvas,
)

MOTION_DIRECTIONS = ("left", "right", "up", "down")
# Speeds in fractions of the canvas side per frame. A box of side s stays `DIGIT_EDGE_MARGIN` (0.02) inside the
# canvas while its centre is in [0.02 + s/2, 0.98 - s/2]: a span of 0.40 for a large digit (0.56) and 0.68 for a
# small one (0.28). Over 8 frames (7 steps) "quickly" travels 7 * 0.055 = 0.385 <= 0.40 and "slowly" 7 * 0.03 =
# 0.21, so every digit stays whole on the canvas for 8 frames, and the two speeds differ by almost 2x.
MOTION_SPEEDS = {"slowly": 0.03, "quickly": 0.055}
# The longest video in which every size at every speed fits (8 with the numbers above).
MAX_MOVING_DIGIT_FRAMES = 1 + int(
    np.floor((1.0 - 2 * DIGIT_EDGE_MARGIN - max(DIGIT_SIZE_FRACTIONS.values())) / max(MOTION_SPEEDS.values()) + 1e-9)
)
# Unit step (x, y) of each direction; image rows grow downwards, so "down" is +y.
_DIRECTION_STEPS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# The world's streams are keyed [seed, split, max_digits (1..6), index]; this value in the third slot keeps a
# video's draws apart from every world canvas'.
_MOVING_DIGITS_STREAM = 100
METADATA_FILE = "metadata.jsonl"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class MovingDigitAttributes:
    """What a caption says about the one digit of a moving-digits video, and what the video metrics read back.

    Args:
        digit (`int`): The class, 0..9.
        colour (`str`): A key of `DIGIT_COLOURS`.
        size (`str`): One of `DIGIT_SIZES`.
        direction (`str`): One of `MOTION_DIRECTIONS` (on screen: "up" is towards the top of the frame).
        speed (`str`): A key of `MOTION_SPEEDS`.
    """

    digit: int
    colour: str
    size: str
    direction: str
    speed: str

    def __post_init__(self):
        if isinstance(self.digit, bool) or not isinstance(self.digit, (int, np.integer)) or not 0 <= self.digit <= 9:
            raise ValueError(f"`digit` must be an int in 0..9, got {self.digit!r}.")
        object.__setattr__(self, "digit", int(self.digit))
        for name, value, allowed in (
            ("colour", self.colour, tuple(DIGIT_COLOURS)),
            ("size", self.size, DIGIT_SIZES),
            ("direction", self.direction, MOTION_DIRECTIONS),
            ("speed", self.speed, tuple(MOTION_SPEEDS)),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}; choose one of {allowed}.")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Motion.


def _check_num_frames(num_frames) -> int:
    if (
        isinstance(num_frames, bool)
        or not isinstance(num_frames, (int, np.integer))
        or not 2 <= num_frames <= MAX_MOVING_DIGIT_FRAMES
    ):
        raise ValueError(
            f"`num_frames` must be an int in 2..{MAX_MOVING_DIGIT_FRAMES} (a video needs two frames to move, and a "
            f"large digit moving quickly leaves the canvas after {MAX_MOVING_DIGIT_FRAMES}), got {num_frames!r}."
        )
    return int(num_frames)


def motion_path(
    attributes: MovingDigitAttributes,
    num_frames: int = 8,
    resolution: int = 32,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """Centres (x, y) in pixels of the digit's box in each frame: float64 (num_frames, 2).

    The digit moves `MOTION_SPEEDS[speed] * resolution` pixels per frame in its direction, and its box stays
    `DIGIT_EDGE_MARGIN` inside the canvas on the whole path. With `rng` the start along the motion and the
    coordinate across it are uniform over the places where that holds; without it the path is centred.
    """
    if not isinstance(attributes, MovingDigitAttributes):
        raise TypeError(f"`attributes` must be MovingDigitAttributes, got {type(attributes).__name__}.")
    num_frames = _check_num_frames(num_frames)
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"`resolution` must be a positive int, got {resolution!r}.")
    # Everything in fractions of the side, so a video's path does not depend on the resolution.
    half = DIGIT_SIZE_FRACTIONS[attributes.size] / 2
    low, high = DIGIT_EDGE_MARGIN + half, 1.0 - DIGIT_EDGE_MARGIN - half
    speed = MOTION_SPEEDS[attributes.speed]
    travel = speed * (num_frames - 1)
    along_fraction, across_fraction = rng.random(2) if rng is not None else (0.5, 0.5)
    step_x, step_y = _DIRECTION_STEPS[attributes.direction]
    sign = step_x + step_y  # +1 towards larger coordinates, -1 towards smaller
    start = low + along_fraction * (high - low - travel)
    if sign < 0:
        start += travel
    along = start + sign * speed * np.arange(num_frames)
    across = np.full(num_frames, low + across_fraction * (high - low))
    xs, ys = (along, across) if step_x != 0 else (across, along)
    return np.stack([xs, ys], axis=1) * resolution


def render_moving_digit(
    attributes: MovingDigitAttributes, glyph: np.ndarray, centres: np.ndarray, resolution: int = 32
) -> np.ndarray:
    """The frames of one video: float32 (F, resolution, resolution, 3) in [0, 1], the glyph drawn at each centre
    with the world's renderer, colour and size."""
    height = digit_height(attributes.size, resolution)
    colour = DIGIT_COLOURS[attributes.colour]
    return np.stack(
        [render_canvas([DigitPlacement(glyph, colour, tuple(centre), height)], resolution) for centre in centres]
    )


# ----------------------------------------------------------------------------------------------------------------
# Captions. Every template and phrase below is also what `parse_motion_caption` reads.

_DIRECTION_PHRASES = {
    "left": ("to the left", "left", "leftwards"),
    "right": ("to the right", "right", "rightwards"),
    "up": ("up", "upwards", "towards the top"),
    "down": ("down", "downwards", "towards the bottom"),
}
_SPEED_WORDS = {"slowly": ("slowly", "gently"), "quickly": ("quickly", "fast")}
# The first is the canonical wording (`motion_caption_for(..., rng=None)`).
MOTION_CAPTION_TEMPLATES = (
    "a {size} {colour} {digit} moves {speed} {direction}",
    "a {size} {colour} {digit} moving {direction} {speed}",
    "the digit {digit}, {size} and {colour}, moves {direction} {speed}",
    "a {colour} {digit}, {size}, goes {speed} {direction}",
    "{size} {colour} number {digit} sliding {direction}, {speed}",
)
_PHRASE_TO_DIRECTION = {phrase: direction for direction, phrases in _DIRECTION_PHRASES.items() for phrase in phrases}
_WORD_TO_SPEED = {word: speed for speed, words in _SPEED_WORDS.items() for word in words}
_WORD_TO_SIZE = {word: size for size, words in _SIZE_WORDS.items() for word in words}


def _motion_pattern(template: str) -> "re.Pattern":
    slots = {
        "size": _alternation(_WORD_TO_SIZE),
        "colour": _alternation(DIGIT_COLOURS),
        "digit": _alternation([str(digit) for digit in range(NUM_DIGIT_CLASSES)] + list(DIGIT_WORDS)),
        "direction": _alternation(_PHRASE_TO_DIRECTION),
        "speed": _alternation(_WORD_TO_SPEED),
    }
    pattern = ""
    for literal, slot in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if slot:
            pattern += f"(?P<{slot}>{slots[slot]})"
    return re.compile(pattern)


_MOTION_PATTERNS = tuple(_motion_pattern(template) for template in MOTION_CAPTION_TEMPLATES)


def motion_caption_for(
    attributes: MovingDigitAttributes, rng: Optional[Union[np.random.Generator, int]] = None
) -> str:
    """A caption stating every attribute of a moving digit, e.g. "a large red 3 moves quickly to the left".

    With a generator (or an int seed) the template and wording (numeral or word, synonyms of size, speed and
    direction) are random; with `rng=None` the wording is canonical. Digits are written as the world writes them.
    """
    if not isinstance(attributes, MovingDigitAttributes):
        raise TypeError(f"`attributes` must be MovingDigitAttributes, got {type(attributes).__name__}.")
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    choices = (
        MOTION_CAPTION_TEMPLATES,
        (str(attributes.digit), DIGIT_WORDS[attributes.digit]),
        _SIZE_WORDS[attributes.size],
        _SPEED_WORDS[attributes.speed],
        _DIRECTION_PHRASES[attributes.direction],
    )
    if rng is None:
        template, digit, size, speed, direction = (options[0] for options in choices)
    else:
        template, digit, size, speed, direction = (options[rng.integers(len(options))] for options in choices)
    return template.format(size=size, colour=attributes.colour, digit=digit, speed=speed, direction=direction)


def parse_motion_caption(text: str) -> MovingDigitAttributes:
    """Read what a moving-digits caption states (any template and wording `motion_caption_for` writes).

    Case, surrounding spaces, repeated spaces and a final full stop are ignored.
    """
    if not isinstance(text, str):
        raise TypeError(f"`text` must be a string, got {type(text).__name__}.")
    normalised = " ".join(text.lower().split()).rstrip(".").strip()
    for pattern in _MOTION_PATTERNS:
        match = pattern.fullmatch(normalised)
        if match is not None:
            digit = match["digit"]
            return MovingDigitAttributes(
                digit=int(digit) if digit.isdigit() else DIGIT_WORDS.index(digit),
                colour=match["colour"],
                size=_WORD_TO_SIZE[match["size"]],
                direction=_PHRASE_TO_DIRECTION[match["direction"]],
                speed=_WORD_TO_SPEED[match["speed"]],
            )
    example = motion_caption_for(MovingDigitAttributes(3, "red", "large", "left", "quickly"))
    raise ValueError(
        f"Cannot read {text!r} as a moving-digits caption. Captions look like {example!r}; colours "
        f"{tuple(DIGIT_COLOURS)}, sizes {DIGIT_SIZES}, speeds {tuple(MOTION_SPEEDS)}, directions {MOTION_DIRECTIONS}."
    )


# ----------------------------------------------------------------------------------------------------------------
# The set: one video per index, drawn from one split's glyphs.


def _check_arguments(split, num_videos, seed, num_frames, resolution) -> None:
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {DIGITS_SPLITS}.")
    if isinstance(num_videos, bool) or not isinstance(num_videos, (int, np.integer)) or num_videos < 1:
        raise ValueError(f"`num_videos` must be a positive int, got {num_videos!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"`seed` must be a non-negative int, got {seed!r}.")
    _check_num_frames(num_frames)
    if (
        isinstance(resolution, bool)
        or not isinstance(resolution, (int, np.integer))
        or resolution < MIN_WORLD_RESOLUTION
    ):
        raise ValueError(
            f"`resolution` must be an int >= {MIN_WORLD_RESOLUTION} (smaller digits are not readable), got "
            f"{resolution!r}."
        )


def _moving_digit_samples(split: str, num_videos: int, seed: int, num_frames: int, resolution: int):
    """Yields (frames as uint8 (F, H, W, 3), caption, MovingDigitAttributes) for each video."""
    _check_arguments(split, num_videos, seed, num_frames, resolution)
    glyphs, labels = digit_glyphs(split)
    glyphs_of_class = [np.flatnonzero(labels == digit) for digit in range(NUM_DIGIT_CLASSES)]
    colours = tuple(DIGIT_COLOURS)
    speeds = tuple(MOTION_SPEEDS)
    for index in range(int(num_videos)):
        # One stream per video: video i is the same whatever num_videos is, and its attributes, glyph and caption
        # are the same whatever the resolution and num_frames are.
        rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], _MOVING_DIGITS_STREAM, index])
        attributes = MovingDigitAttributes(
            digit=int(rng.integers(NUM_DIGIT_CLASSES)),
            colour=colours[rng.integers(len(colours))],
            size=DIGIT_SIZES[rng.integers(len(DIGIT_SIZES))],
            direction=MOTION_DIRECTIONS[rng.integers(len(MOTION_DIRECTIONS))],
            speed=speeds[rng.integers(len(speeds))],
        )
        glyph = glyphs[rng.choice(glyphs_of_class[attributes.digit])]
        centres = motion_path(attributes, num_frames, resolution, rng)
        frames = render_moving_digit(attributes, glyph, centres, resolution)
        # quantised once here, so the arrays, the Dataset's and the folder's PNG frames hold the same values
        pixels = np.round(frames * 255.0).astype(np.uint8)
        yield pixels, motion_caption_for(attributes, rng), attributes


def moving_digits_arrays(
    split: str = "train", num_videos: int = 1000, seed: int = 0, num_frames: int = 8, resolution: int = 32
) -> tuple[torch.Tensor, list[str], list[MovingDigitAttributes]]:
    """Captioned moving digits as arrays, for training without PIL: videos float32 (N, 3, F, H, W) in [-1, 1]
    (channels before frames, as diffusers' video UNets take them), captions, and each video's
    `MovingDigitAttributes`.

    Glyphs of the "train" split come only from the digits train split, "test" ones only from the held-out split.
    Deterministic given all arguments; video i does not depend on `num_videos`. Digit, colour, size, direction and
    speed are uniform; captions use random templates and wording (`parse_motion_caption` reads them all).
    """
    videos, captions, attributes = [], [], []
    for pixels, caption, video_attributes in _moving_digit_samples(split, num_videos, seed, num_frames, resolution):
        videos.append(pixels)
        captions.append(caption)
        attributes.append(video_attributes)
    array = np.stack(videos).astype(np.float32) / 255.0 * 2.0 - 1.0
    return torch.from_numpy(array).permute(0, 4, 1, 2, 3).contiguous(), captions, attributes


def _frames_feature():
    import datasets

    # datasets >= 4 names the list feature `List`; older versions only have `Sequence`.
    return datasets.List(datasets.Image()) if hasattr(datasets, "List") else datasets.Sequence(datasets.Image())


def moving_digits(
    split: str = "train", num_videos: int = 1000, seed: int = 0, num_frames: int = 8, resolution: int = 32
):
    """Captioned moving digits as a `datasets.Dataset` with columns `frames` (per video a list of RGB PIL images),
    `text` (the caption) and the stated attributes `digit`, `colour`, `size`, `direction`, `speed`. The same videos
    as `moving_digits_arrays` with the same arguments (identical pixel values)."""
    import datasets
    import PIL.Image

    names = ("digit", "colour", "size", "direction", "speed")
    rows = {"frames": [], "text": [], **{name: [] for name in names}}
    for pixels, caption, attributes in _moving_digit_samples(split, num_videos, seed, num_frames, resolution):
        rows["frames"].append([PIL.Image.fromarray(frame) for frame in pixels])
        rows["text"].append(caption)
        for name in names:
            rows[name].append(getattr(attributes, name))
    features = datasets.Features(
        {
            "frames": _frames_feature(),
            "text": datasets.Value("string"),
            "digit": datasets.Value("int64"),
            **{name: datasets.Value("string") for name in names[1:]},
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


# ----------------------------------------------------------------------------------------------------------------
# The video folder: <folder>/<video_id>/frame_000.png ... and <folder>/metadata.jsonl.


def write_moving_digits_folder(
    folder: Union[str, Path],
    split: str = "train",
    num_videos: int = 1000,
    seed: int = 0,
    num_frames: int = 8,
    resolution: int = 32,
) -> Path:
    """Write the set as a video folder that `load_video_folder` (and so a training script) reads: one subfolder
    per video (`video_000000/frame_000.png ...`) and `metadata.jsonl` with a `{"video": ..., "text": ...}` line
    per video. The folder must be new or empty. `metadata.jsonl` is written last and atomically, so an
    interrupted write leaves a folder that does not load rather than a partial set. Returns the folder."""
    import PIL.Image

    _check_arguments(split, num_videos, seed, num_frames, resolution)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise FileExistsError(f"{folder} already exists and is not an empty folder; write the videos to a new one.")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (pixels, caption, _) in enumerate(
        _moving_digit_samples(split, num_videos, seed, num_frames, resolution)
    ):
        video_id = f"video_{index:06d}"
        (folder / video_id).mkdir()
        for frame_index, frame in enumerate(pixels):
            PIL.Image.fromarray(frame).save(folder / video_id / f"frame_{frame_index:03d}.png")
        lines.append(json.dumps({"video": video_id, "text": caption}))
    with atomic_write(folder / METADATA_FILE) as file:
        file.write("\n".join(lines) + "\n")
    return folder


def _natural_key(name: str) -> list:
    # numbers compare as numbers, so unpadded names keep their order too (frame_2 before frame_10)
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_metadata(folder: Path) -> list[tuple[str, str]]:
    metadata = folder / METADATA_FILE
    if not metadata.is_file():
        raise FileNotFoundError(
            f"No {METADATA_FILE} in {folder}. A video folder holds one subfolder of frames per video and a "
            f'{METADATA_FILE} with one line per video: {{"video": "<subfolder>", "text": "<caption>"}}.'
        )
    entries = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata} line {number} is not JSON ({error.msg}).") from None
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("video"), str)
            or not isinstance(record.get("text"), str)
        ):
            raise ValueError(
                f'{metadata} line {number} must be an object with string fields "video" and "text", got {line!r}.'
            )
        entries.append((record["video"], record["text"]))
    if not entries:
        raise ValueError(f"{metadata} lists no videos.")
    return entries


def _frame_paths(folder: Path, video_id: str) -> list[str]:
    """The frame files of one video, sorted by name, after checking they exist and share one size."""
    import PIL.Image

    video_folder = (folder / video_id).resolve()
    if video_folder.parent != folder.resolve():
        raise ValueError(f"Video {video_id!r} in {folder / METADATA_FILE} must name a subfolder of {folder}.")
    if not video_folder.is_dir():
        raise FileNotFoundError(f"{folder / METADATA_FILE} lists video {video_id!r} but {video_folder} is no folder.")
    frames = sorted(
        (path for path in video_folder.iterdir() if path.is_file() and path.suffix.lower() in FRAME_SUFFIXES),
        key=lambda path: _natural_key(path.name),
    )
    if not frames:
        raise ValueError(f"Video folder {video_folder} holds no frames (image files ending in {FRAME_SUFFIXES}).")
    sizes = {}
    for path in frames:
        with PIL.Image.open(path) as image:  # reads the header only
            sizes.setdefault(image.size, path.name)
    if len(sizes) > 1:
        found = ", ".join(f"{width}x{height} ({name})" for (width, height), name in sizes.items())
        raise ValueError(f"The frames of {video_folder} must all have one size, got {found}.")
    return [str(path) for path in frames]


def load_video_folder(folder: Union[str, Path]):
    """Read a video folder (`write_moving_digits_folder`'s format, or a user's own videos in it) as a
    `datasets.Dataset` with columns `frames` (per video a list of PIL images, in file-name order) and `text`.

    The format: `folder/metadata.jsonl` with one `{"video": "<video_id>", "text": "<caption>"}` line per video,
    and `folder/<video_id>/` holding that video's frames as image files of one size (`frame_000.png`, ...;
    names sort with numbers compared as numbers). Frames are read from disk when a row is accessed.
    """
    import datasets

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"No video folder at {folder}.")
    rows = {"frames": [], "text": []}
    for video_id, text in _read_metadata(folder):
        rows["frames"].append(_frame_paths(folder, video_id))
        rows["text"].append(text)
    features = datasets.Features({"frames": _frames_feature(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict(rows, features=features)


__all__ = [
    "MAX_MOVING_DIGIT_FRAMES",
    "MOTION_CAPTION_TEMPLATES",
    "MOTION_DIRECTIONS",
    "MOTION_SPEEDS",
    "MovingDigitAttributes",
    "load_video_folder",
    "motion_caption_for",
    "motion_path",
    "moving_digits",
    "moving_digits_arrays",
    "parse_motion_caption",
    "render_moving_digit",
    "write_moving_digits_folder",
]
