"""The captioned digits world: attributes, renderer, layout, captions and the dataset built from them."""

import itertools

import numpy as np
import PIL.Image
import pytest

import storydiff.data.digits as digits_module
from storydiff.data.digits import (
    CAPTION_TEMPLATES,
    DIGIT_COLOURS,
    DIGIT_POSITIONS,
    DIGIT_SIZES,
    DIGIT_WORDS,
    DigitAttributes,
    DigitPlacement,
    attributes_from_records,
    attributes_to_json,
    caption_for,
    digit_glyphs,
    digits_arrays,
    digits_world,
    digits_world_arrays,
    layout_centre,
    parse_caption,
    placement_for,
    render_canvas,
)

ALL_ATTRIBUTES = [
    DigitAttributes(digit, colour, position, size)
    for digit, colour, position, size in itertools.product(range(10), DIGIT_COLOURS, DIGIT_POSITIONS, DIGIT_SIZES)
]


def box_of_ink(canvas: np.ndarray, threshold: float = 0.05) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(canvas.max(axis=-1) > threshold)
    return columns.min(), rows.min(), columns.max() + 1, rows.max() + 1


def test_vocabulary():
    assert len(DIGIT_COLOURS) == 6 and len(DIGIT_POSITIONS) == 9 and DIGIT_SIZES == ("small", "large")
    assert DIGIT_WORDS[7] == "seven" and len(DIGIT_WORDS) == 10
    colours = np.array([np.array(rgb) / np.linalg.norm(rgb) for rgb in DIGIT_COLOURS.values()])
    cosines = colours @ colours.T
    np.fill_diagonal(cosines, -1)
    assert cosines.max() < np.cos(np.deg2rad(30))  # well separated as directions
    for rgb in DIGIT_COLOURS.values():
        assert max(rgb) == 1.0  # intensity = max over channels, for every colour
    assert 0.2126 * DIGIT_COLOURS["blue"][0] + 0.7152 * DIGIT_COLOURS["blue"][1] > 0.2  # visible on black


@pytest.mark.parametrize(
    "arguments, message",
    [
        ((10, "red", "left", "small"), "digit"),
        ((True, "red", "left", "small"), "digit"),
        ((3, "purple", "left", "small"), "colour 'purple'"),
        ((3, "red", "middle left", "small"), "position 'middle left'"),
        ((3, "red", "left", "medium"), "size 'medium'"),
    ],
)
def test_attributes_are_validated(arguments, message):
    with pytest.raises(ValueError, match=message):
        DigitAttributes(*arguments)


def test_renderer_places_continuously_and_clips():
    glyph = np.ones((8, 8), dtype=np.float32)
    canvas = render_canvas([DigitPlacement(glyph, (1.0, 0.0, 0.0), (16.0, 16.0), 10.0)], resolution=32)
    assert canvas.shape == (32, 32, 3) and canvas.dtype == np.float32
    assert canvas[..., 1:].max() == 0.0 and canvas.min() >= 0.0 and canvas.max() <= 1.0
    assert canvas[..., 0].sum() == pytest.approx(100.0, rel=1e-5)  # a full 10x10 box, antialiased exactly
    assert box_of_ink(canvas) == (11, 11, 21, 21)

    # A sub-pixel move shifts the centre of mass by the same amount: digits can move smoothly.
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    digit = digit_glyphs("test")[0][5]
    for shift in (0.25, 0.5, 1.75):
        before = render_canvas([DigitPlacement(digit, (0, 1, 0), (14.0, 15.0), 12.0)])[..., 1]
        after = render_canvas([DigitPlacement(digit, (0, 1, 0), (14.0 + shift, 15.0), 12.0)])[..., 1]
        moved = (after * xs).sum() / after.sum() - (before * xs).sum() / before.sum()
        assert moved == pytest.approx(shift, abs=0.02)
        assert (after * ys).sum() / after.sum() == pytest.approx((before * ys).sum() / before.sum(), abs=1e-4)

    # Partly and entirely off the canvas: clipped, no error.
    half_out = render_canvas([DigitPlacement(glyph, (1, 1, 1), (0.0, 16.0), 10.0)])
    assert half_out[..., 0].sum() == pytest.approx(50.0, rel=1e-5)
    assert render_canvas([DigitPlacement(glyph, (1, 1, 1), (-20.0, 16.0), 10.0)]).max() == 0.0


