"""Train or fine-tune the UNet (and optionally the text encoder) of a Stable-Diffusion-shaped pipeline.

    # fine-tune any SD-shaped pipeline (local folder or Hub id), full or LoRA
    accelerate launch training/train_text_to_image.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset_name user/captioned-images --caption_column text --resolution 512 --lora_rank 8 --output_dir out
    # a miniature model from scratch on the built-in captioned digits world, with a VAE from train_vae.py
    accelerate launch training/train_text_to_image.py --dataset digits_world --vae digits-vae --output_dir digits-t2i

Data: the digits world (`storydiff.data.digits`), an image folder with captions in `metadata.jsonl`, or a Hub dataset
(`--image_column`, `--caption_column`). Objective: the latent-diffusion epsilon (or v) loss on `vae latents *
scaling_factor`, with condition dropout (`--proportion_empty_prompts` replaces a caption by "", the unconditional
prompt stock pipelines use for classifier-free guidance). From scratch (`--vae`), a word-level CLIP tokenizer is built
from the training captions and a small CLIP text encoder is trained with the UNet. `--lora_rank N` trains LoRA
adapters (peft) on the UNet's attention projections instead of the full UNet and saves them in diffusers' LoRA format
(`pipe.load_lora_weights(output_dir)`); otherwise the output folder is a whole pipeline that the stock
`StableDiffusionPipeline.from_pretrained` loads. EMA, gradient accumulation, mixed precision, gradient checkpointing,
exact resume, TensorBoard, validation grids, a model card with measured metrics and `--push_to_hub` come from the
utilities shared by every storydiff training script.
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
BUILT_IN_DATASETS = (DIGITS_WORLD,)
SD_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_DIGITS_VALIDATION_PROMPTS = (
    "a large red 3 in the centre",
    "a small blue 7 in the top left corner",
    "a large green 0 on the right",
    "a small yellow 5 at the bottom",
)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = add_image_data_arguments(parser, BUILT_IN_DATASETS, "Image folder with metadata.jsonl captions.", 32,
                                    "Training image size in pixels.")  # fmt: skip
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--num_world_samples", type=int, default=8000, help="Canvases of the digits world.")

    model = parser.add_argument_group("model: fine-tune a pipeline, or start from a VAE")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None, help="SD-shaped pipeline.")
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--vae", type=str, default=None, help="From scratch: an AutoencoderKL folder or Hub id.")
    model.add_argument("--unet_block_out_channels", type=str, default="32,64", help="From scratch: UNet widths.")
    model.add_argument("--unet_layers_per_block", type=int, default=1)
    model.add_argument("--unet_attention_head_dim", type=int, default=8)
    model.add_argument("--unet_norm_num_groups", type=int, default=8)
    model.add_argument("--text_encoder_hidden_size", type=int, default=64, help="From scratch: CLIP text width.")
    model.add_argument("--text_encoder_layers", type=int, default=2)
    model.add_argument("--tokenizer_max_length", type=int, default=24, help="From scratch: tokens per caption.")
    model.add_argument("--train_text_encoder", action="store_true", help="Also train the text encoder.")
    model.add_argument("--lora_rank", type=int, default=None, help="Train LoRA adapters of this rank only.")
    model.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: the rank).")
    model.add_argument("--prediction_type", type=str, default=None, choices=("epsilon", "v_prediction"))
    model.add_argument("--proportion_empty_prompts", type=float, default=0.1, help="P(caption -> '') for CFG.")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Trade compute for memory.")

    validation = parser.add_argument_group("validation and evaluation")
    validation.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    validation.add_argument("--validation_steps", type=int, default=500, help="Sample a grid every N steps.")
    validation.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    validation.add_argument("--validation_guidance_scale", type=float, default=4.0)
    validation.add_argument("--validation_inference_steps", type=int, default=25)
    validation.add_argument(
        "--evaluation_guidance_scales",
        type=str,
        default="1,2,4,7",
        help="Digits world: caption adherence and Frechet distance at these scales go into the model card.",
    )
    validation.add_argument("--num_evaluation_images", type=int, default=200)

    add_common_training_arguments(parser)
    parser.set_defaults(learning_rate=3e-4, train_batch_size=64, lr_warmup_steps=100)
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_text_to_image_arguments(args)
    return args


def check_text_to_image_arguments(args: argparse.Namespace) -> None:
    check_one_data_source(args, BUILT_IN_DATASETS)
    if (args.pretrained_model_name_or_path is None) == (args.vae is None):
        raise ValueError(
            "Give exactly one model source: --pretrained_model_name_or_path (fine-tune an SD-shaped pipeline) or "
            "--vae (start a new UNet and text encoder from scratch on that VAE's latents)."
        )
    if args.vae is not None and args.lora_rank is not None:
        raise ValueError("--lora_rank adapts an existing UNet; a model from scratch (--vae) trains in full.")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"--lora_rank must be >= 1 (or left out for full fine-tuning), got {args.lora_rank}.")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora_alpha must be a finite number > 0, got {args.lora_alpha}.")
    if not 0.0 <= args.proportion_empty_prompts < 1.0:
        raise ValueError(f"--proportion_empty_prompts must be in [0, 1), got {args.proportion_empty_prompts}.")
    for name in ("validation_steps", "num_validation_images", "validation_inference_steps", "num_evaluation_images"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.resolution < 8:
        raise ValueError(f"--resolution must be >= 8, got {args.resolution}.")
    args.unet_block_out_channels = int_list("--unet_block_out_channels", args.unet_block_out_channels, minimum=1)
    args.evaluation_guidance_scales = [float(g) for g in _float_list(args.evaluation_guidance_scales)]
    check_path_or_hub_id("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    check_path_or_hub_id("--vae", args.vae)
    if args.vae is not None:
        args.train_text_encoder = True  # a new text encoder is random: it must learn


def _float_list(text: str) -> list:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--evaluation_guidance_scales must be comma-separated numbers, got {text!r}.") from None
    if any(not math.isfinite(value) or value < 1.0 for value in values):  # empty: no evaluation
        raise ValueError(f"--evaluation_guidance_scales must be finite and >= 1 (diffusers' g), got {text!r}.")
    return values


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import shutil
import tempfile
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
from storydiff.training.text_image_data import (
    ImageCaptionDataset,
    collate_image_captions,
    digits_world_training_data,
)

# ------------------------------------------------------------------------------------------------------------ data


def load_training_data(args) -> tuple:
    """`(dataset, dataset_id)`. Captions must be non-empty unless --proportion_empty_prompts trains the empty one."""
    if args.dataset == DIGITS_WORLD:
        dataset = digits_world_training_data(args.resolution, args.num_world_samples, args.seed)
        if args.max_train_samples is not None:
            dataset.images, dataset.captions = (
                dataset.images[: args.max_train_samples],
                dataset.captions[: args.max_train_samples],
            )
        return dataset, "storydiff-digits-world"
    from storydiff.training.datasets_loading import load_image_dataset_from_args

    hf_dataset = load_image_dataset_from_args(args, other_columns={"--caption_column": args.caption_column})
    dataset_id = args.dataset_name
    dataset = ImageCaptionDataset(hf_dataset=hf_dataset, image_column=args.image_column,
                                  caption_column=args.caption_column, resolution=args.resolution,
                                  random_flip=args.random_flip)  # fmt: skip
    captions = dataset.all_captions()
    empty = [i for i, caption in enumerate(captions) if not isinstance(caption, str) or not caption.strip()]
    if empty and args.proportion_empty_prompts == 0:
        raise ValueError(
            f"{len(empty)} of {len(captions)} examples have an empty --caption_column {args.caption_column!r} "
            f"(first at index {empty[0]}). Fill them in, or set --proportion_empty_prompts > 0 if empty captions "
            "are meant as unconditional examples."
        )
    return dataset, dataset_id


# ----------------------------------------------------------------------------------------------------------- model


class TextToImageDenoiser(torch.nn.Module):
    """Text encoder + UNet in one `forward`, so DDP / FSDP synchronise the gradients of both."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy_latents, timesteps, input_ids):
        encoder_hidden_states = self.text_encoder(input_ids)[0]  # as StableDiffusionPipeline.encode_prompt
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample


