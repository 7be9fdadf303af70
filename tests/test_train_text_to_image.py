"""training/train_vae.py and training/train_text_to_image.py: from scratch on the digits world, LoRA fine-tuning of
the result, stock-diffusers loading, bad input and kill-and-resume."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from storydiff import DynamicCFGStableDiffusionPipeline
from storydiff.data.digits import digits_world_arrays
from storydiff.training.text_to_image_components import caption_words, new_vae
from storydiff.training.train_text_to_image import main as train_text_to_image
from storydiff.training.train_vae import main as train_vae

TINY_T2I = [
    "--resolution", "24",
    "--num_world_samples", "24",
    "--unet_block_out_channels", "8,16",
    "--unet_norm_num_groups", "4",
    "--unet_attention_head_dim", "4",
    "--text_encoder_hidden_size", "16",
    "--text_encoder_layers", "1",
    "--train_batch_size", "4",
    "--lr_warmup_steps", "1",
    "--num_validation_images", "1",
    "--validation_inference_steps", "2",
    "--evaluation_guidance_scales", "",
    "--torch_num_threads", "1",
    "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    new_vae((4, 8), latent_channels=4, norm_num_groups=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory, tiny_vae_folder) -> Path:
    out = tmp_path_factory.mktemp("t2i") / "run"
    train_text_to_image(["--dataset", "digits_world", "--vae", str(tiny_vae_folder), *TINY_T2I,
                         "--output_dir", str(out), "--max_train_steps", "3", "--validation_steps", "2",
                         "--checkpointing_steps", "2"])  # fmt: skip
    return out


def test_vae_training_reports_reconstruction_and_scaling_factor(tmp_path):
    out = tmp_path / "vae"
    train_vae(["--dataset", "digits_world", "--num_world_samples", "16", "--resolution", "24",
               "--block_out_channels", "4,8", "--norm_num_groups", "4", "--train_batch_size", "8",
               "--max_train_steps", "2", "--report_to", "none", "--torch_num_threads", "1",
               "--output_dir", str(out)])  # fmt: skip
    vae = AutoencoderKL.from_pretrained(out)
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 2 and 0 < metrics["heldout_reconstruction_mse"] < 10
    assert vae.config.scaling_factor == pytest.approx(metrics["latent_scaling_factor"])
    assert vae.config.scaling_factor != 0.18215  # measured, not SD's constant
    card = (out / "README.md").read_text()
    assert "training/train_vae.py --dataset digits_world" in card and "heldout_psnr_db" in card


def test_from_scratch_model_loads_in_the_stock_pipeline_and_equals_the_dynamic_cfg_one(digits_model):
    out = digits_model
    assert (out / "model_index.json").is_file() and (out / "samples.png").is_file()
    assert (out / "validation" / "step_000002.png").is_file()
    assert (out / "checkpoint-2").is_dir()
    for component in ("unet", "vae", "text_encoder"):
        assert list((out / component).glob("*.safetensors")) and not list((out / component).glob("*.bin"))
    card = (out / "README.md").read_text()
    assert "StableDiffusionPipeline.from_pretrained" in card and "--dataset digits_world" in card

    stock = StableDiffusionPipeline.from_pretrained(out)
    assert type(stock.text_encoder).__name__ == "CLIPTextModel" and stock.safety_checker is None
    # every word of the training captions is one token; an unseen word still tokenizes, letter by letter
    _, captions, _ = digits_world_arrays("train", num_samples=24, seed=0, resolution=24)
    for word in caption_words(captions):
        assert stock.tokenizer.tokenize(word) == [f"{word}</w>"]
    assert stock.tokenizer.tokenize("zq") == ["z", "q</w>"]
    stock.set_progress_bar_config(disable=True)
    arguments = dict(prompt=["a large blue 3 on the right", "a small red 7 in the top left corner"],
                     guidance_scale=3.0, num_inference_steps=3, output_type="np")  # fmt: skip
    expected = stock(**arguments, generator=torch.manual_seed(0)).images
    assert expected.shape == (2, 24, 24, 3) and np.isfinite(expected).all()

    dynamic = DynamicCFGStableDiffusionPipeline.from_pretrained(out)
    dynamic.set_progress_bar_config(disable=True)
    got = dynamic(**arguments, generator=torch.manual_seed(0), guidance_schedule="static").images
    np.testing.assert_array_equal(got, expected)


def write_captioned_folder(root: Path) -> Path:
    """Images of mixed sizes and modes (RGB, RGBA, L, P) with captions in metadata.jsonl."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i, (mode, size) in enumerate([("RGB", (20, 24)), ("RGBA", (16, 16)), ("L", (30, 18)), ("P", (17, 17))]):
        array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).convert(mode).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a small red {i} in the centre"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_lora_fine_tuning_on_an_image_folder_loads_with_load_lora_weights(digits_model, tmp_path):
    folder = write_captioned_folder(tmp_path / "images")
    out = tmp_path / "lora"
    train_text_to_image(["--pretrained_model_name_or_path", str(digits_model), "--train_data_dir", str(folder),
                         *TINY_T2I, "--lora_rank", "2", "--learning_rate", "0.05", "--max_train_steps", "2",
                         "--output_dir", str(out)])  # fmt: skip
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    lora_keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert lora_keys and all(key.startswith("unet.") and "lora" in key for key in lora_keys)
    assert "load_lora_weights" in (out / "README.md").read_text()

    pipe = StableDiffusionPipeline.from_pretrained(digits_model)
    pipe.set_progress_bar_config(disable=True)
    arguments = dict(prompt="a small red 1 in the centre", num_inference_steps=2, output_type="np")
    base = pipe(**arguments, generator=torch.manual_seed(0)).images
    pipe.load_lora_weights(out)
    adapted = pipe(**arguments, generator=torch.manual_seed(0)).images
    assert not np.allclose(base, adapted)


