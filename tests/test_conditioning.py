"""ControlNet conditions: computed maps, position masks and `prepare_condition`'s alignment with the images."""

import sys

import numpy as np
import PIL.Image
import pytest
import torch

from storydiff.conditioning import canny_edges, depth_style_map, edge_map, position_mask, prepare_condition
from storydiff.data.digits import DIGIT_COLOURS, DigitAttributes, digit_glyphs, placement_for, render_canvas
from storydiff.training.text_image_data import image_to_tensor


def square_image(size: int = 32, left: int = 8, right: int = 24) -> np.ndarray:
    """A white square [left, right) x [left, right) on black, uint8 (size, size)."""
    image = np.zeros((size, size), dtype=np.uint8)
    image[left:right, left:right] = 255
    return image


# ----------------------------------------------------------------------------------------------------------------
# Input kinds, shapes and dtypes


INPUT_KINDS = {
    "numpy grey uint8": lambda: square_image(),
    "numpy grey float": lambda: square_image().astype(np.float32) / 255,
    "numpy RGB uint8": lambda: np.repeat(square_image()[:, :, None], 3, axis=2),
    "numpy RGB float64": lambda: np.repeat(square_image()[:, :, None], 3, axis=2) / 255.0,
    "numpy bool": lambda: square_image() > 0,
    "PIL L": lambda: PIL.Image.fromarray(square_image()),
    "PIL RGBA": lambda: PIL.Image.fromarray(square_image()).convert("RGBA"),
    "torch (C, H, W)": lambda: torch.from_numpy(square_image()).float().div(255).expand(3, -1, -1),
    "torch (H, W)": lambda: torch.from_numpy(square_image()),
}


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_maps_accept_every_input_kind(kind):
    image = INPUT_KINDS[kind]()
    edges = edge_map(image)
    depth = depth_style_map(image)
    assert edges.shape == depth.shape == (32, 32) and edges.dtype == depth.dtype == np.float32
    assert edges.min() >= 0 and edges.max() == pytest.approx(1.0)
    assert depth.min() >= 0 and depth.max() == pytest.approx(1.0)
    condition = prepare_condition(image, 16, 16)
    assert condition.dtype == torch.float32 and condition.shape[1:] == (16, 16)
    assert 0 <= condition.min() and condition.max() == 1


@pytest.mark.parametrize("function", [edge_map, depth_style_map])
def test_output_types(function):
    image = square_image()
    as_numpy, as_pil, as_torch = (function(image, output_type=kind) for kind in ("np", "pil", "pt"))
    assert as_numpy.shape == (32, 32)
    assert isinstance(as_pil, PIL.Image.Image) and as_pil.mode == "L" and as_pil.size == (32, 32)
    assert as_torch.shape == (1, 32, 32) and as_torch.dtype == torch.float32
    np.testing.assert_allclose(as_torch[0].numpy(), as_numpy)
    np.testing.assert_allclose(np.asarray(as_pil) / 255.0, as_numpy, atol=0.5 / 255 + 1e-6)


def test_lists_give_lists():
    images = [square_image(), square_image(size=20, left=4, right=12)]
    edges = edge_map(images, output_type="pt")
    assert isinstance(edges, list) and [tuple(e.shape) for e in edges] == [(1, 32, 32), (1, 20, 20)]
    depths = depth_style_map(images)
    assert [d.shape for d in depths] == [(32, 32), (20, 20)]


# ----------------------------------------------------------------------------------------------------------------
# Canny


def test_canny_finds_the_border_of_a_square_and_nothing_in_flat_regions():
    pytest.importorskip("cv2")
    edges = canny_edges(square_image())
    assert edges.dtype == np.uint8 and edges.shape == (32, 32) and set(np.unique(edges)) == {0, 255}
    rows, columns = np.nonzero(edges)
    # every edge pixel is on the square's border: one pixel either side of x, y = 8 or 24
    on_vertical_border = (np.minimum(abs(columns - 7.5), abs(columns - 23.5)) <= 1) & (rows >= 6) & (rows <= 25)
    on_horizontal_border = (np.minimum(abs(rows - 7.5), abs(rows - 23.5)) <= 1) & (columns >= 6) & (columns <= 25)
    assert (on_vertical_border | on_horizontal_border).all()
    # the whole border is found: each side has edge pixels along most of its length
    assert (edges[8:24, 6:10].max(axis=1) > 0).all() and (edges[8:24, 22:26].max(axis=1) > 0).all()
    assert (edges[6:10, 8:24].max(axis=0) > 0).all() and (edges[22:26, 8:24].max(axis=0) > 0).all()
    # flat regions (inside the square, the black surround) have none
    assert edges[11:21, 11:21].max() == 0 and edges[:5].max() == 0 and edges[:, 27:].max() == 0


