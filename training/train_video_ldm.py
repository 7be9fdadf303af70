"""Turn an image LDM into a video LDM: insert Video LDM temporal layers and train them on captioned videos.

    # the digits-world miniature: the shipped tiny LDM, built-in moving digits
    accelerate launch training/train_video_ldm.py --pretrained_model_name_or_path digits-text-to-image \\
        --dataset moving_digits --output_dir digits-video-ldm
    # any SD-shaped pipeline (folder or Hub id) on a video folder (metadata.jsonl + a folder of frames per video)
    accelerate launch training/train_video_ldm.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --train_data_dir my_videos --resolution 256 --num_frames 16 --output_dir my-video-ldm

The image model's UNet becomes a `storydiff.VideoLDMUNet` (`from_unet2d`: temporal attention after each spatial
transformer, a temporal 3D-conv block after each resnet, mixed in by learned alphas, an exact identity at the start).
The spatial layers stay frozen (Align your Latents); `--spatial_lora_rank N` also trains LoRA adapters on the spatial
attention (peft), fused into the saved UNet. `--image_fraction p` replaces each video of a batch, with probability p,
by a digits-world image repeated over the frames and marked image-only (joint image/video training, Video Diffusion
Models): those frames get exactly the image model's output, so they train only the spatial adapters and keep them an
image model. Objective: the latent-diffusion loss on every frame, with condition dropout for classifier-free guidance.

Output: a `VideoLDMPipeline` folder (`VideoLDMPipeline.from_pretrained(output_dir)`), the temporal layers alone in
`output_dir/temporal_layers` (`VideoLDMUNet.from_unet2d(unet, temporal_layers=...)`), validation GIF strips,
motion metrics on held-out moving digits, a model card; EMA of the trained weights, exact resume, TensorBoard and
`--push_to_hub` come from the utilities every storydiff training script shares.
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
    parse_args_or_exit,
    training_argument_parser,
)
from storydiff.training.datasets_loading import check_one_data_source

MOVING_DIGITS = "moving_digits"
BUILT_IN_DATASETS = (MOVING_DIGITS,)
SPATIAL_LORA_TARGETS = r".*\.spatial\..*\.(to_q|to_k|to_v|to_out\.0)$"  # the image model's attention only
DEFAULT_DIGITS_VALIDATION_PROMPTS = (
    "a large red 3 moves slowly to the left",
    "a small blue 7 moves quickly up",
    "a large green 0 moves quickly to the right",
    "a small yellow 5 moves slowly down",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default=None, choices=BUILT_IN_DATASETS, help="Built-in video set.")
    data.add_argument("--train_data_dir", type=str, default=None, help="Video folder: metadata.jsonl + frames.")
    data.add_argument("--dataset_name", type=str, default=None, help="datasets dataset with a frames column.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--frames_column", type=str, default="frames", help="Column of frame lists (PIL images).")
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--resolution", type=int, default=32, help="Frame size in pixels.")
    data.add_argument("--num_frames", type=int, default=8, help="Frames per training clip.")
    data.add_argument("--frame_stride", type=int, default=1, help="Take every N-th frame of the source video.")
    data.add_argument("--max_frames", type=int, default=32, help="The longest clip the model will accept.")
    data.add_argument("--num_videos", type=int, default=8000, help="Built-in set: videos to make.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N videos.")
    data.add_argument("--image_fraction", type=float, default=0.0, help="P(a video -> an image-only sample).")
    data.add_argument("--num_world_samples", type=int, default=8000, help="Images for --image_fraction.")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="SD-shaped image LDM.")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--temporal_attention_head_dim", type=int, default=8)
    model.add_argument("--no_temporal_cross_attention", action="store_true", help="Temporal layers ignore text.")
    model.add_argument("--temporal_conv_kernel_size", type=int, default=3)
    model.add_argument("--spatial_lora_rank", type=int, default=None, help="Also train spatial LoRA adapters.")
    model.add_argument("--spatial_learning_rate", type=float, default=None, help="Their rate (default: 0.1x).")
    model.add_argument("--proportion_empty_prompts", type=float, default=0.1, help="P(caption -> '') for CFG.")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")

    validation = parser.add_argument_group("validation and evaluation")
    validation.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    validation.add_argument("--validation_steps", type=int, default=500, help="Sample GIF strips every N steps.")
    validation.add_argument("--validation_guidance_scale", type=float, default=4.0)
    validation.add_argument("--validation_inference_steps", type=int, default=25)
    validation.add_argument("--num_evaluation_videos", type=int, default=100, help="Built-in set: held-out videos.")

    add_common_training_arguments(parser)
    parser.set_defaults(learning_rate=3e-4, train_batch_size=8, lr_warmup_steps=100)
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_video_arguments(args)
    return args


def check_video_arguments(args: argparse.Namespace) -> None:
    check_one_data_source(args, BUILT_IN_DATASETS)
    check_path_or_hub_id("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    if args.train_data_dir is not None and not os.path.isdir(args.train_data_dir):
        raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
    for name in ("num_frames", "frame_stride", "max_frames", "num_videos", "validation_steps",
                 "validation_inference_steps", "num_evaluation_videos", "temporal_attention_head_dim"):  # fmt: skip
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.num_frames > args.max_frames:
        raise ValueError(f"--num_frames {args.num_frames} cannot exceed --max_frames {args.max_frames}.")
    if args.temporal_conv_kernel_size < 1 or args.temporal_conv_kernel_size % 2 == 0:
        raise ValueError(
            f"--temporal_conv_kernel_size must be a positive odd int, got {args.temporal_conv_kernel_size}."
        )
    if not 0.0 <= args.image_fraction < 1.0:
        raise ValueError(f"--image_fraction must be in [0, 1), got {args.image_fraction}.")
    if args.image_fraction > 0 and args.dataset != MOVING_DIGITS:
        raise ValueError("--image_fraction mixes in digits-world images, so it needs --dataset moving_digits.")
    if args.image_fraction > 0 and args.spatial_lora_rank is None:
        raise ValueError(
            "--image_fraction trains nothing with frozen spatial layers (image-only frames bypass the temporal ones): "
            "add --spatial_lora_rank."
        )
    if not 0.0 <= args.proportion_empty_prompts < 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1), got {args.proportion_empty_prompts}.")
    if args.spatial_lora_rank is not None and args.spatial_lora_rank < 1:
        raise ValueError(f"--spatial_lora_rank must be >= 1, got {args.spatial_lora_rank}.")
    if args.spatial_learning_rate is not None and not (math.isfinite(args.spatial_learning_rate) and args.spatial_learning_rate > 0):  # fmt: skip
        raise ValueError(f"--spatial_learning_rate must be a finite number > 0, got {args.spatial_learning_rate}.")
    if args.resolution < 8:
        raise ValueError(f"--resolution must be >= 8, got {args.resolution}.")


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import contextlib
import json
import time

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
from storydiff.training.sample_grids import labelled_grid, log_grid, save_grid
from storydiff.training.train_text_to_image import load_sd_shaped_components
from storydiff.training.video_data import VideoCaptionDataset, collate_videos

# ------------------------------------------------------------------------------------------------------------ data


def load_training_data(args) -> tuple:
    """`(dataset, dataset_id)`."""
    if args.dataset == MOVING_DIGITS:
        from storydiff.data.moving_digits import moving_digits_arrays

        count = min(args.num_videos, args.max_train_samples or args.num_videos)
        videos, captions, _ = moving_digits_arrays("train", count, args.seed, args.num_frames * args.frame_stride,
                                                   args.resolution)  # fmt: skip
        dataset = VideoCaptionDataset(videos=videos, captions=captions, num_frames=args.num_frames,
                                      frame_stride=args.frame_stride, resolution=args.resolution)  # fmt: skip
        return dataset, "storydiff-moving-digits"
    if args.train_data_dir is not None:
        from storydiff.data.moving_digits import load_video_folder

        hf_dataset, dataset_id = load_video_folder(args.train_data_dir), None
    else:
        import datasets

        hf_dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir,
                                           split="train")  # fmt: skip
        dataset_id = args.dataset_name
    for flag, column in (("--frames_column", args.frames_column), ("--caption_column", args.caption_column)):
        if column not in hf_dataset.column_names:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset ({', '.join(hf_dataset.column_names)})."
            )
    if args.max_train_samples is not None:
        hf_dataset = hf_dataset.select(range(min(args.max_train_samples, len(hf_dataset))))
    if len(hf_dataset) == 0:
        raise ValueError("The dataset has no videos.")
    dataset = VideoCaptionDataset(hf_dataset=hf_dataset, frames_column=args.frames_column,
                                  caption_column=args.caption_column, num_frames=args.num_frames,
                                  frame_stride=args.frame_stride, resolution=args.resolution)  # fmt: skip
    return dataset, dataset_id


def image_data(args):
    """Digits-world images and captions for joint image/video training (none without --image_fraction)."""
    if args.image_fraction == 0:
        return None
    from storydiff.data.digits import digits_world_arrays

    images, captions, _ = digits_world_arrays("train", args.num_world_samples, args.seed, args.resolution)
    return images, captions


def mix_in_images(pixels, captions, images) -> tuple:
    """Replace videos by image-only samples (an image repeated over the frames) with probability --image_fraction;
    returns the pixels, captions and the `(batch, frames)` image-only indicator."""
    pixels, captions = pixels.clone(), list(captions)
    indicator = torch.zeros(pixels.shape[0], pixels.shape[2])
    if images is None:
        return pixels, captions, indicator
    image_pixels, image_captions, fraction = images
    chosen = torch.rand(pixels.shape[0]) < fraction
    picks = torch.randint(0, len(image_captions), (pixels.shape[0],))
    for row in torch.nonzero(chosen).flatten().tolist():
        pixels[row] = image_pixels[picks[row]][:, None].to(pixels.dtype)  # broadcast over the frames
        captions[row] = image_captions[picks[row]]
        indicator[row] = 1.0
    return pixels, captions, indicator


# ----------------------------------------------------------------------------------------------------------- model


class VideoDenoiser(torch.nn.Module):
    """The video UNet with the frozen text encoder in one `forward`, so DDP / FSDP see one model."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy_latents, timesteps, input_ids, image_only_indicator):
        with torch.no_grad():
            text = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, text, image_only_indicator=image_only_indicator).sample


