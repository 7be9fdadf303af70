"""Image-caption training data for `train_vae.py` and `train_text_to_image.py`.

Sources: the built-in captioned digits world (`storydiff.data.digits`), an image folder with a `metadata.jsonl`
(datasets' "imagefolder" layout: `{"file_name": ..., "text": ...}` per line), or a Hub dataset with an image and a
caption column. Every item is `{"pixel_values": (C, H, W) in [-1, 1], "caption": str, "index": int}`; `index` lets
tests check the exact data order.
"""

from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DIGITS_WORLD = "digits_world"
BUILT_IN_DATASETS = (DIGITS_WORLD,)


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """RGB, shorter side resized to `resolution` (bicubic), centre crop, scaled to [-1, 1], (3, H, W)."""
    image = image.convert("RGB")
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    if not center_crop:
        left = top = 0
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(Dataset):
    """Either in-memory tensors with captions (the digits world) or a `datasets.Dataset` read lazily."""

    def __init__(
        self,
        images: Optional[torch.Tensor] = None,
        captions: Optional[list] = None,
        hf_dataset=None,
        image_column: str = "image",
        caption_column: str = "text",
        resolution: int = 32,
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        self.images, self.captions, self.hf_dataset = images, captions, hf_dataset
        self.image_column, self.caption_column = image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.captions) if self.hf_dataset is None else len(self.hf_dataset)

    def __getitem__(self, index: int) -> dict:
        if self.hf_dataset is None:
            return {"pixel_values": self.images[index], "caption": self.captions[index], "index": index}
        row = self.hf_dataset[index]
        pixels = image_to_tensor(row[self.image_column], self.resolution, self.center_crop)
        if self.random_flip and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
        caption = row[self.caption_column]
        if isinstance(caption, (list, tuple)):  # several captions per image: the first, deterministically
            caption = caption[0] if caption else ""
        return {"pixel_values": pixels, "caption": caption, "index": index}

    def all_captions(self) -> list:
        if self.hf_dataset is None:
            return list(self.captions)
        return [c if isinstance(c, str) else (c[0] if c else "") for c in self.hf_dataset[self.caption_column]]


def digits_world_training_data(resolution: int, num_samples: int, seed: int) -> ImageCaptionDataset:
    """The train split of the captioned digits world as an in-memory dataset."""
    from storydiff.data.digits import digits_world_arrays

    images, captions, _ = digits_world_arrays("train", num_samples=num_samples, seed=seed, resolution=resolution)
    return ImageCaptionDataset(images=torch.as_tensor(images), captions=list(captions), resolution=resolution)


def collate_image_captions(examples: list) -> dict:
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "captions": [example["caption"] for example in examples],
        "index": torch.tensor([example["index"] for example in examples]),
    }
