"""Checkpoint, kill, resume: no batch lost or repeated.

How a training script uses this module (see training/train_class_conditional.py for the full pattern)::

    sampler = SeededEpochSampler(len(dataset), seed=args.seed)          # order depends on (seed, epoch) only
    dataloader = DataLoader(dataset, batch_size=..., sampler=sampler)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)

    settings = resume_settings(args, accelerator, dataset={"name": ..., "num_examples": len(dataset)},
                               model_config=model.config)               # what an exact resume needs unchanged
    position = TrainingPosition()                                        # global_step, epoch, batches_in_epoch
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)   # "latest", a path, or None
    if checkpoint is not None:                                           # models, optimizer, RNG, EMA, position
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    for epoch, batches in epoch_batches(dataloader, position):           # skips what the checkpoint has seen
        for batch in batches:
            position.batches_in_epoch += 1
            with accelerator.accumulate(model):
                ...
            if accelerator.sync_gradients:
                position.global_step += 1
                position.record_loss(loss_value)                         # the last 100, kept across resumes
                if position.global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
    position.total_wall_time_s()                                         # this session plus the resumed ones

Why it is exact: the data order of an epoch is a function of the seed and the epoch number alone; a checkpoint
records how many batches of the current epoch were consumed, and resuming skips exactly those with
`accelerator.skip_first_batches`. `accelerator.save_state` also stores the optimizer, the LR scheduler and every RNG
(noise, timesteps and condition dropout continue exactly as without the interruption). Checkpoints are written to
a temporary folder and renamed when complete, so a process killed mid-save never leaves a half checkpoint that
`--resume_from_checkpoint latest` would pick up; `--checkpoints_total_limit` deletes old checkpoints only after the
new one is complete.

Exact or refused: a checkpoint records the settings that decide the data order and the model's shape
(`resume_settings`: batch size, accumulation, seed, process count, data set, model config). Resuming with other
values raises `ResumeSettingsError` listing each difference, unless the caller allows it (a warning then). A
checkpoint whose RNG state file is missing or unreadable is refused too (accelerate would skip it silently and the
resumed run would draw different noise). Objects that are not prepared models (an EMA) add themselves with
`accelerator.register_save_state_pre_hook` / `register_load_state_pre_hook` (see training/ema.py).
"""

import json
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import torch
from accelerate.data_loader import skip_first_batches
from torch.utils.data import Sampler

CHECKPOINT_PREFIX = "checkpoint-"
POSITION_FILE = "training_position.json"
SETTINGS_FILE = "resume_settings.json"
RECENT_LOSSES_KEPT = 100
_CHECKPOINT_PATTERN = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class SeededEpochSampler(Sampler):
    """Shuffles `range(num_examples)` with a permutation that depends only on `(seed, epoch)`.

    accelerate calls `set_epoch` on it (also through `skip_first_batches`), so a resumed run sees the same order.
    Every process uses the same permutation; accelerate shards the batches across processes.
    """

    def __init__(self, num_examples: int, seed: int = 0, shuffle: bool = True):
        if num_examples < 1:
            raise ValueError(f"The dataset is empty (num_examples={num_examples}).")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.num_examples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_examples


@dataclass
class TrainingPosition:
    """Where training is: optimizer updates done, the current epoch, and batches of that epoch already used; also the
    wall time of earlier sessions and the last losses, so that a resumed run reports the whole run's figures."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    wall_time_s: float = 0.0  # wall time of the sessions before this one (up to the checkpoint resumed from)
    recent_losses: list = field(default_factory=list)  # the last RECENT_LOSSES_KEPT step losses
    session_started: float = field(default_factory=time.monotonic, repr=False, compare=False)

    def record_loss(self, loss: float) -> None:
        self.recent_losses = (self.recent_losses + [float(loss)])[-RECENT_LOSSES_KEPT:]

    def total_wall_time_s(self) -> float:
        """Wall time of the whole run: the earlier sessions' and this one's so far."""
        return self.wall_time_s + time.monotonic() - self.session_started

    def to_json(self) -> dict:
        return {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "wall_time_s": round(self.total_wall_time_s(), 3),
            "recent_losses": self.recent_losses,
        }


class ResumeSettingsError(ValueError):
    """A checkpoint was saved with other settings than the resuming run's, so the resume would not be exact."""


def resume_settings(args, accelerator, *, dataset: dict, model_config) -> dict:
    """The settings an exact resume needs unchanged: batch size, accumulation, seed, process count, the learning-rate
    schedule (rate, kind, warm-up), the data set
    (`dataset`: a name and `num_examples`, plus anything that identifies it) and the model config, which may nest
    several components' configs (keys starting with `_`, at any depth, are diffusers bookkeeping and left out:
    `_use_default_values` lists keys in set order, which differs between processes). JSON-normalised, so that a saved
    copy compares equal."""
    settings = {
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "num_processes": accelerator.num_processes,
        # the learning-rate schedule is built from these: another value would change every step after the resume.
        # The run length is left out on purpose: resuming with a larger --max_train_steps is how a run is extended
        # (the schedule then stretches from the resume point on, which the docs say).
        "learning_rate": getattr(args, "learning_rate", None),
        "lr_scheduler": getattr(args, "lr_scheduler", None),
        "lr_warmup_steps": getattr(args, "lr_warmup_steps", None),
        "dataset": dataset,
        "model_config": _without_bookkeeping(dict(model_config)),
    }
    return json.loads(json.dumps(settings, default=str))


def _without_bookkeeping(config):
    if isinstance(config, dict):
        return {k: _without_bookkeeping(v) for k, v in config.items() if not str(k).startswith("_")}
    return config


