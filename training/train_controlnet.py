"""Train a ControlNet (full or lite, all or mid-block-only connection, base model locked or unlocked, one or several
conditions) for a Stable-Diffusion-shaped pipeline.

    # the paper's full ControlNet on Canny edges of an image folder with a conditioning_image column
    accelerate launch training/train_controlnet.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir photos --conditioning_image_column conditioning_image --resolution 512 --output_dir out
    # in miniature: a lite, mid-block-only ControlNet on the digits world's edges, for the shipped digits model
    accelerate launch training/train_controlnet.py --pretrained_model_name_or_path storydiff/checkpoints/digits-text-to-image \\
        --dataset digits_world --digits_conditions edges --variant lite --connect mid_block --output_dir digits-cn

Variants (Zhang et al., ICCV 2023): `--variant full` trains a copy of the UNet's encoder (`ControlNetFullModel`),
`lite` one convolution per encoder layer (`ControlNetLiteModel`); `--connect mid_block` connects only the middle
block (the paper's small-scale mode); `--unlock decoder` also trains the UNet's up blocks and output layers (the
original `sd_locked=False`), `all` the whole UNet (storydiff's extension), both at `--unlocked_learning_rate`.
An image folder's `metadata.jsonl` names each condition image with a `<column>_file_name` key (datasets reads it as
the image column `<column>`). Several `--conditioning_image_column`s (or `--digits_conditions edges,position_colour`) train one ControlNet on their
channel concatenation with Uni-ControlNet's per-condition dropout. The output folder is a whole
`DynamicCFGStableDiffusionControlNetPipeline` (the stock `StableDiffusionControlNetPipeline` plus guidance schedules;
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it too) with the ControlNet in `controlnet/`; on the digits world the model card records edge IoU, caption
adherence and Frechet distance, and `evaluation_history.json` their course over training (`--evaluation_steps`).
EMA, exact resume, 2-process runs, TensorBoard, validation grids and `--push_to_hub` come from the shared utilities.

Class-conditional bases: when `--pretrained_model_name_or_path` is a `ClassConditionalPipeline` folder with a
pixel-space `UNet2DModel` (the shipped digits-class-conditional model), the script trains a ControlNet for it on
`--dataset digits` with the Canny edges of each glyph as the condition; class labels drop to the null class with
`--proportion_empty_prompts` (the class analogue of empty captions). The output is a `ClassConditionalPipeline`
with the ControlNet in `controlnet/`; the card records edge IoU (with the class, and with the null class, where the
condition does all the work) and class accuracy. Its model, data, sampling and card are in
training/controlnet_class_conditional.py; the training loop (`train_controlnet`) is shared.

    accelerate launch training/train_controlnet.py --pretrained_model_name_or_path storydiff/checkpoints/digits-class-conditional \\
        --dataset digits --resolution 16 --variant lite --output_dir digits-class-cn

Coherence-aware bases (`--guidance coherence`): a `CoherenceAwarePipeline` folder saved by train_coherence_aware.py
with a UNet denoiser. Its frozen conditioner gives the context; a dropped caption keeps its text at coherence 0 (the
negative of coherence-aware CFG) instead of becoming "". The output is a `CoherenceAwarePipeline` with the ControlNet
in `controlnet/`, where coherence and control are separate knobs (training/controlnet_coherence_aware.py).
"""

# ruff: noqa: E402 -- the flags are parsed before torch and diffusers are imported, so that --help answers at once
import argparse
import math
import os
import sys
from typing import Optional, Sequence

from storydiff.training.arguments import (
    add_common_training_arguments,
    check_common_training_arguments,
    check_path_or_hub_id,
    int_list,
    parse_args_or_exit,
    training_argument_parser,
)
from storydiff.training.datasets_loading import add_image_data_arguments, check_one_data_source

