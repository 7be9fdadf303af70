"""Coherence-aware diffusion (CAD) training: learn from every (image, condition, coherence) triple.

    # text: fine-tune an SD-shaped model (its UNet) with a new CoherenceConditioner, full or LoRA
    accelerate launch training/train_coherence_aware.py --condition text --pretrained_model_name_or_path my-sd \\
        --train_data_dir scored/ --caption_column text --mode cad --output_dir cad-unet
    # text: the paper's Text-RIN from scratch (the SD-shaped folder gives the VAE, text encoder and scheduler)
    accelerate launch training/train_coherence_aware.py --condition text --denoiser text_rin ...
    # class labels: a coherence-aware class-conditional UNet2DModel, new or from a ClassConditionalPipeline folder
    accelerate launch training/train_coherence_aware.py --condition class --label_column label --train_data_dir scored/ ...

The data needs a `coherence` column (in [0, 1]): `training/compute_coherence.py` adds it (CLIP image-caption cosine,
or a classifier's out-of-fold confidence in the given label). `--mode` picks the training rule (see
training/coherence_modes.py): `cad` (condition on c, no dropout), and the paper's baselines `baseline` (condition
dropout 0.1), `filter` (drop c < --filter_threshold) and `weight` (loss * c / mean c), all on the same model so that the
comparison is of the rule only. The output is a `CoherenceAwarePipeline` (text) or a `ClassConditionalPipeline` with a
`CoherenceAwareUNet2DModel` (class), with EMA weights, a model card giving the mode, the coherence statistics and how to
sample (CA-CFG for `cad`, CFG against the empty / null condition otherwise). EMA, exact resume, gradient accumulation,
mixed precision, TensorBoard, validation grids (coherence 0 -> 1) and `--push_to_hub` come from the shared utilities.
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
from storydiff.training.coherence_modes import MODES
from storydiff.training.datasets_loading import add_image_data_arguments, check_one_data_source

DEFAULT_VALIDATION_PROMPTS = ("a large red 3 in the centre", "a small blue 7 in the top left corner")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = add_image_data_arguments(parser, (), "Image folder (metadata.jsonl) or a save_to_disk folder.", 32,
                                    "Training image size.")  # fmt: skip
    data.add_argument("--condition", type=str, default="text", choices=("text", "class"), help="What y is.")
    data.add_argument("--caption_column", type=str, default="text")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--image_channels", type=int, default=3, choices=(1, 3), help="Class condition only.")
    data.add_argument("--coherence_column", type=str, default="coherence")

    mode = parser.add_argument_group("coherence")
    mode.add_argument("--mode", type=str, default="cad", choices=MODES, help="Training rule (coherence_modes.py).")
    mode.add_argument("--condition_dropout", type=float, default=None, help="Default: 0 for cad, 0.1 otherwise.")
    mode.add_argument("--filter_threshold", type=float, default=None, help="--mode filter: drop c below this.")
    mode.add_argument("--coherence_bins", type=int, default=None, help="Quantile-bin c first (the paper: 8).")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="text: SD-shaped pipeline (required); class: a ClassConditionalPipeline to start from.")  # fmt: skip
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--denoiser", type=str, default="unet", choices=("unet", "text_rin"),
                       help="text: fine-tune the pipeline's UNet, or a new TextRINModel.")  # fmt: skip
    model.add_argument("--lora_rank", type=int, default=None, help="text + unet: LoRA on the UNet (merged at save).")
    model.add_argument("--lora_alpha", type=float, default=None)
    model.add_argument("--conditioner_dim", type=int, default=128)
    model.add_argument("--conditioner_layers", type=int, default=2)
    model.add_argument("--conditioner_heads", type=int, default=4)
    model.add_argument("--num_registers", type=int, default=16)
    model.add_argument("--rin_interface_dim", type=int, default=64)
    model.add_argument("--rin_latent_dim", type=int, default=128)
    model.add_argument("--rin_num_latents", type=int, default=32)
    model.add_argument("--rin_blocks", type=int, default=3)
    model.add_argument("--rin_compute_layers", type=int, default=2)
    model.add_argument("--rin_heads", type=int, default=4)
    model.add_argument("--rin_patch_size", type=int, default=1)
    model.add_argument("--self_conditioning_rate", type=float, default=0.9, help="TextRIN: P(latent self-cond).")
    model.add_argument("--block_out_channels", type=str, default="32,64,64", help="class, new UNet: widths.")
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--attention_levels", type=str, default="", help="class, new UNet: levels with attention.")
    model.add_argument("--norm_num_groups", type=int, default=8)
    model.add_argument("--num_train_timesteps", type=int, default=1000)
    model.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2", help="class, new UNet only.")
    model.add_argument("--gradient_checkpointing", action="store_true")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_prompts", type=str, nargs="*", default=None)
    validation.add_argument("--validation_coherences", type=str, default="0,0.5,1", help="Grid columns.")
    validation.add_argument("--validation_steps", type=int, default=500)
    validation.add_argument("--validation_guidance_scale", type=float, default=3.0)
    validation.add_argument("--validation_inference_steps", type=int, default=20)

    add_common_training_arguments(parser)
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_coherence_aware_arguments(args)
    return args


def check_coherence_aware_arguments(args: argparse.Namespace) -> None:
    check_one_data_source(args, ())
    check_path_or_hub_id("--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    if args.condition == "text":
        if args.pretrained_model_name_or_path is None:
            raise ValueError(
                "--condition text needs --pretrained_model_name_or_path: an SD-shaped pipeline whose VAE, text encoder "
                "and tokenizer the model uses (and whose UNet it fine-tunes with --denoiser unet)."
            )
        if args.lora_rank is not None and args.denoiser != "unet":
            raise ValueError("--lora_rank adapts an existing UNet; --denoiser text_rin is trained from scratch.")
    else:
        for flag, value, default in (("--denoiser", args.denoiser, "unet"), ("--lora_rank", args.lora_rank, None)):
            if value != default:
                raise ValueError(f"{flag} is for --condition text; class conditioning trains a UNet2DModel in full.")
    if args.lora_rank is not None and args.lora_rank < 1:
        raise ValueError(f"--lora_rank must be >= 1 (or left out for full fine-tuning), got {args.lora_rank}.")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise ValueError(f"--lora_alpha must be a finite number > 0, got {args.lora_alpha}.")
    if args.filter_threshold is not None and not 0.0 <= args.filter_threshold <= 1.0:
        raise ValueError(f"--filter_threshold must be in [0, 1], got {args.filter_threshold}.")
    if (args.mode == "filter") != (args.filter_threshold is not None):
        raise ValueError("--filter_threshold goes with --mode filter (and only with it).")
    if args.condition_dropout is not None and not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"--condition_dropout must be in [0, 1), got {args.condition_dropout}.")
    if not 0.0 <= args.self_conditioning_rate <= 1.0:
        raise ValueError(f"--self_conditioning_rate must be in [0, 1], got {args.self_conditioning_rate}.")
    if args.coherence_bins is not None and args.coherence_bins < 2:
        raise ValueError(f"--coherence_bins must be >= 2 (or left out), got {args.coherence_bins}.")
    for name in ("validation_steps", "validation_inference_steps", "conditioner_dim", "num_registers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    args.block_out_channels = int_list("--block_out_channels", args.block_out_channels, minimum=1)
    args.attention_levels = int_list("--attention_levels", args.attention_levels) if args.attention_levels else []
    try:
        args.validation_coherences = [float(c) for c in args.validation_coherences.split(",") if c.strip()]
    except ValueError:
        raise ValueError(
            f"--validation_coherences must be comma-separated numbers, got {args.validation_coherences!r}."
        ) from None
    if not args.validation_coherences or any(not 0.0 <= c <= 1.0 for c in args.validation_coherences):
        raise ValueError(f"--validation_coherences must be values in [0, 1], got {args.validation_coherences}.")
    args.dataset, args.proportion_empty_prompts = None, 0.0  # the shared loaders read these


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.coherence import coherence_summary
from storydiff.custom_pipelines.coherence_aware import encode_text
from storydiff.models.coherence import check_coherence
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
from storydiff.training.coherence_modes import CoherenceTrainingMode
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

# ------------------------------------------------------------------------------------------------------------ data


def load_training_data(args) -> tuple:
    """`(dataset, coherences, dataset_id, extra)`: the text or class dataset of the shared loaders, the coherence of
    every row, and for class data `{"num_classes", "id2label"}`."""
    if args.condition == "text":
        from storydiff.training.train_text_to_image import load_training_data as load_captioned

        dataset, dataset_id = load_captioned(args)
        extra = {}
    else:
        from storydiff.training.train_class_conditional import load_training_data as load_labelled

        dataset, num_classes, id2label, dataset_id = load_labelled(args)
        extra = {"num_classes": num_classes, "id2label": id2label}
    columns = dataset.hf_dataset.column_names
    if args.coherence_column not in columns:
        raise ValueError(
            f"The dataset has no --coherence_column {args.coherence_column!r} (columns: {', '.join(columns)}). "
            "Compute it first: python training/compute_coherence.py --train_data_dir <data> --output_dir <scored> "
            "(--scorer clip --clip_model <CLIP> for captions, --scorer classifier for labels), then train on <scored>."
        )
    coherences = dataset.hf_dataset[args.coherence_column]
    if any(c is None for c in coherences):
        raise ValueError(f"--coherence_column {args.coherence_column!r} has missing values; score every row.")
    try:
        coherences = check_coherence(torch.tensor(coherences, dtype=torch.float32))
    except ValueError as error:
        raise ValueError(f"--coherence_column {args.coherence_column!r}: {error}") from None
    return dataset, coherences, dataset_id, extra


def collate(examples: list) -> dict:
    """Image-caption or image-label examples into a batch (captions stay a list)."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
             "index": torch.tensor([e["index"] for e in examples])}  # fmt: skip
    if "caption" in examples[0]:
        batch["captions"] = [e["caption"] for e in examples]
    else:
        batch["class_labels"] = torch.stack([torch.as_tensor(e["class_labels"]) for e in examples])
    return batch


