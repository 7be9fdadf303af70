"""Measuring generated videos of moving digits (`storydiff.data.moving_digits`).

* **motion**: `track_centres` follows the ink's centre of mass frame by frame (ink is the max over channels above
  `INK_THRESHOLD`, as `text_adherence` reads it); `motion_direction` fits a least-squares line through a video's
  centres and names its main direction, or "none" when the fitted displacement is under `min_displacement`
  pixels or the centres do not lie near a line (a track that jumps back and forth is not a motion);
* **temporal consistency**: the digit class and colour of every frame (`measure_canvases`, heaviest digit) against
  the video's most frequent one: a digit that turns into another, or changes colour, scores below 1;
* **per-frame adherence** of what does not change in time (digit, colour, size), and a Frechet distance of the
  frames' digits to held-out world canvases.

Validation on real held-out videos (`moving_digits_arrays("test", 200, seed=0)`, 8 frames, 32x32, the shipped
classifier; "mixed" videos take frame f of video i from video i + 7f, so each frame shows another digit):

| videos | direction | identity | colour consistency | digit | colour | size | adherence | frame FD |
|---|---|---|---|---|---|---|---|---|
| real | 1.000 | 0.986 | 1.000 | 0.960 | 1.000 | 1.000 | 0.987 | 6.3 |
| frames shuffled in time | 0.020 | 0.986 | 1.000 | 0.960 | 1.000 | 1.000 | 0.987 | 6.3 |
| first frame repeated | 0.000 | 1.000 | 1.000 | 0.965 | 1.000 | 1.000 | 0.988 | 6.3 |
| mixed | 0.010 | 0.294 | 0.374 | 0.206 | 0.281 | 0.547 | 0.345 | 6.3 |

At 24x24 (60 videos) real videos give direction 1.000, identity 0.992 and digit 0.892 (the classifier reads
small digits worse at 24 pixels). Direction needs both the line fit and the straightness test: on shuffled frames
the fitted line alone names the stated direction for 0.41 of the videos (its slope is random but its main axis
mostly the true one). Every size, speed and direction is read right at 8 frames; at 2 frames of 24 pixels
(0.72 pixels of motion when slow) 3 of 160 videos of every digit, size, direction and speed read "none".

The frame Frechet distance sees single frames only (the rearranged videos above hold the same frames, or their
first frames, and score alike): it measures frame quality. It compares the frames with 500 static held-out world
canvases, and is biased upwards for few samples, and the 8 frames of a video share one glyph: compare numbers
computed from equal numbers of videos and frames (the 200 first frames alone: 6.3; 200 train-split videos: 6.9;
the real frames blurred with a 1-pixel Gaussian: 58; 500 static train-split world canvases: 2.8).
`tests/test_video_evaluation.py` checks these figures on fewer videos with thresholds a little below them.
"""

from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np
import torch

from storydiff.data.moving_digits import MovingDigitAttributes, parse_motion_caption

from .digits import DigitClassifier, _resolve
from .text_adherence import INK_THRESHOLD, canvas_frechet_distance, measure_canvases

VIDEO_ATTRIBUTE_NAMES = ("digit", "colour", "size")
# The least fitted displacement, in pixels, that counts as a motion. The slowest real motion (a digit moving
# "slowly" across 2 frames of the smallest world canvas, 24 pixels) covers 0.72 pixels; a still digit's centre
# does not move at all, and a still generated digit's only by its noise. 0.3 would also read those slowest videos
# all right (0.5 misses 3 of 160), but lets more of a generated still digit's wobble count as motion.
MIN_DISPLACEMENT = 0.5
# The least fraction of the centres' spread the fitted line must explain (R^2). Real tracks are straight (about
# 1.0); frames in random order give a line through a cloud (about 0.15 on average for 8 frames).
MIN_LINEARITY = 0.5


