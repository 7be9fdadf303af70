"""training/train_controlnet.py on a tiny SD-shaped model: every variant, connection and unlock mode for a few steps
(which weights train, what the output folder loads as), multi-condition data and dropout, an image folder with
condition columns, exact resume, and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from tiny_stable_diffusion import tiny_sd_components

from storydiff import ControlNetFullModel, ControlNetLiteModel, DynamicCFGStableDiffusionControlNetPipeline
from storydiff.training.checkpointing import ResumeSettingsError
from storydiff.training.controlnet_data import condition_dropout_mask, digit_boxes, digits_world_control_arrays
from storydiff.training.train_controlnet import main as train_controlnet

TINY = [
    "--dataset", "digits_world", "--resolution", "24", "--num_world_samples", "12", "--train_batch_size", "4",
    "--conditioning_embedding_out_channels", "4,8", "--num_validation_examples", "2", "--num_validation_images", "1",
    "--validation_inference_steps", "2", "--num_evaluation_images", "4", "--validation_steps", "1000",
    "--torch_num_threads", "1", "--report_to", "none",
]  # fmt: skip
CONTROLNET_WEIGHTS = "controlnet/diffusion_pytorch_model.safetensors"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny Stable-Diffusion-shaped folder (VAE factor 2: 24-pixel images are 12x12 latents)."""
    folder = tmp_path_factory.mktemp("base")
    components = tiny_sd_components(folder / "parts", sample_size=12)
    StableDiffusionPipeline(**components, requires_safety_checker=False).save_pretrained(folder / "pipe")
    return folder / "pipe"


def run(base_model, out, *extra):
    return Path(train_controlnet(["--pretrained_model_name_or_path", str(base_model), *TINY, "--output_dir", str(out),
                                  *extra]))  # fmt: skip


def changed(before: dict, after: dict, prefix: str) -> bool:
    names = [name for name in before if name.startswith(prefix)]
    assert names, prefix
    return any(not torch.equal(before[name], after[name]) for name in names)


