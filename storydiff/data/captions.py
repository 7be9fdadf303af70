"""Captions written from motion tags, with several templates and synonyms.

E.T. asks an LLM to turn an outline ("Between frames s and e: trucking_right ...") into a sentence; this
module does the same job with templates so that synthetic data needs no model: it walks through the camera
segments and says what the character does meanwhile, e.g. "The camera trucks right, following the
character as they move right, then pushes in."
"""

from typing import List, Sequence, Tuple

import numpy as np

from ..trajectories.tagging import MOTION_PATTERNS, NUM_MOTION_CLASSES, segments_from_labels

# per axis and sign: (present tense, gerund) synonyms
_CAMERA_AXIS_PHRASES = {
    (0, 1): [
        ("trucks right", "trucking right"),
        ("moves right", "moving right"),
        ("tracks right", "tracking right"),
        ("slides to the right", "sliding to the right"),
    ],
    (0, -1): [
        ("trucks left", "trucking left"),
        ("moves left", "moving left"),
        ("tracks left", "tracking left"),
        ("slides to the left", "sliding to the left"),
    ],
    (1, 1): [
        ("booms down", "booming down"),
        ("booms bottom", "booming bottom"),
        ("cranes down", "craning down"),
        ("moves down", "moving down"),
        ("descends", "descending"),
    ],
    (1, -1): [
        ("booms up", "booming up"),
        ("booms top", "booming top"),
        ("cranes up", "craning up"),
        ("moves up", "moving up"),
        ("rises", "rising"),
    ],
    (2, 1): [
        ("pushes in", "pushing in"),
        ("dollies in", "dollying in"),
        ("moves forward", "moving forward"),
        ("moves closer", "moving closer"),
    ],
    (2, -1): [
        ("pulls out", "pulling out"),
        ("dollies out", "dollying out"),
        ("pulls back", "pulling back"),
        ("moves backward", "moving backward"),
    ],
}
_CAMERA_STATIC_PHRASES = [
    ("stays static", "staying static"),
    ("remains still", "remaining still"),
    ("holds its position", "holding its position"),
    ("stays fixed", "staying fixed"),
]
_CHARACTER_AXIS_PHRASES = {
    (0, 1): ["moves right", "walks to the right", "heads right"],
    (0, -1): ["moves left", "walks to the left", "heads left"],
    (1, 1): ["moves down", "goes down", "crouches down"],
    (1, -1): ["moves up", "goes up", "climbs up"],
    (2, 1): ["moves forward", "walks forward", "advances"],
    (2, -1): ["moves backward", "walks backward", "steps back"],
}
_CHARACTER_STATIC_PHRASES = ["stays still", "stands still", "remains static", "does not move"]
_CHARACTER_NOUNS = ["the character", "the main character", "the person", "the subject"]


def _motion_class(label, what: str) -> int:
    if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"{what} must be an int class index, got {type(label).__name__} {label!r}.")
    if not 0 <= label < NUM_MOTION_CLASSES:
        raise ValueError(f"{what} must be a motion class in 0..{NUM_MOTION_CLASSES - 1}, got {label}.")
    return int(label)


def _labels(labels, what: str) -> np.ndarray:
    """Per-transition classes of one trajectory: a non-empty 1-D array of motion classes."""
    segments = segments_from_labels(labels)  # checks that they are 1-D integer labels
    if not segments:
        raise ValueError(f"{what} are empty; a caption needs at least one frame transition.")
    for _, _, label in segments:
        _motion_class(label, f"each of {what}")
    return np.asarray(labels)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def camera_phrase(label: int, rng: np.random.Generator) -> Tuple[str, str]:
    """(present, gerund) description of a camera class, e.g. ("trucks right and pushes in", ...)."""
    pattern = MOTION_PATTERNS[_motion_class(label, "camera label")]
    parts = [_pick(rng, _CAMERA_AXIS_PHRASES[(axis, int(sign))]) for axis, sign in enumerate(pattern) if sign != 0]
    if not parts:
        return _pick(rng, _CAMERA_STATIC_PHRASES)
    return _join([p for p, _ in parts]), _join([g for _, g in parts])


def character_phrase(label: int, rng: np.random.Generator) -> str:
    """Description of a character class, e.g. "walks to the right"."""
    pattern = MOTION_PATTERNS[_motion_class(label, "character label")]
    parts = [_pick(rng, _CHARACTER_AXIS_PHRASES[(axis, int(sign))]) for axis, sign in enumerate(pattern) if sign != 0]
    return _join(parts) if parts else _pick(rng, _CHARACTER_STATIC_PHRASES)


