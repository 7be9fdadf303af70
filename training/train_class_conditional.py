"""Train a class-conditional `UNet2DModel` with condition dropout, for classifier-free guidance.

    accelerate launch training/train_class_conditional.py --dataset digits --resolution 16 --output_dir out
    python training/train_class_conditional.py --train_data_dir my_images/ --resolution 32 --output_dir out
    python training/train_class_conditional.py --dataset_name user/dataset --image_column img --label_column y ...

Data: the built-in digits (scikit-learn's 8x8 digits upsampled, training split of storydiff/data/digits.py), an image
folder laid out as one sub-folder per class (`datasets` "imagefolder"), or a Hub dataset with an image and a label
column. The UNet has `num_classes + 1` class embeddings; with probability `--class_dropout_prob` a label is replaced
by the last one, the null class, so one model gives both predictions CFG needs. Trained with the DDPM epsilon loss;
the saved pipeline is a `ClassConditionalPipeline` with the EMA weights and a DDIM scheduler, plus a model card.
Checkpoints every `--checkpointing_steps` resume exactly (`--resume_from_checkpoint latest`).
"""

# ruff: noqa: E402 -- the flags are parsed before torch and diffusers are imported, so that --help answers at once
import argparse
import os
import sys
from typing import Optional, Sequence

from storydiff.training.arguments import (
    add_common_training_arguments,
    check_common_training_arguments,
    int_list,
    parse_args_or_exit,
    training_argument_parser,
)
from storydiff.training.datasets_loading import add_image_data_arguments, check_one_data_source

BUILT_IN_DATASETS = ("digits",)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = add_image_data_arguments(parser, BUILT_IN_DATASETS, "Image folder, one sub-folder per class.", 16,
                                    "Training image size (digits: 16 or 32).")  # fmt: skip
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--image_channels", type=int, default=3, choices=(1, 3), help="Image folders / Hub only.")

    model = parser.add_argument_group("model")
    model.add_argument("--block_out_channels", type=str, default="32,64,64", help="UNet channels per level.")
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--attention_levels", type=str, default="", help="Levels with attention, e.g. '2'.")
    model.add_argument("--norm_num_groups", type=int, default=8)
    model.add_argument("--num_train_timesteps", type=int, default=1000)
    model.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2")
    model.add_argument("--class_dropout_prob", type=float, default=0.1, help="P(label -> null class) for CFG.")

    validation = parser.add_argument_group("validation")
    validation.add_argument("--validation_steps", type=int, default=500, help="Sample a grid every N steps.")
    validation.add_argument("--num_validation_images_per_class", type=int, default=4)
    validation.add_argument("--validation_guidance_scale", type=float, default=3.0)
    validation.add_argument("--validation_inference_steps", type=int, default=25)

    add_common_training_arguments(parser)
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_one_data_source(args, BUILT_IN_DATASETS)
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    if args.validation_steps < 1 or args.num_validation_images_per_class < 1:
        raise ValueError("--validation_steps and --num_validation_images_per_class must be >= 1.")
    args.block_out_channels = int_list("--block_out_channels", args.block_out_channels, minimum=1)
    args.attention_levels = int_list("--attention_levels", args.attention_levels) if args.attention_levels else []
    for level in args.attention_levels:
        if not 0 <= level < len(args.block_out_channels):
            raise ValueError(f"--attention_levels has {level}; levels are 0..{len(args.block_out_channels) - 1}.")
    if args.resolution % 2 ** (len(args.block_out_channels) - 1):
        raise ValueError(
            f"--resolution {args.resolution} must be divisible by 2**{len(args.block_out_channels) - 1} for "
            f"{len(args.block_out_channels)} UNet levels."
        )
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline
from storydiff.data.digits import NUM_DIGIT_CLASSES, digits_arrays
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
from storydiff.training.datasets_loading import load_image_dataset_from_args
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


class IndexedImageDataset(Dataset):
    """Yields `{"pixel_values", "class_labels", "index"}`; `index` lets tests check the exact data order."""

    def __init__(self, images=None, labels=None, hf_dataset=None, image_column=None, label_ids=None, transform=None):
        self.images, self.labels = images, labels
        self.hf_dataset, self.image_column, self.label_ids, self.transform = (
            hf_dataset,
            image_column,
            label_ids,
            transform,
        )

    def __len__(self):
        return len(self.labels) if self.hf_dataset is None else len(self.hf_dataset)

    def __getitem__(self, index):
        if self.hf_dataset is None:
            return {"pixel_values": self.images[index], "class_labels": self.labels[index], "index": index}
        image = self.hf_dataset[index][self.image_column]
        return {
            "pixel_values": self.transform(image),
            "class_labels": torch.tensor(self.label_ids[index], dtype=torch.long),
            "index": index,
        }


