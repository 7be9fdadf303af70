"""A `diffusers.guiders` guider for modular pipelines that follows a `GuidanceSchedule`."""

import math
from typing import Optional, Sequence

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from storydiff.schedulers.guidance_schedule import (
    GuidanceSchedule,
    GuidanceScheduleLike,
    _fix_use_default_values,
    _schedule_from_arguments,
)


class DynamicClassifierFreeGuidance(ClassifierFreeGuidance):
    r"""Classifier-free guidance whose weight follows a [`GuidanceSchedule`] over the denoising steps.

    A drop-in replacement for diffusers' `ClassifierFreeGuidance` in modular pipelines (for example
    `pipe.update_components(guider=DynamicClassifierFreeGuidance(guidance_scale=7.5, guidance_schedule="linear"))`).
    The modular denoising loop calls `set_state(step, num_inference_steps, timestep)` before every step; the guider
    uses the scale `g_i` of that step from `guidance_schedule.scales(guidance_scale, num_inference_steps)`. On a step
    where `g_i == 1` (`w_i == 0`) the guider asks for the conditional prediction only (`num_conditions == 1`), so the
    unconditional pass is skipped: a schedule with `k` zero-weight steps out of `N` costs `(2N - k) / (2N)` of static
    CFG. With the `static` schedule it computes exactly what `ClassifierFreeGuidance` computes.

    Args:
        guidance_scale (`float`, defaults to `7.5`):
            The overall diffusers scale `g = 1 + w` the schedule redistributes (with `use_original_formulation=True`,
            the paper's weight `w` itself, as in `ClassifierFreeGuidance`).
        guidance_rescale (`float`, defaults to `0.0`):
            Rescaling factor against overexposure (https://huggingface.co/papers/2305.08891), applied as in
            `ClassifierFreeGuidance`.
        use_original_formulation (`bool`, defaults to `False`):
            Use `pred_cond + w * (pred_cond - pred_uncond)` instead of diffusers'
            `pred_uncond + g * (pred_cond - pred_uncond)`.
        start (`float`, defaults to `0.0`), stop (`float`, defaults to `1.0`), enabled (`bool`, defaults to `True`):
            As in `ClassifierFreeGuidance`: no guidance at all outside the `[start, stop)` fraction of the steps.
        guidance_schedule (`str`, `GuidanceSchedule`, list of floats or callable, defaults to `"static"`):
            A schedule kind (see `GUIDANCE_SCHEDULE_KINDS`) with its parameters below, a `GuidanceSchedule`, per-step
            scales, or a callable (which works but cannot be saved).
        power, clamp, interval, values:
            Parameters of the schedule kind, as in [`GuidanceSchedule`]; leave them None when `guidance_schedule` is
            not a kind name.

    Before `set_state` has been called (no step known) the guider uses `guidance_scale` itself.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        guidance_schedule: GuidanceScheduleLike = "static",
        power: Optional[float] = None,
        clamp: Optional[float] = None,
        interval: Optional[Sequence[float]] = None,
        values: Optional[Sequence[float]] = None,
    ):
        # ClassifierFreeGuidance.__init__ would register its own config over ours; it only sets the attributes below.
        BaseGuidance.__init__(self, start, stop, enabled)
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() == 1:
            guidance_scale = guidance_scale.item()
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale}.")
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation

        schedule = _schedule_from_arguments(guidance_schedule, power, clamp, interval, values)
        self._guidance_schedule = schedule
        # Save the schedule as plain config entries, so that guider_config.json is self-contained.
        self.register_to_config(guidance_schedule=schedule.config.kind, **_schedule_parameters(schedule))
        _fix_use_default_values(self)
        if schedule.config.kind not in ("static", "custom", "callable"):
            schedule.scales(self._diffusers_scale, 2)  # fail now, not mid-run, on e.g. guidance_scale < 1
        self._scales_cache: Optional[tuple[int, torch.Tensor]] = None

    @property
    def guidance_schedule(self) -> GuidanceSchedule:
        return self._guidance_schedule

    @property
    def _diffusers_scale(self) -> float:
        # The schedule works in diffusers' g = 1 + w; the original formulation's guidance_scale is w.
        return self.guidance_scale + 1.0 if self.use_original_formulation else self.guidance_scale

    def scales(self, num_inference_steps: int) -> torch.Tensor:
        """Per-step scales in this guider's formulation (`g_i`, or `w_i` with `use_original_formulation`)."""
        if self._guidance_schedule.is_static:
            return torch.full((num_inference_steps,), float(self.guidance_scale), dtype=torch.float64)
        if self._scales_cache is None or self._scales_cache[0] != num_inference_steps:
            scales = self._guidance_schedule.scales(self._diffusers_scale, num_inference_steps)
            if self.use_original_formulation:
                scales = scales - 1.0
            self._scales_cache = (num_inference_steps, scales)
        return self._scales_cache[1]

    @property
    def current_guidance_scale(self) -> float:
        """The scale of the step set by `set_state` (`guidance_scale` itself before any step is set)."""
        if self._guidance_schedule.is_static or self._step is None or self._num_inference_steps is None:
            return self.guidance_scale
        step, steps = int(self._step), int(self._num_inference_steps)
        if not 0 <= step < steps:
            raise ValueError(
                f"The guider was set to step {step} of {steps}; a schedule needs 0 <= step < num_inference_steps."
            )
        return self.scales(steps)[step].item()

    def forward(self, pred_cond: torch.Tensor, pred_uncond: Optional[torch.Tensor] = None) -> GuiderOutput:
        if not self._is_cfg_enabled():
            pred = pred_cond
        else:
            shift = pred_cond - pred_uncond
            pred = pred_cond if self.use_original_formulation else pred_uncond
            pred = pred + self.current_guidance_scale * shift

        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)

        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled:
            return False

        is_within_range = True
        if self._num_inference_steps is not None:
            skip_start_step = int(self._start * self._num_inference_steps)
            skip_stop_step = int(self._stop * self._num_inference_steps)
            is_within_range = skip_start_step <= self._step < skip_stop_step
        if not is_within_range:
            return False

        # w_i == 0: the guided prediction is the conditional one, so the unconditional pass is not needed
        no_guidance_scale = 0.0 if self.use_original_formulation else 1.0
        return not math.isclose(self.current_guidance_scale, no_guidance_scale)

    def get_state(self):
        state = super().get_state()
        state["current_guidance_scale"] = self.current_guidance_scale
        return state

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        if self._guidance_schedule.config.kind == "callable":
            raise ValueError(
                "A guider with a callable schedule cannot be saved; use a schedule kind or a list of scales."
            )
        return super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def new(self, **kwargs):
        if self._guidance_schedule.config.kind == "callable" and "guidance_schedule" not in kwargs:
            kwargs["guidance_schedule"] = self._guidance_schedule  # the function is not in the config
            for name in ("power", "clamp", "interval", "values"):
                kwargs[name] = None
        return super().new(**kwargs)


def _schedule_parameters(schedule: GuidanceSchedule) -> dict:
    return {name: schedule.config[name] for name in ("power", "clamp", "interval", "values")}
