"""The captioned moving-digits video set: determinism, splits, paths inside the canvas, captions, and the three
forms (arrays, Dataset, video folder) holding the same pixels."""

import itertools
import json

import numpy as np
import PIL.Image
import pytest
import torch

import storydiff.data.moving_digits as moving_module
from storydiff.data.digits import (
    DIGIT_COLOURS,
    DIGIT_EDGE_MARGIN,
    DIGIT_SIZES,
    DIGIT_WORDS,
    digit_glyphs,
)
from storydiff.data.moving_digits import (
    MAX_MOVING_DIGIT_FRAMES,
    MOTION_CAPTION_TEMPLATES,
    MOTION_DIRECTIONS,
    MOTION_SPEEDS,
    MovingDigitAttributes,
    load_video_folder,
    motion_caption_for,
    motion_path,
    moving_digits,
    moving_digits_arrays,
    parse_motion_caption,
    render_moving_digit,
    write_moving_digits_folder,
)
from storydiff.evaluation import motion_direction, track_centres

ALL_ATTRIBUTES = [
    MovingDigitAttributes(digit, colour, size, direction, speed)
    for digit, colour, size, direction, speed in itertools.product(
        range(10), DIGIT_COLOURS, DIGIT_SIZES, MOTION_DIRECTIONS, MOTION_SPEEDS
    )
]


