"""A `diffusers.guiders` guider for coherence-aware classifier-free guidance (CA-CFG) in modular pipelines."""

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from diffusers.configuration_utils import register_to_config

from storydiff.models.coherence import check_coherence
from storydiff.schedulers.dynamic_guider import DynamicClassifierFreeGuidance
from storydiff.schedulers.guidance_schedule import GuidanceScheduleLike

if TYPE_CHECKING:
    from diffusers.modular_pipelines.modular_pipeline import BlockState


class CoherenceAwareGuidance(DynamicClassifierFreeGuidance):
    r"""Coherence-aware classifier-free guidance (CAD, Dufour et al. 2024) with a [`GuidanceSchedule`].

    A model trained with coherence-aware diffusion is conditioned on a caption *and* on its coherence `c` in [0, 1]
    (how well the caption describes the image). CA-CFG contrasts a confident and a "this caption says nothing"
    prediction instead of a conditional and an unconditional one:

        eps_hat = eps(x, y-, c-) + g * (eps(x, y+, c+) - eps(x, y-, c-)),    g = 1 + w,

    with `c+ = coherence` and `c- = negative_coherence`. By default the negative branch uses the *same* prompt as
    the positive one (the paper's pure form): wherever the denoise step gives no negative input (`None`), the
    guider fills in the positive one. An empty-string or random-string negative prompt is used by giving its
    embeddings as the negative input, as with `ClassifierFreeGuidance`.

    The guider tells the denoise step which coherence each branch uses: every batch from `prepare_inputs` (and
    `prepare_inputs_from_block_state`) carries a `coherence` entry, a float tensor of shape `(1,)` (or `(batch,)`
    for per-sample coherence), on the device of the batch's first tensor. The denoise step feeds it, with the
    branch's text hidden states, to a [`CoherenceConditioner`] and gives the conditioner's output to the denoiser:

    ```py
    guider.set_state(step=i, num_inference_steps=num_inference_steps, timestep=t)
    guider_state = guider.prepare_inputs({"text_hidden_states": (prompt_embeds, None)})  # None: same prompt
    for batch in guider_state:
        guider.prepare_models(unet)
        context = conditioner(batch.text_hidden_states, batch.coherence)
        batch.noise_pred = unet(latents, t, encoder_hidden_states=context.encoder_hidden_states).sample
        guider.cleanup_models(unet)
    noise_pred = guider(guider_state).pred
    ```

    Per call, the denoise step may override the configured coherences with a `coherence` entry in the inputs: a
    float or a `(batch,)` tensor (the positive coherence) or a tuple `(positive, negative)`; `None` in it means the
    configured value. With `prepare_inputs_from_block_state`, a `coherence` input field names the block-state
    attribute(s) to read, in the same forms.

    Everything else is inherited from [`DynamicClassifierFreeGuidance`]: the per-step scale follows
    `guidance_schedule`, and on a step whose weight is zero (`g_i == 1`) only the positive branch runs. With the
    `static` schedule the result equals `ClassifierFreeGuidance` given the two branches' conditionings.

    Args:
        guidance_scale, guidance_rescale, use_original_formulation, start, stop, enabled, guidance_schedule, power,
        clamp, interval, values:
            As in [`DynamicClassifierFreeGuidance`]. The authors' CA-CFG weight `w` is `guidance_scale - 1` (or
            `guidance_scale` itself with `use_original_formulation=True`).
        coherence (`float`, defaults to `1.0`):
            Coherence `c+` of the positive branch, in [0, 1].
        negative_coherence (`float`, defaults to `0.0`):
            Coherence `c-` of the negative branch, in [0, 1].
    """

    _coherence_key = "coherence"

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
        coherence: float = 1.0,
        negative_coherence: float = 0.0,
    ):
        self.coherence = _check_config_coherence("coherence", coherence)
        self.negative_coherence = _check_config_coherence("negative_coherence", negative_coherence)
        super().__init__(
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            use_original_formulation=use_original_formulation,
            start=start,
            stop=stop,
            enabled=enabled,
            guidance_schedule=guidance_schedule,
            power=power,
            clamp=clamp,
            interval=interval,
            values=values,
        )

    def prepare_inputs(self, data: dict[str, Any]) -> list["BlockState"]:
        data = dict(data)
        branch_coherences = self._branch_coherences(data.pop(self._coherence_key, None))
        # the paper's pure form: a branch without a negative input uses the positive one (same prompt, c-)
        data = {
            key: (value[0], value[0]) if isinstance(value, tuple) and value[1] is None else value
            for key, value in data.items()
        }
        return self._add_coherence(super().prepare_inputs(data), branch_coherences)

    def prepare_inputs_from_block_state(self, data: "BlockState", input_fields: dict[str, Any]) -> list["BlockState"]:
        input_fields = dict(input_fields)
        coherence_field = input_fields.pop(self._coherence_key, None)
        if isinstance(coherence_field, tuple):
            given = tuple(None if name is None else getattr(data, name, None) for name in coherence_field)
        else:
            given = None if coherence_field is None else getattr(data, coherence_field, None)
        branch_coherences = self._branch_coherences(given)
        input_fields = {
            key: (value[0], value[0]) if isinstance(value, tuple) and _missing(data, value[1]) else value
            for key, value in input_fields.items()
        }
        batches = super().prepare_inputs_from_block_state(data, input_fields)
        return self._add_coherence(batches, branch_coherences)

    def _branch_coherences(self, given: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """`(c+, c-)` as checked float tensors: the per-call `given` value(s) where set, else the config's."""
        if isinstance(given, tuple) and len(given) != 2:
            raise ValueError(
                f"A `coherence` tuple must be (positive, negative), got {len(given)} values; use None for the "
                "configured coherence."
            )
        positive, negative = given if isinstance(given, tuple) else (given, None)
        positive = self.coherence if positive is None else positive
        negative = self.negative_coherence if negative is None else negative
        return check_coherence(positive), check_coherence(negative)

    def _add_coherence(
        self, batches: list["BlockState"], branch_coherences: tuple[torch.Tensor, torch.Tensor]
    ) -> list["BlockState"]:
        # batch 0 is the positive branch (pred_cond), batch 1, when guidance runs, the negative one (pred_uncond)
        for batch, coherence in zip(batches, branch_coherences):
            device = next((value.device for value in batch.as_dict().values() if torch.is_tensor(value)), None)
            setattr(batch, self._coherence_key, coherence if device is None else coherence.to(device))
        return batches

    def get_state(self):
        state = super().get_state()
        state["coherence"] = self.coherence
        state["negative_coherence"] = self.negative_coherence
        return state


def _check_config_coherence(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a number in [0, 1], got {type(value).__name__} {value!r}.")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(
            f"`{name}` must be a finite value in [0, 1] (0 = the condition says nothing of the image, 1 = it "
            f"describes it fully), got {value}."
        )
    return float(value)


def _missing(data: "BlockState", name: Optional[str]) -> bool:
    return name is None or getattr(data, name, None) is None