def build_video_unet(args, unet2d):
    from storydiff.models.video_ldm_unet import VideoLDMUNet

    unet = VideoLDMUNet.from_unet2d(
        unet2d,
        num_frames=args.num_frames,
        max_frames=args.max_frames,
        temporal_attention_head_dim=args.temporal_attention_head_dim,
        temporal_cross_attention=not args.no_temporal_cross_attention,
        temporal_conv_kernel_size=args.temporal_conv_kernel_size,
    )
    unet.freeze_spatial()
    if args.spatial_lora_rank is not None:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=args.spatial_lora_rank, lora_alpha=args.spatial_lora_rank,
                                    init_lora_weights="gaussian", target_modules=SPATIAL_LORA_TARGETS))  # fmt: skip
        # peft leaves only the adapters trainable: the temporal layers must stay so
        for parameter in unet.temporal_parameters().values():
            parameter.requires_grad_(True)
    return unet


def parameter_groups(args, unet) -> list:
    temporal = list(unet.temporal_parameters().values())
    if not all(parameter.requires_grad for parameter in temporal):
        raise RuntimeError("Some temporal parameters do not require gradients: they would never train.")
    groups = [{"params": temporal, "lr": args.learning_rate}]
    spatial = [p for name, p in unet.named_parameters() if "lora_" in name]
    if spatial:
        groups.append({"params": spatial, "lr": args.spatial_learning_rate or args.learning_rate * 0.1})
    return groups