def test_canny_output_types_inputs_and_lists():
    pytest.importorskip("cv2")
    rgb = np.repeat(square_image()[:, :, None], 3, axis=2)
    reference = canny_edges(square_image())
    np.testing.assert_array_equal(canny_edges(rgb), reference)
    np.testing.assert_array_equal(canny_edges(PIL.Image.fromarray(rgb).convert("RGBA")), reference)
    np.testing.assert_array_equal(canny_edges(rgb / 255.0), reference)
    as_pil = canny_edges(rgb, output_type="pil")
    assert as_pil.mode == "L" and np.array_equal(np.asarray(as_pil), reference)
    as_torch = canny_edges(rgb, output_type="pt")
    assert as_torch.shape == (1, 32, 32) and set(as_torch.unique().tolist()) == {0.0, 1.0}
    both = canny_edges([rgb, square_image()], 50, 150)
    assert isinstance(both, list) and len(both) == 2 and np.array_equal(both[0], both[1])
    # colours of equal brightness still have an edge between them (Canny runs on RGB, not on the grey image)
    red_green = np.zeros((16, 16, 3), dtype=np.uint8)
    red_green[:, :8, 0] = red_green[:, 8:, 1] = 255
    assert canny_edges(red_green)[:, 6:10].any()


def test_canny_on_a_photo_finds_a_plausible_amount_of_edges():
    pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data")
    edges = canny_edges(skimage_data.coffee())
    assert edges.shape == (400, 600)
    assert 0.01 < (edges > 0).mean() < 0.40


def test_canny_without_opencv_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # what Python does for a module that is not installed
    with pytest.raises(ImportError, match="pip install opencv-python-headless"):
        canny_edges(square_image())


# ----------------------------------------------------------------------------------------------------------------
# Soft edges and depth-style maps


def test_edge_map_is_strong_on_the_border_and_zero_in_flat_regions():
    edges = edge_map(square_image(), blur_sigma=0)
    assert edges[:, 7:9].max() == 1 and edges[12:20, 12:20].max() == 0 and edges[:4, :4].max() == 0
    assert edge_map(np.full((8, 8), 0.3)).max() == 0  # flat: zeros, not normalised noise
    blurred = edge_map(square_image(), blur_sigma=2)
    assert (blurred > 0.1).sum() > (edges > 0.1).sum()  # a blur widens the lines


def test_depth_style_map_bulges_in_the_middle_of_the_foreground():
    depth = depth_style_map(square_image())
    assert depth[:8].max() == 0 and depth[:, 24:].max() == 0  # background is far
    assert depth[15:17, 15:17].min() == 1 and depth[8, 8] < 0.2  # the middle is nearest, the rim far
    assert depth_style_map(np.ones((6, 6), dtype=bool)).min() == 1  # all foreground: flat
    assert depth_style_map(np.zeros((6, 6))).max() == 0
    gradient = np.tile(np.linspace(0.2, 0.8, 10, dtype=np.float32), (4, 1))
    luminance = depth_style_map(gradient, method="luminance")
    assert luminance[0, 0] == 0 and luminance[0, -1] == pytest.approx(1) and (np.diff(luminance[0]) > 0).all()


def test_depth_style_map_of_a_digits_world_canvas():
    glyphs, labels = digit_glyphs("train")
    placement = placement_for(DigitAttributes(int(labels[0]), "red", "centre", "large"), glyphs[0], resolution=32)
    canvas = render_canvas([placement], resolution=32)
    depth = depth_style_map(canvas, threshold=0.3, blur_sigma=1.0, output_type="pt")
    assert depth.shape == (1, 32, 32)
    left, top, right, bottom = placement.box()
    inside = depth[0, int(top) + 1 : int(bottom), int(left) + 1 : int(right)]
    assert inside.max() == 1 and depth[0, :4].max() < 0.05  # the digit is near, the empty top row far