DIGITS_WORLD = "digits_world"
DIGITS = "digits"  # class-conditional bases: scikit-learn's digits with their class labels, edges as the condition
BUILT_IN_DATASETS = (DIGITS_WORLD, DIGITS)
VARIANTS = ("full", "lite")
CONNECTIONS = ("all", "mid_block")
UNLOCK_MODES = ("none", "decoder", "all")
DEFAULT_EMBEDDING_CHANNELS = (16, 32, 96, 256)  # diffusers' default, truncated to the VAE's downsampling
# the conditions derived from digits-world canvases (training/controlnet_data.py) and their channels
DIGITS_CONDITIONS = {"edges": 1, "position_colour": 3}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = add_image_data_arguments(parser, BUILT_IN_DATASETS, "Image folder with metadata.jsonl (captions and "
                                    "condition file names).", 32, "Training image size in pixels.")  # fmt: skip
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--conditioning_image_column", type=str, nargs="+", default=["conditioning_image"],
                      help="Condition image column(s); several train one multi-condition ControlNet.")  # fmt: skip
    data.add_argument("--digits_conditions", type=str, default="edges",
                      help="Digits world: comma-separated conditions from edges, position_colour.")  # fmt: skip
    data.add_argument("--num_world_samples", type=int, default=8000, help="Canvases of the digits world.")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                       help="SD-shaped pipeline, or a ClassConditionalPipeline with a pixel-space UNet2DModel.")  # fmt: skip
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--controlnet_model_name_or_path", type=str, default=None, help="Continue from a ControlNet.")
    model.add_argument("--variant", type=str, default="full", choices=VARIANTS)
    model.add_argument("--connect", type=str, default="all", choices=CONNECTIONS)
    model.add_argument("--unlock", type=str, default="none", choices=UNLOCK_MODES)
    model.add_argument("--unlocked_learning_rate", type=float, default=None,
                       help="Rate of the unlocked UNet weights (default: --learning_rate / 5, the original's ratio).")  # fmt: skip
    model.add_argument("--conditioning_channels", type=int, default=None,
                       help="Channels of the (concatenated) condition; checked against the data.")  # fmt: skip
    model.add_argument("--conditioning_embedding_out_channels", type=str, default=None,
                       help="Widths of the condition encoder (default: 16,32,96,256 cut to the VAE's stride).")  # fmt: skip
    model.add_argument("--proportion_empty_prompts", type=float, default=0.5,
                       help="P(caption -> '', or class -> null class); the paper uses 0.5 so the ControlNet learns "
                       "the condition itself.")  # fmt: skip
    model.add_argument("--guidance", type=str, default="cfg", choices=("cfg", "coherence"),
                       help="cfg: dropped captions become ''; coherence: a coherence-aware base (CoherenceAwarePipeline "
                       "folder), dropped captions keep their text at coherence 0 (CA-CFG's negative).")  # fmt: skip
    model.add_argument("--condition_drop_each", type=float, default=None, help="Several conditions: P(drop one).")
    model.add_argument("--condition_drop_all", type=float, default=None, help="P(drop every condition).")
    model.add_argument("--condition_keep_all", type=float, default=None, help="Several conditions: P(keep all).")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")

    validation = parser.add_argument_group("validation and evaluation")
    validation.add_argument("--num_validation_examples", type=int, default=4, help="Conditions in the grid.")
    validation.add_argument("--num_validation_images", type=int, default=2, help="Samples per condition.")
    validation.add_argument("--validation_steps", type=int, default=500, help="Sample a grid every N steps.")
    validation.add_argument("--validation_guidance_scale", type=float, default=4.0)
    validation.add_argument("--validation_inference_steps", type=int, default=20)
    validation.add_argument("--evaluation_steps", type=int, default=0,
                            help="Digits world: measure edge IoU / adherence / FD every N steps (0: at the end only).")  # fmt: skip
    validation.add_argument("--num_evaluation_images", type=int, default=200)

    add_common_training_arguments(parser)
    parser.set_defaults(learning_rate=1e-4, train_batch_size=32, lr_warmup_steps=0, lr_scheduler="constant")
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_controlnet_arguments(args)
    return args


