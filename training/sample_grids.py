"""Sample grids with row and column labels, for validation images and the `samples.png` of a training run.

    grid = labelled_grid(images, rows=["0", "1", ...], columns=["seed 0", "seed 1"], title="step 500, CFG 3.0")
    Image.fromarray(grid).save(path)                     # or save_grid(grid, path), which writes atomically

`images` are `rows * columns` pictures in row-major order (numpy, HWC, values in [0, 1] or uint8). Small pictures
are enlarged (nearest neighbour) to `min_cell` pixels, so that 16x16 digits stay readable beside their labels.
"""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storydiff.atomic_files import atomic_save


def labelled_grid(
    images, rows, columns, title: str = None, min_cell: int = 64, font_size: int = 12, gap: int = 2
) -> np.ndarray:
    """A uint8 RGB grid of `images` with `rows` labels on the left, `columns` labels on top, and an optional
    `title` line above them; pictures are `gap` white pixels apart."""
    images = np.asarray(images)
    if len(images) != len(rows) * len(columns):
        raise ValueError(f"{len(images)} images do not fill {len(rows)} rows x {len(columns)} columns.")
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    zoom = max(1, -(-min_cell // max(images.shape[1:3])))
    images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
    image_h, image_w = images.shape[1:3]
    cell_h, cell_w = image_h + gap, image_w + gap

    font = ImageFont.load_default(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text):
        left, top, right, bottom = measure.textbbox((0, 0), str(text), font=font)
        return right - left, bottom - top

    pad = 4
    left_w = max(text_size(label)[0] for label in rows) + 2 * pad
    line_h = max(text_size(label)[1] for label in [*columns, *rows, title or "A"]) + 2 * pad
    top_h = line_h * (2 if title else 1)
    canvas = Image.new("RGB", (left_w + cell_w * len(columns), top_h + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, label in enumerate(columns):
        width = text_size(label)[0]
        x = left_w + c * cell_w + (image_w - width) // 2
        draw.text((x, top_h - line_h + pad), str(label), fill="black", font=font)
    for r, label in enumerate(rows):
        height = text_size(label)[1]
        draw.text((pad, top_h + r * cell_h + (image_h - height) // 2), str(label), fill="black", font=font)
        for c in range(len(columns)):
            canvas.paste(Image.fromarray(images[r * len(columns) + c]), (left_w + c * cell_w, top_h + r * cell_h))
    return np.asarray(canvas)


def save_grid(grid: np.ndarray, path: str) -> str:
    """Write `grid` as a PNG at `path` atomically (a kill leaves the old picture or the new one)."""
    atomic_save(path, lambda temporary: Image.fromarray(grid).save(temporary, format="PNG"))
    return str(path)


def log_grid(accelerator, grid: np.ndarray, path: str, step: int) -> str:
    """`save_grid(grid, path)`, and the grid as the "validation" image of `step` in TensorBoard when it is a tracker."""
    save_grid(grid, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
    return str(path)