@pytest.mark.parametrize(
    "variant, connect, unlock, conditions",
    [
        ("full", "all", "none", "edges"),
        ("lite", "mid_block", "none", "edges"),
        ("full", "mid_block", "decoder", "position_colour"),
        ("lite", "all", "all", "edges,position_colour"),
    ],
)
def test_each_mode_trains_what_it_says_and_the_output_loads(
    base_model, tmp_path, variant, connect, unlock, conditions
):
    out = run(base_model, tmp_path / "run", "--variant", variant, "--connect", connect, "--unlock", unlock,
              "--digits_conditions", conditions, "--max_train_steps", "2", "--learning_rate", "1e-2",
              "--evaluation_steps", "1")  # fmt: skip
    pipe = DynamicCFGStableDiffusionControlNetPipeline.from_pretrained(out)
    expected_class = ControlNetFullModel if variant == "full" else ControlNetLiteModel
    channels = sum({"edges": 1, "position_colour": 3}[kind] for kind in conditions.split(","))
    assert type(pipe.controlnet) is expected_class
    assert pipe.controlnet.config.connect == connect and pipe.controlnet.config.conditioning_channels == channels

    controlnet = load_file(out / CONTROLNET_WEIGHTS)
    assert any(
        tensor.abs().max() > 0 for name, tensor in controlnet.items() if name.startswith("controlnet_mid_block")
    )
    down_zero_convs = [t for name, t in controlnet.items() if name.startswith("controlnet_down_blocks")]
    if connect == "mid_block":  # no gradient reaches them: they stay zero
        assert all(torch.count_nonzero(tensor) == 0 for tensor in down_zero_convs)
    else:
        assert any(torch.count_nonzero(tensor) > 0 for tensor in down_zero_convs)

    base, unet = load_file(base_model / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    assert changed(base, unet, "up_blocks") == (unlock != "none")
    assert changed(base, unet, "conv_out") == (unlock != "none")
    assert changed(base, unet, "down_blocks") == (unlock == "all")

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 2 and "canvas_frechet_distance" in metrics
    assert ("edge_iou" in metrics) == ("edges" in conditions) and ("edge_iou_no_prompt" in metrics) == (
        "edges" in conditions
    )
    history = json.loads((out / "evaluation_history.json").read_text())
    assert [record["step"] for record in history] == [1, 2]
    card = (out / "README.md").read_text()
    assert "train_controlnet.py" in card and f"--variant {variant}" in card and (out / "samples.png").is_file()

    condition = torch.rand(1, channels, 24, 24)
    image = pipe("a small red 3", image=condition, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 24, 24, 3)


def test_resume_continues_exactly_and_refuses_other_settings(base_model, tmp_path):
    common = ["--variant", "lite", "--checkpointing_steps", "2", "--digits_conditions", "edges,position_colour",
              "--num_evaluation_images", "2"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(base_model, straight, *common, "--max_train_steps", "3")
    run(base_model, resumed, *common, "--max_train_steps", "2", "--debug_example_log", str(tmp_path / "a.jsonl"))
    run(base_model, resumed, *common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
        "--debug_example_log", str(tmp_path / "b.jsonl"))  # fmt: skip
    expected, got = load_file(straight / CONTROLNET_WEIGHTS), load_file(resumed / CONTROLNET_WEIGHTS)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    log = [json.loads(line)["step"] for name in "ab" for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2]
    with pytest.raises(ResumeSettingsError, match="connect"):
        run(base_model, resumed, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
            "--connect", "mid_block")  # fmt: skip


def test_an_image_folder_with_two_condition_columns(base_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{index}.png")
        Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(folder / f"edges{index}.png")
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"seg{index}.png")
        rows.append({"file_name": f"{index}.png", "edges_file_name": f"edges{index}.png",
                     "seg_file_name": f"seg{index}.png", "text": "a photo"})  # fmt: skip
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--pretrained_model_name_or_path", str(base_model), "--train_data_dir", str(folder), "--resolution", "24",
            "--train_batch_size", "2", "--conditioning_embedding_out_channels", "4,8", "--validation_inference_steps",
            "1", "--num_validation_examples", "1", "--num_validation_images", "1", "--torch_num_threads", "1",
            "--report_to", "none", "--max_train_steps", "2", "--random_flip", "--conditioning_image_column", "edges",
            "seg"]  # fmt: skip
    out = Path(train_controlnet([*args, "--output_dir", str(tmp_path / "out"), "--conditioning_channels", "4"]))
    assert (
        DynamicCFGStableDiffusionControlNetPipeline.from_pretrained(out).controlnet.config.conditioning_channels == 4
    )
    with pytest.raises(ValueError, match=r"make 4 channel\(s\)"):
        train_controlnet([*args, "--output_dir", str(tmp_path / "out2"), "--conditioning_channels", "3"])
    with pytest.raises(ValueError, match="depth"):
        train_controlnet([*args[:-2], "depth", "--output_dir", str(tmp_path / "out3")])


def test_digits_conditions_are_aligned_with_the_canvas():
    images, _, attributes, conditions = digits_world_control_arrays("test", 8, 0, 32, ["edges", "position_colour"])
    canvases = np.round((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8)
    for canvas, attributes_list, condition in zip(canvases, attributes, conditions):
        ink = canvas.max(axis=-1) > 32
        edges, mask = condition[0] > 0.5, condition[1:].max(axis=0) > 0
        assert edges.any() and mask[ink].mean() > 0.99  # the ink lies inside the filled boxes
        assert (mask & ~ink).sum() < mask.sum()  # boxes, not the glyph itself
        box = digit_boxes(canvas, attributes_list)[0][0]
        rows, columns = np.nonzero(edges)
        # Canny marks the outline on either side of the ink's edge: within a pixel of the box
        assert (
            box[0] - 1 <= columns.min()
            and columns.max() <= box[2]
            and box[1] - 1 <= rows.min()
            and rows.max() <= box[3]
        )


def test_condition_dropout_probabilities():
    generator = torch.Generator().manual_seed(0)
    keep = condition_dropout_mask(20000, 2, drop_each=0.5, drop_all=0.1, keep_all=0.1, generator=generator)
    all_dropped, all_kept = (~keep).all(1).float().mean(), keep.all(1).float().mean()
    assert abs(all_dropped - (0.1 + 0.8 * 0.25)) < 0.015 and abs(all_kept - (0.1 + 0.8 * 0.25)) < 0.015
    assert not condition_dropout_mask(10, 1, 0.0, 0.0, 0.0).logical_not().any()  # one condition: never dropped


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--digits_conditions", "edges,depth"], "distinct names"),
        (["--conditioning_embedding_out_channels", "4,8,16"], "downsamples 4x but the VAE downsamples 2x"),
        (["--condition_drop_all", "0.7", "--condition_keep_all", "0.5"], "must be <= 1"),
        (["--proportion_empty_prompts", "1.5"], "probability"),
        (["--unlocked_learning_rate", "nan"], "unlocked_learning_rate"),
        (["--resolution", "25"], "divisible"),
        (["--conditioning_channels", "3"], r"make 1 channel\(s\)"),
    ],
)
def test_bad_arguments_are_refused_before_training(base_model, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run(base_model, tmp_path / "bad", "--max_train_steps", "1", *extra)
    assert not (tmp_path / "bad" / "checkpoint-1").exists()


def test_unlock_decoder_needs_up_blocks(base_model, tmp_path, monkeypatch):
    from storydiff.training import train_controlnet as script

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    unet.up_blocks = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="needs a UNet with up blocks"):
        script.unlocked_unet_parameters(unet, "decoder")