def _differences(saved: dict, current: dict, prefix: str = "") -> list:
    lines = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key, "(not recorded)"), current.get(key, "(not set)")
        if isinstance(old, dict) and isinstance(new, dict):
            lines += _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            lines.append(f"{prefix}{key}: checkpoint {old!r}, now {new!r}")
    return lines


def list_checkpoints(output_dir: str) -> list:
    """Complete checkpoints in `output_dir`, oldest first, as `(step, path)`."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_PATTERN.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isfile(os.path.join(path, POSITION_FILE)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoint(output_dir: str, resume_from_checkpoint: Optional[str]) -> Optional[str]:
    """Resolve `--resume_from_checkpoint`: None (start fresh), "latest" (newest complete checkpoint in
    `output_dir`, or None when there is none yet), or a checkpoint folder (a bare name is looked up in
    `output_dir`)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isfile(os.path.join(path, POSITION_FILE)):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint folder (no "
            f"{POSITION_FILE}). Use 'latest' or one of: "
            f"{', '.join(os.path.basename(p) for _, p in list_checkpoints(output_dir)) or '(none yet)'}."
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str,
    position: TrainingPosition,
    total_limit: Optional[int] = None,
    settings: Optional[dict] = None,
) -> str:
    """Save models, optimizer, LR scheduler, RNG states, registered hooks (EMA), `position` and `settings` (from
    `resume_settings`) as `output_dir/checkpoint-<global_step>`. Once it is complete, delete the oldest checkpoints
    beyond `total_limit`. Returns the folder."""
    from storydiff.training.run_guards import check_finite_weights

    check_finite_weights(*accelerator._models, what="a model being checkpointed")
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{position.global_step}")
    partial_path = final_path + ".partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial_path)
    if accelerator.is_main_process:
        if settings is not None:
            with open(os.path.join(partial_path, SETTINGS_FILE), "w") as file:
                json.dump(settings, file, indent=1)
        # The position file marks a complete checkpoint (list_checkpoints), so it is written last.
        with open(os.path.join(partial_path, POSITION_FILE), "w") as file:
            json.dump(position.to_json(), file)
        shutil.rmtree(final_path, ignore_errors=True)
        os.replace(partial_path, final_path)
        if total_limit is not None:  # only now: a kill before this line leaves the old checkpoints intact
            existing = list_checkpoints(output_dir)
            for _, old in existing[: max(0, len(existing) - total_limit)]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final_path


def load_checkpoint(
    accelerator, path: str, settings: Optional[dict] = None, allow_changed_settings: bool = False
) -> TrainingPosition:
    """Restore everything `save_checkpoint` saved and return the training position. With `settings`, compare them
    with the checkpoint's first: a difference raises `ResumeSettingsError` (a warning with
    `allow_changed_settings`). A missing or unreadable RNG state raises `ValueError`."""
    if settings is not None:
        check_resume_settings(path, settings, allow_changed_settings)
    check_rng_state(path, accelerator.process_index)
    accelerator.load_state(path)
    with open(os.path.join(path, POSITION_FILE)) as file:
        return TrainingPosition(**json.load(file))


def check_resume_settings(path: str, settings: dict, allow_changed_settings: bool = False) -> None:
    settings_path = os.path.join(path, SETTINGS_FILE)
    saved = {}
    if os.path.isfile(settings_path):
        with open(settings_path) as file:
            saved = json.load(file)
    differences = _differences(saved, settings)
    if not differences:
        return
    listing = "\n  ".join(differences)
    if allow_changed_settings:
        warnings.warn(
            f"Resuming from {path} with changed settings (--allow_resume_with_changed_settings); the run is not the "
            f"one the checkpoint started:\n  {listing}",
            stacklevel=2,
        )
        return
    raise ResumeSettingsError(
        f"Cannot resume exactly from {path}: these settings differ from the checkpoint's:\n  {listing}\n"
        "Run with the checkpoint's values, start a new run in another --output_dir, or pass "
        "--allow_resume_with_changed_settings to continue anyway."
    )


def check_rng_state(path: str, process_index: int) -> None:
    """accelerate's `load_state` skips a missing or broken RNG state with an info log; refuse it instead."""
    from accelerate.utils import RNG_STATE_NAME, load

    rng_path = os.path.join(path, f"{RNG_STATE_NAME}_{process_index}.pkl")
    if not os.path.isfile(rng_path):
        raise ValueError(
            f"The checkpoint {path} has no {os.path.basename(rng_path)}: without it the resumed run would draw "
            "other random numbers than the interrupted one. Resume from another checkpoint."
        )
    try:
        load(rng_path)
    except Exception as error:
        raise ValueError(
            f"The RNG state {rng_path} cannot be read ({error}); resume from another checkpoint."
        ) from None


def epoch_batches(dataloader, position: TrainingPosition, num_epochs: int) -> Iterator[Tuple[int, object]]:
    """Yield `(epoch, batches)` from `position.epoch` to `num_epochs - 1`, skipping the batches of the current
    epoch that the position says were already used. Updates `position.epoch` and resets
    `position.batches_in_epoch` at each new epoch; the caller increments `batches_in_epoch` per batch."""
    start_epoch, skip = position.epoch, position.batches_in_epoch
    if skip >= len(dataloader):  # the checkpoint was taken at the very end of an epoch
        start_epoch, skip = start_epoch + 1, 0
    for epoch in range(start_epoch, num_epochs):
        position.epoch = epoch
        dataloader.set_epoch(epoch)
        if epoch == start_epoch and skip > 0:
            position.batches_in_epoch = skip
            batches = skip_first_batches(dataloader, skip)
            batches.set_epoch(epoch)
        else:
            position.batches_in_epoch = 0
            batches = dataloader
        yield epoch, batches
