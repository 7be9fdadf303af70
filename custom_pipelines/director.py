"""DIRECTOR: camera trajectories from a caption and a character trajectory (Courant et al., ECCV 2024).

Usable as `DirectorPipeline.from_pretrained(folder)` and as `DiffusionPipeline.from_pretrained(folder,
custom_pipeline=storydiff.custom_pipeline_path("director"), trust_remote_code=True)`. A folder saved without its text
encoder (the small shipped checkpoints) loads with `text_encoder=` and `tokenizer=` passed to `from_pretrained`.

Decoding. The model works on standardised trajectory features multiplied by `sigma_data` (the reference code's "EDM2
normalisation": the training data are scaled by `sigma_data = 0.5` so that their standard deviation matches EDM's
assumption). The reference sampler forgot to divide generated samples by `sigma_data` before de-standardising them,
which halves every velocity and shrinks the 6D rotation columns; this pipeline divides, so a trained model reproduces
the scale of its training trajectories.
"""

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from storydiff.models.director import DirectorModel
from storydiff.pipeline_checks import (
    check_callback_tensor_inputs,
    check_generator,
    check_guidance_scales,
    check_latents,
)
from storydiff.pipeline_mixins import SavedPipelineClassMixin, StepCallbackStateMixin
from storydiff.schedulers.guidance_schedule import (
    GuidanceSchedule,
    GuidanceScheduleLike,
    StepGuidance,
)
from storydiff.schedulers.scheduling_edm_heun import EDMHeunScheduler
from storydiff.text_features import TextFeatures, encode_text, null_text_features, text_embed_dim
from storydiff.trajectories import (
    check_positions,
    destandardize_camera_features,
    encode_character,
    features_to_poses,
)

OUTPUT_TYPES = ("np", "pt", "latent")


@dataclass
class DirectorPipelineOutput(BaseOutput):
    """Output of [`DirectorPipeline`].

    Args:
        trajectories (`np.ndarray` or `torch.Tensor` of shape `(batch, frames, 4, 4)`):
            Camera-to-world poses (OpenCV axes: x right, y down, z forward) with orthonormal rotations; for
            `output_type="latent"`, the final samples in the model's space, shape `(batch, frames, 9)`.
        features (`np.ndarray` or `torch.Tensor` of shape `(batch, frames, 9)`):
            The de-standardised DIRECTOR features (6D rotation, frame-0 position then velocities) the poses were
            decoded from (`None` for `output_type="latent"`).
        character (`np.ndarray` or `torch.Tensor` of shape `(batch, frames, 3)`):
            The character trajectory each camera trajectory was conditioned on (zeros: a static character at the
            origin).
        guidance_scales (`list[float]`): the guidance scale `g_i` applied at each Heun step (a callback may change
            them, see [`DirectorPipeline`]).
    """

    trajectories: Union[np.ndarray, torch.Tensor]
    features: Optional[Union[np.ndarray, torch.Tensor]]
    character: Union[np.ndarray, torch.Tensor]
    guidance_scales: List[float]