def make_pipeline(components: dict, unet):
    from diffusers import DDIMScheduler

    from storydiff.custom_pipelines.video_ldm import VideoLDMPipeline

    return VideoLDMPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                            tokenizer=components["tokenizer"], unet=unet,
                            scheduler=DDIMScheduler.from_config(components["scheduler"].config))  # fmt: skip


# ------------------------------------------------------------------------------------------------------ validation


def generate(pipeline, prompts: Sequence[str], guidance_scale: float, steps: int, seed: int) -> np.ndarray:
    """Videos `(N, F, H, W, 3)` in [0, 1], in batches, with a fixed seed."""
    pipeline.set_progress_bar_config(disable=True)
    videos = []
    for start in range(0, len(prompts), 16):
        generator = torch.Generator(device="cpu").manual_seed(seed + start)
        videos.append(pipeline(list(prompts[start : start + 16]), guidance_scale=guidance_scale,
                               num_inference_steps=steps, generator=generator).frames)  # fmt: skip
    return np.concatenate(videos)


def validation_strips(pipeline, args, prompts: Sequence[str], step: int) -> tuple:
    """A labelled grid (rows: prompts, columns: frames) and the videos."""
    videos = generate(pipeline, prompts, args.validation_guidance_scale, args.validation_inference_steps, args.seed)
    grid = labelled_grid(
        videos.reshape(-1, *videos.shape[2:]),
        rows=list(prompts),
        columns=[f"frame {i}" for i in range(videos.shape[1])],
        title=f"step {step}, guidance {args.validation_guidance_scale:g}, {args.validation_inference_steps} DDIM steps",
        min_cell=64,
    )
    return grid, videos