def load_components(args, captions: Sequence[str]) -> dict:
    """The five SD components: loaded from a pipeline, or new ones around a trained VAE."""
    from diffusers import AutoencoderKL, DDPMScheduler

    if args.pretrained_model_name_or_path is not None:
        return load_sd_shaped_components(args.pretrained_model_name_or_path, args.revision)
    from storydiff.training.text_to_image_components import (
        caption_words,
        new_text_encoder,
        new_unet,
        word_level_clip_tokenizer,
    )

    vae = AutoencoderKL.from_pretrained(args.vae, revision=args.revision)
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution % downsampling:
        raise ValueError(f"--resolution {args.resolution} must be divisible by the VAE's downsampling {downsampling}.")
    with tempfile.TemporaryDirectory() as tokenizer_folder:  # the pipeline saves the tokenizer with the rest
        tokenizer = word_level_clip_tokenizer(caption_words(captions), tokenizer_folder, args.tokenizer_max_length)
    text_encoder = new_text_encoder(tokenizer, args.text_encoder_hidden_size, args.text_encoder_layers, seed=args.seed)
    unet = new_unet(args.resolution // downsampling, text_encoder.config.hidden_size, args.unet_block_out_channels,
                    args.unet_layers_per_block, args.unet_attention_head_dim, args.unet_norm_num_groups,
                    vae.config.latent_channels, seed=args.seed)  # fmt: skip
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1,
                              prediction_type=args.prediction_type or "epsilon")  # fmt: skip
    return {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "unet": unet, "scheduler": scheduler}


