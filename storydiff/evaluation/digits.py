"""Evaluation in miniature: score generated digits with a classifier trained by the project.

`DigitClassifier` is a small CNN trained on the digits *train* split (`training/train_digit_classifier.py`) and
shipped in `storydiff/checkpoints/digit-classifier/`. It gives two numbers for a set of generated digits:

* `class_accuracy`: how often the classifier recognises the class that was asked for (adherence, the role CLIP
  score or Inception Score play for real models);
* `digit_frechet_distance`: the Frechet distance between Gaussians fitted to the classifier's penultimate features
  of the generated digits and of the held-out *test* split (quality and diversity, the role FID plays).

Image convention: the public functions take images the way diffusers pipelines return them, values in [0, 1]:
a numpy array (N, H, W, C) or (N, H, W) (`output_type="np"`), a torch tensor (N, C, H, W) (`output_type="pt"`),
or a list of PIL images. They are converted to grey and resized to the classifier's resolution when needed.
"""

import functools
import weakref
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from storydiff.metrics import frechet_distance

DIGIT_CLASSIFIER_FOLDER = "digit-classifier"


class DigitClassifier(ModelMixin, ConfigMixin):
    r"""A small CNN for the upsampled scikit-learn digits, saved and loaded like any diffusers model.

    Each block is two 3x3 convolutions with SiLU; blocks after the first start with a 2x average pooling. The
    penultimate features are the global average of the last block (as FID uses Inception's pooled features).

    Args:
        sample_size (`int`, defaults to 16): Resolution the classifier was trained at; inputs are resized to it.
        in_channels (`int`, defaults to 1): Image channels.
        block_out_channels (`tuple[int]`, defaults to `(16, 32, 32)`): Width of each block; the last one is the
            width of the features used for the Frechet distance.
        num_classes (`int`, defaults to 10): Number of digit classes.
        dropout (`float`, defaults to 0.1): Dropout before the linear head (training only).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 16,
        in_channels: int = 1,
        block_out_channels: Sequence[int] = (16, 32, 32),
        num_classes: int = 10,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(block_out_channels) == 0:
            raise ValueError("`block_out_channels` needs at least one block width.")
        blocks = []
        channels = in_channels
        for index, width in enumerate(block_out_channels):
            blocks.append(
                nn.Sequential(
                    nn.AvgPool2d(2) if index > 0 else nn.Identity(),
                    nn.Conv2d(channels, width, kernel_size=3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(width, width, kernel_size=3, padding=1),
                    nn.SiLU(),
                )
            )
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, num_classes)

    @property
    def num_features(self) -> int:
        return self.config.block_out_channels[-1]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, num_features) of images (N, in_channels, H, W) in [-1, 1]."""
        hidden = images
        for block in self.blocks:
            hidden = block(hidden)
        return hidden.mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes) of images (N, in_channels, H, W) in [-1, 1]."""
        return self.head(self.head_dropout(self.features(images)))


def default_digit_classifier_path() -> Path:
    """Folder of the digit classifier shipped with storydiff (`storydiff/checkpoints/digit-classifier`)."""
    return Path(__file__).resolve().parents[1] / "checkpoints" / DIGIT_CLASSIFIER_FOLDER


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, device: str) -> DigitClassifier:
    return DigitClassifier.from_pretrained(path).to(device).eval()


def load_digit_classifier(
    path: Optional[Union[str, Path]] = None, device: Union[str, torch.device] = "cpu"
) -> DigitClassifier:
    """Load a trained `DigitClassifier` in eval mode (the shipped one by default). Loads are cached."""
    path = Path(path) if path is not None else default_digit_classifier_path()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No digit classifier at {path}. Train one with `python training/train_digit_classifier.py "
            f"--output_dir {path}`."
        )
    return _load_cached(str(path.resolve()), str(device))


def _images_to_tensor(images) -> torch.Tensor:
    """Any supported image batch -> float32 (N, C, H, W) in [0, 1]."""
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("Got an empty list of images.")
        if all(hasattr(image, "convert") for image in images):  # PIL images
            images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        else:
            images = np.stack([np.asarray(image) for image in images])
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        if tensor.ndim == 3:  # (N, H, W) grey
            tensor = tensor.unsqueeze(-1)
        if tensor.ndim == 4 and tensor.shape[-1] in (1, 3):  # numpy is channels-last, as diffusers returns it
            tensor = tensor.permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().to("cpu")
        tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(1)
        if tensor.ndim == 4 and tensor.shape[1] not in (1, 3) and tensor.shape[-1] in (1, 3):
            tensor = tensor.permute(0, 3, 1, 2)
    else:
        raise TypeError(
            f"Images must be a numpy array, a torch tensor or a list of PIL images, got {type(images).__name__}."
        )
    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(
            "Images must be (N, H, W, C) numpy, (N, C, H, W) torch or (N, H, W) grey with 1 or 3 channels, got "
            f"shape {tuple(images.shape)}."
        )
    if tensor.shape[0] == 0:
        raise ValueError("Got zero images.")
    if not torch.isfinite(tensor).all():
        raise ValueError("Images contain non-finite values.")
    low, high = tensor.min().item(), tensor.max().item()
    if low < -1e-4 or high > 1 + 1e-4:
        raise ValueError(
            f"Images must have values in [0, 1] (diffusers' output convention), got [{low:.3f}, {high:.3f}]. "
            "Convert [-1, 1] tensors with (images + 1) / 2."
        )
    return tensor.clamp(0.0, 1.0)


def _classifier_input(images, classifier: DigitClassifier) -> torch.Tensor:
    """Images in [0, 1] -> the classifier's input: its channels and resolution, values in [-1, 1]."""
    tensor = _images_to_tensor(images)
    in_channels, size = classifier.config.in_channels, classifier.config.sample_size
    if tensor.shape[1] != in_channels:
        tensor = tensor.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1)
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return tensor * 2.0 - 1.0


