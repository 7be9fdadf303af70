"""Measuring text adherence in the captioned digits world, validated on real held-out canvases."""

import itertools

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import ndimage

from storydiff.data.digits import (
    DIGIT_COLOURS,
    DIGIT_POSITIONS,
    DIGIT_SIZES,
    DigitAttributes,
    caption_for,
    digit_glyphs,
    digits_world,
    digits_world_arrays,
    placement_for,
    render_canvas,
)
from storydiff.evaluation import (
    canvas_frechet_distance,
    caption_adherence,
    load_digit_classifier,
    measure_canvas,
    measure_canvases,
)
from storydiff.evaluation.text_adherence import _digit_features
from storydiff.metrics import frechet_distance


def world_canvases(split="test", num_samples=500, seed=0, resolution=32, max_digits=1):
    images, captions, attributes = digits_world_arrays(split, num_samples, seed, resolution, max_digits)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy(), captions, attributes


def changed(attributes: DigitAttributes, rng: np.random.Generator) -> DigitAttributes:
    """The same digit with every attribute replaced by another value."""
    return DigitAttributes(
        digit=int((attributes.digit + rng.integers(1, 10)) % 10),
        colour=str(rng.choice([c for c in DIGIT_COLOURS if c != attributes.colour])),
        position=str(rng.choice([p for p in DIGIT_POSITIONS if p != attributes.position])),
        size="large" if attributes.size == "small" else "small",
    )


@pytest.fixture(scope="module")
def held_out():
    return world_canvases()


def test_reads_true_captions_of_held_out_canvases(held_out):
    # Measured (see storydiff/evaluation/text_adherence.py): digit 0.978, colour/position/size 1.0, exact 0.978.
    canvases, captions, attributes = held_out
    scores = caption_adherence(canvases, attributes)
    assert scores["digit"] >= 0.96
    assert scores["colour"] >= 0.995 and scores["position"] >= 0.995 and scores["size"] >= 0.995
    assert scores["exact"] >= 0.96 and scores["count"] == 1.0
    assert scores["overall"] == pytest.approx(np.mean([scores[k] for k in ("digit", "colour", "position", "size")]))
    assert scores["num_images"] == scores["num_digits"] == 500
    # captions are read with parse_caption: the same scores
    assert caption_adherence(canvases, captions) == scores


def test_does_not_read_changed_captions(held_out):
    # Measured: 0.0 on every attribute.
    canvases, _, attributes = held_out
    rng = np.random.default_rng(0)
    wrong = [[changed(item, rng) for item in items] for items in attributes]
    scores = caption_adherence(canvases, wrong)
    for name in ("digit", "colour", "position", "size"):
        assert scores[name] <= 0.02
    assert scores["exact"] == 0.0

    # one attribute changed at a time: only that one drops
    for name in ("digit", "colour", "position", "size"):
        one_wrong = [
            [DigitAttributes(**{**item.to_dict(), name: getattr(changed(item, rng), name)})]
            for (item,) in attributes[:200]
        ]
        scores = caption_adherence(canvases[:200], one_wrong)
        assert scores[name] <= 0.02 and scores["exact"] == 0.0
        assert all(scores[other] >= 0.95 for other in ("digit", "colour", "position", "size") if other != name)


def test_multi_digit_canvases():
    # Measured on 500 canvases of 1 to 3 digits: digit 0.942, colour/position/size 1.0, exact 0.890; with every
    # attribute changed: overall 0.165, exact 0.0.
    canvases, captions, attributes = world_canvases(num_samples=500, max_digits=3)
    scores = caption_adherence(canvases, captions)
    assert scores["digit"] >= 0.92 and scores["exact"] >= 0.86 and scores["count"] == 1.0
    assert min(scores["colour"], scores["position"], scores["size"]) >= 0.995
    rng = np.random.default_rng(0)
    wrong = caption_adherence(canvases, [[changed(item, rng) for item in items] for items in attributes])
    assert wrong["overall"] <= 0.25 and wrong["exact"] == 0.0

    # every stated digit is found, in any order; a stated digit that is not there counts as wrong
    measured = measure_canvases(canvases[:50])
    for items, found in zip(attributes[:50], measured):
        assert {(a.colour, a.position, a.size) for a in items} == {(a.colour, a.position, a.size) for a in found}
    missing = caption_adherence(canvases[:1], [attributes[0] + [DigitAttributes(1, "red", "centre", "large")]])
    assert missing["count"] == 0.0 and missing["exact"] == 0.0


def test_every_colour_position_and_size_is_read_back():
    glyphs, labels = digit_glyphs("test")
    glyph = glyphs[np.flatnonzero(labels == 0)[0]]
    attributes = [
        DigitAttributes(0, colour, position, size)
        for colour, position, size in itertools.product(DIGIT_COLOURS, DIGIT_POSITIONS, DIGIT_SIZES)
    ]
    for resolution in (24, 32, 64):
        rng = np.random.default_rng(resolution)
        canvases = np.stack(
            [render_canvas([placement_for(item, glyph, resolution, rng)], resolution) for item in attributes]
        )
        found = measure_canvases(canvases)
        assert [items for items in found] == [[item] for item in attributes]


