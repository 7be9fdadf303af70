"""The shipped coherence-aware digits models: they load offline onto the shipped text-to-image model, their cards give
the data and training commands, the coherence knob works on held-out captions (adherence rises from c = 0 to c = 1),
and the README's quick start runs as written."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from storydiff import CoherenceAwarePipeline, CoherenceConditioner
from storydiff.checkpoints import (
    DIGITS_COHERENCE_AWARE_TEXT,
    DIGITS_COHERENCE_BASELINE_TEXT,
    checkpoint_path,
    coherence_aware_pipeline,
)
from storydiff.data.digits import digits_world_arrays
from storydiff.evaluation.text_adherence import caption_adherence

REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED = {DIGITS_COHERENCE_AWARE_TEXT: "cad", DIGITS_COHERENCE_BASELINE_TEXT: "baseline"}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_card_gives_the_data_and_training_commands(name):
    folder = Path(checkpoint_path(name))
    weights = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    assert weights < 8_000_000 and not list(folder.rglob("*.bin"))
    card = (folder / "README.md").read_text()
    assert "training/train_coherence_aware.py" in card and f"--mode {SHIPPED[name]}" in card
    assert "training/compute_coherence.py --scorer clip" in card and "noisy_digits_world" in card
    metrics = json.loads((folder / "train_metrics.json").read_text())
    assert metrics["mode"] == SHIPPED[name] and metrics["train_steps"] >= 1000
    assert json.loads((folder / "coherence_training.json").read_text())["mode"] == SHIPPED[name]


def test_the_pipeline_is_assembled_from_the_base_model():
    pipe = coherence_aware_pipeline(DIGITS_COHERENCE_AWARE_TEXT)
    assert isinstance(pipe, CoherenceAwarePipeline) and isinstance(pipe.conditioner, CoherenceConditioner)
    assert isinstance(pipe.denoiser, UNet2DConditionModel) and pipe.vae is not None
    with pytest.raises(ValueError, match="No shipped checkpoint"):
        coherence_aware_pipeline("digits-no-such-model")
    with pytest.raises(ValueError, match="not a shipped text coherence-aware model"):
        coherence_aware_pipeline("digits-clip")


def test_raising_coherence_raises_caption_adherence():
    pipe = coherence_aware_pipeline(DIGITS_COHERENCE_AWARE_TEXT)
    pipe.set_progress_bar_config(disable=True)
    _, captions, _ = digits_world_arrays("test", num_samples=32, seed=1, resolution=32)
    noise = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def adherence(coherence: float) -> float:
        images = pipe(list(captions), coherence=coherence, guidance_scale=3.0, num_inference_steps=8,
                      latents=noise.clone(), output_type="np").images  # fmt: skip
        return caption_adherence(images, list(captions))["overall"]

    assert adherence(1.0) > adherence(0.0) + 0.15


def test_the_readme_quick_start_runs():
    readme = (REPOSITORY / "README.md").read_text()
    section = readme[readme.index("## Quick start: coherence-aware diffusion") :]
    code = re.search(r"```py\n(.*?)```", section, re.DOTALL).group(1)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert len(namespace["images"]) == 3 and namespace["images"][0].size == (32, 32)


def test_the_class_conditional_model_follows_its_labels_more_at_higher_coherence():
    from storydiff import ClassConditionalPipeline, CoherenceAwareUNet2DModel
    from storydiff.checkpoints import DIGITS_COHERENCE_AWARE_CLASS
    from storydiff.evaluation.digits import class_accuracy

    folder = Path(checkpoint_path(DIGITS_COHERENCE_AWARE_CLASS))
    card = (folder / "README.md").read_text()
    assert "--condition class" in card and "--mode cad" in card and "--scorer classifier" in card
    pipe = ClassConditionalPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, CoherenceAwareUNet2DModel)
    pipe.set_progress_bar_config(disable=True)
    labels = [digit for digit in range(10) for _ in range(4)]

    def accuracy(coherence: float) -> float:
        images = pipe(class_labels=labels, coherence=coherence, guidance_scale=1.0, num_inference_steps=10,
                      generator=torch.manual_seed(0), output_type="np").images  # fmt: skip
        return class_accuracy(images, labels)

    assert accuracy(1.0) > accuracy(0.0) + 0.1