# ----------------------------------------------------------------------------------------------------------- model


class TextCoherenceDenoiser(torch.nn.Module):
    """Conditioner + denoiser as one module, so that accelerate wraps (DDP, FSDP) and checkpoints both together."""

    def __init__(self, conditioner, denoiser):
        super().__init__()
        self.conditioner, self.denoiser = conditioner, denoiser

    def forward(self, noisy, timesteps, text_hidden_states, text_mask, coherence, self_conditioning=None):
        context = self.conditioner(text_hidden_states, coherence, text_mask)
        kwargs = {"encoder_hidden_states": context.encoder_hidden_states,
                  "encoder_attention_mask": context.encoder_attention_mask}  # fmt: skip
        if self_conditioning is not None:
            kwargs["self_conditioning_latents"] = self_conditioning
        return self.denoiser(noisy, timesteps, **kwargs)


def build_text_model(args, coherences) -> tuple:
    """`(components, model)`: the SD-shaped pipeline's frozen parts and the trainable conditioner + denoiser."""
    from storydiff.models.coherence import CoherenceConditioner
    from storydiff.models.text_rin import TextRINModel
    from storydiff.training.train_text_to_image import load_sd_shaped_components

    components = load_sd_shaped_components(args.pretrained_model_name_or_path, args.revision)
    unet = components.pop("unet")
    text_width = components["text_encoder"].config.hidden_size
    if args.denoiser == "unet":
        denoiser = unet
        cross_attention_dim = unet.config.cross_attention_dim
        if args.lora_rank is not None:
            from storydiff.training.train_text_to_image import add_lora_adapters

            unet.requires_grad_(False)
            add_lora_adapters(argparse.Namespace(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                                 train_text_encoder=False), unet, None)  # fmt: skip
    else:
        vae = components["vae"]
        downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.resolution % (downsampling * args.rin_patch_size):
            raise ValueError(f"--resolution {args.resolution} must be divisible by the VAE's downsampling "
                             f"{downsampling} times --rin_patch_size {args.rin_patch_size}.")  # fmt: skip
        cross_attention_dim = args.conditioner_dim
        torch.manual_seed(args.seed)
        denoiser = TextRINModel(
            sample_size=args.resolution // downsampling, in_channels=vae.config.latent_channels,
            patch_size=args.rin_patch_size, interface_dim=args.rin_interface_dim, latent_dim=args.rin_latent_dim,
            num_latents=args.rin_num_latents, num_blocks=args.rin_blocks, compute_layers=args.rin_compute_layers,
            num_heads=args.rin_heads, cross_attention_dim=cross_attention_dim,
        )  # fmt: skip
    torch.manual_seed(args.seed + 1)
    conditioner = CoherenceConditioner(text_dim=text_width, dim=args.conditioner_dim,
                                       cross_attention_dim=cross_attention_dim, num_registers=args.num_registers,
                                       num_layers=args.conditioner_layers, num_heads=args.conditioner_heads)  # fmt: skip
    if args.coherence_bins is not None:
        conditioner.fit_bins(coherences, args.coherence_bins)
    if args.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        conditioner.enable_gradient_checkpointing()
    components["vae"].requires_grad_(False)
    components["text_encoder"].requires_grad_(False)
    return components, TextCoherenceDenoiser(conditioner, denoiser)