def _join(parts: List[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _overlapping_label(segments: Sequence[Tuple[int, int, int]], start: int, end: int) -> int:
    overlaps = [(min(end, e) - max(start, s), label) for s, e, label in segments]
    return max(overlaps)[1]


_FIRST = ["The camera {cam}", "The camera {cam}", "The shot opens as the camera {cam}"]
_NEXT = [
    ", then {cam}",
    ", and then {cam}",
    ". Then the camera {cam}",
    ". Next, it {cam}",
    ". After that, the camera {cam}",
]
_NEXT_GERUND = [", followed by {gerund}", ", before {gerund}"]


def camera_caption(camera_labels, rng: np.random.Generator) -> str:
    """Camera-only caption (E.T.'s `caption_cam/`), e.g. "The camera trucks right, then pushes in."."""
    sentence = ""
    camera_labels = _labels(camera_labels, "camera_labels")
    for index, (_, _, label) in enumerate(segments_from_labels(camera_labels)):
        present, gerund = camera_phrase(label, rng)
        if index == 0:
            sentence = _pick(rng, _FIRST).format(cam=present)
        elif rng.random() < 0.3:
            sentence += _pick(rng, _NEXT_GERUND).format(gerund=gerund)
        else:
            sentence += _pick(rng, _NEXT).format(cam=present)
    return sentence + "."


def full_caption(camera_labels, character_labels, rng: np.random.Generator) -> str:
    """Camera + character caption (E.T.'s `caption/`): each camera segment with what the character does."""
    camera_labels = _labels(camera_labels, "camera_labels")
    character_labels = _labels(character_labels, "character_labels")
    if len(camera_labels) != len(character_labels):
        raise ValueError(
            f"camera_labels ({len(camera_labels)}) and character_labels ({len(character_labels)}) must label the "
            "same frame transitions of one trajectory."
        )
    character_segments = segments_from_labels(character_labels)
    noun = _pick(rng, _CHARACTER_NOUNS)
    clauses, previous_link = [], ""
    camera_segments = segments_from_labels(camera_labels)
    for index, (start, end, label) in enumerate(camera_segments):
        character_label = _overlapping_label(character_segments, start, end)
        present, gerund = camera_phrase(label, rng)
        action = character_phrase(character_label, rng)
        moving_together = label == character_label and label != 0  # same axes and signs: same direction
        if moving_together and MOTION_PATTERNS[label][2] < 0:  # pulling out in front of an approaching character
            link = _pick(rng, [f", leading {noun} as they approach", f" ahead of {noun}, who {action}"])
        elif moving_together:
            link = _pick(
                rng,
                [
                    f", following {noun}",
                    f", following {noun} as they {_plural(action)}",
                    f" along with {noun}, who {action}",
                ],
            )
        else:
            link = _pick(rng, [f" while {noun} {action}", f" as {noun} {action}", f"; meanwhile {noun} {action}"])
        openings = ["The camera {cam}{link}", "The camera {cam}{link}"]
        if len(camera_segments) > 1:
            openings.append("At first the camera {cam}{link}")
        # after a clause with its own sub-clause ("; meanwhile ...", ", who ..."), start a new sentence
        new_sentence_only = index > 0 and (";" in previous_link or ", who" in previous_link)
        if index == 0:
            clauses.append(_pick(rng, openings).format(cam=present, link=link))
        elif not new_sentence_only and rng.random() < 0.3 and ";" not in link:
            templates = [", followed by {gerund}{link}", ", before {gerund}{link}"]
            clauses.append(_pick(rng, templates).format(gerund=gerund, link=link))
        else:
            last = (
                ". Finally, the camera {cam}{link}" if index == len(camera_segments) - 1 else ". Next, it {cam}{link}"
            )
            templates = [". Then it {cam}{link}", ". After that, the camera {cam}{link}", last]
            if not new_sentence_only:
                templates.append(", then {cam}{link}")
            clauses.append(_pick(rng, templates).format(cam=present, link=link))
        previous_link = link
    return "".join(clauses) + "."


def _plural(action: str) -> str:
    """'moves right' -> 'move right' for 'as they ...' (every phrase above starts with a regular verb)."""
    words = []
    for part in action.split(" and "):
        verb, _, rest = part.partition(" ")
        if verb.endswith("es") and verb[:-2].endswith(("sh", "ch", "ss")):
            verb = verb[:-2]
        elif verb in ("does", "goes"):
            verb = verb[:-2]
        elif verb.endswith("s"):
            verb = verb[:-1]
        words.append(f"{verb} {rest}".strip())
    return " and ".join(words)
