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

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline
from storydiff.training.arguments import (
    add_common_training_arguments,
    check_common_training_arguments,
    create_accelerator,
)
from storydiff.training.checkpointing import (
    SeededEpochSampler,
    TrainingPosition,
    epoch_batches,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from storydiff.data.digits import NUM_DIGIT_CLASSES, digits_arrays
from storydiff.training.ema import create_ema, ema_weights, register_ema_checkpointing
from storydiff.training.hub import push_folder_to_hub
from storydiff.training.model_card import training_command, write_model_card
from storydiff.training.optimization import create_optimizer_and_lr_scheduler, training_length

BUILT_IN_DATASETS = ("digits",)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", type=str, default=None, choices=BUILT_IN_DATASETS, help="Built-in dataset.")
    data.add_argument("--train_data_dir", type=str, default=None, help="Image folder, one sub-folder per class.")
    data.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id (or local dataset script).")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--cache_dir", type=str, default=None)
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--resolution", type=int, default=16, help="Training image size (digits: 16 or 32).")
    data.add_argument("--image_channels", type=int, default=3, choices=(1, 3), help="Image folders / Hub only.")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips (not for digits).")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N examples.")

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
    sources = [args.dataset is not None, args.train_data_dir is not None, args.dataset_name is not None]
    if sum(sources) != 1:
        raise ValueError("Give exactly one data source: --dataset digits, --train_data_dir or --dataset_name.")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        raise ValueError(f"--class_dropout_prob must be in [0, 1), got {args.class_dropout_prob}.")
    if args.validation_steps < 1 or args.num_validation_images_per_class < 1:
        raise ValueError("--validation_steps and --num_validation_images_per_class must be >= 1.")
    args.block_out_channels = _int_list("--block_out_channels", args.block_out_channels)
    args.attention_levels = _int_list("--attention_levels", args.attention_levels) if args.attention_levels else []
    for level in args.attention_levels:
        if not 0 <= level < len(args.block_out_channels):
            raise ValueError(f"--attention_levels has {level}; levels are 0..{len(args.block_out_channels) - 1}.")
    if args.resolution % 2 ** (len(args.block_out_channels) - 1):
        raise ValueError(
            f"--resolution {args.resolution} must be divisible by 2**{len(args.block_out_channels) - 1} for "
            f"{len(args.block_out_channels)} UNet levels."
        )
    return args


def _int_list(flag: str, text: str) -> list:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}.") from None
    if not values:
        raise ValueError(f"{flag} is empty.")
    return values


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

    if args.train_data_dir is not None:
        if not os.path.isdir(args.train_data_dir):
            raise ValueError(f"--train_data_dir {args.train_data_dir!r} is not a folder.")
        dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split="train")
        dataset_id = None
    else:
        dataset = datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train"
        )
        dataset_id = args.dataset_name
    for flag, column in (("--image_column", args.image_column), ("--label_column", args.label_column)):
        if column not in dataset.column_names:
            raise ValueError(
                f"{flag} {column!r} is not a column of the dataset. Available columns: "
                f"{', '.join(dataset.column_names)}."
            )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))

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


def validation_grid(pipeline, args, num_classes: int, step: int) -> np.ndarray:
    """One row per class, `--num_validation_images_per_class` columns, sampled with CFG; returns uint8 HWC."""
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
    columns = args.num_validation_images_per_class
    rows = [np.concatenate(list(images[r * columns : (r + 1) * columns]), axis=1) for r in range(num_classes)]
    grid = (np.concatenate(rows, axis=0) * 255).round().astype(np.uint8)
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    zoom = max(1, 64 // args.resolution)  # small digits are unreadable at 1:1
    return grid.repeat(zoom, axis=0).repeat(zoom, axis=1)


def log_validation(accelerator, pipeline, args, num_classes: int, step: int) -> str:
    grid = validation_grid(pipeline, args, num_classes, step)
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.png")
    Image.fromarray(grid).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid, step, dataformats="HWC")
    return path


# ----------------------------------------------------------------------------------------------------------- train


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder holding the saved pipeline."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.time()
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
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    ema = create_ema(accelerator.unwrap_model(unet), args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(
        total=max_train_steps,
        initial=position.global_step,
        desc="Training steps",
        disable=not accelerator.is_local_main_process,
    )
    recent_losses = []
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
                loss = F.mse_loss(prediction.float(), noise.float())
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
            step_loss = accelerator.gather(loss.detach()).mean().item()
            recent_losses = (recent_losses + [step_loss])[-100:]
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            if ema is not None:
                logs["ema_decay"] = ema.cur_decay_value
            accelerator.log(logs, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit)
            if position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                model = accelerator.unwrap_model(unet)
                with ema_weights(ema, model):
                    log_validation(accelerator, make_pipeline(model, noise_scheduler, num_classes, id2label),
                                   args, num_classes, position.global_step)  # fmt: skip
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
            pipeline.save_pretrained(args.output_dir, safe_serialization=True)
            grid_path = log_validation(accelerator, pipeline, args, num_classes, position.global_step)
        sample_name = "samples.png"
        os.replace(grid_path, os.path.join(args.output_dir, sample_name))
        metrics = {
            "train_steps": position.global_step,
            "final_train_loss_mean_last_100_steps": float(np.mean(recent_losses)) if recent_losses else None,
            "train_wall_time_s": round(time.time() - started, 1),
            "train_examples": len(dataset),
            "epochs": position.epoch + 1,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        with open(os.path.join(args.output_dir, "train_metrics.json"), "w") as file:
            json.dump(metrics, file, indent=2)
        write_model_card(
            args.output_dir,
            title=f"Class-conditional diffusion on {dataset_id or 'an image folder'} ({args.resolution}x{args.resolution})",
            description=(
                f"A class-conditional `UNet2DModel` ({num_classes} classes + a null class for classifier-free "
                f"guidance, condition dropout {args.class_dropout_prob}) trained with the DDPM epsilon loss by "
                "storydiff's `training/train_class_conditional.py`. Saved with "
                f"{'EMA' if ema is not None else 'final'} weights and a DDIM scheduler as a storydiff "
                "`ClassConditionalPipeline`, which also takes dynamic guidance schedules."
            ),
            tags=["class-conditional", "classifier-free-guidance", "image-generation"],
            command=training_command(argv, script=os.path.abspath(__file__)),
            metrics={k: v for k, v in metrics.items() if v is not None},
            datasets=[dataset_id] if dataset_id and "/" in dataset_id else None,
            images=[sample_name],
            usage=(
                "import torch\nfrom storydiff import ClassConditionalPipeline\n\n"
                'pipe = ClassConditionalPipeline.from_pretrained("path/to/this/folder")\n'
                f"images = pipe(class_labels=list(range({num_classes})), guidance_scale=3.0, "
                'guidance_schedule="linear",\n              num_inference_steps=25, '
                "generator=torch.manual_seed(0)).images"
            ),
        )
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            url = push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved the pipeline and its model card in {args.output_dir}")
    accelerator.end_training()
    return args.output_dir


if __name__ == "__main__":
    main()
