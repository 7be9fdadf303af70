"""Command line flags every storydiff training script shares, and the accelerate setup that goes with them.

A new script::

    parser = argparse.ArgumentParser(description="Train X.")
    add_common_training_arguments(parser)               # output, optimisation, EMA, checkpoints, logging, hub
    parser.add_argument("--my_model_flag", ...)          # its own flags
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    accelerator = create_accelerator(args, project_name="train_x")

The matching utilities live next to this file: checkpointing.py (checkpoint/resume without losing or repeating
data), ema.py (EMA saved in checkpoints), model_card.py (README.md model card), hub.py (`--push_to_hub`).
Hidden `--debug_*` flags exist for tests (they are not shown by `--help`).
"""

import argparse
import os

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def add_common_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("output and logging")
    group.add_argument("--output_dir", type=str, required=True, help="Where the pipeline, checkpoints, logs go.")
    group.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to output_dir.")
    group.add_argument("--report_to", type=str, default="tensorboard", help="accelerate tracker, or 'none'.")
    group.add_argument("--seed", type=int, default=0, help="Seed for model init, data order, noise, dropout.")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    group.add_argument("--num_train_epochs", type=int, default=10)
    group.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer updates; overrides --num_train_epochs."
    )
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=5e-4)
    group.add_argument("--lr_scheduler", type=str, default="cosine", choices=LR_SCHEDULER_CHOICES)
    group.add_argument("--lr_warmup_steps", type=int, default=100)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--mixed_precision", type=str, default="no", choices=MIXED_PRECISION_CHOICES)
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--torch_num_threads", type=int, default=None, help="CPU threads for torch (1 is fastest on a busy CPU)."
    )

    group = parser.add_argument_group("EMA")
    group.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True, help="Keep an EMA.")
    group.add_argument("--ema_decay", type=float, default=0.999, help="Largest EMA decay.")
    group.add_argument("--ema_power", type=float, default=0.75, help="EMA warmup power (decay ramps up).")

    group = parser.add_argument_group("checkpoints")
    group.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable state every N steps.")
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many.")
    group.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (newest checkpoint in output_dir; starts fresh when there is none) or a checkpoint folder.",
    )

    group = parser.add_argument_group("hub")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline to the Hub.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Repo id; defaults to output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None)
    group.add_argument("--hub_private", action="store_true")

    # For tests: log the dataset indices of every batch (JSON lines), and slow steps down so that a test can kill
    # the process at a known point.
    parser.add_argument("--debug_example_log", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--debug_step_sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser


def check_common_training_arguments(args: argparse.Namespace) -> None:
    positive = ["train_batch_size", "num_train_epochs", "gradient_accumulation_steps", "checkpointing_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.torch_num_threads is not None and args.torch_num_threads < 1:
        raise ValueError(f"--torch_num_threads must be >= 1, got {args.torch_num_threads}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")


def create_accelerator(args: argparse.Namespace, project_name: str) -> Accelerator:
    """An `Accelerator` with the shared flags applied, its trackers started (TensorBoard by default)."""
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if report_to is not None:
            config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers(project_name, config=config)
    return accelerator