@pytest.mark.parametrize(
    "extra, match",
    [
        (
            ["--caption_column", "caption"],
            r"--caption_column 'caption' is not a column.*Available columns: image, text",
        ),
        (["--lora_rank", "0"], "--lora_rank must be >= 1"),
        (["--proportion_empty_prompts", "1.0"], r"--proportion_empty_prompts must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_on_an_image_folder(extra, match, digits_model, tmp_path):
    folder = write_captioned_folder(tmp_path / "images")
    argv = ["--pretrained_model_name_or_path", str(digits_model), "--train_data_dir", str(folder), *TINY_T2I,
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "out"), *extra]  # fmt: skip
    with pytest.raises(ValueError, match=match):
        train_text_to_image(argv)


def test_empty_captions_need_proportion_empty_prompts(digits_model, tmp_path):
    folder = write_captioned_folder(tmp_path / "images")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[2]["text"] = " "
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["--pretrained_model_name_or_path", str(digits_model), "--train_data_dir", str(folder), *TINY_T2I,
            "--max_train_steps", "1", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(
        ValueError, match=r"1 of 4 examples have an empty --caption_column 'text' \(first at index 2\)"
    ):
        train_text_to_image([*argv, "--proportion_empty_prompts", "0"])


def test_a_folder_that_is_not_stable_diffusion_shaped_is_refused(tmp_path, tiny_vae_folder):
    not_sd = tmp_path / "class-conditional"
    not_sd.mkdir()
    (not_sd / "model_index.json").write_text(json.dumps({"_class_name": "ClassConditionalPipeline",
                                                         "unet": ["diffusers", "UNet2DModel"],
                                                         "scheduler": ["diffusers", "DDIMScheduler"]}))  # fmt: skip
    argv = ["--dataset", "digits_world", *TINY_T2I, "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"not Stable-Diffusion-shaped: it has no vae, text_encoder, tokenizer"):
        train_text_to_image([*argv, "--pretrained_model_name_or_path", str(not_sd)])
    with pytest.raises(ValueError, match="does not exist"):
        train_text_to_image([*argv, "--pretrained_model_name_or_path", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="exactly one model source"):
        train_text_to_image([*argv, "--pretrained_model_name_or_path", str(not_sd), "--vae", str(tiny_vae_folder)])
    with pytest.raises(ValueError, match="a model from scratch \\(--vae\\) trains in full"):
        train_text_to_image([*argv, "--vae", str(tiny_vae_folder), "--lora_rank", "4"])


def test_tensorboard_logging_without_tensorboard_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    argv = ["--dataset", "digits_world", "--num_world_samples", "16", "--resolution", "24", "--max_train_steps", "1",
            "--output_dir", str(tmp_path / "vae"), "--report_to", "tensorboard"]  # fmt: skip
    with pytest.raises(ImportError, match=r"--report_to tensorboard.*storydiff\[train\].*--report_to none"):
        train_vae(argv)


def test_weights_that_overflow_are_never_saved(tmp_path):
    from storydiff.training.run_guards import NonFiniteLossError, check_finite_weights

    vae = new_vae((4, 8), latent_channels=4, norm_num_groups=4)
    check_finite_weights(vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"encoder.conv_in.weight holds NaN or infinite values; not saving"):
        check_finite_weights(vae)
    with pytest.raises(ValueError, match="--learning_rate must be a finite number > 0 \\(and fit a float32\\)"):
        train_vae(["--dataset", "digits_world", "--output_dir", str(tmp_path / "o"), "--learning_rate", "1e39"])


def test_resume_refuses_other_settings_and_a_nan_loss_saves_nothing(digits_model, tmp_path, tiny_vae_folder):
    import shutil

    from storydiff.training.checkpointing import ResumeSettingsError
    from storydiff.training.run_guards import NonFiniteLossError

    out = tmp_path / "run"
    shutil.copytree(digits_model, out)
    argv = ["--dataset", "digits_world", "--vae", str(tiny_vae_folder), *TINY_T2I, "--output_dir", str(out),
            "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2", "--validation_steps", "1000"]  # fmt: skip
    with pytest.raises(ResumeSettingsError, match=r"train_batch_size: checkpoint 4, now 2"):
        train_text_to_image([*argv, "--train_batch_size", "2"])
    with pytest.raises(ResumeSettingsError, match=r"unet.block_out_channels"):
        train_text_to_image([*argv, "--unet_block_out_channels", "8,8"])

    before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(NonFiniteLossError, match="optimizer update 4"):
        train_text_to_image([*argv, "--debug_nan_loss_at_step", "4"])
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_a_failed_final_save_leaves_the_previous_pipeline_loadable(
    digits_model, tmp_path, tiny_vae_folder, monkeypatch
):
    import shutil

    import storydiff.training.train_text_to_image as script

    out = tmp_path / "run"
    shutil.copytree(digits_model, out)
    config_before = (out / "unet" / "config.json").read_text()
    weights_before = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):  # the pipeline is written into the staging folder by then; the card fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(script, "write_model_card", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_text_to_image(["--dataset", "digits_world", "--vae", str(tiny_vae_folder), *TINY_T2I,
                             "--output_dir", str(out), "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                             "--validation_steps", "1000", "--checkpointing_steps", "2"])  # fmt: skip
    assert (out / "unet" / "config.json").read_text() == config_before
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights_before
    StableDiffusionPipeline.from_pretrained(out)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