def build_class_model(args, coherences, in_channels: int, num_classes: int) -> tuple:
    """`(components, unet)`: a `CoherenceAwareUNet2DModel`, new or from a ClassConditionalPipeline's UNet."""
    from diffusers import DDPMScheduler, UNet2DModel

    from storydiff.models.coherence_unet_2d import CoherenceAwareUNet2DModel
    from storydiff.training.train_class_conditional import build_unet

    if args.pretrained_model_name_or_path is not None:
        config = UNet2DModel.load_config(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision)
        # a coherence-aware UNet is fine-tuned as it is; a plain class-conditional one gets a new coherence embedding
        aware = config["_class_name"] == CoherenceAwareUNet2DModel.__name__
        loader = CoherenceAwareUNet2DModel if aware else UNet2DModel
        base = loader.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", revision=args.revision)
        if base.config.num_class_embeds != num_classes + 1:
            raise ValueError(
                f"The pretrained UNet has {base.config.num_class_embeds} class embeddings; the data has {num_classes} "
                f"classes (+ the null class = {num_classes + 1})."
            )
        scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    else:
        torch.manual_seed(args.seed)
        base = build_unet(args, in_channels, num_classes)
        scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    unet = base if isinstance(base, CoherenceAwareUNet2DModel) else CoherenceAwareUNet2DModel.from_unet(base)
    if args.coherence_bins is not None:
        unet.fit_bins(coherences, args.coherence_bins)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return {"scheduler": scheduler}, unet


