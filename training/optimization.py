"""Run length, optimiser and learning-rate schedule from the shared flags of training/arguments.py.

A script calls, after building its dataloader and model:

    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(model.parameters(), args, accelerator, max_train_steps)
"""

import math

import torch
from diffusers.optimization import get_scheduler


def training_length(args, num_batches: int, accelerator) -> tuple[int, int, int]:
    """(optimizer updates per epoch, total updates, epochs) for a dataloader of `num_batches` batches."""
    # accelerate's prepared dataloader yields len(dataloader) // num_processes batches per process; an epoch ends
    # with a (possibly partial) accumulation, so it has ceil(batches / accumulation) optimizer updates.
    updates_per_epoch = math.ceil(
        math.ceil(num_batches / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    return updates_per_epoch, max_train_steps, math.ceil(max_train_steps / updates_per_epoch)


def create_optimizer_and_lr_scheduler(parameters, args, accelerator, max_train_steps: int):
    """AdamW with the shared flags, and diffusers' learning-rate schedule `--lr_scheduler` with warm-up."""
    optimizer = torch.optim.AdamW(
        parameters,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
    )
    # The prepared scheduler steps once per process for every optimizer update, hence the num_processes factors.
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, lr_scheduler
