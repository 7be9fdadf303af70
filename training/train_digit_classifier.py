"""Train the evaluation classifier for generated digits (`storydiff.evaluation.DigitClassifier`).

The classifier learns the digits *train* split at the diffusion checkpoint's resolution; its test-split accuracy
goes into the model card, and its penultimate features define the digit Frechet distance. It takes well under a
minute on a CPU:

    python training/train_digit_classifier.py --resolution 16 --output_dir storydiff/checkpoints/digit-classifier

Data order is a per-epoch permutation seeded by `seed + epoch`, and a checkpoint is written after every epoch (the
shared training/checkpointing.py, in `--work_dir/checkpoints`), so `--resume_from_checkpoint latest` continues
after a kill without losing or repeating data.
"""

# ruff: noqa: E402 -- the flags are parsed before torch is imported, so that --help answers at once
import argparse
import math
import os
import sys

from storydiff.training.arguments import end_training, parse_args_or_exit, training_argument_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__)
    parser.add_argument("--output_dir", default="storydiff/checkpoints/digit-classifier", help="final model folder")
    parser.add_argument("--work_dir", default="runs/digit-classifier", help="checkpoints and tensorboard logs")
    parser.add_argument("--resolution", type=int, default=16, help="the diffusion checkpoint's resolution")
    parser.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 32])
    parser.add_argument("--num_epochs", type=int, default=30)
    # Named like the shared flag inside, so that the shared resume checks read it.
    parser.add_argument("--batch_size", dest="train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--no_augment", action="store_true", help="turn off random shifts, scales and rotations")
    parser.add_argument("--max_train_samples", type=int, default=None, help="use only the first N train digits")
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    parser.add_argument(
        "--allow_resume_with_changed_settings",
        action="store_true",
        help="resume even if batch size, seed, data or model differ from the checkpoint's (with a warning)",
    )
    parser.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_num_threads", type=int, default=None, help="CPU threads (1 is best on a busy CPU)")
    parser.add_argument("--debug_nan_loss_at_step", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    parser.set_defaults(gradient_accumulation_steps=1)
    args = parser.parse_args(argv)
    for name in ("num_epochs", "train_batch_size", "checkpoints_total_limit"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('train_', '')} must be >= 1, got {getattr(args, name)}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        parser.error(f"--max_train_samples must be >= 1 (or left out for all digits), got {args.max_train_samples}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    if args.torch_num_threads is not None and args.torch_num_threads < 1:
        parser.error(f"--torch_num_threads must be >= 1, got {args.torch_num_threads}")
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.data.digits import NUM_DIGIT_CLASSES, digits_arrays
from storydiff.evaluation.digits import DigitClassifier
from storydiff.training.checkpointing import (
    TrainingPosition,
    find_checkpoint,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
)
from storydiff.training.model_card import training_command
from storydiff.training.run_guards import (
    check_finite_loss,
    check_finite_weights,
    check_output_dir_writable,
    debug_nan_loss,
    resume_hint_on_interrupt,
)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts (up to 7.5 % of the side), scales (0.9-1.1) and rotations (+-10 degrees).

    Generated digits are rarely centred exactly like the scanned ones; a classifier that only knows perfectly
    centred digits would score placement instead of class.
    """
    batch = images.shape[0]
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(10)
    scale = 0.9 + 0.2 * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.15  # affine_grid units: 2 = the whole side
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sample in [0, 1] so that the zero padding of grid_sample is the digits' blank background.
    moved = F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return moved * 2 - 1


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(batch).argmax(1) for batch in images.split(512)])
    model.train()
    return (predictions == labels).float().mean().item()


def write_model_card(output_dir: Path, args, metrics: dict, command: str, num_parameters: int) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    card_data = ModelCardData(
        library_name="diffusers", license="apache-2.0", tags=["storydiff", "image-classification", "evaluation"]
    )
    content = f"""---
{card_data.to_yaml()}
---

# Digit classifier for evaluating generated digits

A `storydiff.evaluation.DigitClassifier` (a small CNN, block widths {"-".join(map(str, args.block_out_channels))},
{num_parameters:,} parameters) trained on the train split of scikit-learn's digits upsampled to
{args.resolution}x{args.resolution} (`storydiff.data.digits`, stratified 80/20 split, seed 0). storydiff uses it
to score class-conditional samples: class accuracy, and a Frechet distance between its
{args.block_out_channels[-1]}-d penultimate features of generated digits and of the held-out test split.

| metric | value |
|---|---|
| train-split accuracy | {metrics["train_accuracy"]:.4f} |
| test-split accuracy ({metrics["num_test"]} images, never trained on) | {metrics["test_accuracy"]:.4f} |
| epochs | {args.num_epochs} |
| training wall time, all sessions (s) | {metrics["train_wall_time_s"]:.1f} |

Trained with:

```bash
{command}
```

```py
from storydiff.evaluation import class_accuracy, digit_frechet_distance, load_digit_classifier

classifier = load_digit_classifier()  # this folder
```
"""
    ModelCard(content).save(Path(output_dir) / "README.md")


def main(argv=None) -> dict:
    """Train; returns the metrics. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = [str(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir, checkpoint_dir=os.path.join(args.work_dir, "checkpoints")):
        return train(args, argv)


def train(args: argparse.Namespace, argv) -> dict:
    # Both folders are checked before the first step, not found unwritable after the last one.
    check_output_dir_writable(args.output_dir)
    check_output_dir_writable(args.work_dir, flag="--work_dir")
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    work_dir, output_dir = Path(args.work_dir), Path(args.output_dir)
    checkpoint_dir = str(work_dir / "checkpoints")
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
    )
    set_seed(args.seed)
    train_images, train_labels = digits_arrays("train", args.resolution)
    test_images, test_labels = digits_arrays("test", args.resolution)
    if args.max_train_samples is not None:
        train_images, train_labels = train_images[: args.max_train_samples], train_labels[: args.max_train_samples]

    model = DigitClassifier(
        sample_size=args.resolution, block_out_channels=tuple(args.block_out_channels), num_classes=NUM_DIGIT_CLASSES
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_labels) / args.train_batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.num_epochs * steps_per_epoch
    )
    settings = resume_settings(
        args,
        accelerator,
        dataset={"name": "sklearn-digits", "resolution": args.resolution, "num_examples": len(train_labels)},
        model_config={**model.config, "augment": not args.no_augment, "num_epochs": args.num_epochs},
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("digit-classifier", config={k: str(v) for k, v in vars(args).items()})

    position = TrainingPosition()
    checkpoint = find_checkpoint(checkpoint_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
        accelerator.print(f"Resumed from {checkpoint} after epoch {position.epoch}.")
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from; starting from scratch.")

    progress = tqdm(
        range(position.epoch * steps_per_epoch, args.num_epochs * steps_per_epoch),
        desc="digit classifier",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(position.epoch, args.num_epochs):
        # The epoch alone fixes the data order and augmentation, so a resumed run sees exactly what it would have.
        epoch_generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        order = torch.randperm(len(train_labels), generator=epoch_generator)
        for batch_indices in order.split(args.train_batch_size):
            images, labels = train_images[batch_indices], train_labels[batch_indices]
            if not args.no_augment:
                images = augment(images, epoch_generator)
            loss = F.cross_entropy(model(images.to(accelerator.device)), labels.to(accelerator.device))
            loss = debug_nan_loss(loss, args, position.global_step)
            step_loss = check_finite_loss(accelerator, loss, position.global_step)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.global_step += 1
            position.record_loss(step_loss)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}")
            accelerator.log({"train/loss": step_loss}, step=position.global_step - 1)

        test_accuracy = accuracy(accelerator.unwrap_model(model), test_images.to(accelerator.device), test_labels)
        accelerator.log({"test/accuracy": test_accuracy}, step=(epoch + 1) * steps_per_epoch)
        position.epoch = epoch + 1
        save_checkpoint(accelerator, checkpoint_dir, position, args.checkpoints_total_limit, settings)
    progress.close()

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model).eval()
    metrics = {
        "train_accuracy": accuracy(model, train_images.to(accelerator.device), train_labels),
        "test_accuracy": accuracy(model, test_images.to(accelerator.device), test_labels),
        "num_test": len(test_labels),
        "train_wall_time_s": round(position.total_wall_time_s(), 1),
    }
    if accelerator.is_main_process:
        command = training_command(argv, script=os.path.abspath(__file__))
        num_parameters = sum(p.numel() for p in model.parameters())

        def write_outputs(folder: str) -> None:  # one atomic swap: the old classifier or the new one, never a mix
            model.save_pretrained(folder)  # safetensors
            write_model_card(folder, args, metrics, command, num_parameters)

        check_finite_weights(model)
        save_folder_atomically(output_dir, write_outputs)
        accelerator.print(
            f"test accuracy {metrics['test_accuracy']:.4f} (train {metrics['train_accuracy']:.4f}); saved to {output_dir}"
        )
    end_training(accelerator)
    return metrics


if __name__ == "__main__":
    main()