# ----------------------------------------------------------------------------------------------------------------
# Position and colour masks


def test_position_mask_fills_pixel_boxes_with_their_colours():
    mask = position_mask([(2, 4, 6, 8), (10, 0, 12, 3)], (12, 16), colours=[(1, 0, 0), (0, 1, 1)])
    assert mask.shape == (12, 16, 3) and mask.dtype == np.float32
    np.testing.assert_array_equal(mask[4:8, 2:6], np.broadcast_to([1, 0, 0], (4, 4, 3)))
    np.testing.assert_array_equal(mask[0:3, 10:12], np.broadcast_to([0, 1, 1], (3, 2, 3)))
    assert mask.sum() == 4 * 4 + 2 * 3 * 2  # nothing outside the boxes
    plain = position_mask([(2, 4, 6, 8)], 10)
    assert plain.shape == (10, 10) and plain.sum() == 16
    assert position_mask([(2, 4, 6, 8)], 10, output_type="pt").shape == (1, 10, 10)
    rgb = position_mask([(2, 4, 6, 8)], 10, colours=[DIGIT_COLOURS["blue"]], output_type="pil")
    assert rgb.mode == "RGB" and rgb.getpixel((3, 5)) == (76, 76, 255)  # 0.3 * 255 rounded


def test_position_mask_partial_pixels_overlaps_and_clipping():
    mask = position_mask([(1.5, 0, 3, 1)], (1, 4))
    np.testing.assert_allclose(mask[0], [0, 0.5, 1, 0])  # half of pixel 1 is inside
    overlap = position_mask([(0, 0, 3, 3), (1, 1, 4, 4)], 4, colours=[(1, 0, 0), (0.5, 1, 0)])
    np.testing.assert_allclose(overlap[1, 1], [1, 1, 0])  # a per-channel maximum, never above 1
    clipped = position_mask([(-5, -5, 2, 2), (30, 30, 40, 40)], 4)
    assert clipped.sum() == 4
    assert position_mask([], 4).shape == (4, 4) and position_mask([], 4, colours=[]).shape == (4, 4, 3)


def test_position_mask_of_a_digits_world_canvas_covers_its_ink():
    glyphs, labels = digit_glyphs("train")
    placements = [
        placement_for(DigitAttributes(int(labels[0]), "red", "top left", "small"), glyphs[0], resolution=32),
        placement_for(DigitAttributes(int(labels[1]), "cyan", "bottom right", "large"), glyphs[1], resolution=32),
    ]
    canvas = render_canvas(placements, resolution=32)
    mask = position_mask([p.box() for p in placements], 32, colours=[p.colour for p in placements])
    assert (mask >= canvas - 1e-6).all()  # every bit of ink lies inside its box, in its colour


# ----------------------------------------------------------------------------------------------------------------
# prepare_condition: alignment, resampling, channels


def test_a_bright_box_lands_where_expected_in_a_non_square_image():
    # 48 wide x 32 high -> 16: scale 1/2 to 24 x 16, then a centre crop drops 4 columns on the left
    image = np.zeros((32, 48), dtype=np.uint8)
    image[8:16, 30:38] = 255
    condition = prepare_condition(image, 16, 16)
    expected = np.zeros((16, 16), dtype=np.float32)
    expected[4:8, 11:15] = 1
    np.testing.assert_array_equal(condition[0].numpy(), expected)
    top_left = prepare_condition(image, 16, 16, center_crop=False)
    np.testing.assert_array_equal(top_left[0].numpy()[4:8, 15:16], 1)  # not cropped on the left: 4 columns right
    assert top_left[0].sum() == 4 * 1