def test_random_flips_move_the_image_and_its_conditions_together():
    import datasets

    from storydiff.training.controlnet_data import ImageConditionDataset

    image, condition = np.zeros((16, 16, 3), dtype=np.uint8), np.zeros((16, 16), dtype=np.uint8)
    image[:, :4], condition[:, :4] = 255, 255  # both marked on the left
    rows = {"image": [Image.fromarray(image)] * 16, "text": ["a"] * 16, "edges": [Image.fromarray(condition)] * 16}
    dataset = ImageConditionDataset(hf_dataset=datasets.Dataset.from_dict(rows), conditioning_columns=["edges"],
                                    resolution=16, random_flip=True)  # fmt: skip
    torch.manual_seed(0)
    sides = set()
    for index in range(16):
        item = dataset[index]
        image_left = item["pixel_values"][0, :, :4].mean() > 0
        assert image_left == (item["conditions"][0, :, :4].mean() > 0.5)
        sides.add(bool(image_left))
    assert sides == {True, False}  # both orientations occur


# ----------------------------------------------------------------------------------- class-conditional base models

CLASS_TINY = [
    "--dataset", "digits", "--resolution", "16", "--max_train_samples", "12", "--train_batch_size", "4",
    "--conditioning_embedding_out_channels", "4", "--num_validation_examples", "2", "--num_validation_images", "1",
    "--validation_inference_steps", "2", "--num_evaluation_images", "4", "--validation_steps", "1000",
    "--torch_num_threads", "1", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="module")
def class_base(tmp_path_factory) -> Path:
    """A tiny ClassConditionalPipeline in the shipped digits model's shape: pixel space 16x16x1, 10 classes + null."""
    from diffusers import DDIMScheduler, UNet2DModel

    from storydiff import ClassConditionalPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=4, num_class_embeds=11)  # fmt: skip
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    folder = tmp_path_factory.mktemp("class_base") / "pipe"
    ClassConditionalPipeline(scheduler=scheduler, unet=unet, id2label={i: str(i) for i in range(10)}).save_pretrained(
        folder
    )
    return folder


def run_class(class_base, out, *extra):
    return Path(train_controlnet(["--pretrained_model_name_or_path", str(class_base), *CLASS_TINY, "--output_dir",
                                  str(out), *extra]))  # fmt: skip


