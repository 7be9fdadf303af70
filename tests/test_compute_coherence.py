"""training/compute_coherence.py: a coherence column from a tiny CLIP or a classifier, resumable, with clear errors."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from storydiff.coherence import clip_coherence
from storydiff.data.digits import digits_world
from storydiff.data.noisy import noisy_digit_labels
from storydiff.training.compute_coherence import ChunksMismatchError, main
from storydiff.training.train_digits_clip import new_clip_model, new_processor

RESOLUTION = 24
SCRIPT = Path(__file__).resolve().parents[1] / "training" / "compute_coherence.py"


@pytest.fixture(scope="module")
def caption_folder(tmp_path_factory):
    """An image folder of 20 canvases with a metadata.jsonl of captions."""
    folder = tmp_path_factory.mktemp("captioned")
    world = digits_world("train", num_samples=20, seed=0, resolution=RESOLUTION)
    with open(folder / "metadata.jsonl", "w") as file:
        for index, row in enumerate(world):
            row["image"].save(folder / f"{index:03d}.png")
            file.write(json.dumps({"file_name": f"{index:03d}.png", "text": row["text"]}) + "\n")
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, caption_folder):
    """A random tiny CLIPModel and its CLIPProcessor saved like a Hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    captions = digits_world("train", num_samples=20, seed=0, resolution=RESOLUTION)["text"]
    args = argparse.Namespace(resolution=RESOLUTION, tokenizer_max_length=24, hidden_size=16, num_layers=1,
                              num_heads=2, patch_size=8, projection_dim=8, seed=0)  # fmt: skip
    processor = new_processor(list(captions), args)
    new_clip_model(processor.tokenizer, args).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def clip_command(data, clip, output, *extra):
    return ["--train_data_dir", str(data), "--caption_column", "text", "--scorer", "clip", "--clip_model", str(clip),
            "--output_dir", str(output), "--device", "cpu", *map(str, extra)]  # fmt: skip


def test_clip_scores_end_to_end(caption_folder, clip_folder, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    output = tmp_path / "scored"
    coherence = main(clip_command(caption_folder, clip_folder, output, "--batch_size", 4))
    scored = datasets.load_from_disk(str(output))
    assert scored.column_names == ["image", "text", "coherence"] and len(scored) == 20
    values = np.asarray(scored["coherence"])
    assert values.min() >= 0 and values.max() <= 1 and np.array_equal(values, coherence)
    expected = clip_coherence(
        scored["image"], scored["text"], CLIPModel.from_pretrained(clip_folder),
        CLIPProcessor.from_pretrained(clip_folder), device="cpu",
    )  # fmt: skip
    np.testing.assert_allclose(values, expected.numpy(), atol=1e-6)
    stats = json.loads((output / "coherence_stats.json").read_text())
    assert stats["coherence"]["count"] == 20 and stats["scorer"] == "clip"
    assert stats["coherence"]["mean"] == pytest.approx(float(values.mean()), abs=1e-6)
    assert not Path(str(output) + ".partial").exists()  # the chunks go once the result is saved

    # the rescale acts on the saved cosines: q10 -> 0, q90 -> 1
    low, high = stats["clip_cosine"]["q10"], stats["clip_cosine"]["q90"]
    rescaled = main(
        clip_command(caption_folder, clip_folder, tmp_path / "rescaled", "--clip_low", low, "--clip_high", high)
    )
    assert rescaled.min() == 0 and rescaled.max() == 1 and 0 < np.mean((rescaled > 0) & (rescaled < 1))


def test_clip_scores_resume_after_a_kill_gives_the_same_result(caption_folder, clip_folder, tmp_path):
    whole = main(clip_command(caption_folder, clip_folder, tmp_path / "whole", "--chunk_size", 6))
    output = tmp_path / "resumed"
    assert (
        main(clip_command(caption_folder, clip_folder, output, "--chunk_size", 6, "--debug_stop_after_chunks", 2))
        is None
    )
    partial = Path(str(output) + ".partial")
    assert sorted(path.name for path in partial.glob("chunk_*.npy")) == ["chunk_00000.npy", "chunk_00001.npy"]
    assert not output.exists()
    # other arguments are refused, naming what changed
    with pytest.raises(ChunksMismatchError, match="chunk_size: 6 then, 5 now"):
        main(clip_command(caption_folder, clip_folder, output, "--chunk_size", 5))
    resumed = main(clip_command(caption_folder, clip_folder, output, "--chunk_size", 6))
    assert np.array_equal(resumed, whole)
    assert np.array_equal(np.asarray(datasets.load_from_disk(str(output))["coherence"]), whole)


def test_classifier_scores_from_a_saved_dataset(tmp_path):
    images, given, true = noisy_digit_labels(0.4, seed=0, resolution=8)
    images, given, true = images[:300], given[:300], true[:300]
    pixels = ((images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    rows = {"image": [Image.fromarray(array) for array in pixels], "label": given.tolist()}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    saved = tmp_path / "noisy_digits"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))  # a save_to_disk input folder
    output = tmp_path / "scored"
    main(["--train_data_dir", str(saved), "--label_column", "label", "--scorer", "classifier",
          "--feature_resolution", 8, "--output_dir", str(output)])  # fmt: skip
    scored = datasets.load_from_disk(str(output))
    coherence = np.asarray(scored["coherence"])
    assert scored.column_names == ["image", "label", "coherence"] and coherence.shape == (300,)
    clean = (given == true).numpy()
    assert coherence.min() >= 0 and coherence.max() <= 1
    assert coherence[clean].mean() > 2 * coherence[~clean].mean()
    assert json.loads((output / "coherence_stats.json").read_text())["scorer"] == "classifier"


def test_errors(caption_folder, clip_folder, tmp_path):
    from transformers import CLIPTextConfig

    with pytest.raises(ValueError, match="'caption' is not a column.*Available columns: image, text"):
        main(clip_command(caption_folder, clip_folder, tmp_path / "a")[:3] + ["caption"] + clip_command(
            caption_folder, clip_folder, tmp_path / "a")[4:])  # fmt: skip
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        main(clip_command(caption_folder, clip_folder, existing))
    not_clip = tmp_path / "text-only"
    CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        not_clip
    )
    with pytest.raises(ValueError, match="is not a CLIP model.*CLIPTextConfig"):
        main(clip_command(caption_folder, not_clip, tmp_path / "b"))
    with pytest.raises(SystemExit):  # argparse: the classifier needs a label column
        main(["--train_data_dir", str(caption_folder), "--scorer", "classifier", "--output_dir", str(tmp_path / "c")])


def test_help_answers_at_once():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--clip_model" in result.stdout and "resumable" not in result.stderr
