"""training/train_coherence_aware.py and training/coherence_modes.py: every mode for a few steps on text and class
data, the TextRIN and LoRA paths, exact resume, the saved pipelines, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tiny_stable_diffusion import tiny_sd_components

from storydiff import ClassConditionalPipeline, CoherenceAwarePipeline, CoherenceAwareUNet2DModel, TextRINModel
from storydiff.training.coherence_modes import CoherenceTrainingMode
from storydiff.training.train_coherence_aware import main as train_coherence_aware

COHERENCES = [0.9, 0.1, 0.6, 0.3, 1.0, 0.0, 0.8, 0.45]
CAPTIONS = ["a red 3", "a blue 7", "a 1 at the top", "a big 0", "a red 3", "a 5", "a small 2", "a 9"]

TINY_CONDITIONER = ["--conditioner_dim", "16", "--conditioner_layers", "1", "--conditioner_heads", "2",
                    "--num_registers", "2"]  # fmt: skip
COMMON = [
    "--resolution", "16", "--train_batch_size", "4", "--lr_warmup_steps", "1", "--max_train_steps", "2",
    "--checkpointing_steps", "2", "--validation_steps", "100", "--validation_inference_steps", "1",
    "--validation_coherences", "0,1", *TINY_CONDITIONER, "--torch_num_threads", "1", "--report_to", "none",
]  # fmt: skip
TINY_RIN = ["--denoiser", "text_rin", "--rin_interface_dim", "8", "--rin_latent_dim", "16", "--rin_num_latents", "4",
            "--rin_blocks", "1", "--rin_compute_layers", "1", "--rin_heads", "2"]  # fmt: skip
TINY_CLASS_UNET = ["--condition", "class", "--block_out_channels", "8,16", "--norm_num_groups", "4",
                   "--image_channels", "1"]  # fmt: skip


def write_scored_folder(folder: Path) -> Path:
    """An image folder with captions, labels and a coherence column (what compute_coherence.py produces)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, (caption, coherence) in enumerate(zip(CAPTIONS, COHERENCES)):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{index}.png")
            row = {"file_name": f"{index}.png", "text": caption, "label": index % 3, "coherence": coherence}
            metadata.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="module")
def scored_folder(tmp_path_factory) -> Path:
    return write_scored_folder(tmp_path_factory.mktemp("scored"))


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("base") / "sd"
    components = tiny_sd_components(folder.parent / "parts", sample_size=8)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(folder)
    return folder


def run(out, scored_folder, *extra):
    return Path(train_coherence_aware(["--train_data_dir", str(scored_folder), *COMMON, "--output_dir", str(out),
                                       *extra]))  # fmt: skip


# -------------------------------------------------------------------------------------------------------- the modes


def test_modes_condition_drop_and_weight_as_documented():
    coherences = torch.tensor(COHERENCES)
    rows = torch.arange(8)
    torch.manual_seed(0)
    cad = CoherenceTrainingMode("cad", coherences).batch(rows)
    assert cad.coherence.tolist() == pytest.approx(COHERENCES) and not cad.dropped.any()
    assert cad.loss_weight.tolist() == [1.0] * 8

    baseline = CoherenceTrainingMode("baseline", coherences, condition_dropout=0.5)
    torch.manual_seed(0)
    batch = baseline.batch(rows)
    assert batch.dropped.any() and not batch.dropped.all()
    assert batch.coherence.tolist() == [0.0 if d else 1.0 for d in batch.dropped.tolist()]  # dropped get c = 0

    weight = CoherenceTrainingMode("weight", coherences, condition_dropout=0.0).batch(rows)
    assert weight.loss_weight.mean().item() == pytest.approx(1.0)
    assert weight.loss_weight.tolist() == pytest.approx((coherences / coherences.mean()).tolist())

    filtered = CoherenceTrainingMode("filter", coherences, filter_threshold=0.5)
    assert filtered.kept_indices() == [0, 2, 4, 6]
    assert filtered.mean_coherence == pytest.approx(np.mean([0.9, 0.6, 1.0, 0.8]))
    assert CoherenceTrainingMode("cad", coherences).guidance()["negative"] == "same"
    assert baseline.guidance()["negative"] == "null"
    with pytest.raises(ValueError, match="keeps no sample"):
        CoherenceTrainingMode("filter", coherences, filter_threshold=1.0 + 1e-6)


