"""storydiff.coherence (CLIP cosine, classifier coherence, summary, binning) and storydiff.data.noisy."""

import argparse
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from storydiff.coherence import (
    bin_coherence,
    classifier_coherence,
    clip_coherence,
    clip_cosine,
    coherence_summary,
    quantile_bin_edges,
)
from storydiff.data.digits import digits_world, digits_world_arrays, parse_caption
from storydiff.data.noisy import VAGUE_CAPTIONS, noisy_digit_labels, noisy_digits_world
from storydiff.models.coherence import CoherenceEmbedding
from storydiff.training.train_digits_clip import new_clip_model, new_processor

RESOLUTION = 24


def tiny_clip_args(**overrides):
    values = dict(resolution=RESOLUTION, tokenizer_max_length=24, hidden_size=16, num_layers=1, num_heads=2,
                  patch_size=8, projection_dim=8, seed=0)  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny_clip():
    """A random tiny CLIPModel with a word-level tokenizer and an image processor for 24x24 canvases."""
    _, captions, _ = digits_world_arrays("train", num_samples=60, seed=0, resolution=RESOLUTION)
    processor = new_processor(captions, tiny_clip_args())
    return new_clip_model(processor.tokenizer, tiny_clip_args()).eval(), processor


@pytest.fixture(scope="module")
def canvases():
    images, captions, _ = digits_world_arrays("test", num_samples=10, seed=3, resolution=RESOLUTION)
    return (images + 1) / 2, captions  # [0, 1]


def _projected(output):
    return output if torch.is_tensor(output) else output.pooler_output


def test_clip_cosine_matches_the_model_features(tiny_clip, canvases):
    model, processor = tiny_clip
    images, captions = canvases
    cosines = clip_cosine(images, captions, model, processor, device="cpu")
    with torch.no_grad():
        # the processor normalises with mean 0.5, std 0.5: [0, 1] -> [-1, 1]
        image_features = _projected(model.get_image_features(pixel_values=images * 2 - 1))
        tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")
        text_features = _projected(model.get_text_features(**tokens))
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    expected = (image_features * text_features).sum(-1)
    assert cosines.shape == (10,)
    torch.testing.assert_close(cosines, expected, atol=1e-5, rtol=1e-5)


def test_clip_cosine_batching_and_pil_input_change_nothing(tiny_clip, canvases):
    model, processor = tiny_clip
    images, captions = canvases
    whole = clip_cosine(images, captions, model, processor, batch_size=64, device="cpu")
    batched = clip_cosine(images, captions, model, processor, batch_size=3, device="cpu", show_progress=True)
    torch.testing.assert_close(whole, batched, atol=1e-6, rtol=1e-6)
    pil_images = digits_world("test", num_samples=10, seed=3, resolution=RESOLUTION)["image"]
    torch.testing.assert_close(clip_cosine(pil_images, captions, model, processor, device="cpu"), whole)


def test_clip_coherence_is_clipped_cosine_and_rescales(tiny_clip, canvases):
    model, processor = tiny_clip
    images, captions = canvases
    cosines = clip_cosine(images, captions, model, processor, device="cpu")
    plain = clip_coherence(images, captions, model, processor, device="cpu")
    torch.testing.assert_close(plain, cosines.clamp(min=0))
    low, high = float(cosines.min()) + 0.01, float(cosines.max()) - 0.01
    rescaled = clip_coherence(images, captions, model, processor, low=low, high=high, device="cpu")
    torch.testing.assert_close(rescaled, ((cosines - low) / (high - low)).clamp(0, 1))
    assert rescaled.min() == 0 and rescaled.max() == 1
    with pytest.raises(ValueError, match="both `low` and `high`"):
        clip_coherence(images, captions, model, processor, low=0.1)
    with pytest.raises(ValueError, match="low < high"):
        clip_coherence(images, captions, model, processor, low=0.5, high=0.2)


def test_clip_cosine_bad_input(tiny_clip, canvases):
    model, processor = tiny_clip
    images, captions = canvases
    with pytest.raises(ValueError, match="10 images but 9 captions"):
        clip_cosine(images, captions[:9], model, processor)
    with pytest.raises(ValueError, match="empty"):
        clip_cosine(images[:0], [], model, processor)
    with pytest.raises(TypeError, match="single string"):
        clip_cosine(images[:1], captions[0], model, processor)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clip_cosine(images * 2 - 1, captions, model, processor)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        clip_cosine(images[0], captions[:1], model, processor)


def test_classifier_coherence_finds_corrupted_labels():
    images, given, true = noisy_digit_labels(0.4, seed=0)
    scores = classifier_coherence(images, given)
    assert scores.shape == (len(given),) and scores.min() >= 0 and scores.max() <= 1
    clean = (given == true).numpy()
    assert roc_auc_score(clean, scores) > 0.9
    assert scores[clean].mean() > 3 * scores[~clean].mean()


