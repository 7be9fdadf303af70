"""The built-in dataset: scikit-learn's 8x8 handwritten digits, upsampled, with one fixed train/test split.

The diffusion model and the evaluation classifier train on the "train" split; generated samples are compared
with the held-out "test" split. Keeping the split in one place keeps those roles from ever overlapping.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

NUM_DIGIT_CLASSES = 10
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_SPLITS = ("train", "test")


def digits_arrays(split: str = "train", resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, resolution, resolution) in [-1, 1] and labels as int64 (N,).

    The 8x8 digits (values 0..16) are upsampled bilinearly. The split is stratified by class, 80/20, seed 0.
    """
    if split not in DIGITS_SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; choose one of {DIGITS_SPLITS}.")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"`resolution` must be an int >= 8, got {resolution!r}.")
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_indices, test_indices = train_test_split(
        indices, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=digits.target
    )
    chosen = np.sort(train_indices if split == "train" else test_indices)
    images = torch.from_numpy(digits.images[chosen].astype(np.float32) / 16.0).unsqueeze(1)
    if resolution != 8:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = (images.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    labels = torch.from_numpy(digits.target[chosen].astype(np.int64))
    return images, labels