def test_arrays_are_deterministic_and_video_i_does_not_depend_on_the_count():
    videos, captions, attributes = moving_digits_arrays("train", num_videos=6, seed=3, num_frames=4, resolution=24)
    assert videos.shape == (6, 3, 4, 24, 24) and videos.dtype == torch.float32
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    again = moving_digits_arrays("train", num_videos=6, seed=3, num_frames=4, resolution=24)
    assert torch.equal(videos, again[0]) and captions == again[1] and attributes == again[2]
    longer = moving_digits_arrays("train", num_videos=9, seed=3, num_frames=4, resolution=24)
    assert torch.equal(videos, longer[0][:6]) and captions == longer[1][:6] and attributes == longer[2][:6]
    # pixels are quantised once, to 8 bits
    levels = (videos + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    # other seeds and splits give other videos
    assert moving_digits_arrays("train", 6, seed=4, num_frames=4, resolution=24)[1] != captions
    assert moving_digits_arrays("test", 6, seed=3, num_frames=4, resolution=24)[1] != captions
    # a video's attributes and caption do not depend on the resolution or the number of frames
    other = moving_digits_arrays("train", 6, seed=3, num_frames=8, resolution=32)
    assert other[1] == captions and other[2] == attributes


def test_videos_are_drawn_from_their_own_split_and_show_one_glyph(monkeypatch):
    keys = {
        split: {glyph.tobytes(): label for glyph, label in zip(*digit_glyphs(split))} for split in ("train", "test")
    }
    for split, other in (("train", "test"), ("test", "train")):
        drawn = []

        def recording_render(attributes, glyph, *args, drawn=drawn, **kwargs):
            drawn.append((attributes.digit, np.asarray(glyph).tobytes()))
            return render_moving_digit(attributes, glyph, *args, **kwargs)

        monkeypatch.setattr(moving_module, "render_moving_digit", recording_render)
        _, _, attributes = moving_digits_arrays(split, num_videos=40, seed=0, num_frames=2, resolution=24)
        assert len(drawn) == 40
        assert all(keys[split].get(key) == digit for digit, key in drawn)  # a glyph of the stated class
        assert not any(key in keys[other] for _, key in drawn)
        assert [digit for digit, _ in drawn] == [item.digit for item in attributes]


class FixedDraws:
    """Stands in for a generator whose uniform draws are all `value` (0 and 1 are the extreme starts)."""

    def __init__(self, value):
        self.value = value

    def random(self, size):
        return np.full(size, self.value)


@pytest.mark.parametrize("num_frames", [2, MAX_MOVING_DIGIT_FRAMES])
def test_every_path_stays_inside_the_canvas_at_constant_speed(num_frames):
    assert MAX_MOVING_DIGIT_FRAMES == 8
    rng = np.random.default_rng(0)
    resolution = 32
    for size, direction, speed in itertools.product(DIGIT_SIZES, MOTION_DIRECTIONS, MOTION_SPEEDS):
        attributes = MovingDigitAttributes(5, "red", size, direction, speed)
        half = moving_module.DIGIT_SIZE_FRACTIONS[size] * resolution / 2
        low, high = DIGIT_EDGE_MARGIN * resolution, (1 - DIGIT_EDGE_MARGIN) * resolution
        draws = [rng] * 30 + [FixedDraws(0.0), FixedDraws(1.0), None]
        for path in [motion_path(attributes, num_frames, resolution, draw) for draw in draws]:
            assert path.shape == (num_frames, 2)
            assert (path - half >= low - 1e-9).all() and (path + half <= high + 1e-9).all()
            steps = np.diff(path, axis=0)
            expected = np.array(moving_module._DIRECTION_STEPS[direction]) * MOTION_SPEEDS[speed] * resolution
            np.testing.assert_allclose(steps, np.broadcast_to(expected, steps.shape), atol=1e-9)
    # the worst case nearly fills the span: a large digit moving quickly for 8 frames
    assert 7 * MOTION_SPEEDS["quickly"] <= 1 - 2 * DIGIT_EDGE_MARGIN - moving_module.DIGIT_SIZE_FRACTIONS["large"]


def test_the_drawn_digit_is_whole_in_every_frame():
    # at 64 pixels the edge margin is 1.28 pixels: the outermost rows and columns never get ink
    videos, _, attributes = moving_digits_arrays("test", num_videos=24, seed=1, num_frames=8, resolution=64)
    ink = ((videos + 1) / 2).amax(dim=1) > 0  # (N, F, H, W)
    assert not ink[..., [0, -1], :].any() and not ink[..., :, [0, -1]].any()
    assert ink.flatten(2).any(dim=2).all()  # every frame shows its digit
    assert {item.direction for item in attributes} == set(MOTION_DIRECTIONS)


def test_measured_motion_of_real_videos_is_the_stated_one():
    for resolution in (24, 32):
        videos, _, attributes = moving_digits_arrays(
            "test", num_videos=40, seed=0, num_frames=8, resolution=resolution
        )
        directions = motion_direction(track_centres(((videos + 1) / 2).permute(0, 2, 3, 4, 1).numpy()))
        assert directions == [item.direction for item in attributes]


def test_captions_round_trip_over_every_combination_and_template():
    assert motion_caption_for(MovingDigitAttributes(3, "red", "large", "left", "quickly")) == (
        "a large red 3 moves quickly to the left"
    )
    assert (
        motion_caption_for(MovingDigitAttributes(7, "blue", "small", "up", "slowly"))
        == "a small blue 7 moves slowly up"
    )
    rng = np.random.default_rng(0)
    templates_seen, words_seen = set(), set()
    for attributes in ALL_ATTRIBUTES:
        assert parse_motion_caption(motion_caption_for(attributes)) == attributes
        for _ in range(3):
            caption = motion_caption_for(attributes, rng)
            assert parse_motion_caption(caption) == attributes, caption
            assert parse_motion_caption("  " + caption.upper() + ". ") == attributes
            templates_seen.update(
                index
                for index, template in enumerate(MOTION_CAPTION_TEMPLATES)
                if moving_module._MOTION_PATTERNS[index].fullmatch(caption)
            )
            words_seen.update(caption.split())
    assert templates_seen == set(range(len(MOTION_CAPTION_TEMPLATES)))
    assert set(DIGIT_WORDS) <= words_seen  # digits written as words too, as the world does
    assert motion_caption_for(ALL_ATTRIBUTES[0], 5) == motion_caption_for(ALL_ATTRIBUTES[0], np.random.default_rng(5))


@pytest.mark.parametrize(
    "text",
    [
        "a large red 3 moves quickly",
        "a large purple 3 moves quickly to the left",
        "a red 3 in the top left corner",
        "",
    ],
)
def test_unreadable_captions_say_what_captions_look_like(text):
    with pytest.raises(ValueError, match="moves quickly to the left"):
        parse_motion_caption(text)
    with pytest.raises(TypeError, match="string"):
        parse_motion_caption(3)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"digit": 10}, "digit"),
        ({"digit": True}, "digit"),
        ({"colour": "purple"}, "colour"),
        ({"size": "medium"}, "size"),
        ({"direction": "sideways"}, "direction"),
        ({"speed": "fast"}, "speed"),
    ],
)
def test_bad_attributes(fields, message):
    valid = {"digit": 3, "colour": "red", "size": "large", "direction": "left", "speed": "quickly"}
    with pytest.raises(ValueError, match=message):
        MovingDigitAttributes(**{**valid, **fields})


