"""training/train_video_ldm.py: temporal layers trained on a tiny image LDM, on the built-in moving digits and on a
video folder, spatial LoRA with joint image/video batches, exact resume and bad input."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from tiny_stable_diffusion import tiny_sd_components

from storydiff import VideoLDMPipeline, VideoLDMUNet
from storydiff.data.moving_digits import write_moving_digits_folder
from storydiff.training.checkpointing import ResumeSettingsError
from storydiff.training.train_video_ldm import main as train_video_ldm

TINY = [
    "--resolution", "24", "--num_frames", "4", "--max_frames", "8", "--num_videos", "12",
    "--temporal_attention_head_dim", "4", "--train_batch_size", "2", "--lr_warmup_steps", "1",
    "--validation_inference_steps", "2", "--num_evaluation_videos", "2", "--validation_steps", "1000",
    "--torch_num_threads", "1", "--report_to", "none",
]  # fmt: skip
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped folder (VAE factor 2: 24-pixel frames are 12x12 latents)."""
    folder = tmp_path_factory.mktemp("image-ldm")
    components = tiny_sd_components(folder / "parts", sample_size=12)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(folder / "pipe")
    return folder / "pipe"


@pytest.fixture(scope="module")
def trained(image_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("video") / "run"
    train_video_ldm(["--pretrained_model_name_or_path", str(image_model), "--dataset", "moving_digits", *TINY,
                     "--max_train_steps", "3", "--checkpointing_steps", "2", "--output_dir", str(out)])  # fmt: skip
    return out


def test_only_the_temporal_layers_train_and_the_output_loads(trained, image_model):
    out = trained
    pipe = VideoLDMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, VideoLDMUNet) and pipe.unet.config.num_frames == 4
    base = UNet2DConditionModel.from_pretrained(image_model, subfolder="unet")
    # the spatial weights are the image model's, bit for bit; the temporal ones moved away from their zero start
    spatial = {name.replace(".spatial.", ".").removeprefix("unet."): p for name, p in pipe.unet.named_parameters()
               if name not in pipe.unet.temporal_parameters()}  # fmt: skip
    for name, parameter in base.named_parameters():
        assert torch.equal(parameter, spatial[name]), name
    temporal = pipe.unet.temporal_parameters()
    zero_started = [name for name in temporal if name.endswith("conv2.weight") and "temporal_conv" in name]
    assert zero_started and all(temporal[name].abs().max() > 0 for name in zero_started)

    # the temporal layers alone, loadable onto the base UNet
    saved = load_file(out / "temporal_layers" / "temporal_layers.safetensors")
    assert set(saved) == set(temporal)
    rebuilt = VideoLDMUNet.from_unet2d(
        base, temporal_layers=str(out / "temporal_layers"), temporal_attention_head_dim=4
    )
    sample, text = torch.randn(1, 4, 4, 12, 12), torch.randn(1, 16, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(sample, 10, text).sample, pipe.unet(sample, 10, text).sample)

    metrics = json.loads((out / "train_metrics.json").read_text())
    for name in ("video_direction_accuracy", "image_per_frame_direction_accuracy", "video_identity_consistency"):
        assert 0.0 <= metrics[name] <= 1.0
    assert (
        metrics["trainable_parameters"] == metrics["temporal_parameters"] == sum(p.numel() for p in temporal.values())
    )
    card = (out / "README.md").read_text()
    assert "train_video_ldm.py --pretrained_model_name_or_path" in card and "VideoLDMPipeline.from_pretrained" in card
    assert (out / "samples.png").is_file() and len(list((out / "samples").glob("*.gif"))) == 4
    assert (out / "checkpoint-2" / "ema.safetensors").is_file()


