"""Coherence scores: how well a condition (a caption, a class label) describes its image, in [0, 1].

Coherence-aware diffusion (CAD) conditions the denoiser on such a score for every training pair. Two scorers:

* Image-caption: the cosine similarity of a CLIP model's image and text embeddings (`clip_cosine`), with any
  transformers `CLIPModel` checkpoint (OpenAI CLIP, MetaCLIP, or storydiff's tiny digits CLIP,
  `storydiff.checkpoints.digits_clip_path()`). `clip_coherence` is the CAD authors' score, CLIP score / 100 =
  max(cos, 0), optionally rescaled.
* Image-label: the out-of-fold probability a classifier gives to the label a sample carries
  (`classifier_coherence`). This one is storydiff's design: the authors never released their class-conditional
  coherence.

`coherence_summary` describes a score distribution and `bin_coherence` quantises scores the way
`storydiff.models.coherence.CoherenceEmbedding` does.

    >>> from transformers import CLIPModel, CLIPProcessor
    >>> from storydiff.checkpoints import digits_clip_path
    >>> from storydiff.coherence import clip_coherence
    >>> model = CLIPModel.from_pretrained(digits_clip_path())
    >>> processor = CLIPProcessor.from_pretrained(digits_clip_path())
    >>> scores = clip_coherence(images, captions, model, processor)  # (N,) in [0, 1]
"""

from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from storydiff.models.coherence import check_bin_edges, check_coherence, quantile_bin_edges

# Inputs of this size or smaller score without a progress bar (it would only flash).
PROGRESS_BAR_MIN_ITEMS = 256
SUMMARY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
SUMMARY_HISTOGRAM_BINS = 10

__all__ = [
    "bin_coherence",
    "check_coherence",
    "classifier_coherence",
    "clip_coherence",
    "clip_cosine",
    "coherence_summary",
    "quantile_bin_edges",
]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as_images(images):
    """A tensor is checked and kept; any other iterable of images (a list, a `datasets` column) becomes a list."""
    if torch.is_tensor(images):
        if images.ndim != 4:
            raise ValueError(
                f"Image tensors must have shape (N, C, H, W) with values in [0, 1], got shape {tuple(images.shape)}."
            )
        return images
    if isinstance(images, (str, bytes, dict)) or not hasattr(images, "__iter__"):
        raise TypeError(
            f"`images` must be a list of PIL images or an (N, C, H, W) tensor, got {type(images).__name__}."
        )
    return list(images)


def _tensor_image_options(processor, images: torch.Tensor) -> dict:
    """Processor options for a float tensor in [0, 1]: no 1/255 rescale (that is for 0..255 pixels), and no resize
    or crop when the tensor already has the processor's output size (a PIL resize would quantise it to 8 bits)."""
    options = {"do_rescale": False}
    crop_size = getattr(getattr(processor, "image_processor", processor), "crop_size", None)
    if isinstance(crop_size, dict):
        height, width = crop_size.get("height"), crop_size.get("width")
    else:
        height, width = getattr(crop_size, "height", None), getattr(crop_size, "width", None)
    if (height, width) == tuple(images.shape[-2:]):
        options.update(do_resize=False, do_center_crop=False)
    return options


def _projected(features) -> torch.Tensor:
    # transformers 4 returns the projected embeddings; transformers 5 an output whose pooler_output holds them
    return features if torch.is_tensor(features) else features.pooler_output