@pytest.mark.parametrize("variant, connect, unlock", [("lite", "all", "none"), ("full", "mid_block", "decoder")])
def test_class_conditional_base_trains_and_its_output_generates_with_control(
    class_base, tmp_path, variant, connect, unlock
):
    from storydiff import ClassConditionalPipeline

    out = run_class(class_base, tmp_path / "run", "--variant", variant, "--connect", connect, "--unlock", unlock,
                    "--max_train_steps", "2", "--learning_rate", "1e-2", "--evaluation_steps", "1", "--use_ema")  # fmt: skip
    pipe = ClassConditionalPipeline.from_pretrained(out)
    expected_class = ControlNetFullModel if variant == "full" else ControlNetLiteModel
    assert type(pipe.controlnet) is expected_class and pipe.controlnet.config.conditioning_channels == 1
    assert pipe.controlnet.config.connect == connect and pipe.config.num_classes == 10
    index = json.loads((out / "model_index.json").read_text())
    assert index["controlnet"] == ["storydiff.models.controlnet_variants", expected_class.__name__]

    controlnet = load_file(out / CONTROLNET_WEIGHTS)
    assert any(t.abs().max() > 0 for name, t in controlnet.items() if name.startswith("controlnet_mid_block"))
    base, unet = load_file(class_base / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    assert changed(base, unet, "up_blocks") == (unlock != "none")
    assert not changed(base, unet, "down_blocks")

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["train_steps"] == 2
    for name in ("edge_iou", "edge_iou_null_class", "class_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert [record["step"] for record in json.loads((out / "evaluation_history.json").read_text())] == [1, 2]
    card = (out / "README.md").read_text()
    assert "train_controlnet.py" in card and "ClassConditionalPipeline" in card and (out / "samples.png").is_file()

    pipe.set_progress_bar_config(disable=True)
    edges = torch.zeros(2, 1, 16, 16)
    edges[:, :, 4:12, 6] = 1.0
    images = pipe(class_labels=[1, 7], control_image=edges, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 16, 16, 1) and np.isfinite(images).all()


def test_class_conditional_resume_continues_exactly(class_base, tmp_path):
    common = ["--variant", "lite", "--checkpointing_steps", "2", "--num_evaluation_images", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_class(class_base, straight, *common, "--max_train_steps", "3")
    run_class(class_base, resumed, *common, "--max_train_steps", "2")
    run_class(class_base, resumed, *common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    expected, got = load_file(straight / CONTROLNET_WEIGHTS), load_file(resumed / CONTROLNET_WEIGHTS)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    with pytest.raises(ResumeSettingsError, match="proportion_empty_prompts"):
        run_class(class_base, resumed, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                  "--proportion_empty_prompts", "0.2")  # fmt: skip


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--resolution", "32"], "--resolution 16"),
        (["--conditioning_embedding_out_channels", "4,8"], "pixel space"),
        (["--conditioning_channels", "3"], r"make 1 channel\(s\)"),
    ],
)
def test_class_conditional_bad_arguments(class_base, tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run_class(class_base, tmp_path / "bad", "--max_train_steps", "1", *extra)


def test_the_data_must_fit_the_base(class_base, base_model, tmp_path):
    with pytest.raises(ValueError, match="--dataset digits"):
        train_controlnet(["--pretrained_model_name_or_path", str(class_base), *TINY, "--output_dir", str(tmp_path / "a"),
                          "--max_train_steps", "1"])  # fmt: skip
    with pytest.raises(ValueError, match="class-conditional base"):
        train_controlnet(["--pretrained_model_name_or_path", str(base_model), *CLASS_TINY, "--output_dir",
                          str(tmp_path / "b"), "--max_train_steps", "1"])  # fmt: skip


def test_class_conditional_two_processes(class_base, tmp_path):
    """2 processes (gloo) on CPU with the UNet's decoder unlocked: DDP wraps the ControlNet and the UNet together."""
    from test_distributed_training import run_two_processes

    from storydiff import ClassConditionalPipeline

    out = tmp_path / "ddp"
    run_two_processes("train_controlnet.py", ["--pretrained_model_name_or_path", str(class_base), *CLASS_TINY,
                                              "--unlock", "decoder", "--max_train_steps", "2", "--output_dir", str(out)])  # fmt: skip
    pipe = ClassConditionalPipeline.from_pretrained(out)
    assert type(pipe.controlnet) is ControlNetFullModel
    assert json.loads((out / "train_metrics.json").read_text())["train_steps"] == 2


# ---------------------------------------------------------------------------------- coherence-aware bases


@pytest.fixture(scope="module")
def coherence_aware_base(tmp_path_factory) -> Path:
    """A tiny CoherenceAwarePipeline folder (what train_coherence_aware.py saves) on 12x12 latents."""
    from test_coherence_aware_pipeline import tiny_conditioner

    from storydiff import CoherenceAwarePipeline

    folder = tmp_path_factory.mktemp("cad_base")
    components = tiny_sd_components(folder / "parts", sample_size=12)
    pipe = CoherenceAwarePipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                  tokenizer=components["tokenizer"], conditioner=tiny_conditioner(),
                                  denoiser=components["unet"], scheduler=components["scheduler"])  # fmt: skip
    pipe.save_pretrained(folder / "pipe")
    return folder / "pipe"


def test_guidance_coherence_trains_a_controlnet_for_a_coherence_aware_model(coherence_aware_base, tmp_path):
    from storydiff import CoherenceAwarePipeline

    out = run(coherence_aware_base, tmp_path / "cad", "--guidance", "coherence", "--max_train_steps", "2",
              "--learning_rate", "1e-2", "--proportion_empty_prompts", "0.5")  # fmt: skip
    pipe = CoherenceAwarePipeline.from_pretrained(out)
    assert isinstance(pipe.controlnet, ControlNetFullModel)
    base = CoherenceAwarePipeline.from_pretrained(coherence_aware_base)
    for name in ("conditioner", "denoiser"):  # locked: only the ControlNet trained
        before, after = base.components[name].state_dict(), pipe.components[name].state_dict()
        assert all(torch.equal(before[key], after[key]) for key in before), name
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert "edge_iou" in metrics and "edge_iou_no_prompt" in metrics
    assert "--guidance coherence" in (out / "README.md").read_text()
    condition = torch.rand(1, 1, 24, 24)
    image = pipe("a red 3", coherence=0.5, control_image=condition, num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 24, 24, 3)


def test_guidance_must_match_the_base(coherence_aware_base, base_model, tmp_path):
    with pytest.raises(ValueError, match="train its ControlNet with --guidance coherence"):
        run(coherence_aware_base, tmp_path / "a", "--max_train_steps", "1")
    with pytest.raises(ValueError, match="needs a coherence-aware base"):
        run(base_model, tmp_path / "b", "--guidance", "coherence", "--max_train_steps", "1")
