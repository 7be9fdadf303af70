"""The shipped digits-text-to-image checkpoint: a stock Stable Diffusion folder, offline, with its card."""

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from storydiff import DynamicCFGStableDiffusionPipeline
from storydiff.checkpoints import text_to_image_pipeline_path


def test_stock_pipeline_loads_the_shipped_folder_offline_and_generates_what_the_caption_says():
    folder = Path(text_to_image_pipeline_path())
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 12e6  # a few MB

    stock = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    stock.set_progress_bar_config(disable=True)
    prompts = ["a large red 3 in the centre", "a large green 7 in the centre"]
    arguments = dict(prompt=prompts, guidance_scale=4.0, num_inference_steps=15, output_type="np")
    images = stock(**arguments, generator=torch.manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3)
    # the colour the caption asks for dominates the digit's pixels
    bright = images.max(-1) > 0.4
    assert images[0][bright[0]].mean(0).argmax() == 0 and images[1][bright[1]].mean(0).argmax() == 1

    dynamic = DynamicCFGStableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    dynamic.set_progress_bar_config(disable=True)
    same = dynamic(**arguments, generator=torch.manual_seed(0), guidance_schedule="static").images
    np.testing.assert_array_equal(same, images)


def test_card_gives_the_commands_and_the_measured_adherence():
    folder = Path(text_to_image_pipeline_path())
    card = (folder / "README.md").read_text()
    assert "training/train_text_to_image.py --dataset digits_world --vae" in card
    assert "training/train_vae.py --dataset digits_world" in (folder / "vae" / "README.md").read_text()
    metrics = json.loads((folder / "train_metrics.json").read_text())
    for scale in ("1", "2", "4", "7"):
        assert 0 <= metrics[f"caption_adherence_overall_g{scale}"] <= 1
        assert f"caption_adherence_overall_g{scale}" in card and f"canvas_frechet_distance_g{scale}" in card
    assert metrics["vae_heldout_psnr_db"] > 25