def load_training_data(args):
    """Returns `(dataset, num_classes, id2label, dataset_id)`."""
    if args.dataset == "digits":
        if args.resolution not in (16, 32):
            raise ValueError(f"The digits dataset is made at --resolution 16 or 32, got {args.resolution}.")
        images, labels = digits_arrays("train", args.resolution)
        if args.max_train_samples is not None:
            images, labels = images[: args.max_train_samples], labels[: args.max_train_samples]
        id2label = {i: str(i) for i in range(NUM_DIGIT_CLASSES)}
        return IndexedImageDataset(images=images, labels=labels), NUM_DIGIT_CLASSES, id2label, "sklearn-digits"

    import datasets

    dataset = load_image_dataset_from_args(args, other_columns={"--label_column": args.label_column})
    dataset_id = args.dataset_name
    feature = dataset.features[args.label_column]
    raw_labels = dataset[args.label_column]
    if isinstance(feature, datasets.ClassLabel):
        id2label, label_ids = dict(enumerate(feature.names)), list(raw_labels)
    elif all(isinstance(label, str) for label in raw_labels):
        names = sorted(set(raw_labels))
        id2label = dict(enumerate(names))
        label_ids = [names.index(label) for label in raw_labels]
    elif all(isinstance(label, (int, np.integer)) and not isinstance(label, bool) for label in raw_labels):
        label_ids = [int(label) for label in raw_labels]
        if min(label_ids) < 0:
            raise ValueError(f"--label_column {args.label_column!r} has negative labels.")
        id2label = {i: str(i) for i in range(max(label_ids) + 1)}
    else:
        raise ValueError(f"--label_column {args.label_column!r} must hold class indices or class names.")

    mode = "L" if args.image_channels == 1 else "RGB"

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert(mode)
        scale = args.resolution / min(image.size)
        image = image.resize((max(args.resolution, round(image.width * scale)),
                              max(args.resolution, round(image.height * scale))), Image.BICUBIC)  # fmt: skip
        left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
        image = image.crop((left, top, left + args.resolution, top + args.resolution))
        array = np.asarray(image, dtype=np.float32).reshape(args.resolution, args.resolution, -1) / 127.5 - 1.0
        tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        if args.random_flip and torch.rand(()) < 0.5:
            tensor = tensor.flip(-1)
        return tensor

    indexed = IndexedImageDataset(
        hf_dataset=dataset, image_column=args.image_column, label_ids=label_ids, transform=transform
    )
    return indexed, len(id2label), id2label, dataset_id


# ----------------------------------------------------------------------------------------------------------- model


def build_unet(args, in_channels: int, num_classes: int) -> UNet2DModel:
    levels = len(args.block_out_channels)
    attention = set(args.attention_levels)
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if i in attention else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if levels - 1 - i in attention else "UpBlock2D" for i in range(levels)),
        norm_num_groups=args.norm_num_groups,
        num_class_embeds=num_classes + 1,  # the last embedding is the null class
    )


def make_pipeline(unet, noise_scheduler, num_classes, id2label) -> ClassConditionalPipeline:
    return ClassConditionalPipeline(
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        unet=unet,
        num_classes=num_classes,
        id2label=id2label,
    )