# ------------------------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize("mode", ["cad", "baseline", "filter", "weight"])
def test_every_mode_trains_a_loadable_text_pipeline(tmp_path, scored_folder, base_model, mode):
    extra = ["--filter_threshold", "0.5"] if mode == "filter" else []
    out = run(tmp_path / mode, scored_folder, "--pretrained_model_name_or_path", str(base_model), "--mode", mode,
              *extra)  # fmt: skip
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert (
        metrics["mode"] == mode
        and metrics["train_steps"] == 2
        and np.isfinite(metrics["train_loss_mean_last_2_steps"])
    )
    assert metrics["kept_examples"] == (4 if mode == "filter" else 8)
    assert metrics["coherence"]["mean"] == pytest.approx(np.mean(COHERENCES), abs=1e-4)
    assert (out / "samples.png").is_file() and (out / "checkpoint-2").is_dir()
    card = (out / "README.md").read_text()
    assert f"--mode {mode}" in card and "CoherenceAwarePipeline" in card
    pipe = CoherenceAwarePipeline.from_pretrained(out)
    image = pipe("a red 3", coherence=0.5, num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_text_rin_trains_from_scratch_with_self_conditioning(tmp_path, scored_folder, base_model):
    calls = []
    original = TextRINModel.forward

    def recording(self, *args, **kwargs):
        calls.append(
            kwargs.get("self_conditioning_latents") is not None
            and bool(kwargs["self_conditioning_latents"].abs().sum())
        )
        return original(self, *args, **kwargs)

    TextRINModel.forward = recording
    try:
        out = run(tmp_path / "rin", scored_folder, "--pretrained_model_name_or_path", str(base_model), *TINY_RIN,
                  "--self_conditioning_rate", "1.0", "--coherence_bins", "4")  # fmt: skip
    finally:
        TextRINModel.forward = original
    # with rate 1 every training step runs a no-grad pass first; its latents feed the trained pass
    assert len(calls) >= 4 and any(calls)
    pipe = CoherenceAwarePipeline.from_pretrained(out)
    assert isinstance(pipe.denoiser, TextRINModel) and pipe.takes_self_conditioning
    assert pipe.conditioner.config.num_bins == 4 and len(pipe.conditioner.config.bin_edges) == 3
    assert pipe("a 5", num_inference_steps=2, output_type="latent").images.shape == (1, 4, 8, 8)


def test_lora_fine_tuning_saves_merged_weights(tmp_path, scored_folder, base_model):
    out = run(tmp_path / "lora", scored_folder, "--pretrained_model_name_or_path", str(base_model),
              "--lora_rank", "2", "--learning_rate", "1e-2")  # fmt: skip
    pipe = CoherenceAwarePipeline.from_pretrained(out)
    base = StableDiffusionPipeline.from_pretrained(base_model).unet
    assert not any("lora" in name for name in pipe.denoiser.state_dict())
    changed = [
        name for name, value in pipe.denoiser.state_dict().items() if not torch.equal(value, base.state_dict()[name])
    ]
    assert changed and all("attn" in name for name in changed)  # only the adapted projections moved
    metrics = json.loads((out / "train_metrics.json").read_text())
    full = sum(p.numel() for p in base.parameters())
    assert metrics["trainable_parameters"] < full


def test_resume_continues_exactly(tmp_path, scored_folder, base_model):
    # a constant learning rate, so that a 2-step run extended to 4 steps has the uninterrupted run's schedule
    common = ["--pretrained_model_name_or_path", str(base_model), "--mode", "weight", "--condition_dropout", "0.3",
              "--lr_scheduler", "constant"]  # fmt: skip
    straight = run(tmp_path / "straight", scored_folder, *common, "--max_train_steps", "4")
    first = run(tmp_path / "resumed", scored_folder, *common, "--max_train_steps", "2")
    resumed = run(first, scored_folder, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    for component in ("conditioner", "denoiser"):
        a = CoherenceAwarePipeline.from_pretrained(straight).components[component].state_dict()
        b = CoherenceAwarePipeline.from_pretrained(resumed).components[component].state_dict()
        assert all(torch.equal(a[name], b[name]) for name in a), component
    with pytest.raises(ValueError, match="mode"):
        run(resumed, scored_folder, *common[:2], "--mode", "cad", "--lr_scheduler", "constant", "--max_train_steps",
            "6", "--resume_from_checkpoint", "latest")  # fmt: skip


# ------------------------------------------------------------------------------------------------------------ class


@pytest.mark.parametrize("mode", ["cad", "baseline"])
def test_class_modes_train_a_coherence_aware_unet(tmp_path, scored_folder, mode):
    out = run(tmp_path / mode, scored_folder, *TINY_CLASS_UNET, "--mode", mode)
    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, CoherenceAwareUNet2DModel) and pipe.config.num_classes == 3
    negative = "same" if mode == "cad" else "null"
    images = pipe(class_labels=[0, 2], coherence=[1.0, 0.0], negative_class=negative, num_inference_steps=1,
                  output_type="np").images  # fmt: skip
    assert images.shape == (2, 16, 16, 1)
    assert f'negative_class="{negative}"' in (out / "README.md").read_text()


def test_class_fine_tuning_starts_from_a_class_conditional_pipeline(tmp_path, scored_folder):
    from diffusers import DDPMScheduler, UNet2DModel

    # a plain class-conditional pipeline (the shipped digits model's kind) gets a coherence embedding ...
    plain = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=4, num_class_embeds=4, layers_per_block=1)  # fmt: skip
    ClassConditionalPipeline(scheduler=DDPMScheduler(), unet=plain).save_pretrained(tmp_path / "plain")
    out = run(tmp_path / "from_plain", scored_folder, *TINY_CLASS_UNET, "--pretrained_model_name_or_path",
              str(tmp_path / "plain"), "--max_train_steps", "1", "--learning_rate", "1e-9")  # fmt: skip
    tuned = ClassConditionalPipeline.from_pretrained(out).unet
    assert isinstance(tuned, CoherenceAwareUNet2DModel)
    torch.testing.assert_close(tuned.label_embedding.weight, plain.class_embedding.weight, atol=1e-6, rtol=0)
    # ... and a coherence-aware one is fine-tuned as it is
    again = run(tmp_path / "again", scored_folder, *TINY_CLASS_UNET, "--pretrained_model_name_or_path", str(out))
    assert isinstance(ClassConditionalPipeline.from_pretrained(again).unet, CoherenceAwareUNet2DModel)


