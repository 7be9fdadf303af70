"""Argument checks shared by every storydiff pipeline, so that bad input fails before any work with an error that says
what was wrong and what is allowed (instead of an IndexError deep inside diffusers, or NaN samples).

A new pipeline calls them at the top of `__call__`, once it knows how many samples it generates:

    check_generator(generator, batch_size)
    latents = check_latents(latents, shape)        # `shape=None` checks the type and finiteness only
    check_guidance_scales(scales, dtype)          # the per-step scales of the call's guidance schedule
    check_callback_tensor_inputs(names, self._callback_tensor_inputs)
"""

from typing import Optional, Sequence

import torch


def check_generator(generator, batch_size: int) -> None:
    """`generator` must be None, one `torch.Generator`, or a list of exactly one generator per generated sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if not isinstance(generator, (list, tuple)):
        raise TypeError(
            f"`generator` must be a torch.Generator or a list of them (one per sample), got {type(generator).__name__}."
        )
    if len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators, but this call generates {batch_size} samples; "
            f"pass one generator per sample ({batch_size}), or a single torch.Generator."
        )
    for index, item in enumerate(generator):
        if not isinstance(item, torch.Generator):
            raise TypeError(f"`generator[{index}]` must be a torch.Generator, got {type(item).__name__}.")


def check_latents(latents: Optional[torch.Tensor], shape: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """Starting latents given by the user must be a tensor of the expected shape with finite values."""
    if latents is None:
        return None
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"`latents` must be a torch.Tensor, got {type(latents).__name__}.")
    if shape is not None and tuple(latents.shape) != tuple(shape):
        raise ValueError(f"`latents` must have shape {tuple(shape)}, got {tuple(latents.shape)}.")
    if not latents.is_floating_point():
        raise TypeError(f"`latents` must be a floating-point tensor, got dtype {latents.dtype}.")
    if not torch.isfinite(latents).all():
        raise ValueError("`latents` contain NaN or infinite values; starting noise must be finite.")
    return latents


def check_guidance_scales(scales: torch.Tensor, dtype: torch.dtype) -> None:
    """The per-step guidance scales must be finite in the dtype the denoiser computes in (a float32 model turns a
    scale above 3.4e38 into inf, and every sample into NaN)."""
    if not dtype.is_floating_point:
        return
    largest = torch.finfo(dtype).max
    peak = float(scales.abs().max()) if scales.numel() else 0.0
    if not peak <= largest:
        raise ValueError(
            f"The guidance schedule reaches a scale of {peak:.4g}, which overflows the model's {dtype} computation "
            f"(largest finite value {largest:.4g}); use a smaller guidance_scale."
        )


def check_callback_tensor_inputs(names: Sequence[str], allowed: Sequence[str]) -> None:
    """`callback_on_step_end_tensor_inputs` may only name tensors the pipeline can pass to callbacks."""
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` has {unknown}; this pipeline can pass {list(allowed)} to a "
            "step callback."
        )