def validation_grid(pipeline, args, num_classes: int, id2label: dict, step: int) -> np.ndarray:
    """One row per class, `--num_validation_images_per_class` columns, sampled with CFG; uint8 HWC with the class
    names on the left and the sample numbers on top."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipeline(
        class_labels=list(range(num_classes)),
        num_images_per_class=args.num_validation_images_per_class,
        guidance_scale=args.validation_guidance_scale,
        num_inference_steps=args.validation_inference_steps,
        generator=generator,
        output_type="np",
    ).images
    return labelled_grid(
        images,
        rows=[f"class {id2label[c]}" for c in range(num_classes)],
        columns=[f"sample {i + 1}" for i in range(args.num_validation_images_per_class)],
        title=f"step {step}, guidance {args.validation_guidance_scale}, {args.validation_inference_steps} DDIM steps",
    )


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder holding the saved pipeline. Ctrl-C exits with status 130 and one line on
    how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_class_conditional")
    set_seed(args.seed)

    dataset, num_classes, id2label, dataset_id = load_training_data(args)
    in_channels = dataset[0]["pixel_values"].shape[0]
    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    # A DataLoader draws a seed for its workers from its generator each time it starts an epoch. Its own generator
    # keeps that draw off the global RNG, which a resumed run restores mid-epoch, after the draw.
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    unet = build_unet(args, in_channels, num_classes)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(unet.parameters(), args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset={"name": dataset_id or args.train_data_dir, "num_examples": len(dataset), "classes": id2label},
        model_config={**unet.config, "class_dropout_prob": args.class_dropout_prob},
    )
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    ema = create_ema(accelerator.unwrap_model(unet), args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(
        total=max_train_steps,
        initial=position.global_step,
        desc="Training steps",
        disable=not accelerator.is_local_main_process,
    )
    null_class = num_classes
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        unet.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                entry = {"step": position.global_step, "epoch": epoch, "indices": batch["index"].tolist()}
                example_log.write(json.dumps(entry) + "\n")
                example_log.flush()
            clean = batch["pixel_values"]
            labels = batch["class_labels"]
            drop = torch.rand(labels.shape, device=labels.device) < args.class_dropout_prob
            labels = torch.where(drop, torch.full_like(labels, null_class), labels)
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)

            with accelerator.accumulate(unet):
                prediction = unet(noisy, timesteps, class_labels=labels).sample
                loss = debug_nan_loss(F.mse_loss(prediction.float(), noise.float()), args, position.global_step)
                step_loss = check_finite_loss(accelerator, loss, position.global_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                model = accelerator.unwrap_model(unet)
                with ema_weights(ema, model):
                    pipeline = make_pipeline(model, noise_scheduler, num_classes, id2label)
                    grid = validation_grid(pipeline, args, num_classes, id2label, position.global_step)
                path = os.path.join(args.output_dir, "validation", f"step_{position.global_step:06d}.png")
                log_grid(accelerator, grid, path, position.global_step)
                unet.train()
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)
            if position.global_step >= max_train_steps:
                break
    progress.close()
    if example_log is not None:
        example_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(unet)
        with ema_weights(ema, model):
            pipeline = make_pipeline(model, noise_scheduler, num_classes, id2label)
            grid = validation_grid(pipeline, args, num_classes, id2label, position.global_step)
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                "train_wall_time_s": round(position.total_wall_time_s(), 1),
                "train_examples": len(dataset),
                "epochs": position.epoch + 1,
                "parameters": sum(p.numel() for p in model.parameters()),
            }

            def write_outputs(folder: str) -> None:
                # Everything lands in the output folder in one atomic swap: a kill or a full disk leaves the
                # previous pipeline or this one, never a mix; checkpoints and logs already there are kept.
                pipeline.save_pretrained(folder, safe_serialization=True)
                save_grid(grid, os.path.join(folder, "samples.png"))
                with open(os.path.join(folder, "train_metrics.json"), "w") as file:
                    json.dump(metrics, file, indent=2)
                write_card(folder, args, argv, metrics, num_classes, dataset_id, ema is not None)

            check_finite_weights(model)
            save_folder_atomically(args.output_dir, write_outputs)
        log_grid(accelerator, grid, os.path.join(args.output_dir, "samples.png"), position.global_step)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved the pipeline and its model card in {args.output_dir}")
    end_training(accelerator)
    return args.output_dir


def write_card(folder, args, argv, metrics, num_classes, dataset_id, with_ema: bool) -> None:
    write_model_card(
        folder,
        title=f"Class-conditional diffusion on {dataset_id or 'an image folder'} ({args.resolution}x{args.resolution})",
        description=(
            f"A class-conditional `UNet2DModel` ({num_classes} classes + a null class for classifier-free "
            f"guidance, condition dropout {args.class_dropout_prob}) trained with the DDPM epsilon loss by "
            "storydiff's `training/train_class_conditional.py`. Saved with "
            f"{'EMA' if with_ema else 'final'} weights and a DDIM scheduler as a storydiff "
            "`ClassConditionalPipeline`, which also takes dynamic guidance schedules."
        ),
        tags=["class-conditional", "classifier-free-guidance", "image-generation"],
        command=training_command(argv, script=os.path.abspath(__file__)),
        metrics={k: v for k, v in metrics.items() if v is not None},
        datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
        images=["samples.png"],
        usage=(
            "import torch\nfrom storydiff import ClassConditionalPipeline\n\n"
            'pipe = ClassConditionalPipeline.from_pretrained("path/to/this/folder")\n'
            f"images = pipe(class_labels=list(range({num_classes})), guidance_scale=3.0, "
            'guidance_schedule="linear",\n              num_inference_steps=25, '
            "generator=torch.manual_seed(0)).images"
        ),
    )


if __name__ == "__main__":
    main()