def load_sd_shaped_components(name_or_path: str, revision: Optional[str] = None) -> dict:
    """Load VAE, text encoder, tokenizer, UNet and scheduler, with a clear error for anything not SD-shaped."""
    from diffusers import DDPMScheduler, DiffusionPipeline

    if os.path.isdir(name_or_path):
        index_path = os.path.join(name_or_path, "model_index.json")
        if not os.path.isfile(index_path):
            raise ValueError(f"{name_or_path!r} is not a diffusers pipeline folder (no model_index.json).")
        with open(index_path) as file:
            index = json.load(file)
    elif os.path.sep in name_or_path.strip("/").replace("/", "", 1) or name_or_path.startswith((".", "/")):
        raise ValueError(f"--pretrained_model_name_or_path {name_or_path!r} does not exist.")
    else:
        index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    missing = [name for name in SD_COMPONENTS if not (isinstance(index.get(name), list) and index[name][0])]
    if missing:
        raise ValueError(
            f"{name_or_path!r} is not Stable-Diffusion-shaped: it has no {', '.join(missing)} "
            f"(found {', '.join(k for k in index if not k.startswith('_'))}). train_text_to_image.py needs a VAE, a "
            "text encoder, a tokenizer, a UNet and a scheduler (the StableDiffusionPipeline layout)."
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    components = {
        "vae": AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", revision=revision),
        "text_encoder": CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", revision=revision),
        "tokenizer": AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", revision=revision),
        "unet": UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", revision=revision),
        "scheduler": DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", revision=revision),
    }
    return components


def add_lora_adapters(args, unet, text_encoder) -> None:
    from peft import LoraConfig

    alpha = args.lora_alpha or args.lora_rank
    unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=list(LORA_TARGET_MODULES)))  # fmt: skip
    if args.train_text_encoder:
        text_encoder.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))  # fmt: skip