@pytest.mark.parametrize("source_size", [(48, 32), (32, 48), (27, 40), (50, 23)])  # (width, height), odd crops
@pytest.mark.parametrize("center_crop", [True, False])
def test_the_condition_lands_where_the_image_content_does(source_size, center_crop):
    width, height = source_size
    rng = np.random.default_rng(width * height)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for _ in range(3):  # three bright blobs at random places
        x, y = rng.integers(3, width - 9), rng.integers(3, height - 9)
        image[y : y + 6, x : x + 6] = 255
    pictured = (image_to_tensor(PIL.Image.fromarray(image), 16, center_crop=center_crop) + 1) / 2
    for resample in ("nearest", "bilinear", "area"):
        condition = prepare_condition(image, 16, 16, resample=resample, center_crop=center_crop)
        assert condition.shape == pictured.shape == (3, 16, 16)
        # same geometry: the filters differ only in how they draw the blobs' rims, so the maps agree closely and
        # their centres of mass coincide: bilinear to a tenth of a pixel (as the image's bicubic filter would),
        # nearest and PIL's box filter (which weighs whole source pixels) within half a pixel, where a crop or a
        # sampling grid off by one pixel would be a whole pixel away
        assert (condition - pictured).abs().mean() < 0.05
        tolerance = 0.1 if resample == "bilinear" else 0.45
        for axis in (1, 2):
            coordinates = torch.arange(16.0).view((1, -1, 1) if axis == 1 else (1, 1, -1))
            centre_condition = (condition * coordinates).sum() / condition.sum()
            centre_pictured = (pictured * coordinates).sum() / pictured.sum()
            assert abs(centre_condition - centre_pictured) < tolerance


def test_non_square_targets():
    image = np.zeros((40, 40), dtype=np.uint8)
    image[0:10, 20:30] = 255
    # 40 x 40 -> 32 high x 16 wide: scale 0.8 to 32 x 32, then 8 columns cropped on each side
    condition = prepare_condition(image, 32, 16)
    assert condition.shape == (1, 32, 16)
    expected = np.zeros((32, 16), dtype=np.float32)
    expected[0:8, 8:16] = 1
    np.testing.assert_array_equal(condition[0].numpy(), expected)
    assert prepare_condition(np.zeros((20, 10)), 7, 12).shape == (1, 7, 12)  # a portrait map into a landscape model


def test_nearest_keeps_the_label_set_and_bilinear_does_not():
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 3, 7, 150, 255], dtype=np.uint8), size=(37, 53))
    for height, width in ((16, 16), (64, 100), (20, 12)):
        condition = prepare_condition(PIL.Image.fromarray(labels), height, width, resample="nearest")
        assert set(np.rint(condition.numpy() * 255).astype(int).ravel()) <= {0, 3, 7, 150, 255}
    smoothed = prepare_condition(labels, 16, 16, resample="bilinear")
    assert not set(np.rint(smoothed.numpy() * 255).astype(int).ravel()) <= {0, 3, 7, 150, 255}


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_any_channel_count_passes_through(channels):
    rng = np.random.default_rng(channels)
    as_numpy = rng.random((24, 30, channels)).astype(np.float32)
    as_torch = torch.from_numpy(as_numpy).permute(2, 0, 1)
    for condition in (as_numpy, as_torch):
        prepared = prepare_condition(condition, 12, 12, channels=channels, resample="area")
        assert prepared.shape == (channels, 12, 12) and prepared.dtype == torch.float32
    # at the target size already, values come back unchanged
    same = prepare_condition(as_torch, 24, 30, channels=channels)
    torch.testing.assert_close(same, as_torch)