@torch.no_grad()
def _logits_and_features(images, classifier: DigitClassifier, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    inputs = _classifier_input(images, classifier)
    logits, features = [], []
    for start in range(0, inputs.shape[0], batch_size):
        batch = inputs[start : start + batch_size].to(classifier.device, classifier.dtype)
        batch_features = classifier.features(batch)
        logits.append(classifier.head(batch_features).float().cpu())
        features.append(batch_features.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(features).numpy().astype(np.float64)


def _resolve(classifier: Optional[DigitClassifier]) -> DigitClassifier:
    if classifier is None:
        return load_digit_classifier()
    if not isinstance(classifier, DigitClassifier):
        raise TypeError(f"`classifier` must be a DigitClassifier, got {type(classifier).__name__}.")
    return classifier


def _check_labels(labels, num_images: int, num_classes: int) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a 1-D sequence of integer class indices, got {labels.dtype} {labels.shape}."
        )
    if labels.shape[0] != num_images:
        raise ValueError(f"Got {num_images} images but {labels.shape[0]} labels.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Labels must be in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}.")
    return labels


def real_digit_images(split: str = "test", resolution: int = 16) -> np.ndarray:
    """Real digits of a split as (N, resolution, resolution, 1) float32 in [0, 1], like a pipeline's output."""
    from storydiff.data.digits import digits_arrays

    images, _ = digits_arrays(split, resolution)
    return ((images + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()


def balanced_real_digits(
    split: str = "train", per_class: int = 10, resolution: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` random real digits of every class from a split, as (images in [0, 1] like a pipeline's output,
    labels). Class-balanced like a `ClassConditionalPipeline` batch, so it is the fair real-data reference for one."""
    from storydiff.data.digits import digits_arrays

    images, labels = digits_arrays(split, resolution)
    labels = labels.numpy()
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == label), per_class, replace=False) for label in np.unique(labels)]
    chosen = np.concatenate(picks)
    return ((images[chosen] + 1.0) / 2.0).permute(0, 2, 3, 1).numpy(), labels[chosen]


def classifier_features(images, classifier: Optional[DigitClassifier] = None, batch_size: int = 512) -> np.ndarray:
    """Penultimate-layer features (N, num_features) as float64 of images in [0, 1]."""
    return _logits_and_features(images, _resolve(classifier), batch_size)[1]


def class_accuracy(images, labels, classifier: Optional[DigitClassifier] = None, batch_size: int = 512) -> float:
    """Fraction of images whose predicted class equals the requested label (`labels`, N integer classes)."""
    classifier = _resolve(classifier)
    logits, _ = _logits_and_features(images, classifier, batch_size)
    labels = _check_labels(labels, logits.shape[0], classifier.config.num_classes)
    return float((logits.argmax(axis=1) == labels).mean())


# Features of the real test split, per classifier: they are needed for every Frechet distance.
_test_features_cache: "weakref.WeakKeyDictionary[DigitClassifier, np.ndarray]" = weakref.WeakKeyDictionary()


def _real_features(real_test, classifier: DigitClassifier) -> np.ndarray:
    if real_test is not None:
        return classifier_features(real_test, classifier)
    if classifier not in _test_features_cache:
        test_images = real_digit_images("test", classifier.config.sample_size)
        _test_features_cache[classifier] = classifier_features(test_images, classifier)
    return _test_features_cache[classifier]


def digit_frechet_distance(generated, real_test=None, classifier: Optional[DigitClassifier] = None) -> float:
    """Frechet distance in the classifier's feature space between generated digits and real ones.

    `real_test` defaults to the held-out digits test split (360 images) at the classifier's resolution; the
    classifier never saw it. Like FID, the estimate is biased upwards for small sample counts: compare numbers
    computed from the same number of generated images.
    """
    classifier = _resolve(classifier)
    return frechet_distance(classifier_features(generated, classifier), _real_features(real_test, classifier))


def evaluate_digit_samples(
    images, labels, classifier: Optional[DigitClassifier] = None, real_test=None
) -> dict[str, float]:
    """Class accuracy and digit Frechet distance of one set of samples, with a single classifier pass."""
    classifier = _resolve(classifier)
    logits, features = _logits_and_features(images, classifier, batch_size=512)
    labels = _check_labels(labels, logits.shape[0], classifier.config.num_classes)
    return {
        "class_accuracy": float((logits.argmax(axis=1) == labels).mean()),
        "frechet_distance": frechet_distance(features, _real_features(real_test, classifier)),
        "num_samples": int(logits.shape[0]),
    }
