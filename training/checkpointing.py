"""Checkpoint, kill, resume: no batch lost or repeated.

How a training script uses this module (see training/train_class_conditional.py for the full pattern)::

    sampler = SeededEpochSampler(len(dataset), seed=args.seed)          # order depends on (seed, epoch) only
    dataloader = DataLoader(dataset, batch_size=..., sampler=sampler)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)

    position = TrainingPosition()                                        # global_step, epoch, batches_in_epoch
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)   # "latest", a path, or None
    if checkpoint is not None:
        position = load_checkpoint(accelerator, checkpoint)              # models, optimizer, RNG, EMA, position
    for epoch, batches in epoch_batches(dataloader, position):           # skips what the checkpoint has seen
        for batch in batches:
            position.batches_in_epoch += 1
            with accelerator.accumulate(model):
                ...
            if accelerator.sync_gradients:
                position.global_step += 1
                if position.global_step % args.checkpointing_steps == 0:
                    save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit)

Why it is exact: the data order of an epoch is a function of the seed and the epoch number alone; a checkpoint
records how many batches of the current epoch were consumed, and resuming skips exactly those with
`accelerator.skip_first_batches`. `accelerator.save_state` also stores the optimizer, the LR scheduler and every RNG
(noise, timesteps and condition dropout continue exactly as without the interruption). Checkpoints are written to
a temporary folder and renamed when complete, so a process killed mid-save never leaves a half checkpoint that
`--resume_from_checkpoint latest` would pick up. Objects that are not prepared models (an EMA) add themselves with
`accelerator.register_save_state_pre_hook` / `register_load_state_pre_hook` (see training/ema.py).
"""

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Tuple

import torch
from accelerate.data_loader import skip_first_batches
from torch.utils.data import Sampler

CHECKPOINT_PREFIX = "checkpoint-"
POSITION_FILE = "training_position.json"
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
    """Where training is: optimizer updates done, the current epoch, and batches of that epoch already used."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0


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


def save_checkpoint(accelerator, output_dir: str, position: TrainingPosition, total_limit: Optional[int] = None):
    """Save models, optimizer, LR scheduler, RNG states, registered hooks (EMA) and `position` as
    `output_dir/checkpoint-<global_step>`, keeping at most `total_limit` checkpoints. Returns the folder."""
    final_path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{position.global_step}")
    partial_path = final_path + ".partial"
    if accelerator.is_main_process:
        if total_limit is not None:
            existing = list_checkpoints(output_dir)
            for _, old in existing[: max(0, len(existing) - total_limit + 1)]:
                shutil.rmtree(old)
        shutil.rmtree(partial_path, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(partial_path)
    if accelerator.is_main_process:
        with open(os.path.join(partial_path, POSITION_FILE), "w") as file:
            json.dump(asdict(position), file)
        shutil.rmtree(final_path, ignore_errors=True)
        os.replace(partial_path, final_path)
    accelerator.wait_for_everyone()
    return final_path


def load_checkpoint(accelerator, path: str) -> TrainingPosition:
    """Restore everything `save_checkpoint` saved and return the training position."""
    accelerator.load_state(path)
    with open(os.path.join(path, POSITION_FILE)) as file:
        return TrainingPosition(**json.load(file))


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