def test_a_channel_mismatch_is_an_error_not_a_broadcast():
    with pytest.raises(
        ValueError, match=r"condition has 1 channel, the ControlNet expects 3 \(conditioning_channels\)"
    ):
        prepare_condition(np.zeros((8, 8)), 8, 8, channels=3)
    with pytest.raises(ValueError, match="condition has 4 channels, the ControlNet expects 3"):
        prepare_condition(PIL.Image.new("RGBA", (8, 8)), 8, 8, channels=3)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "condition, message",
    [
        (np.zeros((2, 8, 8, 3)), r"must be \(H, W\) or \(H, W, C\).*list"),
        (np.zeros(8), r"must be \(H, W\) or \(H, W, C\)"),
        (torch.zeros(1, 3, 8, 8), r"must be \(H, W\) or \(C, H, W\)"),
        (np.zeros((0, 8)), "empty"),
        (np.zeros((8, 8, 0)), "empty"),
        (np.full((8, 8), np.nan), "non-finite"),
        (np.full((8, 8), np.inf), "non-finite"),
        (np.full((8, 8), -0.5), r"must be in \[0, 1\].*\(x \+ 1\) / 2"),
        (np.zeros((8, 8), dtype=np.int64), "dtype int64; use uint8"),
        ("image.png", "PIL image, a numpy array or a torch tensor"),
    ],
)
def test_bad_conditions_are_explained(condition, message):
    with pytest.raises((ValueError, TypeError), match=message):
        prepare_condition(condition, 8, 8)
    with pytest.raises((ValueError, TypeError), match=message):
        edge_map(condition)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"height": 0, "width": 8}, "`height` must be a positive int"),
        ({"height": 8, "width": 8.0}, "`width` must be a positive int"),
        ({"height": 8, "width": 8, "resample": "bicubic"}, r"`resample` must be one of \('nearest', 'bilinear'"),
        ({"height": 8, "width": 8, "channels": 0}, "`channels` must be a positive int"),
    ],
)
def test_bad_prepare_arguments_are_explained(arguments, message):
    with pytest.raises(ValueError, match=message):
        prepare_condition(np.zeros((8, 8)), **arguments)


@pytest.mark.parametrize(
    "low, high, message",
    [
        (200, 100, "0 <= low_threshold <= high_threshold"),
        (-1, 100, "0 <= low_threshold <= high_threshold"),
        (float("nan"), 100, "`low_threshold` must be a finite number"),
        (0, float("inf"), "`high_threshold` must be a finite number"),
        ("100", 200, "`low_threshold` must be a finite number"),
    ],
)
def test_bad_canny_thresholds_are_explained(low, high, message):
    with pytest.raises(ValueError, match=message):
        canny_edges(square_image(), low, high)


def test_bad_map_arguments_are_explained():
    with pytest.raises(ValueError, match="`output_type` must be one of"):
        edge_map(square_image(), output_type="tensor")
    with pytest.raises(ValueError, match="`blur_sigma` must be a finite number >= 0"):
        edge_map(square_image(), blur_sigma=-1)
    with pytest.raises(ValueError, match="`method` must be one of"):
        depth_style_map(square_image(), method="midas")
    with pytest.raises(ValueError, match=r"`threshold` must be a number in \[0, 1\)"):
        depth_style_map(square_image(), threshold=1.5)
    with pytest.raises(ValueError, match=r"\(1 to 4 channels\), got 5 channels"):
        edge_map(np.zeros((8, 8, 5)))
    with pytest.raises(ValueError, match="A PIL image holds 1 or 3 channels"):
        position_mask([(0, 0, 2, 2)], 4, colours=[(1, 0, 0, 1)], output_type="pil")
    with pytest.raises(ValueError, match="`aperture_size` must be 3, 5 or 7"):
        canny_edges(square_image(), aperture_size=4)


@pytest.mark.parametrize(
    "boxes, resolution, colours, message",
    [
        ([(4, 0, 2, 2)], 8, None, r"Box 0 must be 4 finite pixel coordinates \(left, top, right, bottom\)"),
        ([(0, 0, 2)], 8, None, "Box 0 must be 4 finite"),
        ([(0, 0, 2, float("nan"))], 8, None, "Box 0 must be 4 finite"),
        ([(0, 0, 2, 2)], 0, None, "`resolution` must be a positive int"),
        ([(0, 0, 2, 2)], (8, 8.5), None, "`resolution` must be a positive int"),
        ([(0, 0, 2, 2)], 8, [(1, 0, 0), (0, 1, 0)], "2 colours; give one colour per box"),
        ([(0, 0, 2, 2), (1, 1, 3, 3)], 8, [(1, 0, 0), (0, 1)], "same, non-zero number of channels"),
        ([(0, 0, 2, 2)], 8, [(2, 0, 0)], r"finite and in \[0, 1\]"),
    ],
)
def test_bad_position_masks_are_explained(boxes, resolution, colours, message):
    with pytest.raises(ValueError, match=message):
        position_mask(boxes, resolution, colours)