def test_classifier_coherence_is_out_of_fold():
    # A 1-nearest-neighbour classifier scoring its own training samples would give every label, wrong ones
    # included, probability 1; out of fold, a wrong label is contradicted by the sample's nearest clean neighbours.
    images, given, true = noisy_digit_labels(0.2, seed=1, resolution=8)
    scores = classifier_coherence(images, given, classifier=KNeighborsClassifier(n_neighbors=1))
    wrong = (given != true).numpy()
    assert scores[wrong].mean() < 0.2
    assert scores[~wrong].mean() > 0.7


def test_classifier_coherence_bad_input():
    features, labels = np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2
    with pytest.raises(ValueError, match="20 feature rows but labels of shape"):
        classifier_coherence(features, labels[:19])
    with pytest.raises(ValueError, match="empty"):
        classifier_coherence(np.zeros((0, 4)), np.zeros(0))
    bad = features.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        classifier_coherence(bad, labels)
    with pytest.raises(ValueError, match="classes \\[2\\] have fewer"):
        classifier_coherence(np.zeros((22, 4)), np.r_[labels, 2, 2])
    with pytest.raises(ValueError, match="two classes"):
        classifier_coherence(features, np.zeros(20))


def test_summary_values():
    summary = coherence_summary([0.0, 0.25, 0.5, 0.75, 1.0])
    assert summary["count"] == 5 and summary["mean"] == 0.5 and summary["min"] == 0 and summary["max"] == 1
    assert summary["q50"] == 0.5 and summary["q25"] == 0.25 and summary["q10"] == pytest.approx(0.1)
    assert summary["std"] == pytest.approx(np.std([0, 0.25, 0.5, 0.75, 1]))
    assert summary["histogram_counts"] == [1, 0, 1, 0, 0, 1, 0, 1, 0, 1]
    assert summary["histogram_edges"][0] == 0 and summary["histogram_edges"][-1] == 1
    with pytest.raises(ValueError, match="empty"):
        coherence_summary([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coherence_summary([0.5, 1.5])


def test_binning_matches_the_coherence_embedding():
    values = np.random.default_rng(0).beta(2, 5, size=200)
    edges = quantile_bin_edges(values, num_bins=8)
    embedding = CoherenceEmbedding(dim=16, num_bins=8, bin_edges=edges)
    expected = embedding.quantize(torch.tensor(values, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(bin_coherence(values, edges), expected)
    assert sorted(Counter(bin_coherence(values, edges)).values()) == [25] * 8  # quantile bins: equally populated
    np.testing.assert_allclose(bin_coherence([0.0, 0.5, 0.7, 1.0], [0.5, 0.7]), [0, 0.5, 1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        bin_coherence([0.5], [0.6, 0.4])


def test_noisy_digit_labels():
    images, given, true = noisy_digit_labels(0.4, seed=0)
    assert images.shape[1:] == (1, 16, 16) and len(given) == len(true) == images.shape[0]
    assert int((given != true).sum()) == round(0.4 * len(true))
    again = noisy_digit_labels(0.4, seed=0)[1]
    other = noisy_digit_labels(0.4, seed=1)[1]
    assert torch.equal(given, again) and not torch.equal(given, other)
    assert torch.equal(noisy_digit_labels(0.0)[1], true)
    with pytest.raises(ValueError, match="fraction"):
        noisy_digit_labels(1.5)


def test_noisy_digits_world():
    world = noisy_digits_world(60, RESOLUTION, fraction_wrong=0.25, fraction_vague=0.2, seed=2)
    assert world.column_names == ["image", "text", "true_text", "corruption"]
    counts = Counter(world["corruption"])
    assert counts == {"none": 33, "wrong": 15, "vague": 12}
    clean = digits_world("train", 60, 2, RESOLUTION)
    assert list(world["true_text"]) == list(clean["text"])
    assert np.array_equal(np.asarray(world[5]["image"]), np.asarray(clean[5]["image"]))
    for row in world:
        if row["corruption"] == "none":
            assert row["text"] == row["true_text"]
        elif row["corruption"] == "wrong":
            (stated,), (true,) = parse_caption(row["text"]), parse_caption(row["true_text"])
            assert stated.digit != true.digit and stated.colour != true.colour
        else:
            assert row["text"] in VAGUE_CAPTIONS
            with pytest.raises(ValueError):  # the adherence measurer cannot read anything from it
                parse_caption(row["text"])
    again = noisy_digits_world(60, RESOLUTION, fraction_wrong=0.25, fraction_vague=0.2, seed=2)
    assert list(again["text"]) == list(world["text"])
    other = noisy_digits_world(60, RESOLUTION, fraction_wrong=0.25, fraction_vague=0.2, seed=3)
    assert list(other["corruption"]) != list(world["corruption"])
    with pytest.raises(ValueError, match="<= 1"):
        noisy_digits_world(10, RESOLUTION, fraction_wrong=0.6, fraction_vague=0.5)
