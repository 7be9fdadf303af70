"""A `callback_on_step_end` that applies a `GuidanceSchedule` to stock diffusers pipelines."""

import functools
import inspect
import math
from typing import Any, Optional, Sequence

import torch
from diffusers.callbacks import PipelineCallback
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from storydiff.schedulers.guidance_schedule import (
    GuidanceSchedule,
    GuidanceScheduleLike,
    _fix_use_default_values,
    _schedule_from_arguments,
)

logger = logging.get_logger(__name__)

# Callback tensors whose first half (dim 0) is the unconditional batch of classic pipelines, concatenated once before
# the denoising loop as torch.cat([negative, positive]).
CFG_BATCH_TENSOR_INPUTS = ("prompt_embeds", "add_text_embeds", "add_time_ids")

# The smallest scale we suggest for step 0 when the schedule wants no guidance there: a stock pipeline builds its CFG
# batch only for guidance_scale > 1, and 1 + 2**-20 changes the prediction by about one millionth of (cond - uncond).
NEAR_UNGUIDED_SCALE = 1.0 + 2.0**-20


class GuidanceScheduleCallback(PipelineCallback):
    r"""Applies a [`GuidanceSchedule`] to a stock diffusers pipeline through `callback_on_step_end`.

    Works with the classic pipelines that concatenate the CFG batch once and weigh it with `self.guidance_scale` on
    every step: `StableDiffusionPipeline`, `StableDiffusionXLPipeline`, their img2img and inpainting variants,
    `StableDiffusionControlNetPipeline`, `AnimateDiffSDXLPipeline`. Some diffusers pipelines weigh with their
    `guidance_scale` argument instead (`StableDiffusionControlNetImg2ImgPipeline`, the SDXL ControlNet pipelines,
    `AnimateDiffPipeline` and most AnimateDiff variants): there the callback can only switch guidance off for some
    steps (every scale must be 1 or the pipeline's `guidance_scale`, as with `interval`), and it raises a `ValueError`
    for other schedules. AnimateDiff pipelines also need `callback_on_step_end_tensor_inputs=callback.tensor_inputs`.

    ```py
    >>> callback = GuidanceScheduleCallback("linear", guidance_scale=7.5, pipeline=pipe)
    >>> image = pipe(prompt, num_inference_steps=30, guidance_scale=callback.first_step_guidance_scale(30),
    ...              callback_on_step_end=callback).images[0]
    ```

    How it works: at the end of step `i` it sets `pipeline._guidance_scale = g_{i+1}` for the next step. A step with no
    guidance (`g == 1`, `w == 0`) must not set the scale to 1 or less: that would switch the pipeline's
    `do_classifier_free_guidance` off while its prompt embeddings still hold both halves, breaking the batch (the
    mistake of diffusers' `SDCFGCutoffCallback`). Instead the unconditional half of every CFG tensor
    (`prompt_embeds`, and for SDXL `add_text_embeds` and `add_time_ids`) is replaced by the conditional half, so the
    guided prediction `u + g (c - u)` equals the conditional prediction `c`; the original halves come back on the next
    guided step. This works for any batch size and `num_images_per_prompt`.

    Limits (use storydiff's `DynamicCFG*` pipelines or the modular guider when they matter):

    * **The unconditional pass is never skipped**: a stock pipeline always runs the doubled batch, so zero-weight steps
      cost as much as guided ones.
    * **Step 0 runs at the `guidance_scale` given to the pipeline's `__call__`**: no callback runs before it. Pass
      `guidance_scale` to this constructor and `guidance_scale=callback.first_step_guidance_scale(N)` to the
      pipeline: that is `g_0` when `g_0 > 1`, and `1 + 2**-20` (a negligible weight that keeps the CFG batch) when
      the schedule starts without guidance, as linear, cosine and pcs do. Without a constructor `guidance_scale`, the
      schedule uses the pipeline's `guidance_scale` as its overall scale and step 0 runs at that scale (logged once).
    * Other tensors that differ between the halves and are not callback inputs are not swapped on zero-weight steps:
      IP-Adapter negative image embeddings, and ControlNet `guess_mode` (which feeds the ControlNet the conditional
      half only). There the zero-weight steps keep a little of the unconditional branch.
    * With `guidance_rescale > 0` a zero-weight step equals the conditional prediction up to float rounding.
    * The schedule runs over the steps actually taken (`pipeline.num_timesteps`, e.g. `int(N * strength)` for
      img2img). Second-order schedulers (Heun, KDPM2: `scheduler.order == 2`) evaluate the model twice per step; both
      evaluations of step `i` use `g_i`.

    Args:
        guidance_schedule (`str`, `GuidanceSchedule`, list of floats or callable, defaults to `"static"`):
            The schedule, as accepted by `GuidanceSchedule.from_any`.
        guidance_scale (`float`, *optional*):
            The overall diffusers scale `g = 1 + w` the schedule redistributes. Defaults to the pipeline's
            `guidance_scale` of the run.
        num_inference_steps (`int`, *optional*):
            Steps the pipeline will take; needed by `first_step_guidance_scale`, and checked against the run.
        tensor_inputs (`list[str]`, *optional*):
            The CFG tensors to swap on zero-weight steps. Defaults to the names of `CFG_BATCH_TENSOR_INPUTS` that
            `pipeline` accepts, or to `["prompt_embeds"]` without a pipeline. SDXL pipelines need
            `["prompt_embeds", "add_text_embeds", "add_time_ids"]`: pass `pipeline=` and it is chosen for you.
        pipeline (`DiffusionPipeline` or its class, *optional*):
            Only used to choose `tensor_inputs`; not stored.
        power, clamp, interval, values:
            Parameters of the schedule kind, as in [`GuidanceSchedule`]; leave them None when `guidance_schedule` is
            not a kind name.
    """

    ignore_for_config = ["pipeline"]

    @register_to_config
    def __init__(
        self,
        guidance_schedule: GuidanceScheduleLike = "static",
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        tensor_inputs: Optional[Sequence[str]] = None,
        pipeline=None,
        power: Optional[float] = None,
        clamp: Optional[float] = None,
        interval: Optional[Sequence[float]] = None,
        values: Optional[Sequence[float]] = None,
    ):
        # PipelineCallback.__init__ only validates cutoff arguments this callback does not have.
        schedule = _schedule_from_arguments(guidance_schedule, power, clamp, interval, values)
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
                raise TypeError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
            if schedule.config.kind not in ("custom", "callable"):
                schedule.scales(guidance_scale, 2)  # fail now on non-finite or < 1 scales
        if num_inference_steps is not None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"`num_inference_steps` must be an int, got {type(num_inference_steps).__name__}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")

        if tensor_inputs is None:
            accepted = getattr(pipeline, "_callback_tensor_inputs", None) if pipeline is not None else None
            if pipeline is not None and accepted is None:
                raise TypeError(f"`pipeline` must be a diffusers pipeline, got {type(pipeline).__name__}.")
            accepted = accepted if accepted is not None else ["prompt_embeds"]
            tensor_inputs = [name for name in CFG_BATCH_TENSOR_INPUTS if name in accepted]
        else:
            if isinstance(tensor_inputs, str) or not all(isinstance(name, str) for name in tensor_inputs):
                raise TypeError("`tensor_inputs` must be a list of callback tensor names.")
            unknown = [name for name in tensor_inputs if name not in CFG_BATCH_TENSOR_INPUTS]
            if unknown:
                raise ValueError(
                    f"`tensor_inputs` may only name CFG batch tensors {list(CFG_BATCH_TENSOR_INPUTS)}, got {unknown}."
                )
        if "prompt_embeds" not in tensor_inputs:
            raise ValueError("The pipeline must accept `prompt_embeds` as a callback tensor input.")

        self._guidance_schedule = schedule
        self._tensor_inputs = list(tensor_inputs)
        self.register_to_config(
            guidance_schedule=schedule.config.kind,
            **{name: schedule.config[name] for name in ("power", "clamp", "interval", "values")},
            tensor_inputs=self._tensor_inputs,
        )
        _fix_use_default_values(self)
        self._run_scales: Optional[torch.Tensor] = None
        self._scheduler_order = 1
        self._original_inputs: Optional[dict] = None
        self._warned_about_first_step = False

    @property
    def tensor_inputs(self) -> list[str]:
        return list(self._tensor_inputs)

    @property
    def guidance_schedule(self) -> GuidanceSchedule:
        return self._guidance_schedule

    @property
    def run_scales(self) -> Optional[torch.Tensor]:
        """The per-step scales `g_i` of the current (or last) run; `run_scales[0]` is what the schedule wanted for
        step 0, which ran at the pipeline's own `guidance_scale`."""
        return self._run_scales

    def scales(self, num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None):
        """The schedule's per-step scales for a run of `num_inference_steps` steps."""
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        num_inference_steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        if guidance_scale is None or num_inference_steps is None:
            raise ValueError(
                "Give `guidance_scale` and `num_inference_steps`, here or to the GuidanceScheduleCallback constructor."
            )
        return self._guidance_schedule.scales(guidance_scale, num_inference_steps)

    def first_step_guidance_scale(self, num_inference_steps: Optional[int] = None) -> float:
        """The `guidance_scale` to pass to the pipeline so that step 0 follows the schedule: `g_0` when `g_0 > 1`,
        else `1 + 2**-20`, which keeps the pipeline's CFG batch at a negligible weight (about 1e-6)."""
        first_scale = self.scales(num_inference_steps)[0].item()
        return first_scale if first_scale > 1.0 else NEAR_UNGUIDED_SCALE

    def callback_fn(self, pipeline, step_index: int, timestep, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if step_index == 0:
            self._start_run(pipeline, callback_kwargs)
        if self._run_scales is None:  # the run has no CFG batch and the schedule asks for none
            return callback_kwargs

        next_index = step_index + 1
        if next_index >= pipeline.num_timesteps:
            # leave the pipeline's tensors as they were built, for whatever reads them after the loop
            self._restore_unconditional_half(callback_kwargs)
            return callback_kwargs
        scale = self._run_scales[next_index // self._scheduler_order].item()
        if scale > 1.0:
            self._restore_unconditional_half(callback_kwargs)
            pipeline._guidance_scale = scale
        else:
            self._replace_unconditional_half(callback_kwargs)
        return callback_kwargs

    def _start_run(self, pipeline, callback_kwargs):
        self._original_inputs = None
        self._run_scales = None
        self._scheduler_order = int(getattr(pipeline.scheduler, "order", 1) or 1)
        num_steps = math.ceil(pipeline.num_timesteps / self._scheduler_order)
        expected_steps = self.config.num_inference_steps
        if expected_steps is not None and expected_steps != num_steps:
            raise ValueError(
                f"GuidanceScheduleCallback was built for num_inference_steps={expected_steps}, but the pipeline runs "
                f"{num_steps} steps (img2img runs int(num_inference_steps * strength)). Pass the number of steps "
                "actually run, or leave num_inference_steps None."
            )
        call_scale = float(pipeline.guidance_scale)
        overall_scale = call_scale if self.config.guidance_scale is None else self.config.guidance_scale
        scales = self._guidance_schedule.scales(overall_scale, num_steps)

        later_scales = scales[1 // self._scheduler_order :] if pipeline.num_timesteps > 1 else scales[:0]
        if not pipeline.do_classifier_free_guidance:
            if (later_scales > 1.0).any():
                raise ValueError(
                    f"The pipeline runs without classifier-free guidance (guidance_scale={call_scale} <= 1, or a "
                    "guidance-distilled UNet), so it has no unconditional batch for the schedule to weigh. Pass "
                    "guidance_scale > 1 to the pipeline, e.g. callback.first_step_guidance_scale(num_inference_steps)."
                )
            return
        self._check_tensor_inputs(pipeline, callback_kwargs, needs_swap=bool((later_scales <= 1.0).any()))
        guided_scales = later_scales[later_scales > 1.0]
        if not _reads_guidance_scale_attribute(type(pipeline)) and (guided_scales != call_scale).any():
            raise ValueError(
                f"{type(pipeline).__name__} weighs its predictions with the `guidance_scale` argument of `__call__`, "
                "not with `pipeline.guidance_scale`, so a callback cannot change its scale. On this pipeline the "
                f"callback can only switch guidance off for some steps: every scheduled scale must be 1 or the "
                f"pipeline's guidance_scale ({call_scale}), as with the 'interval' schedule; got "
                f"{sorted(set(guided_scales.tolist()))[:5]}. Use storydiff's DynamicCFG pipelines or the modular guider "
                "for other schedules."
            )

        wanted_first_scale = scales[0].item() if scales[0].item() > 1.0 else NEAR_UNGUIDED_SCALE
        if call_scale != wanted_first_scale and not self._warned_about_first_step:
            self._warned_about_first_step = True
            logger.warning(
                f"Step 0 ran at the pipeline's guidance_scale={call_scale}; the schedule's first scale is "
                f"{scales[0].item():.6g}. No callback runs before step 0: for an exact schedule, give the callback "
                "guidance_scale and num_inference_steps and call the pipeline with "
                "guidance_scale=callback.first_step_guidance_scale()."
            )
        self._run_scales = scales

    def _check_tensor_inputs(self, pipeline, callback_kwargs, needs_swap: bool):
        accepted = getattr(pipeline, "_callback_tensor_inputs", [])
        missing = [name for name in CFG_BATCH_TENSOR_INPUTS if name in accepted and name not in self._tensor_inputs]
        if needs_swap and missing:
            raise ValueError(
                f"{type(pipeline).__name__} also keeps {missing} as CFG batches; the schedule has zero-weight steps, "
                "which need them too. Build the callback with `pipeline=pipe` (or tensor_inputs="
                f"{[name for name in CFG_BATCH_TENSOR_INPUTS if name in accepted]})."
            )
        for name in self._tensor_inputs:
            tensor = callback_kwargs.get(name)
            if tensor is None:
                raise ValueError(
                    f"The pipeline did not pass `{name}` to the callback. Pass "
                    "`callback_on_step_end_tensor_inputs=callback.tensor_inputs` too: some pipelines (AnimateDiff) do "
                    "not read them from the callback."
                )
            if tensor.shape[0] % 2:
                raise ValueError(f"`{name}` has an odd batch size {tensor.shape[0]}: it is not a CFG batch.")

    def _replace_unconditional_half(self, callback_kwargs):
        # Both halves then hold the conditional inputs, so u == c and the guided u + g (c - u) is exactly c.
        if self._original_inputs is not None:
            return
        self._original_inputs = {}
        for name in self._tensor_inputs:
            tensor = callback_kwargs[name]
            conditional = tensor[tensor.shape[0] // 2 :]
            self._original_inputs[name] = tensor
            callback_kwargs[name] = torch.cat([conditional, conditional])

    def _restore_unconditional_half(self, callback_kwargs):
        if self._original_inputs is None:
            return
        callback_kwargs.update(self._original_inputs)
        self._original_inputs = None


@functools.cache
def _reads_guidance_scale_attribute(pipeline_class) -> bool:
    """Whether the denoising loop multiplies by `self.guidance_scale` (which the callback can change) rather than by
    the `guidance_scale` argument of `__call__` (as diffusers' ControlNet img2img, SDXL ControlNet and most AnimateDiff
    pipelines do). Without readable source we trust the pipeline."""
    try:
        source = inspect.getsource(pipeline_class.__call__)
    except (OSError, TypeError):
        return True
    return "self.guidance_scale *" in source or "self._guidance_scale *" in source or " guidance_scale *" not in source
