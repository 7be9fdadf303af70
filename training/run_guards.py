"""Guards around a training run: a writable output before the first step, a clean Ctrl-C, no NaN weights.

A script uses them like this (none imports torch at import time)::

    check_output_dir_writable(args.output_dir)       # create_accelerator calls it; other scripts call it directly
    with resume_hint_on_interrupt(args.output_dir):  # Ctrl-C: one line on how to resume, exit status 130
        ...
        for batch in batches:
            loss = ...
            loss = debug_nan_loss(loss, args, position.global_step)   # hidden --debug_nan_loss_at_step (tests)
            loss_value = check_finite_loss(accelerator, loss, position.global_step)   # before backward
        check_finite_weights(model)                   # before the final save (save_checkpoint checks its own)
"""

import contextlib
import math
import os
import sys
import tempfile

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before the weights are updated with it."""


def check_output_dir_writable(output_dir: str, flag: str = "--output_dir") -> None:
    """Create `output_dir` if needed and write a probe file in it, so that an unusable output is reported before
    training instead of after the last step."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ValueError(
            f"{flag} {output_dir!r} cannot be written ({error.strerror or error}): choose a folder you can write to."
        ) from None


def check_finite_loss(accelerator, loss, step: int) -> float:
    """The mean of this micro-batch's `loss` over all processes; raises `NonFiniteLossError` when it is NaN or
    infinite on any of them. Called on every micro-batch before `accelerator.backward`, so that the weights, the
    EMA and the checkpoints never see a bad update; every process gets the same answer, so all stop together."""
    losses = accelerator.gather(loss.detach().float().reshape(1))
    value = losses.mean().item()
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"The training loss is {value} at optimizer update {step + 1}; stopping before it reaches the weights "
            "(nothing is saved from this run past its last checkpoint). Lower --learning_rate, raise "
            "--lr_warmup_steps or use --mixed_precision no, then resume from the last checkpoint."
        )
    return value


def check_finite_weights(*modules, what: str = "the model") -> None:
    """Raise `NonFiniteLossError` if any parameter or buffer of `modules` holds NaN or infinity. Called before every
    checkpoint and final save: a finite loss can still come with an update that overflows the weights."""
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(tensor.detach().isfinite().all()):
                raise NonFiniteLossError(
                    f"{what}'s {name} holds NaN or infinite values; not saving them. Lower --learning_rate or raise "
                    "--lr_warmup_steps, then resume from the last checkpoint."
                )


def debug_nan_loss(loss, args, step: int):
    """The loss, or NaN at optimizer update `args.debug_nan_loss_at_step` (a hidden flag for tests)."""
    if getattr(args, "debug_nan_loss_at_step", None) == step + 1:
        return loss * float("nan")
    return loss


def is_main_process_by_environment() -> bool:
    """Rank 0 as torchrun / accelerate launch set it (True for a plain `python script.py`)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def resume_hint_on_interrupt(output_dir: str, checkpoint_dir: str = None):
    """On Ctrl-C (KeyboardInterrupt) print one line that says how to resume, then exit with status 130 instead of
    printing a traceback. `checkpoint_dir` is where the checkpoints are (default `output_dir`)."""
    try:
        yield
    except KeyboardInterrupt:
        if is_main_process_by_environment():
            from storydiff.training.checkpointing import list_checkpoints

            checkpoints = list_checkpoints(checkpoint_dir or output_dir)
            if checkpoints:
                step, path = checkpoints[-1]
                where = f"continues from {path} (step {step})"
            else:
                where = "finds no checkpoint yet and starts from step 0"
            print(
                f"\nInterrupted. Run the same command with --resume_from_checkpoint latest to continue: it {where}.",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