def make_pipeline(args, components: dict, model, extra: dict):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    if args.condition == "class":
        from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline

        return ClassConditionalPipeline(scheduler=scheduler, unet=model, num_classes=extra["num_classes"],
                                        id2label=extra["id2label"])  # fmt: skip
    from storydiff.custom_pipelines.coherence_aware import CoherenceAwarePipeline

    return CoherenceAwarePipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                                  tokenizer=components["tokenizer"], conditioner=model.conditioner,
                                  denoiser=model.denoiser, scheduler=scheduler)  # fmt: skip


def validation_grid(pipeline, args, guidance: dict, extra: dict, step: int) -> np.ndarray:
    """Rows: prompts or classes; columns: the test-time coherence (--validation_coherences); one seed per row."""
    pipeline.set_progress_bar_config(disable=True)
    coherences = args.validation_coherences
    common = {"guidance_scale": args.validation_guidance_scale, "num_inference_steps": args.validation_inference_steps,
              "negative_coherence": guidance["negative_coherence"], "output_type": "np"}  # fmt: skip
    if args.condition == "class":
        rows = list(range(extra["num_classes"]))
        labels = [label for label in rows for _ in coherences]
        generator = [torch.Generator().manual_seed(args.seed + label) for label in labels]
        images = pipeline(class_labels=labels, coherence=[c for _ in rows for c in coherences], generator=generator,
                          negative_class=guidance["negative"], **common).images  # fmt: skip
        row_names = [f"class {extra['id2label'][label]}" for label in rows]
    else:
        rows = args.validation_prompts
        prompts = [prompt for prompt in rows for _ in coherences]
        generator = [torch.Generator().manual_seed(args.seed + k // len(coherences)) for k in range(len(prompts))]
        negative = None if guidance["negative"] == "same" else ""
        images = pipeline(prompts, coherence=[c for _ in rows for c in coherences], negative_prompt=negative,
                          generator=generator, **common).images  # fmt: skip
        row_names = list(rows)
    return labelled_grid(images, rows=row_names, columns=[f"c = {c:g}" for c in coherences],
                         title=f"{args.mode}, step {step}, guidance {args.validation_guidance_scale}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_coherence_aware")
    set_seed(args.seed)

    dataset, coherences, dataset_id, extra = load_training_data(args)
    rule = CoherenceTrainingMode(args.mode, coherences, args.condition_dropout, args.filter_threshold)
    kept = rule.kept_indices()
    training_rows = dataset if len(kept) == len(dataset) else Subset(dataset, kept)
    text = args.condition == "text"
    if text:
        components, model = build_text_model(args, coherences)
        if args.validation_prompts is None:
            args.validation_prompts = list(DEFAULT_VALIDATION_PROMPTS)
    else:
        components, model = build_class_model(args, coherences, dataset[0]["pixel_values"].shape[0],
                                              extra["num_classes"])  # fmt: skip
    noise_scheduler = components["scheduler"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    self_conditioned = text and args.denoiser == "text_rin" and model.denoiser.config.self_conditioning

    sampler = SeededEpochSampler(len(training_rows), seed=args.seed)
    dataloader = DataLoader(training_rows, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(trainable, args, accelerator, max_train_steps)
    model_config = {"mode": rule.summary(), "denoiser": dict((model.denoiser if text else model).config),
                    "lora_rank": args.lora_rank, "self_conditioning_rate": args.self_conditioning_rate}  # fmt: skip
    if text:
        model_config["conditioner"] = dict(model.conditioner.config)
    settings = resume_settings(args, accelerator, model_config=model_config,
                               dataset={"name": dataset_id or args.train_data_dir, "num_examples": len(dataset),
                                        "coherence_sum": round(float(coherences.sum()), 4)})  # fmt: skip
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if text:
        components["vae"].to(accelerator.device)
        components["text_encoder"].to(accelerator.device)
    use_ema = args.use_ema and args.lora_rank is None
    ema = create_ema(accelerator.unwrap_model(model), args.ema_decay, args.ema_power) if use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

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
            conditioning = rule.batch(batch["index"])
            with accelerator.accumulate(model):
                if text:
                    loss = text_loss(args, components, model, batch, conditioning, self_conditioned)
                else:
                    loss = class_loss(noise_scheduler, model, batch, conditioning, extra["num_classes"])
                loss = debug_nan_loss(loss, args, position.global_step)
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
                ema.step(accelerator.unwrap_model(model).parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            accelerator.log({"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                with ema_weights(ema, unwrapped):
                    grid = validation_grid(make_pipeline(args, components, unwrapped, extra), args, rule.guidance(),
                                           extra, position.global_step)  # fmt: skip
                path = os.path.join(args.output_dir, "validation", f"step_{position.global_step:06d}.png")
                log_grid(accelerator, grid, path, position.global_step)
                model.train()
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
        with ema_weights(ema, unwrapped):
            if args.lora_rank is not None:
                unwrapped.denoiser.fuse_lora()  # the saved pipeline holds the merged weights
                unwrapped.denoiser.unload_lora()
            pipeline = make_pipeline(args, components, unwrapped, extra)
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                **rule.summary(),
                "coherence": coherence_summary(coherences.tolist()),
                "trainable_parameters": sum(p.numel() for p in trainable),
                "train_wall_time_s": round(position.total_wall_time_s(), 1),
            }
            grid = validation_grid(pipeline, args, rule.guidance(), extra, position.global_step)
            check_finite_weights(unwrapped)
            save_output(args, argv, pipeline, grid, metrics, rule, dataset_id)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved the pipeline and its model card in {args.output_dir}")
    end_training(accelerator)
    return args.output_dir


def noisy_target(scheduler, clean: torch.Tensor) -> tuple:
    """`(noisy, timesteps, target)` for the epsilon (or v) objective at uniformly drawn timesteps."""
    noise = torch.randn_like(clean)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = (
        scheduler.get_velocity(clean, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction"
        else noise
    )
    return noisy, timesteps, target


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weight.to(per_sample.device)).mean()


def text_loss(args, components: dict, model, batch: dict, conditioning, self_conditioned: bool) -> torch.Tensor:
    vae, scheduler = components["vae"], components["scheduler"]
    captions = [
        "" if dropped else caption for caption, dropped in zip(batch["captions"], conditioning.dropped.tolist())
    ]
    with torch.no_grad():
        latents = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        hidden_states, mask = encode_text(
            components["tokenizer"], components["text_encoder"], captions, latents.device
        )
    noisy, timesteps, target = noisy_target(scheduler, latents)
    self_conditioning = None
    if self_conditioned:
        denoiser = model.module.denoiser if hasattr(model, "module") else model.denoiser
        shape = (latents.shape[0], denoiser.config.num_latents, denoiser.config.latent_dim)
        self_conditioning = torch.zeros(shape, device=latents.device, dtype=latents.dtype)
        if torch.rand(()) < args.self_conditioning_rate:
            # RIN's latent self-conditioning: a first pass without gradient gives the latents the trained pass starts from
            with torch.no_grad():
                self_conditioning = model(noisy, timesteps, hidden_states, mask, conditioning.coherence,
                                          self_conditioning).latents.detach()  # fmt: skip
    prediction = model(noisy, timesteps, hidden_states, mask, conditioning.coherence, self_conditioning).sample
    return weighted_mse(prediction, target, conditioning.loss_weight)


def class_loss(scheduler, unet, batch: dict, conditioning, num_classes: int) -> torch.Tensor:
    clean, labels = batch["pixel_values"], batch["class_labels"]
    labels = torch.where(conditioning.dropped.to(labels.device), torch.full_like(labels, num_classes), labels)
    noisy, timesteps, target = noisy_target(scheduler, clean)
    prediction = unet(noisy, timesteps, class_labels=labels, coherence=conditioning.coherence).sample
    return weighted_mse(prediction, target, conditioning.loss_weight)


def save_output(args, argv, pipeline, grid, metrics, rule, dataset_id) -> None:
    """The pipeline, its samples, metrics and model card, replacing the old output atomically."""
    guidance = rule.guidance()
    text = args.condition == "text"
    if text:
        negative_line = "" if guidance["negative"] == "same" else '    negative_prompt="",\n'
        usage = (
            "import torch\nfrom storydiff import CoherenceAwarePipeline\n\n"
            'pipe = CoherenceAwarePipeline.from_pretrained("path/to/this/folder")\n'
            "image = pipe(\n"
            f'    "{args.validation_prompts[0]}",\n'
            "    coherence=1.0,\n    negative_coherence=0.0,\n"
            f"{negative_line}"
            "    guidance_scale=3.0,\n    num_inference_steps=25,\n    generator=torch.manual_seed(0),\n"
            ").images[0]"
        )
    else:
        usage = (
            "import torch\nfrom storydiff import ClassConditionalPipeline\n\n"
            'pipe = ClassConditionalPipeline.from_pretrained("path/to/this/folder")\n'
            "images = pipe(\n    class_labels=[0, 1, 2],\n    coherence=1.0,\n    negative_coherence=0.0,\n"
            f'    negative_class="{guidance["negative"]}",\n'
            "    guidance_scale=3.0,\n    num_inference_steps=25,\n    generator=torch.manual_seed(0),\n"
            ").images"
        )
    sampling = (
        "coherence-aware CFG (the paper's pure form: the same condition at coherence 1 and 0)"
        if args.mode == "cad"
        else f"plain CFG against the {'empty prompt' if text else 'null class'} at coherence 0 (how it was trained)"
    )
    denoiser = {"unet": "a fine-tuned UNet2DConditionModel", "text_rin": "a TextRINModel trained from scratch"}
    what = (
        f"{denoiser[args.denoiser]}{' (LoRA rank ' + str(args.lora_rank) + ', merged)' if args.lora_rank else ''} "
        "with a CoherenceConditioner"
        if text
        else "a CoherenceAwareUNet2DModel (storydiff's own class-conditional CAD design: the label vector plus a "
        "coherence embedding added to the time embedding; the CAD authors never released theirs)"
    )

    def write(folder: str) -> None:
        pipeline.save_pretrained(folder, safe_serialization=True)
        save_grid(grid, os.path.join(folder, "samples.png"))
        with open(os.path.join(folder, "train_metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        with open(os.path.join(folder, "coherence_training.json"), "w") as file:
            json.dump({**rule.summary(), "sampling": guidance}, file, indent=2)
        flat = {k: v for k, v in metrics.items() if not isinstance(v, dict) and v is not None}
        flat.update({f"coherence_{k}": v for k, v in metrics["coherence"].items() if not isinstance(v, (list, dict))})
        write_model_card(
            folder,
            title=f"Coherence-aware diffusion ({args.mode} mode) on "
            f"{dataset_id or os.path.basename(os.path.normpath(args.train_data_dir))}",
            description=(
                f"{what}, trained by storydiff's `training/train_coherence_aware.py` in `{args.mode}` mode "
                f"(training/coherence_modes.py) on data whose coherence column came from "
                "`training/compute_coherence.py`. Sample it with "
                f"{sampling}; `coherence` is a knob in [0, 1] at test time. The coherence statistics of the training "
                "data are in the metrics below and in train_metrics.json."
            ),
            tags=["coherence-aware-diffusion", "text-to-image" if text else "class-conditional"],
            command=training_command(argv, script=os.path.abspath(__file__)),
            metrics=flat,
            datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
            images=["samples.png"],
            usage=usage,
        )

    save_folder_atomically(args.output_dir, write)


if __name__ == "__main__":
    main()