class DirectorPipeline(SavedPipelineClassMixin, StepCallbackStateMixin, DiffusionPipeline):
    r"""Text (+ character trajectory) to camera trajectory with DIRECTOR.

    Step callbacks follow diffusers' protocol (`diffusers.callbacks.PipelineCallback` works): a callback runs after
    each of the `pipe.num_timesteps` model evaluations (`2 * num_inference_steps - 1` for Heun) and sees
    `pipe.guidance_scale` (the scale of the evaluation that just ran) and `pipe.do_classifier_free_guidance`; it may
    replace `latents`, set `pipe._interrupt = True`, or set `pipe._guidance_scale` (applied as in every storydiff
    pipeline: from the next evaluation on under the static schedule; under other schedules only `<= 1`, guidance off).

    A call never changes the pipeline's components (it steps a per-call copy of `pipe.scheduler`), so calls may run
    from several threads at once; see docs/guides/serving.md. `encode_prompt` works on a pipeline that holds only the
    text encoder and tokenizer (`model=None, scheduler=None`): encode once, free the encoder, pass `text_features=`.

    Args:
        model ([`DirectorModel`]): the denoiser (EDM preconditioning inside).
        scheduler ([`EDMHeunScheduler`]): EDM Heun sampler; DIRECTOR uses 10 steps, sigma 80 -> 0.002, rho 40.
        text_encoder ([`~transformers.PreTrainedModel`], *optional*): a text encoder whose width equals the model's
            `text_embed_dim`: CLIP ViT-B/32's text model for the paper's checkpoints, the offline all-MiniLM-L6-v2
            for storydiff's small ones. See `storydiff.text_features.encode_text` for the pooling.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`], *optional*): its tokenizer.
    """

    model_cpu_offload_seq = "text_encoder->model"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        model: DirectorModel,
        scheduler: EDMHeunScheduler,
        text_encoder: Optional[PreTrainedModel] = None,
        tokenizer: Optional[PreTrainedTokenizerBase] = None,
    ):
        super().__init__()
        self.register_modules(model=model, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)

    # ------------------------------------------------------------------------------------------------------------
    # inputs

    def encode_prompt(
        self, prompt: Union[str, List[str]], device=None, max_length: Optional[int] = None
    ) -> TextFeatures:
        """Text features of `prompt` for the model (pooled vector and token sequence).

        Works without a model (`DirectorPipeline(model=None, scheduler=None, text_encoder=..., tokenizer=...)`), so
        that captions can be encoded once and the encoder freed before sampling with `text_features=`. `max_length`
        (token positions) defaults to the model's `max_text_length`, or to DIRECTOR's 77 without a model.
        """
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                "This pipeline has no text encoder; load it with `text_encoder=` and `tokenizer=` "
                "(e.g. storydiff.text_features.load_text_encoder()) or pass `text_features=`."
            )
        model = getattr(self, "model", None)
        if model is not None:
            width = text_embed_dim(self.text_encoder)
            if width != model.config.text_embed_dim:
                raise ValueError(
                    f"The text encoder's width is {width} but the model expects text features of width "
                    f"{model.config.text_embed_dim}; use the text encoder the model was trained with."
                )
        if max_length is None:
            max_length = model.config.max_text_length if model is not None else 77
        return encode_text(self.text_encoder, self.tokenizer, prompt, max_length=max_length, device=device)

    def _character_batch(self, character_trajectory, num_frames: Optional[int]) -> Optional[torch.Tensor]:
        """Validate the character trajectory (or list of them) as positions `(B, N, 3)`; `None` if not given."""
        max_frames = self.model.config.num_frames
        if character_trajectory is None:
            return None
        if isinstance(character_trajectory, (list, tuple)) and len(character_trajectory) > 0:
            first = character_trajectory[0]
            if isinstance(first, (torch.Tensor, np.ndarray)) or (
                isinstance(first, (list, tuple)) and len(first) > 0 and isinstance(first[0], (list, tuple))
            ):
                items = [check_positions(item, max_frames) for item in character_trajectory]
                if any(item.ndim != 2 for item in items):
                    raise ValueError("A list of character trajectories must hold (N, 3) arrays.")
                lengths = {item.shape[0] for item in items}
                if len(lengths) > 1:
                    raise ValueError(
                        f"All character trajectories of a batch must have the same number of frames, got {sorted(lengths)}."
                    )
                character_trajectory = torch.stack([item.float() for item in items])
        positions = check_positions(character_trajectory, max_frames).float()
        if positions.ndim == 2:
            positions = positions.unsqueeze(0)
        if num_frames is not None and positions.shape[1] != num_frames:
            raise ValueError(
                f"`num_frames` is {num_frames} but the character trajectory has {positions.shape[1]} frames; "
                "leave `num_frames=None` to use the trajectory's length."
            )
        return positions

    @staticmethod
    def _batch_size(prompt_batch: int, character_batch: Optional[int]) -> int:
        if character_batch is None or character_batch == prompt_batch:
            return prompt_batch
        if prompt_batch == 1 or character_batch == 1:
            return max(prompt_batch, character_batch)
        raise ValueError(
            f"Got {prompt_batch} prompts and {character_batch} character trajectories; pass as many of each, "
            "or one of either to share it."
        )

    @staticmethod
    def _repeat(tensor: torch.Tensor, batch: int) -> torch.Tensor:
        return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:]).contiguous()

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        character_trajectory: Union[torch.Tensor, np.ndarray, Sequence, None] = None,
        num_frames: Optional[int] = None,
        guidance_scale: float = 1.4,
        guidance_schedule: GuidanceScheduleLike = "static",
        num_inference_steps: int = 10,
        num_trajectories_per_prompt: int = 1,
        generator: Union[torch.Generator, List[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        text_features: Optional[TextFeatures] = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, Any, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Optional[List[str]] = None,
    ):
        r"""Generate camera trajectories.

        Args:
            prompt (`str` or `list[str]`): caption(s) of the camera motion (and the character's), e.g. "The camera
                trucks right while the character moves right". Not empty.
            character_trajectory (`(N, 3)`, `(batch, N, 3)` or a list of `(N, 3)`, *optional*): character centre
                positions per frame, in the camera's world frame (OpenCV axes, y down). `None`: a static character
                at the origin. One trajectory is shared by all prompts, and one prompt by all trajectories.
            num_frames (`int`, *optional*): trajectory length; defaults to the character trajectory's length, else
                the model's maximum (`model.config.num_frames`).
            guidance_scale (`float`, defaults to 1.4): classifier-free guidance `g`: `D = D_null + g (D_cond -
                D_null)`, where the null condition is all zeros (text and character), as in the paper.
            guidance_schedule (defaults to `"static"`): per-step guidance shape, see [`GuidanceSchedule`]. The null
                pass is skipped on Heun steps where `g_i == 1`.
            num_inference_steps (`int`, defaults to 10): Heun steps (`2 * steps - 1` model calls).
            num_trajectories_per_prompt (`int`, defaults to 1): samples per prompt.
            generator (`torch.Generator` or a list of them, *optional*): for reproducible noise; a list needs exactly
                one generator per trajectory (prompts x `num_trajectories_per_prompt`).
            latents (`torch.Tensor` of shape `(batch, frames, 9)`, *optional*): finite, unit-variance starting
                noise; it is multiplied by `scheduler.init_noise_sigma`.
            text_features ([`~storydiff.text_features.TextFeatures`], *optional*): precomputed text features to use
                instead of `prompt` (no text encoder needed).
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"` or `"latent"` (the model-space samples).
            return_dict (`bool`, defaults to `True`): return a [`DirectorPipelineOutput`] rather than a tuple.
            callback_on_step_end (`Callable` or `PipelineCallback`, *optional*): called after every scheduler step
                as `callback(pipeline, step_index, timestep, callback_kwargs)`; see the class docstring for what it
                may change.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*): tensors passed in `callback_kwargs`
                (`["latents"]`).

        Examples:
            ```py
            >>> import torch
            >>> from storydiff import DirectorPipeline
            >>> from storydiff.text_features import load_text_encoder

            >>> text_encoder, tokenizer = load_text_encoder()  # offline all-MiniLM-L6-v2
            >>> pipe = DirectorPipeline.from_pretrained(
            ...     "storydiff/checkpoints/director-c", text_encoder=text_encoder, tokenizer=tokenizer
            ... )
            >>> out = pipe("The camera trucks right.", num_frames=100, generator=torch.Generator().manual_seed(0))
            >>> out.trajectories.shape
            (1, 100, 4, 4)
            ```
        """
        if self.model is None or self.scheduler is None:
            raise ValueError(
                "This pipeline has no model or scheduler (it was built for `encode_prompt` only); load the full "
                "pipeline, e.g. DirectorPipeline.from_pretrained(folder, text_encoder=None, tokenizer=None), and pass "
                "`text_features=`."
            )
        config = self.model.config
        device = self._execution_device

        # ---- check arguments
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_trajectories_per_prompt", num_trajectories_per_prompt),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}.")
        if num_frames is not None:
            if isinstance(num_frames, bool) or not isinstance(num_frames, int):
                raise TypeError(f"`num_frames` must be an int, got {type(num_frames).__name__}.")
            if not 1 <= num_frames <= config.num_frames:
                raise ValueError(
                    f"`num_frames` must be between 1 and the model's maximum {config.num_frames}, got {num_frames}."
                )
        schedule = GuidanceSchedule.from_any(guidance_schedule)
        scales = schedule.scales(guidance_scale, num_inference_steps)
        check_guidance_scales(scales, self.model.dtype)
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"] if callback_on_step_end is not None else []
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        check_callback_tensor_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)

        # ---- conditions
        if text_features is None:
            if prompt is None:
                raise ValueError("Pass a `prompt` (or precomputed `text_features`).")
            text_features = self.encode_prompt(prompt, device=device)
        elif prompt is not None:
            raise ValueError("Pass either `prompt` or `text_features`, not both.")
        elif not isinstance(text_features, TextFeatures):
            raise TypeError(f"`text_features` must be a TextFeatures, got {type(text_features).__name__}.")
        elif text_features.pooled.shape[-1] != config.text_embed_dim:
            raise ValueError(
                f"`text_features` have width {text_features.pooled.shape[-1]}, the model expects {config.text_embed_dim}."
            )
        text_features = text_features.to(device)

        positions = self._character_batch(character_trajectory, num_frames)
        frames = num_frames or (positions.shape[1] if positions is not None else config.num_frames)
        batch = self._batch_size(len(text_features), positions.shape[0] if positions is not None else None)
        if positions is None:
            positions = torch.zeros(1, frames, 3)
        positions = self._repeat(positions.to(device), batch)
        pooled = self._repeat(text_features.pooled, batch)
        tokens = self._repeat(text_features.tokens, batch)
        token_mask = self._repeat(text_features.mask, batch)
        if num_trajectories_per_prompt > 1:
            positions, pooled, tokens, token_mask = (
                t.repeat_interleave(num_trajectories_per_prompt, dim=0)
                for t in (positions, pooled, tokens, token_mask)
            )
            batch *= num_trajectories_per_prompt
        dtype = self.model.dtype
        character = encode_character(positions.float()).to(dtype)
        null = null_text_features(batch, config.text_embed_dim, tokens.shape[1], device=device, dtype=dtype)
        conditional = dict(
            character_features=character,
            text_pooled=pooled.to(dtype),
            text_tokens=tokens.to(dtype),
            text_mask=token_mask,
        )
        both = dict(
            character_features=torch.cat([character, torch.zeros_like(character)]),
            text_pooled=torch.cat([conditional["text_pooled"], null.pooled]),
            text_tokens=torch.cat([conditional["text_tokens"], null.tokens]),
            text_mask=torch.cat([token_mask, null.mask]),
        )

        # ---- noise
        shape = (batch, frames, config.sample_dim)
        check_generator(generator, batch)
        # Heun keeps state between its two evaluations: step a copy, so that concurrent calls cannot disturb each other
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            latents = check_latents(latents, shape).to(device=device, dtype=torch.float32)
        latents = latents * scheduler.init_noise_sigma

        # ---- Heun sampling with classifier-free guidance
        timesteps = scheduler.timesteps
        # Heun's two evaluations of step k (prediction and correction) both use g_k
        step_indices = [min(i // scheduler.order, num_inference_steps - 1) for i in range(len(timesteps))]
        guidance = StepGuidance(schedule, scales, guidance_scale)
        applied_scales = []
        self._guidance_scale = guidance.scale(0)
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                scale = guidance.scale(step_indices[i])
                applied_scales.append(scale)
                model_input = scheduler.scale_model_input(latents, t).to(dtype)
                sigma = t.expand(batch)
                if scale == 1.0:
                    denoised = self.model(model_input, sigma, **conditional).sample
                else:
                    doubled = torch.cat([model_input, model_input])
                    cond, uncond = self.model(doubled, torch.cat([sigma, sigma]), **both).sample.chunk(2)
                    denoised = uncond + scale * (cond - uncond)
                latents = scheduler.step(denoised.float(), t, latents).prev_sample

                if callback_on_step_end is not None:
                    available = {"latents": latents}
                    callback_kwargs = {k: available[k] for k in callback_on_step_end_tensor_inputs}
                    self._guidance_scale = scale
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    guidance.after_callback(scale, self._guidance_scale)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # ---- decode: undo the sigma_data scaling, then the standardisation
        if output_type == "latent":
            trajectories, features = latents, None
        else:
            features = destandardize_camera_features(latents / config.sigma_data)
            trajectories = features_to_poses(features)
        character_out = positions
        self.maybe_free_model_hooks()

        if output_type == "np":
            trajectories = trajectories.cpu().numpy()
            features = features.cpu().numpy()
            character_out = character_out.cpu().numpy()
        # one scale per Heun step: the scale of its first evaluation
        scales_list = [
            scale for k, scale in enumerate(applied_scales) if k == 0 or step_indices[k] != step_indices[k - 1]
        ]
        self._guidance_scales = torch.tensor(scales_list, dtype=torch.float64)
        if not return_dict:
            return trajectories, features, character_out, scales_list
        return DirectorPipelineOutput(
            trajectories=trajectories, features=features, character=character_out, guidance_scales=scales_list
        )