def save_gifs(videos: np.ndarray, folder: str, prefix: str) -> list:
    from diffusers.utils import export_to_gif
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    names = []
    for index, video in enumerate(videos):
        frames = [Image.fromarray((frame * 255).round().astype(np.uint8)).resize((96, 96), Image.NEAREST) for frame in video]  # fmt: skip
        name = f"{prefix}_{index}.gif"
        export_to_gif(frames, os.path.join(folder, name), fps=4)
        names.append(name)
    return names


def evaluate_moving_digits(pipeline, args) -> dict:
    """Motion, identity and adherence on held-out moving-digit captions, with the temporal layers and without
    them (the image model frame by frame: same noise, temporal alphas forced to 1)."""
    from storydiff.data.moving_digits import moving_digits_arrays
    from storydiff.evaluation.video import evaluate_videos

    _, captions, attributes = moving_digits_arrays("test", args.num_evaluation_videos, args.seed, args.num_frames,
                                                   args.resolution)  # fmt: skip
    metrics = {}
    for label, temporal in (("video", True), ("image_per_frame", False)):
        with contextlib.nullcontext() if temporal else pipeline.unet.temporal_layers_disabled():
            videos = generate(pipeline, captions, args.validation_guidance_scale, args.validation_inference_steps,
                              args.seed)  # fmt: skip
        scores = evaluate_videos(videos, attributes)
        for name in ("direction_accuracy", "identity_consistency", "adherence", "frame_frechet_distance"):
            metrics[f"{label}_{name}"] = round(float(scores[name]), 4)
    return metrics


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_video_ldm")
    set_seed(args.seed)

    dataset, dataset_id = load_training_data(args)
    images = image_data(args)
    components = load_sd_shaped_components(args.pretrained_model_name_or_path, args.revision)
    vae, tokenizer, text_encoder, noise_scheduler = (components[name] for name in ("vae", "tokenizer", "text_encoder", "scheduler"))  # fmt: skip
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % factor:
        raise ValueError(f"--resolution {args.resolution} must be divisible by the VAE's downsampling {factor}.")
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet = build_video_unet(args, components["unet"])
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    denoiser = VideoDenoiser(unet, text_encoder)
    groups = parameter_groups(args, unet)
    trainable = [p for group in groups for p in group["params"]]

    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_videos,
                            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    # the groups carry their own learning rates (temporal; spatial LoRA lower)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(groups, args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset={"name": dataset_id or args.train_data_dir, "num_examples": len(dataset)},
        model_config={
            "unet": unet.config,
            "spatial_lora_rank": args.spatial_lora_rank,
            "image_fraction": args.image_fraction,
        },  # fmt: skip
    )
    denoiser, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    vae.to(accelerator.device)
    trained_modules = torch.nn.ModuleList([unet.temporal_modules()])
    if args.spatial_lora_rank is not None:
        trained_modules.append(torch.nn.ModuleList(m for n, m in unet.named_modules() if n.endswith(("lora_A", "lora_B"))))  # fmt: skip
    ema = create_ema(trained_modules, args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    prompts = args.validation_prompts  # none given: the moving digits' defaults; an empty list: no validation
    if prompts is None:
        prompts = list(DEFAULT_DIGITS_VALIDATION_PROMPTS) if args.dataset == MOVING_DIGITS else []
    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="Training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    scaling_factor = vae.config.scaling_factor
    mixing = None if images is None else (*images, args.image_fraction)
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        denoiser.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                example_log.write(
                    json.dumps({"step": position.global_step, "indices": batch["index"].tolist()}) + "\n"
                )
                example_log.flush()
            pixels, captions, indicator = mix_in_images(batch["pixel_values"], batch["captions"], mixing)
            batch_size, _, frames, height, width = pixels.shape
            with torch.no_grad():
                flat = pixels.permute(0, 2, 1, 3, 4).reshape(batch_size * frames, 3, height, width)
                latents = vae.encode(flat.to(accelerator.device, vae.dtype)).latent_dist.sample() * scaling_factor
                latents = latents.reshape(batch_size, frames, *latents.shape[1:]).permute(0, 2, 1, 3, 4)
            drop = torch.rand(batch_size) < args.proportion_empty_prompts
            captions = ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist())]
            input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(latents.device)  # fmt: skip
            noise = torch.randn_like(latents)
            # one noise level per video: the frames of a clip are denoised together at sampling time
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), device=latents.device)  # fmt: skip
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise

            with accelerator.accumulate(denoiser):
                prediction = denoiser(noisy, timesteps, input_ids, indicator.to(latents.device))
                loss = debug_nan_loss(F.mse_loss(prediction.float(), target.float()), args, position.global_step)
                step_loss = check_finite_loss(accelerator, loss, position.global_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(trained_modules.parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if prompts and position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                with ema_weights(ema, trained_modules):
                    grid, _ = validation_strips(make_pipeline(components, unet), args, prompts, position.global_step)
                path = os.path.join(args.output_dir, "validation", f"step_{position.global_step:06d}.png")
                log_grid(accelerator, grid, path, position.global_step)
                denoiser.train()
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)
            if position.global_step >= max_train_steps:
                break
    progress.close()
    if example_log is not None:
        example_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet.eval()
        with ema_weights(ema, trained_modules):
            if args.spatial_lora_rank is not None:
                unet.fuse_lora()  # the saved UNet is a plain VideoLDMUNet with the adapters merged in
                unet.unload_lora()
            pipeline = make_pipeline(components, unet)
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                "train_videos": len(dataset),
                "trainable_parameters": sum(p.numel() for p in trainable),
                "temporal_parameters": sum(p.numel() for p in unet.temporal_parameters().values()),
            }
            if args.dataset == MOVING_DIGITS:
                metrics.update(evaluate_moving_digits(pipeline, args))
            metrics["train_wall_time_s"] = round(position.total_wall_time_s(), 1)
            strips = validation_strips(pipeline, args, prompts, position.global_step) if prompts else None
            save_output(args, argv, pipeline, strips, metrics, dataset_id)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved the video pipeline and its temporal layers in {args.output_dir}")
    end_training(accelerator)
    return args.output_dir