def test_image_formats_give_the_same_reading(held_out):
    canvas = held_out[0][3]
    expected = measure_canvas(canvas)
    assert len(expected) == 1
    uint8 = np.round(canvas * 255).astype(np.uint8)
    assert measure_canvas(uint8) == expected
    assert measure_canvas(PIL.Image.fromarray(uint8)) == expected
    assert measure_canvas(PIL.Image.fromarray(uint8).convert("RGBA")) == expected
    assert measure_canvas(torch.from_numpy(canvas).permute(2, 0, 1)) == expected
    dataset = digits_world("test", num_samples=4)
    assert measure_canvases(dataset["image"]) == measure_canvases(held_out[0][:4])
    as_torch = torch.from_numpy(held_out[0][:4]).permute(0, 3, 1, 2)  # diffusers output_type="pt"
    assert caption_adherence(as_torch, held_out[2][:4]) == caption_adherence(held_out[0][:4], held_out[2][:4])


def test_empty_and_noisy_canvases():
    blank = np.zeros((32, 32, 3), dtype=np.float32)
    assert measure_canvas(blank) == []
    scores = caption_adherence(blank[None], [DigitAttributes(3, "red", "left", "small")])
    assert scores["overall"] == 0.0 and scores["count"] == 0.0

    # a few stray bright pixels are noise, not digits, and do not move the digit's reading
    canvases, _, attributes = world_canvases(num_samples=40, seed=5)
    noisy = canvases.copy()
    rng = np.random.default_rng(0)
    for canvas in noisy:
        ink = ndimage.binary_dilation(canvas.max(-1) > 0, iterations=2)
        free = np.argwhere(~ink)
        for y, x in free[rng.choice(len(free), 2, replace=False)]:
            canvas[y, x] = rng.random(3) * 0.8 + 0.2
    assert measure_canvases(noisy) == measure_canvases(canvases)


def test_canvas_frechet_distance():
    classifier = load_digit_classifier()
    reference, _, _ = world_canvases(num_samples=300)
    # the reference itself: distance zero (the features go through the same Frechet code as the digit metric)
    assert canvas_frechet_distance(reference, num_reference=300, classifier=classifier) == pytest.approx(0, abs=1e-3)
    real, _, _ = world_canvases("train", num_samples=300, seed=1)
    blurred = np.stack([ndimage.gaussian_filter(canvas, (1, 1, 0)) for canvas in real])
    blurred /= blurred.max(axis=(1, 2, 3), keepdims=True)
    real_distance = canvas_frechet_distance(real, num_reference=300, classifier=classifier)
    assert 0 < real_distance < 15
    assert canvas_frechet_distance(blurred, num_reference=300, classifier=classifier) > 2 * real_distance
    # the features are those of the located digit, wherever it is: moving digits leaves the distance near zero
    glyphs, labels = digit_glyphs("test")
    centred, cornered = [], []
    for glyph, label in zip(glyphs[:200], labels[:200]):
        centred.append(render_canvas([placement_for(DigitAttributes(int(label), "red", "centre", "large"), glyph)]))
        cornered.append(
            render_canvas([placement_for(DigitAttributes(int(label), "cyan", "top left", "large"), glyph)])
        )
    features = _digit_features(np.stack(centred), classifier)
    moved = _digit_features(np.stack(cornered), classifier)
    assert features.shape == (200, classifier.num_features)
    assert frechet_distance(features, moved) < 0.05 * frechet_distance(features, _digit_features(blurred, classifier))


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((32, 32)), "one canvas"),
        (np.zeros((32, 32, 1)), "RGB"),
        (np.zeros((32, 24, 3)), "square"),
        (np.zeros((8, 8, 3)), "too small"),
        (np.full((32, 32, 3), 2.0), r"\[0, 1\]"),
        (np.zeros((2, 32, 32, 3)), "one canvas"),
    ],
)
def test_measure_bad_images(image, message):
    with pytest.raises(ValueError, match=message):
        measure_canvas(image)


def test_adherence_bad_input(held_out):
    canvases, captions, attributes = held_out
    with pytest.raises(ValueError, match="2 images but 1"):
        caption_adherence(canvases[:2], attributes[:1])
    with pytest.raises(ValueError, match="Cannot read"):
        caption_adherence(canvases[:1], ["a purple 3 on the moon"])
    with pytest.raises(ValueError, match="non-empty list"):
        caption_adherence(canvases[:1], [[]])
    with pytest.raises(TypeError, match="one entry per image"):
        caption_adherence(canvases[:1], caption_for(attributes[0]))
    with pytest.raises(ValueError, match="RGB"):
        caption_adherence(canvases[:2, ..., :1], attributes[:2])
