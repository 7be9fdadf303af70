"""Image + caption + condition(s) training data for `train_controlnet.py`.

Two sources:
- the captioned digits world with conditions derived from each canvas (`digits_world_conditions`): `edges` (OpenCV
  Canny of the canvas, 1 channel) and `position_colour` (the digit's box filled with its colour, 3 channels), so a
  ControlNet can be trained and its condition fidelity measured back without any annotation;
- a `datasets` dataset (image folder or Hub) with one or more condition image columns.

Several conditions are concatenated along the channels (Uni-ControlNet's multi-condition input): an item is
`{"pixel_values": (3, H, W) in [-1, 1], "caption": str, "conditions": (C, H, W) in [0, 1], "index": int}`, and
`condition_channels` says which channels belong to which condition, so training can drop each one separately.
"""

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from storydiff.conditioning import canny_edges, position_mask, prepare_condition
from storydiff.training.text_image_data import image_to_tensor

DIGITS_CONDITION_KINDS = ("edges", "position_colour")
# Canny thresholds for the digits world's 32x32 antialiased canvases: the glyph outline, not the antialiasing ramp
DIGITS_CANNY_THRESHOLDS = (100, 200)


def digit_boxes(canvas: np.ndarray, attributes_list) -> tuple[list, list]:
    """The pixel box and RGB colour of each digit on a uint8 (H, W, 3) canvas, found from its ink.

    Digits on one canvas have distinct colours (the world guarantees it), so each digit's ink is the set of pixels
    whose colour is nearest to its own; the box is that ink's extent. Reading the box from the pixels (rather than
    from the nominal layout) keeps the mask aligned with the jittered glyph.
    """
    from storydiff.data.digits import DIGIT_COLOURS

    ink = canvas.astype(np.float32).max(axis=-1) > 32
    colours = np.asarray([DIGIT_COLOURS[a.colour] for a in attributes_list], dtype=np.float32)
    normalised = canvas.astype(np.float32) / np.maximum(canvas.max(axis=-1, keepdims=True), 1)
    nearest = np.argmin(((normalised[:, :, None, :] - colours[None, None]) ** 2).sum(-1), axis=-1)
    boxes, box_colours = [], []
    for index, colour in enumerate(colours):
        rows, columns = np.nonzero(ink & (nearest == index))
        if rows.size == 0:
            continue
        boxes.append((columns.min(), rows.min(), columns.max() + 1, rows.max() + 1))
        box_colours.append(colour)
    return boxes, box_colours


def digits_world_conditions(canvases: np.ndarray, attributes: Sequence, kinds: Sequence[str]) -> np.ndarray:
    """Conditions of uint8 (N, H, W, 3) canvases, concatenated in the order of `kinds`: float32 (N, C, H, W)."""
    unknown = [kind for kind in kinds if kind not in DIGITS_CONDITION_KINDS]
    if unknown:
        raise ValueError(f"Unknown digits-world condition(s) {unknown}; choose from {DIGITS_CONDITION_KINDS}.")
    resolution = canvases.shape[1]
    maps = []
    for canvas, attributes_list in zip(canvases, attributes):
        channels = []
        for kind in kinds:
            if kind == "edges":
                channels.append(canny_edges(canvas, *DIGITS_CANNY_THRESHOLDS, output_type="pt"))
            else:
                boxes, colours = digit_boxes(canvas, attributes_list)
                channels.append(position_mask(boxes, resolution, colours or None, output_type="pt").expand(3, -1, -1))
        maps.append(torch.cat(channels))
    return torch.stack(maps).numpy()


def digits_world_control_arrays(split: str, num_samples: int, seed: int, resolution: int, kinds: Sequence[str]):
    """(images (N, 3, H, W) in [-1, 1], captions, attributes, conditions (N, C, H, W) in [0, 1])."""
    from storydiff.data.digits import digits_world_arrays

    images, captions, attributes = digits_world_arrays(
        split, num_samples=num_samples, seed=seed, resolution=resolution
    )
    canvases = np.round((images.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).astype(np.uint8)
    return images, captions, attributes, digits_world_conditions(canvases, attributes, kinds)


class ImageConditionDataset(Dataset):
    """In-memory tensors (the digits world) or a `datasets.Dataset` with condition image columns, read lazily."""

    def __init__(
        self,
        images: Optional[torch.Tensor] = None,
        captions: Optional[list] = None,
        conditions: Optional[torch.Tensor] = None,
        hf_dataset=None,
        image_column: str = "image",
        caption_column: str = "text",
        conditioning_columns: Sequence[str] = (),
        resolution: int = 32,
        random_flip: bool = False,
    ):
        self.images, self.captions, self.conditions, self.hf_dataset = images, captions, conditions, hf_dataset
        self.image_column, self.caption_column = image_column, caption_column
        self.conditioning_columns, self.resolution = list(conditioning_columns), resolution
        self.random_flip = random_flip

    def __len__(self) -> int:
        return len(self.captions) if self.hf_dataset is None else len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        if self.hf_dataset is None:
            return {"pixel_values": self.images[index], "caption": self.captions[index],
                    "conditions": self.conditions[index], "index": index}  # fmt: skip
        row = self.hf_dataset[index]
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):
            caption = caption[0] if caption else ""
        # the same geometry as the image (shorter side resized, centre crop), so each condition stays aligned
        conditions = [
            prepare_condition(row[column], self.resolution, self.resolution) for column in self.conditioning_columns
        ]
        pixels, conditions = image_to_tensor(row[self.image_column], self.resolution), torch.cat(conditions)
        if self.random_flip and torch.rand(()) < 0.5:  # the image and its conditions together, or they would disagree
            pixels, conditions = pixels.flip(-1), conditions.flip(-1)
        return {"pixel_values": pixels, "caption": caption, "conditions": conditions, "index": index}

    def condition_channels(self) -> list[int]:
        """Channels of each condition, in order (from the first example for a `datasets` dataset)."""
        if self.hf_dataset is None:
            raise ValueError("In-memory data records its channels where it is built.")
        row = self.hf_dataset[0]
        return [
            prepare_condition(row[column], self.resolution, self.resolution).shape[0]
            for column in self.conditioning_columns
        ]

    def all_captions(self) -> list:
        if self.hf_dataset is None:
            return list(self.captions)
        return [c if isinstance(c, str) else (c[0] if c else "") for c in self.hf_dataset[self.caption_column]]


def collate_image_conditions(examples: list) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "conditions": torch.stack([torch.as_tensor(example["conditions"]) for example in examples]),
        "index": torch.tensor([example["index"] for example in examples]),
    }


def condition_dropout_mask(
    batch_size: int, num_conditions: int, drop_each: float, drop_all: float, keep_all: float, generator=None
) -> torch.Tensor:
    """Which conditions each example keeps: bool (batch, num_conditions), True = kept (Uni-ControlNet's scheme).

    With probability `drop_all` every condition of an example is dropped, with `keep_all` every one is kept, and
    otherwise each is dropped independently with probability `drop_each`. Dropped conditions become zeros, so the
    ControlNet learns every subset of its conditions, and no condition at all.
    """
    draw = torch.rand(batch_size, generator=generator)
    each = torch.rand(batch_size, num_conditions, generator=generator) >= drop_each
    keep = each.clone()
    keep[draw < drop_all] = False
    keep[(draw >= drop_all) & (draw < drop_all + keep_all)] = True
    return keep