# -------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--mode", "filter"], "--filter_threshold"),
        (["--filter_threshold", "0.5"], "--filter_threshold goes with --mode filter"),
        (["--filter_threshold", "1.5", "--mode", "filter"], "in \\[0, 1\\]"),
        (["--condition_dropout", "1.0"], "condition_dropout"),
        (["--coherence_bins", "1"], "coherence_bins"),
        (["--validation_coherences", "0,2"], "validation_coherences"),
        (["--condition", "class", "--lora_rank", "4"], "--condition text"),
        (["--denoiser", "text_rin", "--lora_rank", "4"], "from scratch"),
    ],
)
def test_bad_flags_are_refused_before_training(tmp_path, scored_folder, base_model, extra, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path / "bad", scored_folder, "--pretrained_model_name_or_path", str(base_model), *extra)
    assert not (tmp_path / "bad").exists()


def test_text_needs_a_base_pipeline(tmp_path, scored_folder):
    with pytest.raises(ValueError, match="needs --pretrained_model_name_or_path"):
        run(tmp_path / "bad", scored_folder)


def test_missing_or_bad_coherence_column_says_how_to_compute_it(tmp_path, scored_folder, base_model):
    with pytest.raises(ValueError, match="compute_coherence.py"):
        run(tmp_path / "bad", scored_folder, "--pretrained_model_name_or_path", str(base_model),
            "--coherence_column", "score")  # fmt: skip
    broken = tmp_path / "broken"
    broken.mkdir()
    rows = [json.loads(line) for line in (scored_folder / "metadata.jsonl").read_text().splitlines()]
    rows[3]["coherence"] = 1.7
    for row in rows:
        (broken / row["file_name"]).write_bytes((scored_folder / row["file_name"]).read_bytes())
    (broken / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match="finite value in \\[0, 1\\]"):
        train_coherence_aware(["--train_data_dir", str(broken), *COMMON, "--output_dir", str(tmp_path / "out"),
                               "--pretrained_model_name_or_path", str(base_model)])  # fmt: skip
