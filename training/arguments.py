"""Command line flags every storydiff training script shares, and the accelerate setup that goes with them.

A new script::

    parser = training_argument_parser("Train X.")       # --help shows every default
    add_common_training_arguments(parser)               # output, optimisation, EMA, checkpoints, logging, hub
    parser.add_argument("--my_model_flag", ...)          # its own flags
    args = parser.parse_args(argv)
    check_common_training_arguments(args)                # lr finite and > 0, counts >= 1, ...
    check_path_or_hub_id("--text_encoder", args.text_encoder)   # a folder that exists, or a Hub id
    accelerator = create_accelerator(args, project_name="train_x")   # first checks that output_dir is writable

This module imports neither torch nor accelerate at import time: a script parses its flags first, so that `--help`
and a bad flag answer at once instead of after seconds of imports.

The matching utilities live next to this file: checkpointing.py (checkpoint/resume without losing or repeating
data, refused when the settings changed), datasets_loading.py (image datasets, offline for local data),
run_guards.py (Ctrl-C, non-finite loss, writable output), ema.py (EMA saved in checkpoints), model_card.py
(README.md model card), sample_grids.py (labelled sample grids), hub.py (`--push_to_hub`).
Hidden `--debug_*` flags exist for tests (they are not shown by `--help`).
"""

import argparse
import copy
import math
import os
import re
import sys

MIXED_PRECISION_CHOICES = ("no", "fp16", "bf16")
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")


def training_argument_parser(description: str) -> argparse.ArgumentParser:
    """An `ArgumentParser` whose `--help` shows each flag's default and keeps the description's line breaks."""
    return argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _format_action(self, action):
        # argparse lists the default only for flags that have a help text; every flag should show it.
        if action.help is None and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


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
    group.add_argument(
        "--allow_resume_with_changed_settings",
        action="store_true",
        help="Resume even if batch size, accumulation, seed, data, model or process count differ from the "
        "checkpoint's (a warning lists them; the resumed run is then not the one the checkpoint started).",
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
    # For tests: make the loss of this optimizer update NaN, to exercise the non-finite loss guard.
    parser.add_argument("--debug_nan_loss_at_step", type=int, default=None, help=argparse.SUPPRESS)
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
    # float32's largest value: a larger rate is finite in Python but overflows in the optimizer's float32 tensors
    if not (math.isfinite(args.learning_rate) and 0 < args.learning_rate <= 3.4e38):
        raise ValueError(f"--learning_rate must be a finite number > 0 (and fit a float32), got {args.learning_rate}.")
    if getattr(args, "max_train_samples", None) is not None and args.max_train_samples < 1:
        raise ValueError(
            f"--max_train_samples must be >= 1 (or left out for all examples), got {args.max_train_samples}."
        )
    if args.torch_num_threads is not None and args.torch_num_threads < 1:
        raise ValueError(f"--torch_num_threads must be >= 1, got {args.torch_num_threads}.")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")


# A Hub repo id: "name" or "namespace/name" of letters, digits, "-", "_", "." (huggingface_hub's rule).
_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def parse_args_or_exit(parse_args) -> argparse.Namespace:
    """`parse_args()` for a script's command line: a bad value ends the run with one line on stderr and exit status
    2, as argparse does for a bad flag, instead of a traceback (`main(argv)` still raises ValueError, for tests)."""
    try:
        return parse_args()
    except ValueError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def int_list(flag: str, text: str, minimum: int = None) -> list:
    """Parse a comma-separated list of integers given to `flag` ("32,64,64"), with errors that name the flag."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}.") from None
    if not values:
        raise ValueError(f"{flag} is empty.")
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{flag} must list integers >= {minimum}, got {text!r}.")
    return values


def check_path_or_hub_id(flag: str, value) -> None:
    """For flags that take "a local folder or a Hub id": a value that looks like a path (it starts with `/`, `.`,
    `~`, or has more than one `/`) must exist; anything else must be a valid Hub id. None passes (the default)."""
    if value is None:
        return
    looks_like_path = value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value
    if os.path.exists(os.path.expanduser(value)):
        return
    if looks_like_path or not _HUB_ID.match(value):
        raise ValueError(
            f"{flag} {value!r} does not exist: pass an existing local folder or a Hub id such as 'org/model'."
        )


def create_accelerator(args: argparse.Namespace, project_name: str):
    """An `Accelerator` with the shared flags applied, its trackers started (TensorBoard by default). Checks first
    that `--output_dir` can be written (run_guards.check_output_dir_writable), so that no step is trained for an
    output that cannot be saved."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from storydiff.training.run_guards import check_output_dir_writable

    check_output_dir_writable(args.output_dir)
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    report_to = None if args.report_to in (None, "none") else args.report_to
    if report_to == "tensorboard":  # accelerate would drop the logs silently without it
        from storydiff.optional_imports import require

        require("tensorboard", purpose="--report_to tensorboard (the default)", alternative="--report_to none")
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


def end_training(accelerator) -> None:
    """Close the trackers, then take the processes through one last barrier and destroy the process group
    explicitly: left to the interpreter's teardown, a gloo group can hang the last process to exit once its peers
    are gone (seen with 2 CPU processes), and the run would never end."""
    import torch.distributed as dist

    accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        accelerator.wait_for_everyone()
        dist.destroy_process_group()