def test_resume_continues_exactly(image_model, tmp_path):
    # a constant rate: a cosine schedule depends on --max_train_steps, which a resumed run may extend
    common = ["--pretrained_model_name_or_path", str(image_model), "--dataset", "moving_digits", *TINY,
              "--checkpointing_steps", "2", "--validation_prompts", "--lr_scheduler", "constant"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_video_ldm([*common, "--max_train_steps", "3", "--output_dir", str(straight)])
    train_video_ldm([*common, "--max_train_steps", "2", "--output_dir", str(resumed),
                     "--debug_example_log", str(tmp_path / "a.jsonl")])  # fmt: skip
    train_video_ldm([*common, "--max_train_steps", "3", "--output_dir", str(resumed), "--resume_from_checkpoint",
                     "latest", "--debug_example_log", str(tmp_path / "b.jsonl")])  # fmt: skip
    expected, got = load_file(straight / UNET_WEIGHTS), load_file(resumed / UNET_WEIGHTS)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    steps = [json.loads(line)["step"] for name in ("a", "b") for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == [0, 1, 2]
    with pytest.raises(ResumeSettingsError, match="num_frames"):
        train_video_ldm([*common, "--max_train_steps", "4", "--output_dir", str(resumed), "--resume_from_checkpoint",
                         "latest", "--num_frames", "3"])  # fmt: skip


def test_video_folder_with_frame_stride_and_spatial_lora_with_image_batches(image_model, tmp_path):
    videos = tmp_path / "videos"
    write_moving_digits_folder(videos, num_videos=4, num_frames=8, resolution=24)
    out = tmp_path / "folder-run"
    train_video_ldm(["--pretrained_model_name_or_path", str(image_model), "--train_data_dir", str(videos), *TINY,
                     "--frame_stride", "2", "--max_train_steps", "2", "--output_dir", str(out),
                     "--validation_prompts", "a red 3 moves up"])  # fmt: skip
    assert VideoLDMPipeline.from_pretrained(out).unet.config.num_frames == 4

    lora = tmp_path / "lora-run"
    train_video_ldm(["--pretrained_model_name_or_path", str(image_model), "--dataset", "moving_digits", *TINY,
                     "--spatial_lora_rank", "2", "--image_fraction", "0.5", "--max_train_steps", "2",
                     "--output_dir", str(lora), "--validation_prompts"])  # fmt: skip
    pipe = VideoLDMPipeline.from_pretrained(lora)
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())  # fused into the saved UNet
    base = UNet2DConditionModel.from_pretrained(image_model, subfolder="unet")
    query = pipe.unet.unet.down_blocks[1].attentions[0].spatial.transformer_blocks[0].attn1.to_q.weight
    assert not torch.equal(query, base.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight)
    metrics = json.loads((lora / "train_metrics.json").read_text())
    assert metrics["trainable_parameters"] > metrics["temporal_parameters"]
    temporal = pipe.unet.temporal_parameters()  # trained too (peft would leave only the adapters trainable)
    assert all(temporal[name].abs().max() > 0 for name in temporal if name.endswith("temporal_conv.conv2.weight"))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--dataset", "moving_digits", "--image_fraction", "0.3"], "add --spatial_lora_rank"),
        (["--train_data_dir", "{tmp}", "--image_fraction", "0.3", "--spatial_lora_rank", "2"], "needs --dataset"),
        (["--dataset", "moving_digits", "--num_frames", "9", "--max_frames", "8"], "cannot exceed --max_frames"),
        (["--dataset", "moving_digits", "--temporal_conv_kernel_size", "2"], "positive odd"),
        (["--train_data_dir", "{tmp}/missing"], "is not a folder"),
        (["--dataset", "moving_digits", "--train_data_dir", "{tmp}"], "exactly one data source"),
    ],
)
def test_bad_arguments_are_refused_before_training(image_model, tmp_path, extra, match):
    extra = [value.replace("{tmp}", str(tmp_path)) for value in extra]
    with pytest.raises(ValueError, match=match):
        train_video_ldm(["--pretrained_model_name_or_path", str(image_model), "--output_dir", str(tmp_path / "o"),
                         "--report_to", "none", *extra])  # fmt: skip
    assert not (tmp_path / "o").exists()


def test_videos_shorter_than_a_clip_are_named(image_model, tmp_path):
    videos = tmp_path / "videos"
    write_moving_digits_folder(videos, num_videos=2, num_frames=3, resolution=24)
    with pytest.raises(ValueError, match=r"Video 0 has 3 frames.*needs at least 4"):
        train_video_ldm(["--pretrained_model_name_or_path", str(image_model), "--train_data_dir", str(videos), *TINY,
                         "--max_train_steps", "1", "--output_dir", str(tmp_path / "o")])  # fmt: skip