def test_dataset_holds_the_same_pixels_as_the_arrays():
    dataset = moving_digits("test", num_videos=4, seed=2, num_frames=3, resolution=24)
    videos, captions, attributes = moving_digits_arrays("test", num_videos=4, seed=2, num_frames=3, resolution=24)
    assert dataset.column_names == ["frames", "text", "digit", "colour", "size", "direction", "speed"]
    assert list(dataset["text"]) == captions
    for index, row in enumerate(dataset):
        assert MovingDigitAttributes(**{name: row[name] for name in attributes[index].to_dict()}) == attributes[index]
        assert len(row["frames"]) == 3 and all(frame.mode == "RGB" for frame in row["frames"])
        pixels = np.stack([np.asarray(frame) for frame in row["frames"]])  # (F, H, W, 3) uint8
        expected = ((videos[index] + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        np.testing.assert_array_equal(pixels, expected)


def test_video_folder_round_trip(tmp_path):
    folder = write_moving_digits_folder(
        tmp_path / "videos", "train", num_videos=3, seed=1, num_frames=4, resolution=24
    )
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [line["video"] for line in lines] == ["video_000000", "video_000001", "video_000002"]
    assert sorted(path.name for path in (folder / "video_000001").iterdir()) == [f"frame_00{i}.png" for i in range(4)]
    dataset = load_video_folder(folder)
    videos, captions, _ = moving_digits_arrays("train", num_videos=3, seed=1, num_frames=4, resolution=24)
    assert dataset.column_names == ["frames", "text"] and list(dataset["text"]) == captions
    for index, row in enumerate(dataset):
        pixels = np.stack([np.asarray(frame.convert("RGB")) for frame in row["frames"]])
        expected = ((videos[index] + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
        np.testing.assert_array_equal(pixels, expected)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_moving_digits_folder(folder, num_videos=1)


def test_a_users_own_video_folder_loads_in_frame_number_order(tmp_path):
    video = tmp_path / "clip"
    video.mkdir()
    for number in (10, 2, 1):  # unpadded names: numbers compare as numbers
        PIL.Image.new("L", (5, 4), color=number).save(video / f"frame_{number}.png")
    (video / "notes.txt").write_text("not a frame")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"video": "clip", "text": "a cat walks"}) + "\n\n")
    dataset = load_video_folder(tmp_path)
    assert len(dataset) == 1 and dataset[0]["text"] == "a cat walks"
    assert [frame.getpixel((0, 0)) for frame in dataset[0]["frames"]] == [1, 2, 10]


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No video folder"):
        load_video_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        load_video_folder(tmp_path)

    metadata = tmp_path / "metadata.jsonl"
    metadata.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_video_folder(tmp_path)
    metadata.write_text(json.dumps({"video": "a"}) + "\n")
    with pytest.raises(ValueError, match='"video" and "text"'):
        load_video_folder(tmp_path)
    metadata.write_text("")
    with pytest.raises(ValueError, match="lists no videos"):
        load_video_folder(tmp_path)
    metadata.write_text(json.dumps({"video": "../elsewhere", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="subfolder"):
        load_video_folder(tmp_path)
    metadata.write_text(json.dumps({"video": "a", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="is no folder"):
        load_video_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "readme.txt").write_text("no frames here")
    with pytest.raises(ValueError, match="holds no frames"):
        load_video_folder(tmp_path)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "a" / "frame_000.png")
    PIL.Image.new("RGB", (8, 6)).save(tmp_path / "a" / "frame_001.png")
    with pytest.raises(ValueError, match=r"one size, got 8x8 \(frame_000.png\), 8x6 \(frame_001.png\)"):
        load_video_folder(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_moving_digits_folder(tmp_path / "file", num_videos=1)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"split": "validation"}, "split"),
        ({"num_videos": 0}, "num_videos"),
        ({"num_videos": 2.0}, "num_videos"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"num_frames": 1}, "num_frames"),
        ({"num_frames": MAX_MOVING_DIGIT_FRAMES + 1}, "num_frames"),
        ({"num_frames": 4.0}, "num_frames"),
        ({"resolution": 16}, "resolution"),
        ({"resolution": 32.0}, "resolution"),
    ],
)
def test_bad_arguments(arguments, message, tmp_path):
    for make in (moving_digits_arrays, moving_digits):
        with pytest.raises(ValueError, match=message):
            make(**{"num_videos": 1, **arguments})
    with pytest.raises(ValueError, match=message):
        write_moving_digits_folder(tmp_path / "videos", **{"num_videos": 1, **arguments})
    assert not (tmp_path / "videos").exists()  # checked before anything is written


def test_motion_path_bad_arguments():
    attributes = MovingDigitAttributes(3, "red", "large", "left", "quickly")
    with pytest.raises(TypeError, match="MovingDigitAttributes"):
        motion_path({"digit": 3})
    with pytest.raises(TypeError, match="MovingDigitAttributes"):
        motion_caption_for("a red 3")
    with pytest.raises(ValueError, match="num_frames"):
        motion_path(attributes, num_frames=9)
    with pytest.raises(ValueError, match="resolution"):
        motion_path(attributes, resolution=0)
