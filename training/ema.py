"""Exponential moving average of model weights, saved in checkpoints as safetensors.

Wraps `diffusers.training_utils.EMAModel` (decay with optional warmup) and adds what a training script needs
around it. A new script uses it like this::

    ema = create_ema(model, decay=args.ema_decay, warmup_power=args.ema_power)
    register_ema_checkpointing(accelerator, ema)       # before load_checkpoint / save_checkpoint
    ...
    if accelerator.sync_gradients:
        ema.step(accelerator.unwrap_model(model).parameters())
    ...
    with ema_weights(ema, accelerator.unwrap_model(model)):   # validation / save_pretrained with EMA weights
        pipeline.save_pretrained(args.output_dir)

`ema` may be None everywhere (`--use_ema` off); the helpers then do nothing.
"""

import contextlib
import json
import os
from typing import Optional

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

EMA_WEIGHTS_FILE = "ema.safetensors"
EMA_STATE_FILE = "ema_state.json"


def create_ema(model: torch.nn.Module, decay: float = 0.9999, warmup_power: Optional[float] = 0.75) -> EMAModel:
    """EMA of `model`'s parameters. With `warmup_power` the decay ramps up as
    `1 - (1 + step) ** -warmup_power` (capped at `decay`), so that short runs still average sensibly."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"The EMA decay must be in (0, 1), got {decay}.")
    return EMAModel(
        model.parameters(),
        decay=decay,
        use_ema_warmup=warmup_power is not None,
        power=warmup_power if warmup_power is not None else 2 / 3,
        model_cls=type(model),
        model_config=getattr(model, "config", None),
    )


def register_ema_checkpointing(accelerator, ema: Optional[EMAModel]) -> None:
    """Make `accelerator.save_state` / `load_state` also save and restore `ema` (weights as safetensors, counters
    as JSON) inside the checkpoint folder."""
    if ema is None:
        return

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_ema(ema, output_dir)

    def load_hook(models, input_dir):
        load_ema(ema, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_ema(ema: EMAModel, folder: str) -> None:
    state = ema.state_dict()
    shadow = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(state.pop("shadow_params"))}
    os.makedirs(folder, exist_ok=True)
    save_file(shadow, os.path.join(folder, EMA_WEIGHTS_FILE))
    with open(os.path.join(folder, EMA_STATE_FILE), "w") as file:
        json.dump(state, file)


def load_ema(ema: EMAModel, folder: str) -> None:
    weights_path = os.path.join(folder, EMA_WEIGHTS_FILE)
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"{folder} has no {EMA_WEIGHTS_FILE}; was it saved without --use_ema?")
    shadow = load_file(weights_path)
    with open(os.path.join(folder, EMA_STATE_FILE)) as file:
        state = json.load(file)
    device = ema.shadow_params[0].device
    state["shadow_params"] = [shadow[f"shadow.{i}"].to(device) for i in range(len(shadow))]
    ema.load_state_dict(state)


@contextlib.contextmanager
def ema_weights(ema: Optional[EMAModel], model: torch.nn.Module):
    """Temporarily put the EMA weights into `model` (no-op when `ema` is None)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())