def make_pipeline(components: dict, unet, text_encoder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=components["vae"],
        text_encoder=text_encoder,
        tokenizer=components["tokenizer"],
        unet=unet,
        scheduler=DDIMScheduler.from_config(components["scheduler"].config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generate(pipeline, prompts: Sequence[str], guidance_scale: float, num_inference_steps: int, seed: int):
    """Images (N, H, W, 3) in [0, 1], in batches, with a fixed seed."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(prompts), 64):
        generator = torch.Generator(device="cpu").manual_seed(seed + start)
        images.append(pipeline(list(prompts[start : start + 64]), guidance_scale=guidance_scale,
                               num_inference_steps=num_inference_steps, generator=generator, output_type="np").images)  # fmt: skip
    return np.concatenate(images)


def validation_grid(pipeline, args, prompts: Sequence[str], step: int) -> np.ndarray:
    """Rows: prompts, columns: seeds; a labelled uint8 grid."""
    repeated = [prompt for prompt in prompts for _ in range(args.num_validation_images)]
    images = generate(pipeline, repeated, args.validation_guidance_scale, args.validation_inference_steps, args.seed)
    return labelled_grid(
        images,
        rows=list(prompts),
        columns=[f"sample {i + 1}" for i in range(args.num_validation_images)],
        title=f"step {step}, guidance {args.validation_guidance_scale:g}, {args.validation_inference_steps} DDIM steps",
        min_cell=96,
    )


def evaluate_digits_world(pipeline, args) -> dict:
    """Caption adherence and Frechet distance on held-out digits-world captions at each evaluation guidance scale."""
    from storydiff.data.digits import digits_world_arrays
    from storydiff.evaluation.text_adherence import canvas_frechet_distance, caption_adherence

    _, captions, attributes = digits_world_arrays("test", num_samples=args.num_evaluation_images, seed=args.seed,
                                                  resolution=args.resolution)  # fmt: skip
    metrics = {}
    for scale in args.evaluation_guidance_scales:
        images = generate(pipeline, captions, scale, args.validation_inference_steps, args.seed)
        adherence = caption_adherence(images, attributes)
        metrics[f"caption_adherence_overall_g{scale:g}"] = round(adherence["overall"], 4)
        metrics[f"caption_adherence_exact_g{scale:g}"] = round(adherence["exact"], 4)
        metrics[f"canvas_frechet_distance_g{scale:g}"] = round(float(canvas_frechet_distance(images)), 3)
    return metrics


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_text_to_image")
    set_seed(args.seed)

    dataset, dataset_id = load_training_data(args)
    components = load_components(args, dataset.all_captions())
    vae, tokenizer, noise_scheduler = components["vae"], components["tokenizer"], components["scheduler"]
    unet, text_encoder = components["unet"], components["text_encoder"]
    vae.requires_grad_(False)
    unet.requires_grad_(args.lora_rank is None)
    text_encoder.requires_grad_(args.train_text_encoder and args.lora_rank is None)
    if args.lora_rank is not None:
        add_lora_adapters(args, unet, text_encoder)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    denoiser = TextToImageDenoiser(unet, text_encoder)
    trainable = [p for p in denoiser.parameters() if p.requires_grad]

    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_image_captions,
                            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(trainable, args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset={"name": dataset_id or args.train_data_dir, "num_examples": len(dataset)},
        model_config={
            "unet": unet.config,
            "text_encoder": text_encoder.config.to_dict(),
            "vae": vae.config,
            "lora_rank": args.lora_rank,
            "train_text_encoder": args.train_text_encoder,
        },  # fmt: skip
    )
    denoiser, optimizer, dataloader, lr_scheduler = accelerator.prepare(denoiser, optimizer, dataloader, lr_scheduler)
    vae.to(accelerator.device)
    ema = create_ema(unet, args.ema_decay, args.ema_power) if args.use_ema and args.lora_rank is None else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    prompts = args.validation_prompts  # none given: the digits world's defaults; an empty list: no validation
    if prompts is None:
        prompts = list(DEFAULT_DIGITS_VALIDATION_PROMPTS) if args.dataset == DIGITS_WORLD else []
    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="Training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    scaling_factor = vae.config.scaling_factor
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
            with torch.no_grad():
                latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample() * scaling_factor
            drop = torch.rand(len(batch["captions"])) < args.proportion_empty_prompts
            captions = ["" if dropped else caption for caption, dropped in zip(batch["captions"], drop.tolist())]
            input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids.to(latents.device)  # fmt: skip
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                      device=latents.device)  # fmt: skip
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise

            with accelerator.accumulate(denoiser):
                prediction = denoiser(noisy, timesteps, input_ids)
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
                ema.step(accelerator.unwrap_model(denoiser).unet.parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if prompts and position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                model = accelerator.unwrap_model(denoiser)
                with ema_weights(ema, model.unet):
                    pipeline = make_pipeline(components, model.unet, model.text_encoder)
                    grid = validation_grid(pipeline, args, prompts, position.global_step)
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
        model = accelerator.unwrap_model(denoiser).eval()
        with ema_weights(ema, model.unet):
            pipeline = make_pipeline(components, model.unet, model.text_encoder)
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                "train_examples": len(dataset),
                "trainable_parameters": sum(p.numel() for p in trainable),
            }
            metrics.update(vae_metrics(args.vae))
            if args.dataset == DIGITS_WORLD and args.lora_rank is None and args.evaluation_guidance_scales:
                metrics.update(evaluate_digits_world(pipeline, args))
            metrics["train_wall_time_s"] = round(position.total_wall_time_s(), 1)
            grid = validation_grid(pipeline, args, prompts, position.global_step) if prompts else None
            save_output(args, argv, pipeline, model, grid, metrics, dataset_id)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved {'LoRA weights' if args.lora_rank else 'the pipeline'} in {args.output_dir}")
    end_training(accelerator)
    return args.output_dir


def vae_metrics(vae_folder: Optional[str]) -> dict:
    """The held-out reconstruction figures a VAE trained by train_vae.py recorded, prefixed with `vae_`."""
    path = os.path.join(vae_folder or "", "train_metrics.json")
    if vae_folder is None or not os.path.isfile(path):
        return {}
    with open(path) as file:
        recorded = json.load(file)
    return {
        f"vae_{name}": recorded[name] for name in ("heldout_reconstruction_mse", "heldout_psnr_db") if name in recorded
    }


def save_output(args, argv, pipeline, model, grid, metrics, dataset_id) -> None:
    """The pipeline (or the LoRA weights), samples, metrics and model card, replacing the old output atomically."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    sample_name = "samples.png"

    def write(folder: str) -> None:
        if args.lora_rank is None:
            pipeline.save_pretrained(folder, safe_serialization=True)
            vae_card = os.path.join(args.vae or "", "README.md")
            if args.vae is not None and os.path.isfile(vae_card):  # the VAE's own card: its command and error
                shutil.copyfile(vae_card, os.path.join(folder, "vae", "README.md"))
        else:
            text_encoder_layers = None
            if args.train_text_encoder:
                text_encoder_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.text_encoder))
            StableDiffusionPipeline.save_lora_weights(
                folder,
                unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet)),
                text_encoder_lora_layers=text_encoder_layers,
                safe_serialization=True,
            )
        images = []
        if grid is not None:
            save_grid(grid, os.path.join(folder, sample_name))
            images = [sample_name]
        with open(os.path.join(folder, "train_metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        lora = args.lora_rank is not None
        base = args.pretrained_model_name_or_path
        load = (
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("path/to/this/folder")'
            if lora
            else 'pipe = StableDiffusionPipeline.from_pretrained("path/to/this/folder")'
        )
        write_model_card(
            folder,
            title=f"Text-to-image {'LoRA' if lora else 'model'} on {dataset_id or 'an image folder'} "
            f"({args.resolution}x{args.resolution})",
            description=(
                f"{'LoRA adapters (rank ' + str(args.lora_rank) + ') for' if lora else 'A'} Stable-Diffusion-shaped "
                "latent diffusion model trained by storydiff's `training/train_text_to_image.py` with condition "
                f"dropout {args.proportion_empty_prompts} for classifier-free guidance. It loads with the stock "
                "diffusers `StableDiffusionPipeline` and with storydiff's `DynamicCFGStableDiffusionPipeline`, which "
                "adds guidance schedules. Caption adherence and Frechet distance are measured on held-out captions of "
                "the digits world by `storydiff.evaluation.text_adherence`, where that is the data."
            ),
            tags=["text-to-image", "stable-diffusion", "latent-diffusion"] + (["lora"] if lora else []),
            command=training_command(argv, script=os.path.abspath(__file__)),
            metrics={k: v for k, v in metrics.items() if v is not None},
            datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
            base_model=base if lora else None,
            images=images,
            usage="import torch\nfrom diffusers import StableDiffusionPipeline\n\n" + load + "\n"
            "image = pipe(\n"
            '    "a small red 7 in the top left corner", guidance_scale=4.0, num_inference_steps=25, '
            "generator=torch.manual_seed(0)\n"
            ").images[0]",
        )

    check_finite_weights(model)
    save_folder_atomically(args.output_dir, write)


if __name__ == "__main__":
    main()