def check_controlnet_arguments(args: argparse.Namespace) -> None:
    check_one_data_source(args, BUILT_IN_DATASETS)
    check_path_or_hub_id("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    check_path_or_hub_id("--controlnet_model_name_or_path", args.controlnet_model_name_or_path)
    for name in ("proportion_empty_prompts", "condition_drop_each", "condition_drop_all", "condition_keep_all"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name} must be a probability in [0, 1], got {value}.")
    if args.proportion_empty_prompts == 1.0:
        raise ValueError("--proportion_empty_prompts 1 would never show a caption; use a value in [0, 1).")
    if args.unlocked_learning_rate is None:
        args.unlocked_learning_rate = args.learning_rate / 5
    if not (math.isfinite(args.unlocked_learning_rate) and 0 < args.unlocked_learning_rate <= 3.4e38):
        raise ValueError(f"--unlocked_learning_rate must be a finite number > 0, got {args.unlocked_learning_rate}.")
    if args.conditioning_channels is not None and args.conditioning_channels < 1:
        raise ValueError(f"--conditioning_channels must be >= 1, got {args.conditioning_channels}.")
    if args.conditioning_embedding_out_channels is not None:
        args.conditioning_embedding_out_channels = int_list("--conditioning_embedding_out_channels",
                                                            args.conditioning_embedding_out_channels, minimum=1)  # fmt: skip
    args.digits_conditions = [kind.strip() for kind in args.digits_conditions.split(",") if kind.strip()]
    if args.dataset == DIGITS_WORLD:
        unknown = [kind for kind in args.digits_conditions if kind not in DIGITS_CONDITIONS]
        if unknown or not args.digits_conditions or len(set(args.digits_conditions)) != len(args.digits_conditions):
            raise ValueError(f"--digits_conditions must be distinct names from {sorted(DIGITS_CONDITIONS)}, got "
                             f"{args.digits_conditions}.")  # fmt: skip
    if args.dataset == DIGITS:
        args.digits_conditions = ["edges"]  # the glyph's Canny edges: the one condition of the class-conditional path
    num_conditions = (
        len(args.digits_conditions) if args.dataset in (DIGITS_WORLD, DIGITS) else len(args.conditioning_image_column)
    )
    several = num_conditions > 1
    # one condition: dropped never (the original ControlNet); several: Uni-ControlNet's drop-each / all / keep-all
    defaults = (0.5, 0.1, 0.1) if several else (0.0, 0.0, 0.0)
    for name, default in zip(("condition_drop_each", "condition_drop_all", "condition_keep_all"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.condition_drop_all + args.condition_keep_all > 1:
        raise ValueError("--condition_drop_all + --condition_keep_all must be <= 1: they are exclusive outcomes.")
    for name in ("num_validation_examples", "num_validation_images", "validation_steps",
                 "validation_inference_steps", "num_evaluation_images"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.evaluation_steps < 0:
        raise ValueError(f"--evaluation_steps must be >= 0 (0: at the end only), got {args.evaluation_steps}.")
    if args.resolution < 8:
        raise ValueError(f"--resolution must be >= 8, got {args.resolution}.")


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.training.arguments import create_accelerator, end_training
from storydiff.training.checkpointing import (
    SeededEpochSampler,
    TrainingPosition,
    epoch_batches,
    find_checkpoint,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
)
from storydiff.training.controlnet_class_conditional import (
    ControlledClassUNet,
    WithConditions,
    class_card,
    class_pipeline,
    class_validation_grid,
    evaluate_class_controlnet,
    glyph_edges,
    is_class_conditional_base,
    load_class_conditional_base,
)
from storydiff.training.controlnet_coherence_aware import (
    ControlledCoherenceUNet,
    coherence_aware_card,
    coherence_aware_pipeline,
    is_coherence_aware_base,
    load_coherence_aware_base,
)
from storydiff.training.controlnet_data import (
    ImageConditionDataset,
    collate_image_conditions,
    condition_dropout_mask,
    digits_world_control_arrays,
)
from storydiff.training.ema import create_ema, ema_weights, register_ema_checkpointing
from storydiff.training.hub import push_folder_to_hub
from storydiff.training.model_card import recent_loss_metric, training_command, write_model_card
from storydiff.training.optimization import create_optimizer_and_lr_scheduler, training_length
from storydiff.training.run_guards import (
    check_finite_loss,
    check_finite_weights,
    debug_nan_loss,
    resume_hint_on_interrupt,
)
from storydiff.training.sample_grids import labelled_grid, log_grid
from storydiff.training.train_text_to_image import load_sd_shaped_components

# ------------------------------------------------------------------------------------------------------------ data


def load_training_data(args) -> tuple:
    """`(dataset, dataset_id, condition names, channels per condition)`."""
    if args.dataset == DIGITS_WORLD:
        num_samples = min(args.num_world_samples, args.max_train_samples or args.num_world_samples)
        images, captions, _, conditions = digits_world_control_arrays("train", num_samples, args.seed, args.resolution,
                                                                      args.digits_conditions)  # fmt: skip
        dataset = ImageConditionDataset(
            images=images, captions=list(captions), conditions=torch.from_numpy(conditions)
        )
        channels = [DIGITS_CONDITIONS[kind] for kind in args.digits_conditions]
        return dataset, "storydiff-digits-world", list(args.digits_conditions), channels
    from storydiff.training.datasets_loading import load_image_dataset_from_args

    columns = {"--caption_column": args.caption_column}
    columns.update({f"--conditioning_image_column {name}": name for name in args.conditioning_image_column})
    hf_dataset = load_image_dataset_from_args(args, other_columns=columns)
    dataset = ImageConditionDataset(hf_dataset=hf_dataset, image_column=args.image_column, caption_column=args.caption_column,
                                    conditioning_columns=args.conditioning_image_column, resolution=args.resolution,
                                    random_flip=args.random_flip)  # fmt: skip
    return dataset, args.dataset_name, list(args.conditioning_image_column), dataset.condition_channels()


def held_out_examples(args, num_examples: int, dataset) -> tuple:
    """(captions, conditions (N, C, H, W), attributes or None): the digits world's test split, else the first rows."""
    if args.dataset == DIGITS_WORLD:
        _, captions, attributes, conditions = digits_world_control_arrays("test", num_examples, args.seed,
                                                                          args.resolution, args.digits_conditions)  # fmt: skip
        return list(captions), torch.from_numpy(conditions), attributes
    items = [dataset[i] for i in range(min(num_examples, len(dataset)))]
    return [item["caption"] for item in items], torch.stack([item["conditions"] for item in items]), None


# ----------------------------------------------------------------------------------------------------------- model


class ControlledUNet(torch.nn.Module):
    """ControlNet + UNet in one `forward`, so DDP / FSDP synchronise the gradients of both when the UNet is unlocked."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, conditions):
        down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states, conditions, return_dict=False)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample  # fmt: skip


def vae_stride(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def create_controlnet(args, unet, stride: int, conditioning_channels: int):
    """A new ControlNet for `unet` (or `--controlnet_model_name_or_path`); `stride` is the VAE's downsampling, 1 in
    pixel space."""
    from storydiff.models.controlnet_variants import ControlNetFullModel, ControlNetLiteModel

    cls = ControlNetFullModel if args.variant == "full" else ControlNetLiteModel
    if args.controlnet_model_name_or_path is not None:
        controlnet = cls.from_pretrained(
            args.controlnet_model_name_or_path, revision=args.revision, connect=args.connect
        )
        if controlnet.config.conditioning_channels != conditioning_channels:
            raise ValueError(f"--controlnet_model_name_or_path takes {controlnet.config.conditioning_channels} condition "
                             f"channels, the data has {conditioning_channels}.")  # fmt: skip
        return controlnet
    widths = args.conditioning_embedding_out_channels
    if widths is None:
        steps = int(math.log2(stride))
        if steps + 1 > len(DEFAULT_EMBEDDING_CHANNELS):
            raise ValueError(f"The VAE downsamples {stride}x; pass --conditioning_embedding_out_channels with "
                             f"{steps + 1} widths.")  # fmt: skip
        widths = DEFAULT_EMBEDDING_CHANNELS[: steps + 1]
    if 2 ** (len(widths) - 1) != stride:
        model = f"the VAE downsamples {stride}x" if stride > 1 else "the model works in pixel space (1x)"
        raise ValueError(f"--conditioning_embedding_out_channels {list(widths)} downsamples {2 ** (len(widths) - 1)}x "
                         f"but {model}: give {int(math.log2(stride)) + 1} width(s).")  # fmt: skip
    if args.connect == "mid_block" and unet.mid_block is None:
        raise ValueError("--connect mid_block needs a UNet with a middle block; this one has none.")
    return cls.from_unet(unet, conditioning_channels=conditioning_channels, conditioning_embedding_out_channels=tuple(widths),
                         connect=args.connect)  # fmt: skip


def unlocked_unet_parameters(unet, unlock: str) -> list:
    """The UNet weights `--unlock` trains: none; the decoder (up blocks and output layers, the original's
    `sd_locked=False`); or all of them."""
    if unlock == "none":
        return []
    if unlock == "all":
        return list(unet.parameters())
    if not len(getattr(unet, "up_blocks", [])):
        raise ValueError(f"--unlock decoder needs a UNet with up blocks; {type(unet).__name__} has none.")
    decoder = [unet.up_blocks, unet.conv_out] + ([unet.conv_norm_out] if unet.conv_norm_out is not None else [])
    return [p for module in decoder for p in module.parameters()]


def trainable_parameters(controlnet, unet, args) -> tuple[list, list]:
    """(controlnet parameters, unlocked UNet parameters), with requires_grad set accordingly."""
    unet.requires_grad_(False)
    controlnet.requires_grad_(True)
    if (
        args.connect == "mid_block"
    ):  # zero down residuals: their 1x1 convolutions get no gradient, so DDP must skip them
        controlnet.controlnet_down_blocks.requires_grad_(False)
    unlocked = unlocked_unet_parameters(unet, args.unlock)
    for parameter in unlocked:
        parameter.requires_grad_(True)
    return [p for p in controlnet.parameters() if p.requires_grad], unlocked


def make_pipeline(components: dict, unet, controlnet):
    """storydiff's ControlNet pipeline (the stock one plus guidance schedules): its saved folder names the storydiff
    class, so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports the ControlNet's module."""
    from diffusers import DDIMScheduler

    from storydiff.custom_pipelines.dynamic_cfg_stable_diffusion_controlnet import (
        DynamicCFGStableDiffusionControlNetPipeline,
    )

    return DynamicCFGStableDiffusionControlNetPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"], tokenizer=components["tokenizer"], unet=unet,
        controlnet=controlnet, scheduler=DDIMScheduler.from_config(components["scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def generate(
    pipeline,
    captions,
    conditions: torch.Tensor,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    channels: Optional[list] = None,
    **call_kwargs,
):
    """Images (N, H, W, 3) in [0, 1] for each caption and its condition, in batches, with a fixed seed. With several
    ControlNets (`MultiControlNetModel`), `channels` splits the concatenated conditions between them; `call_kwargs`
    go to the pipeline call (e.g. `controlnet_conditioning_scale`)."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(captions), 64):
        generator = torch.Generator(device="cpu").manual_seed(seed + start)
        batch = conditions[start : start + 64].to(pipeline.device, pipeline.controlnet.dtype)
        image = list(batch.split(channels, dim=1)) if channels is not None and len(channels) > 1 else batch
        # the coherence-aware pipeline names the condition `control_image` (its `image` would be ambiguous)
        condition = {"control_image" if hasattr(pipeline, "conditioner") else "image": image}
        images.append(pipeline(list(captions[start : start + 64]), **condition, guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps, generator=generator, output_type="np",
                               height=batch.shape[-2], width=batch.shape[-1], **call_kwargs).images)  # fmt: skip
    return np.concatenate(images)


def condition_preview(conditions: torch.Tensor, channels: list) -> np.ndarray:
    """(N, H, W, 3) previews of the first condition of each example (one channel as grey)."""
    first = conditions[:, : channels[0]]
    first = first.expand(-1, 3, -1, -1) if first.shape[1] == 1 else first[:, :3]
    return first.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def validation_grid(pipeline, args, examples, channels, step: int) -> np.ndarray:
    """Rows: held-out conditions; columns: the condition, then samples with different seeds."""
    captions, conditions, _ = examples
    repeated = [caption for caption in captions for _ in range(args.num_validation_images)]
    samples = generate(pipeline, repeated, conditions.repeat_interleave(args.num_validation_images, 0),
                       args.validation_guidance_scale, args.validation_inference_steps, args.seed)  # fmt: skip
    previews = condition_preview(conditions, channels)
    cells = []
    for row, preview in enumerate(previews):
        cells.append(preview)
        cells.extend(samples[row * args.num_validation_images : (row + 1) * args.num_validation_images])
    return labelled_grid(np.stack(cells), rows=list(captions),
                         columns=["condition"] + [f"sample {i + 1}" for i in range(args.num_validation_images)],
                         title=f"step {step}, guidance {args.validation_guidance_scale:g}", min_cell=96)  # fmt: skip


def evaluate_digits(
    pipeline,
    condition_names,
    examples,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    channels: Optional[list] = None,
) -> dict:
    """Condition fidelity and quality on held-out digits-world conditions.

    With the held-out captions: edge IoU (when edges are a condition), caption adherence and Frechet distance. With
    empty captions, `edge_iou_no_prompt`: the caption alone already fixes a digit's place and size, so this is where
    the condition has to do all the work (the paper's "no prompt" setting).
    """
    from storydiff.evaluation.conditions import edge_iou
    from storydiff.evaluation.text_adherence import canvas_frechet_distance, caption_adherence

    captions, conditions, attributes = examples
    images = generate(pipeline, captions, conditions, guidance_scale, num_inference_steps, seed, channels)
    metrics = {}
    if "edges" in condition_names:
        offset = sum(DIGITS_CONDITIONS[kind] for kind in condition_names[: condition_names.index("edges")])
        edges = conditions[:, offset].numpy()
        metrics["edge_iou"] = round(edge_iou(images, edges), 4)
        unprompted = generate(pipeline, [""] * len(captions), conditions, guidance_scale, num_inference_steps, seed,
                              channels)  # fmt: skip
        metrics["edge_iou_no_prompt"] = round(edge_iou(unprompted, edges), 4)
    adherence = caption_adherence(images, attributes)
    metrics["caption_adherence_overall"] = round(adherence["overall"], 4)
    for attribute in ("digit", "position", "colour", "size"):
        if attribute in adherence:
            metrics[f"caption_adherence_{attribute}"] = round(adherence[attribute], 4)
    metrics["canvas_frechet_distance"] = round(float(canvas_frechet_distance(images)), 3)
    return metrics


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    """Trains a ControlNet for the base model's kind: Stable-Diffusion-shaped (captions, latent space) or
    class-conditional (class labels, pixel space)."""
    class_conditional = is_class_conditional_base(args.pretrained_model_name_or_path, args.revision)
    if class_conditional and args.dataset != DIGITS:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is class-conditional: train its ControlNet on --dataset {DIGITS} "
            "(class labels, with the Canny edges of each glyph as the condition)."
        )
    if not class_conditional and args.dataset == DIGITS:
        raise ValueError(
            f"--dataset {DIGITS} (class labels and glyph edges) trains a ControlNet for a class-conditional base "
            "(a ClassConditionalPipeline folder); for a Stable-Diffusion-shaped base use --dataset digits_world or "
            "an image folder."
        )
    coherence_aware = not class_conditional and is_coherence_aware_base(
        args.pretrained_model_name_or_path, args.revision
    )
    if coherence_aware != (args.guidance == "coherence"):
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a coherence-aware model: train its ControlNet with --guidance "
            "coherence."
            if coherence_aware
            else "--guidance coherence needs a coherence-aware base (a "
            "CoherenceAwarePipeline folder saved by train_coherence_aware.py)."
        )
    accelerator = create_accelerator(args, project_name="train_controlnet")
    set_seed(args.seed)
    if class_conditional:
        base = class_conditional_base(args)
    else:
        base = coherence_aware_base(args) if coherence_aware else text_base(args)
    return train_controlnet(args, argv, accelerator, base)


@dataclass
class ControlNetBase:
    """What one kind of base model brings to the shared training loop (`train_controlnet`)."""

    model: torch.nn.Module  # ControlNet + UNet in one forward(noisy, timesteps, context, conditions)
    noise_scheduler: object
    dataset: torch.utils.data.Dataset
    dataset_id: Optional[str]
    dataset_settings: dict  # what identifies the data for an exact resume
    # batch -> (clean latents or pixels, context: text embeddings or class labels, conditions); draws the dropouts
    batch_to_model_inputs: Callable
    held_out: Callable  # () -> (validation examples, evaluation examples or None), made after a resume
    make_pipeline: Callable  # (unet, controlnet) -> the pipeline that samples and is saved
    validation_grid: Callable  # (pipeline, validation examples, step) -> grid image
    evaluate: Callable  # (pipeline, evaluation examples) -> metrics
    card: Callable  # (unwrapped model) -> model card fields
    name: str = "ControlNet pipeline"  # in the last message
    collate_fn: Optional[Callable] = None
    frozen: tuple = ()  # modules that only run forward (VAE, text encoder): moved to the device after `prepare`
    extra_settings: dict = field(default_factory=dict)  # more resume settings of the model


def text_base(args) -> ControlNetBase:
    """A Stable-Diffusion-shaped base: images through the VAE, captions (some emptied) through the text encoder,
    conditions with per-condition dropout."""
    dataset, dataset_id, condition_names, channels = load_training_data(args)
    if args.conditioning_channels is not None and args.conditioning_channels != sum(channels):
        raise ValueError(f"--conditioning_channels {args.conditioning_channels} does not match the data: "
                         f"{dict(zip(condition_names, channels))} make {sum(channels)} channel(s).")  # fmt: skip
    components = load_sd_shaped_components(args.pretrained_model_name_or_path, args.revision)
    vae, text_encoder, tokenizer = components["vae"], components["text_encoder"], components["tokenizer"]
    unet = components["unet"]
    if args.resolution % vae_stride(vae):
        raise ValueError(
            f"--resolution {args.resolution} must be divisible by the VAE's downsampling {vae_stride(vae)}."
        )
    controlnet = create_controlnet(args, unet, vae_stride(vae), sum(channels))
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)

    @torch.no_grad()
    def batch_to_model_inputs(batch) -> tuple:
        latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        drop = torch.rand(len(batch["captions"])) < args.proportion_empty_prompts
        captions = ["" if dropped else caption for caption, dropped in zip(batch["captions"], drop.tolist())]
        input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(latents.device)  # fmt: skip
        encoder_hidden_states = text_encoder(input_ids)[0]
        conditions = drop_conditions(batch["conditions"].to(latents.device, latents.dtype), channels, args)
        return latents, encoder_hidden_states, conditions

    return ControlNetBase(
        model=ControlledUNet(controlnet, unet),
        noise_scheduler=components["scheduler"],
        batch_to_model_inputs=batch_to_model_inputs,
        make_pipeline=lambda unet, controlnet: make_pipeline(components, unet, controlnet),
        card=lambda model: text_card(args, model, dataset_id, condition_names, channels),
        frozen=(vae, text_encoder),
        **captioned_data_fields(args, dataset, dataset_id, condition_names, channels),
    )


def captioned_data_fields(args, dataset, dataset_id, condition_names, channels) -> dict:
    """What every captioned base (SD-shaped or coherence-aware) brings alike: its data, the held-out digits-world
    examples, the validation grid, the evaluation and the resume settings of the condition dropout."""

    def held_out() -> tuple:
        validation = held_out_examples(args, args.num_validation_examples, dataset)
        evaluation = (
            held_out_examples(args, args.num_evaluation_images, dataset) if args.dataset == DIGITS_WORLD else None
        )
        return validation, evaluation

    return dict(
        dataset=dataset,
        dataset_id=dataset_id,
        dataset_settings={
            "name": dataset_id or args.train_data_dir,
            "num_examples": len(dataset),
            "conditions": condition_names,
        },
        held_out=held_out,
        validation_grid=lambda pipeline, examples, step: validation_grid(pipeline, args, examples, channels, step),
        evaluate=lambda pipeline, examples: evaluate_digits(
            pipeline,
            args.digits_conditions,
            examples,
            args.validation_guidance_scale,
            args.validation_inference_steps,
            args.seed,
        ),
        collate_fn=collate_image_conditions,
        extra_settings={
            "condition_dropout": [args.condition_drop_each, args.condition_drop_all, args.condition_keep_all]
        },
    )


def drop_conditions(conditions: torch.Tensor, channels: list, args) -> torch.Tensor:
    """Zero whole conditions of the channel concatenation with Uni-ControlNet's drop-each / drop-all / keep-all."""
    keep = condition_dropout_mask(len(conditions), len(channels), args.condition_drop_each, args.condition_drop_all,
                                  args.condition_keep_all)  # fmt: skip
    boundaries = np.cumsum([0] + channels)
    for index in range(len(channels)):
        conditions[:, boundaries[index] : boundaries[index + 1]] *= keep[:, index, None, None, None].to(conditions)
    return conditions


def coherence_aware_base(args) -> ControlNetBase:
    """A coherence-aware text-to-image model (`CoherenceAwarePipeline` with a UNet): the frozen conditioner gives the
    context at coherence 1, or 0 for a dropped caption (which keeps its text: CA-CFG's negative branch)."""
    from diffusers import DDPMScheduler

    from storydiff.custom_pipelines.coherence_aware import encode_text

    dataset, dataset_id, condition_names, channels = load_training_data(args)
    if args.conditioning_channels is not None and args.conditioning_channels != sum(channels):
        raise ValueError(f"--conditioning_channels {args.conditioning_channels} does not match the data: "
                         f"{dict(zip(condition_names, channels))} make {sum(channels)} channel(s).")  # fmt: skip
    base = load_coherence_aware_base(args)
    vae, unet = base.vae, base.denoiser
    controlnet = create_controlnet(args, unet, vae_stride(vae), sum(channels))

    @torch.no_grad()
    def batch_to_model_inputs(batch) -> tuple:
        latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        dropped = torch.rand(len(batch["captions"])) < args.proportion_empty_prompts
        text, mask = encode_text(base.tokenizer, base.text_encoder, batch["captions"], latents.device)
        context = base.conditioner(text, (~dropped).float().to(latents.device), mask)
        conditions = drop_conditions(batch["conditions"].to(latents.device, latents.dtype), channels, args)
        return latents, (context.encoder_hidden_states, context.encoder_attention_mask), conditions

    fields = captioned_data_fields(args, dataset, dataset_id, condition_names, channels)
    fields["extra_settings"]["guidance"] = args.guidance
    return ControlNetBase(
        model=ControlledCoherenceUNet(controlnet, unet),
        noise_scheduler=DDPMScheduler.from_config(base.scheduler.config),
        batch_to_model_inputs=batch_to_model_inputs,
        make_pipeline=lambda unet, controlnet: coherence_aware_pipeline(base, unet, controlnet),
        card=lambda model: coherence_aware_card(
            args, model, dataset_id, describe_conditions(condition_names, channels), sum(channels)
        ),  # fmt: skip
        name="coherence-aware ControlNet pipeline",
        frozen=(vae, base.text_encoder, base.conditioner),
        **fields,
    )


def class_conditional_base(args) -> ControlNetBase:
    """A pixel-space class-conditional UNet2DModel: digits with their class labels (some dropped to the null class,
    the class analogue of empty captions) and the Canny edges of each glyph as the one condition."""
    from diffusers import DDPMScheduler

    from storydiff.data.digits import digits_arrays
    from storydiff.training.train_class_conditional import load_training_data as load_class_data

    base = load_class_conditional_base(args)
    labelled, num_classes, _, dataset_id = load_class_data(args)
    if num_classes != base.config.num_classes:
        raise ValueError(f"The data has {num_classes} classes, the base model {base.config.num_classes}.")
    dataset = WithConditions(labelled, glyph_edges(labelled.images))
    unet, null_class = base.unet, base.null_class_label
    if args.conditioning_channels is not None and args.conditioning_channels != 1:
        raise ValueError(f"--conditioning_channels {args.conditioning_channels} does not match the data: "
                         "{'edges': 1} make 1 channel(s).")  # fmt: skip
    noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
    controlnet = create_controlnet(args, unet, 1, 1)

    def batch_to_model_inputs(batch) -> tuple:
        clean, labels, conditions = batch["pixel_values"], batch["class_labels"], batch["conditions"]
        # the class analogue of empty captions: the ControlNet must learn to read the condition on its own
        drop = torch.rand(labels.shape, device=labels.device) < args.proportion_empty_prompts
        return clean, torch.where(drop, torch.full_like(labels, null_class), labels), conditions

    def held_out(count: int) -> tuple:
        images, labels = digits_arrays("test", args.resolution)
        return labels[:count].tolist(), glyph_edges(images[:count])

    return ControlNetBase(
        model=ControlledClassUNet(controlnet, unet),
        noise_scheduler=noise_scheduler,
        dataset=dataset,
        dataset_id=dataset_id,
        dataset_settings={"name": dataset_id, "num_examples": len(dataset), "conditions": ["edges"]},
        batch_to_model_inputs=batch_to_model_inputs,
        held_out=lambda: (held_out(args.num_validation_examples), held_out(args.num_evaluation_images)),
        make_pipeline=lambda unet, controlnet: class_pipeline(base, unet, controlnet),
        validation_grid=lambda pipeline, examples, step: class_validation_grid(pipeline, args, examples, step),
        evaluate=lambda pipeline, examples: evaluate_class_controlnet(
            pipeline, examples, args.validation_guidance_scale, args.validation_inference_steps, args.seed
        ),
        card=lambda model: class_card(args, model, base),
        name="class-conditional ControlNet pipeline",
    )


def train_controlnet(args: argparse.Namespace, argv: Sequence[str], accelerator, base: ControlNetBase) -> str:
    """The training loop of every base: noise, loss, clipping, EMA, checkpoints, validation grids, evaluation,
    exact resume; then the final metrics, the saved pipeline and its card."""
    model, dataset, noise_scheduler = base.model, base.dataset, base.noise_scheduler
    controlnet, unet = model.controlnet, model.unet
    controlnet_parameters, unlocked = trainable_parameters(controlnet, unet, args)
    if args.gradient_checkpointing:
        if controlnet._supports_gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    groups = [{"params": controlnet_parameters}]
    if unlocked:
        groups.append({"params": unlocked, "lr": args.unlocked_learning_rate})

    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=base.collate_fn,
                            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(groups, args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset=base.dataset_settings,
        model_config={
            "controlnet": controlnet.config,
            "unet": unet.config,
            "unlock": args.unlock,
            "unlocked_learning_rate": args.unlocked_learning_rate,
            **base.extra_settings,
            "proportion_empty_prompts": args.proportion_empty_prompts,
        },  # fmt: skip
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    for module in base.frozen:
        module.to(accelerator.device)
    ema_target = controlnet if not unlocked else torch.nn.ModuleList([controlnet, unet])
    ema = create_ema(ema_target, args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    validation_examples, evaluation_examples = base.held_out()
    can_evaluate = evaluation_examples is not None
    history_path = os.path.join(args.output_dir, "evaluation_history.jsonl")

    def sample_and_measure(step: int, validate: bool, evaluate: bool) -> Optional[dict]:
        unwrapped = accelerator.unwrap_model(model).eval()
        with ema_weights(ema, ema_target):
            pipeline = base.make_pipeline(unwrapped.unet, unwrapped.controlnet)
            if validate:
                grid = base.validation_grid(pipeline, validation_examples, step)
                path = log_grid(
                    accelerator, grid, os.path.join(args.output_dir, "validation", f"step_{step:06d}.png"), step
                )
                accelerator.print(f"Validation grid: {path}")
            metrics = base.evaluate(pipeline, evaluation_examples) if evaluate else None
        model.train()
        if metrics is not None:
            accelerator.log({f"eval/{name}": value for name, value in metrics.items()}, step=step)
            with open(history_path, "a") as file:
                file.write(json.dumps({"step": step, **metrics}) + "\n")
        return metrics

    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="Training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        model.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                example_log.write(
                    json.dumps({"step": position.global_step, "indices": batch["index"].tolist()}) + "\n"
                )
                example_log.flush()
            clean, context, conditions = base.batch_to_model_inputs(batch)
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                                      device=clean.device)  # fmt: skip
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(clean, noise, timesteps)
            else:
                target = noise

            with accelerator.accumulate(model):
                prediction = model(noisy, timesteps, context, conditions)
                loss = debug_nan_loss(F.mse_loss(prediction.float(), target.float()), args, position.global_step)
                step_loss = check_finite_loss(accelerator, loss, position.global_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(controlnet_parameters + unlocked, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(ema_target.parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            step = position.global_step
            validate = step % args.validation_steps == 0 and step < max_train_steps
            evaluate = bool(can_evaluate and args.evaluation_steps and step % args.evaluation_steps == 0
                            and step < max_train_steps)  # fmt: skip
            if accelerator.is_main_process and (validate or evaluate):
                sample_and_measure(step, validate, evaluate)
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)
            if position.global_step >= max_train_steps:
                break
    progress.close()
    if example_log is not None:
        example_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model).eval()
        metrics = {"train_steps": position.global_step, **recent_loss_metric(position.recent_losses),
                   "train_examples": len(dataset), "controlnet_parameters": sum(p.numel() for p in controlnet.parameters()),
                   "trainable_parameters": sum(p.numel() for p in controlnet_parameters + unlocked)}  # fmt: skip
        metrics.update(sample_and_measure(position.global_step, True, can_evaluate) or {})
        metrics["train_wall_time_s"] = round(position.total_wall_time_s(), 1)
        with ema_weights(ema, ema_target):
            pipeline = base.make_pipeline(unwrapped.unet, unwrapped.controlnet)
            card = base.card(unwrapped)
            save_output(args, argv, pipeline, unwrapped, metrics, base.dataset_id, card, history_path)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved the {base.name} in {args.output_dir}")
    end_training(accelerator)
    return args.output_dir


def read_history(path: str) -> list:
    """Evaluation records by step; a step measured twice (before and after a resume) keeps its last record."""
    if not os.path.isfile(path):
        return []
    records = {}
    with open(path) as file:
        for line in file:
            if line.strip():
                record = json.loads(line)
                records[record["step"]] = record
    return [records[step] for step in sorted(records)]


def save_output(args, argv, pipeline, model, metrics, dataset_id, card: dict, history_path) -> None:
    """The pipeline, metrics, evaluation history and model card (`card`: title, description, tags, usage), replacing
    the old output atomically."""
    validation_grid_path = os.path.join(args.output_dir, "validation", f"step_{metrics['train_steps']:06d}.png")

    def write(folder: str) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        images = []
        if os.path.isfile(validation_grid_path):
            with open(validation_grid_path, "rb") as source, open(os.path.join(folder, "samples.png"), "wb") as target:
                target.write(source.read())
            images = ["samples.png"]
        with open(os.path.join(folder, "train_metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        history = read_history(history_path)
        if history:
            with open(os.path.join(folder, "evaluation_history.json"), "w") as file:
                json.dump(history, file, indent=1)
        write_model_card(
            folder,
            **card,
            command=training_command(argv, script=os.path.abspath(__file__)),
            metrics={k: v for k, v in metrics.items() if v is not None},
            datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
            base_model=args.pretrained_model_name_or_path,
            images=images,
        )

    check_finite_weights(model)
    save_folder_atomically(args.output_dir, write)


def describe_conditions(condition_names, channels) -> str:
    return ", ".join(
        f"{name} ({count} channel{'s' if count > 1 else ''})" for name, count in zip(condition_names, channels)
    )


def text_card(args, model, dataset_id, condition_names, channels) -> dict:
    """Model card fields for a ControlNet of a Stable-Diffusion-shaped model."""
    controlnet_class = type(model.controlnet).__name__
    description = (
        f"A {args.variant} ControlNet (`storydiff.{controlnet_class}`, connection `{args.connect}`, UNet "
        f"{'locked' if args.unlock == 'none' else 'unlocked: ' + args.unlock}) for the Stable-Diffusion-shaped "
        f"model `{args.pretrained_model_name_or_path}`, trained by storydiff's `training/train_controlnet.py` on "
        f"{describe_conditions(condition_names, channels)}. The folder is a whole `DynamicCFGStableDiffusionControlNetPipeline` (the stock "
        "`StableDiffusionControlNetPipeline` plus guidance schedules); the ControlNet alone is in `controlnet/`. Condition dropout (drop each / drop all / keep all): "
        f"{args.condition_drop_each} / {args.condition_drop_all} / {args.condition_keep_all}; empty captions "
        f"{args.proportion_empty_prompts}. Where the data is the digits world, edge IoU (3x3 tolerance), caption "
        "adherence and Frechet distance are measured on held-out conditions."
    )
    return dict(
        title=f"{args.variant.capitalize()} ControlNet ({args.connect}) on {dataset_id or 'an image folder'}",
        description=description,
        tags=["controlnet", "stable-diffusion", f"controlnet-{args.variant}"],
        usage="import torch\nfrom storydiff import DynamicCFGStableDiffusionControlNetPipeline\n\n"
        'pipe = DynamicCFGStableDiffusionControlNetPipeline.from_pretrained("path/to/this/folder")\n'
        f"condition = torch.zeros(1, {sum(channels)}, {args.resolution}, {args.resolution})  # (batch, channels, height, width) in [0, 1]\n"
        'image = pipe("a large red 3 in the centre", image=condition, num_inference_steps=20).images[0]\n'
        "# or DiffusionPipeline.from_pretrained(folder, trust_remote_code=True); the stock StableDiffusionControlNetPipeline\n"
        "# loads it after `import storydiff.models.controlnet_variants`",
    )


if __name__ == "__main__":
    main()