def _videos(videos) -> np.ndarray:
    """Any supported video batch -> float32 (N, F, H, W, 3) in [0, 1]."""
    if isinstance(videos, torch.Tensor):
        if videos.ndim != 5 or videos.shape[2] != 3:
            raise ValueError(
                f"Torch videos must be (N, F, 3, H, W) in [0, 1] (diffusers' output_type='pt'), got shape "
                f"{tuple(videos.shape)}."
            )
        tensor = videos.detach().to("cpu")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        array = tensor.permute(0, 1, 3, 4, 2).numpy()
    elif isinstance(videos, np.ndarray):
        if videos.ndim != 5 or videos.shape[-1] != 3:
            raise ValueError(
                f"Numpy videos must be (N, F, H, W, 3) float in [0, 1] or uint8 (diffusers' output_type='np'), "
                f"got shape {videos.shape}."
            )
        array = videos.astype(np.float32) / 255.0 if videos.dtype == np.uint8 else videos.astype(np.float32)
    elif hasattr(videos, "__iter__") and not isinstance(videos, (str, bytes)):
        # lists of lists of PIL images (output_type='pil', or a Dataset's `frames` column)
        videos = [list(frames) for frames in videos]
        if not videos or not all(frames and all(hasattr(frame, "convert") for frame in frames) for frames in videos):
            raise TypeError("A list of videos must hold, per video, a non-empty list of PIL images.")
        lengths = {len(frames) for frames in videos}
        sizes = {frame.size for frames in videos for frame in frames}
        if len(lengths) > 1 or len(sizes) > 1:
            raise ValueError(
                f"All videos must have the same number of frames and frame size, got {sorted(lengths)} frames and "
                f"sizes {sorted(sizes)}."
            )
        array = np.stack(
            [
                np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0 for frame in frames])
                for frames in videos
            ]
        )
    else:
        raise TypeError(
            "Videos must be numpy (N, F, H, W, 3), torch (N, F, 3, H, W) or a list of lists of PIL images, got "
            f"{type(videos).__name__}."
        )
    if 0 in array.shape:
        raise ValueError(f"Got an empty video batch of shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("Videos contain non-finite values.")
    low, high = float(array.min()), float(array.max())
    if low < -1e-4 or high > 1 + 1e-4:
        raise ValueError(
            f"Videos must have values in [0, 1] (diffusers' output convention), got [{low:.3f}, {high:.3f}]. "
            "Convert [-1, 1] videos with (videos + 1) / 2."
        )
    return np.clip(array, 0.0, 1.0)


def track_centres(videos) -> np.ndarray:
    """The ink's centre of mass (x, y) in pixels in every frame: float64 (N, F, 2), NaN where a frame has no ink.

    Ink is a pixel's max over channels where it exceeds `INK_THRESHOLD`, weighted by that intensity; pixel (i, j)
    is centred at (j + 0.5, i + 0.5), as the world places digits.

    Args:
        videos: numpy (N, F, H, W, 3) float in [0, 1] or uint8, torch (N, F, 3, H, W) in [0, 1], or a list of
            lists of PIL images.
    """
    intensity = _videos(videos).max(axis=-1).astype(np.float64)
    weights = np.where(intensity > INK_THRESHOLD, intensity, 0.0)
    mass = weights.sum(axis=(2, 3))
    height, width = weights.shape[2:]
    with np.errstate(invalid="ignore", divide="ignore"):
        x = (weights.sum(axis=2) * (np.arange(width) + 0.5)).sum(axis=-1) / mass
        y = (weights.sum(axis=3) * (np.arange(height) + 0.5)).sum(axis=-1) / mass
    centres = np.stack([x, y], axis=-1)
    centres[mass == 0] = np.nan
    return centres


def motion_direction(
    centres, min_displacement: float = MIN_DISPLACEMENT, min_linearity: float = MIN_LINEARITY
) -> list[str]:
    """Per video, the direction its digit moves in: one of `MOTION_DIRECTIONS`, or "none".

    A least-squares line through the centres of the frames with ink (x and y each fitted against the frame index)
    gives the displacement from the first to the last of those frames; its larger component names the direction
    ("down" is towards the bottom of the frame). "none" when fewer than two frames have ink, when that
    displacement is under `min_displacement` pixels, or when the line explains less than `min_linearity` of the
    centres' spread (R^2 over both coordinates: the digit jumps about rather than moving).

    Args:
        centres: (N, F, 2) centres (x, y) in pixels, NaN where a frame has no ink (`track_centres`); for one video
            pass `centres[None]`.
        min_displacement (`float`): Pixels.
        min_linearity (`float`): In [0, 1]; 0 accepts any track.
    """
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 3 or centres.shape[-1] != 2 or centres.shape[1] < 2:
        raise ValueError(
            f"`centres` must be (N, F, 2) with F >= 2 frames (what track_centres returns), got {centres.shape}."
        )
    if not np.isfinite(min_displacement) or min_displacement < 0:
        raise ValueError(f"`min_displacement` must be a non-negative number of pixels, got {min_displacement!r}.")
    if not 0.0 <= min_linearity <= 1.0:
        raise ValueError(f"`min_linearity` must be in [0, 1], got {min_linearity!r}.")
    directions = []
    for track in centres:
        frames = np.flatnonzero(np.isfinite(track).all(axis=1))
        if frames.size < 2:
            directions.append("none")
            continue
        points = track[frames]
        times = frames - frames.mean()
        deviations = points - points.mean(axis=0)
        slope = times @ deviations / (times @ times)  # (dx, dy) per frame
        displacement = slope * (frames[-1] - frames[0])
        spread = (deviations**2).sum()
        explained = ((np.outer(times, slope)) ** 2).sum()
        if np.hypot(*displacement) < min_displacement or explained < min_linearity * spread:
            directions.append("none")
        elif abs(displacement[0]) >= abs(displacement[1]):
            directions.append("right" if displacement[0] > 0 else "left")
        else:
            directions.append("down" if displacement[1] > 0 else "up")
    return directions


def _stated(item) -> MovingDigitAttributes:
    if isinstance(item, str):
        return parse_motion_caption(item)
    if isinstance(item, MovingDigitAttributes):
        return item
    raise TypeError(
        f"Each entry of `captions_or_attributes` must be a moving-digits caption or MovingDigitAttributes, got "
        f"{type(item).__name__}."
    )


def _consistency(values: list) -> float:
    """The fraction of frames that agree with the video's most frequent measured value (no ink never agrees)."""
    counts = Counter(value for value in values if value is not None)
    return counts.most_common(1)[0][1] / len(values) if counts else 0.0


def evaluate_videos(
    videos,
    captions_or_attributes: Sequence[Union[str, MovingDigitAttributes]],
    classifier: Optional[DigitClassifier] = None,
) -> dict[str, float]:
    """How well videos of moving digits show what their captions state, and how steady their digit is.

    Every frame is measured in one classifier pass (`measure_canvases`; the heaviest digit of a frame counts).

    Args:
        videos: numpy (N, F, H, W, 3) float in [0, 1] or uint8 (diffusers' `output_type="np"`), torch
            (N, F, 3, H, W) in [0, 1] (`output_type="pt"`), or a list of lists of PIL images; square frames of 16
            pixels and up.
        captions_or_attributes: Per video, its moving-digits caption or `MovingDigitAttributes`.
        classifier: A `DigitClassifier`; the shipped one by default.

    Returns:
        `direction_accuracy`: the fraction of videos whose measured direction (`motion_direction`) is the stated
        one; `identity_consistency` and `colour_consistency`: per video the fraction of frames whose measured
        digit class (colour) is the video's most frequent one, averaged over videos; `digit`, `colour`, `size`:
        the fraction of all frames showing the stated value, and `adherence` their mean;
        `frame_frechet_distance`: `canvas_frechet_distance` of all frames against 500 static held-out world
        canvases (biased by the number of frames: compare numbers computed from equal counts); `num_videos`.
    """
    frames = _videos(videos)
    num_videos, num_frames = frames.shape[:2]
    if isinstance(captions_or_attributes, (str, MovingDigitAttributes)):
        raise TypeError("`captions_or_attributes` needs one entry per video (a list), not a single caption.")
    stated = [_stated(item) for item in captions_or_attributes]
    if len(stated) != num_videos:
        raise ValueError(f"Got {num_videos} videos but {len(stated)} captions or attributes.")
    classifier = _resolve(classifier)

    flat = frames.reshape(num_videos * num_frames, *frames.shape[2:])
    measured = [digits[0] if digits else None for digits in measure_canvases(flat, classifier)]
    directions = motion_direction(track_centres(frames))

    scores = dict.fromkeys(VIDEO_ATTRIBUTE_NAMES, 0.0)
    identity = colour = 0.0
    for video, attributes in enumerate(stated):
        per_frame = measured[video * num_frames : (video + 1) * num_frames]
        identity += _consistency([m.digit if m is not None else None for m in per_frame])
        colour += _consistency([m.colour if m is not None else None for m in per_frame])
        for name in VIDEO_ATTRIBUTE_NAMES:
            scores[name] += sum(m is not None and getattr(m, name) == getattr(attributes, name) for m in per_frame)
    result = {
        "direction_accuracy": float(np.mean([d == s.direction for d, s in zip(directions, stated)])),
        "identity_consistency": identity / num_videos,
        "colour_consistency": colour / num_videos,
    }
    result.update({name: scores[name] / (num_videos * num_frames) for name in VIDEO_ATTRIBUTE_NAMES})
    result["adherence"] = float(np.mean([result[name] for name in VIDEO_ATTRIBUTE_NAMES]))
    result["frame_frechet_distance"] = canvas_frechet_distance(flat, classifier=classifier)
    result["num_videos"] = num_videos
    return result


__all__ = [
    "MIN_DISPLACEMENT",
    "MIN_LINEARITY",
    "VIDEO_ATTRIBUTE_NAMES",
    "evaluate_videos",
    "motion_direction",
    "track_centres",
]