@torch.no_grad()
def clip_cosine(
    images,
    captions: Sequence[str],
    model,
    processor,
    batch_size: int = 64,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: Optional[bool] = None,
) -> torch.Tensor:
    """Cosine similarity between each image's and its caption's CLIP embedding.

    Args:
        images: A list of PIL images, or a float tensor (N, C, H, W) with values in [0, 1].
        captions (`Sequence[str]`): One caption per image.
        model: A transformers `CLIPModel` (MetaCLIP checkpoints load as the same class), or any model with
            `get_image_features` / `get_text_features`.
        processor: Its `CLIPProcessor`, or anything callable like one (`processor(text=..., images=...,
            return_tensors="pt", padding=True, truncation=True)`).
        batch_size (`int`, defaults to 64): Pairs per forward pass.
        device (*optional*): Where the model runs; CUDA when available, else CPU. The model is moved there.
        show_progress (`bool`, *optional*): A tqdm bar; by default only for more than `PROGRESS_BAR_MIN_ITEMS` pairs.

    Returns:
        `torch.Tensor` of shape (N,), float32 on the CPU, values in [-1, 1].
    """
    images = _as_images(images)
    num_images = len(images)
    if isinstance(captions, str):
        raise TypeError("`captions` needs one caption per image (a list of strings), not a single string.")
    captions = list(captions)
    if num_images != len(captions):
        raise ValueError(f"Got {num_images} images but {len(captions)} captions: give one caption per image.")
    if num_images == 0:
        raise ValueError("No images to score: `images` and `captions` are empty.")
    not_text = [index for index, caption in enumerate(captions) if not isinstance(caption, str)]
    if not_text:
        raise TypeError(f"Every caption must be a string; these are not: positions {not_text[:10]}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if torch.is_tensor(images):
        finite = torch.isfinite(images)
        if not finite.all() or images.min() < 0 or images.max() > 1:
            raise ValueError("Image tensors must hold finite values in [0, 1] (not [-1, 1] or 0..255).")
    device = torch.device(device) if device is not None else _default_device()
    model = model.to(device).eval()
    if show_progress is None:
        show_progress = num_images > PROGRESS_BAR_MIN_ITEMS
    cosines = []
    for start in tqdm(range(0, num_images, batch_size), desc="CLIP cosine", disable=not show_progress):
        batch_images = images[start : start + batch_size]
        image_options = {}
        if torch.is_tensor(batch_images):
            batch_images, image_options = list(batch_images.float().cpu()), _tensor_image_options(processor, images)
        inputs = processor(
            text=captions[start : start + batch_size],
            images=batch_images,
            return_tensors="pt",
            padding=True,
            truncation=True,
            **image_options,
        )
        image_features = _projected(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        text_inputs = {name: inputs[name].to(device) for name in ("input_ids", "attention_mask") if name in inputs}
        text_features = _projected(model.get_text_features(**text_inputs))
        cosines.append(torch.nn.functional.cosine_similarity(image_features.float(), text_features.float(), dim=-1))
    return torch.cat(cosines).cpu()


def clip_coherence(
    images,
    captions: Sequence[str],
    model,
    processor,
    low: Optional[float] = None,
    high: Optional[float] = None,
    **kwargs,
) -> torch.Tensor:
    """Coherence of image-caption pairs from CLIP: the CAD authors' CLIP score / 100 = max(cos, 0), in [0, 1].

    A large CLIP's cosines of matching pairs sit around 0.3 and those of random pairs around 0.1; a small model
    trained on a small world can spread them quite differently (all near 0.9, say). `low` and `high` rescale: the
    cosine is mapped affinely from [low, high] onto [0, 1] and clipped (cos <= low -> 0, cos >= high -> 1), so that
    the scores use the whole range a coherence embedding sees. Good values are low and high quantiles of the
    cosines over the data (see `coherence_summary(clip_cosine(...))`). Give both or neither.

    Other keyword arguments go to `clip_cosine` (`batch_size`, `device`, `show_progress`). Returns (N,) float32.
    """
    cosines = clip_cosine(images, captions, model, processor, **kwargs)
    return rescale_cosine(cosines, low, high)


def rescale_cosine(cosines: torch.Tensor, low: Optional[float] = None, high: Optional[float] = None) -> torch.Tensor:
    """max(cos, 0) without `low`/`high`; with them, (cos - low) / (high - low) clipped to [0, 1]."""
    if (low is None) != (high is None):
        raise ValueError(
            f"Give both `low` and `high` to rescale CLIP cosines, or neither; got low={low}, high={high}."
        )
    if low is None:
        return cosines.clamp(min=0.0)
    if not (np.isfinite(low) and np.isfinite(high) and -1.0 <= low < high <= 1.0):
        raise ValueError(f"The rescale needs -1 <= low < high <= 1 (cosine values), got low={low}, high={high}.")
    return ((cosines - low) / (high - low)).clamp(0.0, 1.0)


def classifier_coherence(
    features,
    labels,
    num_folds: int = 5,
    seed: int = 0,
    classifier=None,
) -> np.ndarray:
    """Coherence of image-label pairs: the out-of-fold probability a classifier gives to each sample's *given* label.

    The data are split into `num_folds` stratified folds; each fold is scored by a classifier trained on the other
    folds only (`sklearn.model_selection.cross_val_predict(..., method="predict_proba")`). Out-of-fold matters: a
    classifier that scored its own training samples would have memorised their labels, wrong ones included, and
    would call a mislabelled digit coherent. A classifier that never saw the sample judges its label by what the
    rest of the data say that image looks like, so a corrupted label gets a low probability.

    This class-conditional coherence is storydiff's own design: the CAD authors describe class-conditional
    experiments but never released how they scored them.

    Args:
        features: (N, ...) array or tensor: flattened pixels, or any features (flattened to (N, D)).
        labels: (N,) integer class labels (the given, possibly wrong, ones). Every class needs at least
            `num_folds` samples.
        num_folds (`int`, defaults to 5): Cross-validation folds.
        seed (`int`, defaults to 0): Shuffles the folds.
        classifier (*optional*): An sklearn classifier with `predict_proba`; by default a standardising
            `LogisticRegression` on the features.

    Returns:
        `np.ndarray` of shape (N,), float64 in [0, 1].
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = features.detach().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    labels = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if features.ndim < 1 or features.shape[0] == 0:
        raise ValueError("No samples to score: `features` is empty.")
    features = features.reshape(features.shape[0], -1).astype(np.float64)
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"Got {features.shape[0]} feature rows but labels of shape {labels.shape}: give one label per sample."
        )
    if not np.isfinite(features).all():
        rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
        raise ValueError(f"Features must be finite; rows {rows[:10].tolist()} hold NaN or infinity.")
    if isinstance(num_folds, bool) or not isinstance(num_folds, int) or num_folds < 2:
        raise ValueError(f"`num_folds` must be an int >= 2, got {num_folds!r}.")
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"Need at least two classes to score labels, got only {classes.tolist()}.")
    if counts.min() < num_folds:
        small = classes[counts < num_folds].tolist()
        raise ValueError(
            f"Every class needs at least num_folds={num_folds} samples for stratified folds; classes {small} have "
            f"fewer. Lower `num_folds` or drop those classes."
        )
    if classifier is None:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, C=0.1))
    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(classifier, features, labels, cv=folds, method="predict_proba")
    # predict_proba's columns follow the sorted classes (every class is in every training fold, being stratified)
    column = np.searchsorted(classes, labels)
    return probabilities[np.arange(len(labels)), column].clip(0.0, 1.0)


def coherence_summary(values) -> dict:
    """The distribution of coherence scores: `count`, `mean`, `std`, `min`, `max`, quantiles `q10` .. `q90`
    (0.1, 0.25, 0.5, 0.75, 0.9) and a 10-bin histogram on [0, 1] (`histogram_edges`, `histogram_counts`).
    Raises a ValueError for an empty input or a value outside [0, 1]."""
    scores = _as_scores(values)
    edges = np.linspace(0.0, 1.0, SUMMARY_HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(scores, bins=edges)
    summary = {
        "count": int(scores.size),
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "min": float(scores.min()),
        "max": float(scores.max()),
    }
    for level in SUMMARY_QUANTILES:
        summary[f"q{round(level * 100)}"] = float(np.quantile(scores, level))
    summary["histogram_edges"] = [round(float(edge), 6) for edge in edges]
    summary["histogram_counts"] = [int(count) for count in counts]
    return summary


def bin_coherence(values, bin_edges: Sequence[float]) -> np.ndarray:
    """Quantise scores into `len(bin_edges) + 1` bins as `CoherenceEmbedding` does: a score's bin index is the number
    of interior edges <= it, and the binned value is `bin_index / (num_bins - 1)` (lowest bin 0, highest 1).
    `bin_edges` are interior edges, strictly increasing inside (0, 1), e.g. from `quantile_bin_edges`."""
    scores = _as_scores(values)
    edges = np.asarray(check_bin_edges(bin_edges, len(list(bin_edges)) + 1), dtype=np.float64)
    index = np.searchsorted(edges, scores, side="right")  # torch.bucketize(..., right=True)
    return index / len(edges)


def _as_scores(values) -> np.ndarray:
    # float64 throughout: a score equal to a bin edge must compare equal to it (float32 would round 0.7 below 0.7)
    values = values.detach().cpu() if torch.is_tensor(values) else torch.from_numpy(np.asarray(values, np.float64))
    scores = check_coherence(values.double())
    if scores.numel() == 0:
        raise ValueError("No coherence scores given: the input is empty.")
    return scores.double().numpy()