def test_renderer_composites_by_maximum():
    glyph = np.full((8, 8), 0.8, dtype=np.float32)
    red = DigitPlacement(glyph, DIGIT_COLOURS["red"], (12.0, 16.0), 10.0)
    yellow = DigitPlacement(glyph, DIGIT_COLOURS["yellow"], (16.0, 16.0), 10.0)
    canvas = render_canvas([red, yellow])
    np.testing.assert_allclose(canvas[16, 14], [0.8, 0.8, 0.0], atol=1e-6)  # overlap: max, not sum
    assert canvas.max() <= 1.0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: DigitPlacement(np.ones((8, 8, 1)), (1, 0, 0), (5, 5), 4), "2-D"),
        (lambda: DigitPlacement(np.full((8, 8), 2.0), (1, 0, 0), (5, 5), 4), r"\[0, 1\]"),
        (lambda: DigitPlacement(np.ones((8, 8)), (1, 0), (5, 5), 4), "RGB"),
        (lambda: DigitPlacement(np.ones((8, 8)), (1, 0, 0), (5, np.nan), 4), "centre_xy"),
        (lambda: DigitPlacement(np.ones((8, 8)), (1, 0, 0), (5, 5), 0), "height_px"),
        (lambda: render_canvas([np.ones((8, 8))]), "DigitPlacement"),
        (lambda: render_canvas([], resolution=0), "resolution"),
    ],
)
def test_renderer_bad_input(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("resolution", [24, 32, 64])
def test_every_layout_slot_stays_inside_the_canvas_and_in_its_third(resolution):
    glyph = np.ones((8, 8), dtype=np.float32)
    worst_jitter = np.random.default_rng(0)
    for attributes in ALL_ATTRIBUTES[: len(DIGIT_POSITIONS) * len(DIGIT_SIZES) * 6 : 6]:
        for _ in range(5):
            placement = placement_for(attributes, glyph, resolution, worst_jitter)
            left, top, right, bottom = placement.box()
            assert left >= 0 and top >= 0 and right <= resolution and bottom <= resolution
    for position in DIGIT_POSITIONS:
        small_x, small_y = layout_centre(position, "small", resolution)
        large_x, large_y = layout_centre(position, "large", resolution)
        # both sizes lie on the same side of the centre as the position names
        assert np.sign(small_x - resolution / 2) == np.sign(large_x - resolution / 2)
        assert np.sign(small_y - resolution / 2) == np.sign(large_y - resolution / 2)
        assert ("left" in position) == (small_x < resolution / 2) and ("top" in position) == (small_y < resolution / 2)


def test_every_template_parses_back():
    rng = np.random.default_rng(0)
    for attributes in ALL_ATTRIBUTES:
        assert parse_caption(caption_for(attributes)) == [attributes]
    # every template, both digit forms and every synonym, alone and joined
    captions = set()
    for attributes in ALL_ATTRIBUTES:
        for _ in range(6):
            caption = caption_for([attributes], rng)
            captions.add(caption.split(" ")[0])
            assert parse_caption(caption) == [attributes]
    for first, second, third in zip(ALL_ATTRIBUTES[::7], ALL_ATTRIBUTES[3::7], ALL_ATTRIBUTES[5::7]):
        caption = caption_for([first, second, third], rng)
        assert parse_caption(caption) == [first, second, third]
        assert parse_caption("  " + caption.upper() + ". ") == [first, second, third]


def test_caption_wording_varies():
    attributes = DigitAttributes(7, "red", "top left", "small")
    assert caption_for(attributes) == "a small red 7 in the top left corner"
    captions = {caption_for(attributes, seed) for seed in range(200)}
    assert len(captions) > 30
    assert any("seven" in caption for caption in captions) and any(" 7" in caption for caption in captions)
    assert any("upper left" in caption for caption in captions) and any("little" in caption for caption in captions)
    starts = {caption.format(size="S", colour="C", digit="D", position="P") for caption in CAPTION_TEMPLATES}
    assert len(starts) == len(CAPTION_TEMPLATES)


@pytest.mark.parametrize(
    "text",
    ["", "a small red 7", "a small purple 7 in the top left corner", "a small red 7 in the top left corner and"],
)
def test_unreadable_captions_raise(text):
    with pytest.raises(ValueError, match="Cannot read"):
        parse_caption(text)
    with pytest.raises(TypeError):
        parse_caption(None)
    with pytest.raises(ValueError, match="at least one"):
        caption_for([])


def test_world_is_deterministic_and_matches_its_arrays():
    dataset = digits_world("test", num_samples=12, seed=3, max_digits=3)
    assert dataset.column_names == ["image", "text", "attributes"]
    images, captions, attributes = digits_world_arrays("test", num_samples=12, seed=3, max_digits=3)
    assert images.shape == (12, 3, 32, 32) and images.dtype.is_floating_point
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert captions == dataset["text"]
    for index, row in enumerate(dataset):
        assert isinstance(row["image"], PIL.Image.Image) and row["image"].mode == "RGB"
        pixels = np.asarray(row["image"]).astype(np.float32) / 255.0 * 2.0 - 1.0
        np.testing.assert_allclose(images[index].permute(1, 2, 0).numpy(), pixels, atol=1e-6)
        assert attributes_from_records(row["attributes"]) == attributes[index]
        assert attributes_from_records(attributes_to_json(attributes[index])) == attributes[index]
        assert parse_caption(row["text"]) == attributes[index]
    again = digits_world_arrays("test", num_samples=12, seed=3, max_digits=3)
    assert (again[0] == images).all() and again[1] == captions
    # sample i does not depend on how many are asked for; other seeds and splits differ
    prefix = digits_world_arrays("test", num_samples=5, seed=3, max_digits=3)
    assert (prefix[0] == images[:5]).all() and prefix[1] == captions[:5]
    assert digits_world_arrays("test", num_samples=12, seed=4, max_digits=3)[1] != captions
    assert digits_world_arrays("train", num_samples=12, seed=3, max_digits=3)[1] != captions
    # the same attributes and captions at another resolution
    larger = digits_world_arrays("test", num_samples=12, seed=3, resolution=48, max_digits=3)
    assert larger[0].shape == (12, 3, 48, 48) and larger[1] == captions


def test_world_attribute_ranges_and_multi_digit_canvases():
    _, captions, attributes = digits_world_arrays("train", num_samples=400, seed=0, max_digits=3)
    counts = [len(items) for items in attributes]
    assert set(counts) == {1, 2, 3}
    flat = [item for items in attributes for item in items]
    assert {item.digit for item in flat} == set(range(10))
    assert {item.colour for item in flat} == set(DIGIT_COLOURS)
    assert {item.position for item in flat} == set(DIGIT_POSITIONS)
    assert {item.size for item in flat} == set(DIGIT_SIZES)
    assert any(" and " in caption for caption in captions)
    for items in attributes:
        assert len({item.colour for item in items}) == len(items)
        assert len({item.position for item in items}) == len(items)

    # several digits never overlap: each colour's ink lies in its own box, disjoint from the others
    images, _, attributes = digits_world_arrays("test", num_samples=60, seed=1, max_digits=6)
    pixels = (images.permute(0, 2, 3, 1).numpy() + 1) / 2
    for canvas, items in zip(pixels, attributes):
        boxes = []
        for item in items:
            colour = np.asarray(DIGIT_COLOURS[item.colour])
            ink = canvas.max(axis=-1) > 0.02
            direction = canvas / np.maximum(np.linalg.norm(canvas, axis=-1, keepdims=True), 1e-6)
            mine = ink & (direction @ (colour / np.linalg.norm(colour)) > 0.999)
            assert mine.any()
            rows, columns = np.nonzero(mine)
            boxes.append((columns.min(), rows.min(), columns.max(), rows.max()))
        for (l1, t1, r1, b1), (l2, t2, r2, b2) in itertools.combinations(boxes, 2):
            assert r1 < l2 or r2 < l1 or b1 < t2 or b2 < t1


def test_train_and_test_glyphs_are_separate(monkeypatch):
    train_glyphs, train_labels = digit_glyphs("train")
    test_glyphs, test_labels = digit_glyphs("test")
    assert len(train_glyphs) + len(test_glyphs) == 1797 and len(test_glyphs) == 360
    train_keys = {glyph.tobytes() for glyph in train_glyphs}
    assert not any(glyph.tobytes() in train_keys for glyph in test_glyphs)
    # the same split as digits_arrays
    np.testing.assert_array_equal(digits_arrays("test", 8)[1].numpy(), test_labels)
    np.testing.assert_allclose(digits_arrays("test", 8)[0][:, 0].numpy(), test_glyphs * 2 - 1, atol=1e-6)

    # every world canvas is drawn from its own split's glyphs
    keys_by_split = {"train": train_keys, "test": {glyph.tobytes() for glyph in test_glyphs}}
    for split in ("train", "test"):
        drawn = []

        def recording_placement_for(attributes, glyph, *args, drawn=drawn, **kwargs):
            drawn.append((attributes.digit, np.asarray(glyph).tobytes()))
            return placement_for(attributes, glyph, *args, **kwargs)

        monkeypatch.setattr(digits_module, "placement_for", recording_placement_for)
        digits_world_arrays(split, num_samples=100, seed=0, max_digits=2)
        assert len(drawn) > 100
        assert all(key in keys_by_split[split] for _, key in drawn)
        other = "test" if split == "train" else "train"
        assert not any(key in keys_by_split[other] for _, key in drawn)
        labels = dict(
            zip(
                (g.tobytes() for g in (train_glyphs if split == "train" else test_glyphs)),
                train_labels if split == "train" else test_labels,
            )
        )
        assert all(labels[key] == digit for digit, key in drawn)  # a glyph of the stated class


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"split": "validation"}, "split"),
        ({"num_samples": 0}, "num_samples"),
        ({"seed": -1}, "seed"),
        ({"resolution": 16}, "resolution"),
        ({"resolution": 32.0}, "resolution"),
        ({"max_digits": 7}, "max_digits"),
        ({"max_digits": 0}, "max_digits"),
    ],
)
def test_world_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        digits_world_arrays(**arguments)
    with pytest.raises(ValueError, match=message):
        digits_world(**arguments)