def save_output(args, argv, pipeline, strips, metrics, dataset_id) -> None:
    """The pipeline, the temporal layers alone, sample strips and GIFs, metrics and model card, replacing the old
    output atomically."""

    def write(folder: str) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        pipeline.unet.save_temporal_layers(os.path.join(folder, "temporal_layers"))
        images = []
        if strips is not None:
            grid, videos = strips
            save_grid(grid, os.path.join(folder, "samples.png"))
            images = ["samples.png"] + [os.path.join("samples", name) for name in save_gifs(videos, os.path.join(folder, "samples"), "sample")]  # fmt: skip
        with open(os.path.join(folder, "train_metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        frozen = "frozen" if args.spatial_lora_rank is None else f"adapted by LoRA rank {args.spatial_lora_rank}"
        write_model_card(
            folder,
            title=f"Video LDM on {dataset_id or 'a video folder'} ({args.num_frames} frames, {args.resolution}x{args.resolution})",  # fmt: skip
            description=(
                f"Video LDM temporal layers (storydiff `VideoLDMUNet`) trained by storydiff's "
                f"`training/train_video_ldm.py` on top of the image LDM `{args.pretrained_model_name_or_path}`, whose "
                f"spatial layers were {frozen}. Image-only fraction of the batches: {args.image_fraction}. The "
                "folder is a whole `VideoLDMPipeline`; `temporal_layers/` holds the temporal layers alone (load them "
                "onto the base UNet with `VideoLDMUNet.from_unet2d(unet, temporal_layers=...)`). Metrics on held-out "
                "moving digits compare the video model with the image model applied frame by frame (same noise)."
            ),
            tags=["text-to-video", "video-ldm", "latent-diffusion"],
            command=training_command(argv, script=os.path.abspath(__file__)),
            metrics={k: v for k, v in metrics.items() if v is not None},
            datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
            base_model=args.pretrained_model_name_or_path,
            images=images,
            usage="import torch\nfrom diffusers.utils import export_to_gif\nfrom storydiff import VideoLDMPipeline\n\n"
            'pipe = VideoLDMPipeline.from_pretrained("path/to/this/folder")\n'
            'video = pipe("a large red 3 moves slowly to the left", guidance_scale=4.0, num_inference_steps=25,\n'
            '             generator=torch.manual_seed(0), output_type="pil").frames[0]\n'
            'export_to_gif(video, "video.gif")',
        )

    check_finite_weights(pipeline.unet)
    save_folder_atomically(args.output_dir, write)


if __name__ == "__main__":
    main()
