"""Class-conditional image generation with classifier-free guidance and per-step guidance schedules.

Works with two kinds of denoiser, both trained with a "null" class for classifier-free guidance:

* a class-conditional `UNet2DModel` (`num_class_embeds = num_classes + 1`, the last index is the null class), in
  pixel space or, with a `vae`, in latent space;
* a DiT-style `DiTTransformer2DModel` (`num_embeds_ada_norm = num_classes`, its label table has one extra row for
  the null class, index `num_classes`, as in DiT), usually with a `vae`;
* storydiff's `CoherenceAwareUNet2DModel` (class-conditional coherence-aware diffusion, CAD): a class-conditional
  UNet that also takes a coherence c in [0, 1]. Then `coherence` (default 1.0) is a test-time knob and guidance is
  coherence-aware CFG (CA-CFG): by default the negative branch is the same class at `negative_coherence` (0.0).
  Class-conditional CAD is storydiff's own design: the CAD authors never released theirs.

With a UNet, an optional `controlnet` (storydiff's `ControlNetFullModel` or `ControlNetLiteModel`, built with
`from_unet(unet, ...)`) steers generation with a condition image (`control_image`), as ControlNet steers Stable
Diffusion; control and guidance are separate knobs.

Usable as `ClassConditionalPipeline.from_pretrained(folder)` and as
`DiffusionPipeline.from_pretrained(folder, custom_pipeline=storydiff.custom_pipeline_path("class_conditional"),
trust_remote_code=True)`.
"""

import copy
import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from storydiff.models.coherence import check_coherence
from storydiff.models.coherence_unet_2d import CoherenceAwareUNet2DModel
from storydiff.models.controlnet_variants import check_condition_size, unet2d_forward_with_residuals
from storydiff.pipeline_checks import (
    check_callback_tensor_inputs,
    check_generator,
    check_guidance_scales,
    check_latents,
)
from storydiff.pipeline_mixins import SavedPipelineClassMixin, StepCallbackStateMixin
from storydiff.schedulers.guidance_schedule import GuidanceSchedule, GuidanceScheduleLike, StepGuidance

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
NEGATIVE_CLASSES = ("same", "null")


def is_real_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class ClassConditionalPipelineOutput(BaseOutput):
    """Output of [`ClassConditionalPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images: PIL images, a `(batch, height, width, channels)` array in [0, 1], a
            `(batch, channels, height, width)` tensor in [0, 1], or the final latents for `output_type="latent"`.
        class_labels (`list[int]`):
            The class of each image, in the same order.
        guidance_scales (`list[float]`):
            The diffusers guidance scale `g_i` used at each denoising step, step 0 (noisiest) first.
        coherence (`list[float]`, *optional*):
            The coherence each image was generated with (positive branch), in the same order; None (and left out of
            the tuple form) unless the denoiser is a `CoherenceAwareUNet2DModel`.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    class_labels: List[int]
    guidance_scales: List[float]
    coherence: Optional[List[float]] = None


class ClassConditionalPipeline(SavedPipelineClassMixin, StepCallbackStateMixin, DiffusionPipeline):
    r"""Class-conditional generation with classifier-free guidance (CFG) and guidance weight schedules.

    CFG follows diffusers: `eps = eps_null + g_i * (eps_class - eps_null)`, with `g_i` the per-step scale from
    `GuidanceSchedule.from_any(guidance_schedule).scales(guidance_scale, num_inference_steps)`. A step runs CFG when
    `g_i > 1`; on the other steps the null-class (negative) half of the batch is not computed at all, so the denoiser runs on
    the conditional batch only. The `static` schedule is plain constant CFG.

    Step callbacks follow diffusers' protocol: during `callback_on_step_end`, `pipe.guidance_scale` is the scale of
    the step that just ran, `pipe.num_timesteps` the number of steps, and setting `pipe._interrupt = True` stops the
    run. A callback that sets `pipe._guidance_scale` changes the scale of the next steps under the static schedule;
    under any other schedule only a value `<= 1` (guidance off) is applied (`StepGuidance` documents the rule, which
    is the same in every storydiff pipeline).

    With a [`CoherenceAwareUNet2DModel`] (class-conditional CAD), every prediction also gets a coherence: the
    positive branch `(class, coherence)`, the negative branch `(class, negative_coherence)` with
    `negative_class="same"` (the default: CA-CFG in the paper's pure form, `eps(y, c+) + w (eps(y, c+) - eps(y, c-))`,
    which is `eps_neg + g (eps_pos - eps_neg)` with `g = 1 + w`) or `(null class, negative_coherence)` with
    `negative_class="null"` (standard CFG for a model trained with condition dropout, whose dropped samples had the
    null class and c = 0). CA-CFG costs the same as CFG, and zero-weight steps skip the negative branch alike.

    A call never changes the pipeline's components (the scheduler it steps is a per-call copy of `pipe.scheduler`),
    so calls with different arguments may run at the same time from several threads, as long as no step callback
    changes pipeline state (`pipe._guidance_scale`, `pipe._interrupt`); for those, give each request its own
    `ClassConditionalPipeline.from_pipe(pipe)`, as in docs/guides/serving.md.

    Args:
        scheduler ([`SchedulerMixin`]):
            Scheduler used to denoise, e.g. [`DDIMScheduler`].
        unet ([`UNet2DModel`] or [`CoherenceAwareUNet2DModel`], *optional*):
            Class-conditional UNet with `num_class_embeds = num_classes + 1`, optionally coherence-aware. Give exactly
            one of `unet` and `transformer`.
        transformer ([`DiTTransformer2DModel`], *optional*):
            Class-conditional DiT with `num_embeds_ada_norm = num_classes` (plus its null row).
        vae ([`AutoencoderKL`], *optional*):
            Decodes latents into images. Without it the denoiser works in pixel space, in [-1, 1].
        num_classes (`int`, *optional*):
            Number of real classes; the null class index is `num_classes`. Defaults to `num_class_embeds - 1` for a
            UNet and to `num_embeds_ada_norm` for a DiT.
        id2label (`dict[int, str]`, *optional*):
            Class names, so that `class_labels` can also be given as names.
        controlnet ([`ControlNetModel`], *optional*):
            A ControlNet built from the `unet` (`ControlNetLiteModel.from_unet(unet, ...)` or
            `ControlNetFullModel.from_unet(unet, ...)`); then every call takes a `control_image`. Plain UNet only
            (not with a coherence-aware UNet).
    """

    model_cpu_offload_seq = "transformer->controlnet->unet->vae"
    _optional_components = ["unet", "transformer", "vae", "controlnet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        scheduler: KarrasDiffusionSchedulers,
        unet: Optional[UNet2DModel] = None,
        transformer: Optional[DiTTransformer2DModel] = None,
        vae: Optional[AutoencoderKL] = None,
        num_classes: Optional[int] = None,
        id2label: Optional[Dict[Union[int, str], str]] = None,
        controlnet: Optional[ControlNetModel] = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("Give exactly one denoiser: either `unet` (UNet2DModel) or `transformer` (DiT).")
        if controlnet is not None:
            self._check_controlnet(controlnet, unet)
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae, controlnet=controlnet)

        num_classes = self._check_num_classes(num_classes)
        id2label = self._check_id2label(id2label, num_classes)
        self.register_to_config(num_classes=num_classes, id2label=id2label)

    # ----------------------------------------------------------------------------------------------- components

    @property
    def denoiser(self) -> torch.nn.Module:
        """The `unet` or the `transformer`, whichever this pipeline has."""
        return self.unet if self.unet is not None else self.transformer

    @property
    def is_coherence_aware(self) -> bool:
        """Whether the denoiser takes a coherence (a [`CoherenceAwareUNet2DModel`])."""
        return isinstance(self.unet, CoherenceAwareUNet2DModel)

    @property
    def null_class_label(self) -> int:
        """Index of the null (unconditional) class used for CFG: `num_classes`."""
        return self.config.num_classes

    @property
    def labels(self) -> Dict[str, int]:
        """Class name -> class index, from `id2label` (empty when the pipeline has no names). Comma-separated
        synonyms, as in DiT's ImageNet labels ("tench, Tinca tinca"), each map to the class."""
        labels = {}
        for index, names in (self.config.id2label or {}).items():
            for name in names.split(","):
                if name.strip():
                    labels[name.strip()] = int(index)
        return labels

    @staticmethod
    def _check_controlnet(controlnet, unet) -> None:
        if unet is None:
            raise ValueError(
                "A controlnet works with the `unet` (UNet2DModel) denoiser only; the DiT `transformer` has no skip "
                "connections for ControlNet residuals. Use a class-conditional UNet2DModel, or drop the controlnet."
            )
        if isinstance(unet, CoherenceAwareUNet2DModel):
            # a ControlNet built from the UNet copies its class table but has no coherence input
            raise ValueError(
                "A controlnet is not supported with a CoherenceAwareUNet2DModel: the ControlNet's class embedding has "
                "no coherence input. Use a plain class-conditional UNet2DModel with the controlnet, or drop it."
            )
        if not isinstance(controlnet, ControlNetModel):
            raise TypeError(
                "`controlnet` must be a ControlNetModel (storydiff's ControlNetLiteModel or ControlNetFullModel, built "
                f"with from_unet(unet, ...)), got {type(controlnet).__name__}."
            )
        for key in ("in_channels", "block_out_channels", "layers_per_block"):
            if tuple(np.atleast_1d(controlnet.config[key])) != tuple(np.atleast_1d(unet.config[key])):
                raise ValueError(
                    f"The controlnet's {key}={controlnet.config[key]} does not match the unet's {unet.config[key]}: "
                    "build the ControlNet from this UNet (from_unet(unet, ...))."
                )

    def _check_num_classes(self, num_classes: Optional[int]) -> int:
        if self.unet is not None:
            table_size = self.unet.config.num_class_embeds
            if table_size is None or self.unet.config.class_embed_type is not None:
                raise ValueError(
                    "The UNet is not class-conditional: build it with `num_class_embeds = num_classes + 1` "
                    "(and `class_embed_type=None`) so that it has a class embedding table with a null class."
                )
            largest = table_size - 1
        else:
            largest = self.transformer.config.num_embeds_ada_norm
            if largest is None or self.transformer.config.norm_type != "ada_norm_zero":
                raise ValueError(
                    "The transformer is not a class-conditional DiT: it needs `norm_type='ada_norm_zero'` and "
                    "`num_embeds_ada_norm = num_classes`."
                )
        if num_classes is None:
            num_classes = largest
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(f"`num_classes` must be an int, got {type(num_classes).__name__}.")
        if not 1 <= num_classes <= largest:
            raise ValueError(
                f"`num_classes` must be between 1 and {largest} for this denoiser (its null class index is "
                f"`num_classes`), got {num_classes}."
            )
        return num_classes

    @staticmethod
    def _check_id2label(id2label, num_classes: int) -> Optional[Dict[int, str]]:
        if id2label is None:
            return None
        if isinstance(id2label, (list, tuple)):
            id2label = dict(enumerate(id2label))
        if not isinstance(id2label, dict):
            raise TypeError(f"`id2label` must be a dict of class index -> name, got {type(id2label).__name__}.")
        # JSON stores the keys as strings; keep them as ints in memory and in the saved config alike.
        checked = {}
        for index, name in id2label.items():
            index = int(index)
            if not 0 <= index < num_classes:
                raise ValueError(f"`id2label` has index {index}, outside 0..{num_classes - 1}.")
            checked[index] = str(name)
        return dict(sorted(checked.items()))

    # ------------------------------------------------------------------------------------------------- helpers

    def get_label_ids(self, label: Union[str, Sequence[str]]) -> List[int]:
        """Map class names (from `id2label`) to class indices."""
        names = [label] if isinstance(label, str) else list(label)
        labels = self.labels
        for name in names:
            if name not in labels:
                raise ValueError(f"Unknown class name {name!r}. Known names: {', '.join(labels) or '(none)'}.")
        return [labels[name] for name in names]

    def _class_label_list(self, class_labels) -> List[int]:
        if isinstance(class_labels, torch.Tensor):
            if class_labels.ndim > 1 or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
                raise TypeError(
                    f"`class_labels` as a tensor must be 0-D or 1-D and of integer dtype, got shape "
                    f"{tuple(class_labels.shape)} and dtype {class_labels.dtype}."
                )
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, np.ndarray):
            if class_labels.ndim > 1 or not np.issubdtype(class_labels.dtype, np.integer):
                raise TypeError("`class_labels` as an array must be 0-D or 1-D and of integer dtype.")
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, (int, np.integer, str)) and not isinstance(class_labels, bool):
            class_labels = [class_labels]
        elif not isinstance(class_labels, (list, tuple)):
            raise TypeError(
                "`class_labels` must be an int, a class name, or a list / 1-D tensor of them, got "
                f"{type(class_labels).__name__}."
            )
        if len(class_labels) == 0:
            raise ValueError("`class_labels` is empty; give at least one class.")

        labels = []
        for label in class_labels:
            if isinstance(label, str):
                label = self.get_label_ids(label)[0]
            elif isinstance(label, bool) or not isinstance(label, (int, np.integer)):
                raise TypeError(f"Each class label must be an int or a class name, got {type(label).__name__}.")
            label = int(label)
            if not 0 <= label < self.config.num_classes:
                raise ValueError(
                    f"Class label {label} is out of range: this model has {self.config.num_classes} classes "
                    f"(0..{self.config.num_classes - 1}); index {self.null_class_label} is the null class used for "
                    "guidance and cannot be requested."
                )
            labels.append(label)
        return labels

    @staticmethod
    def _check_positive_int(name: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"`{name}` must be an int, got {type(value).__name__}.")
        if value < 1:
            raise ValueError(f"`{name}` must be >= 1, got {value}.")

    def check_inputs(self, num_images_per_class, num_inference_steps, output_type, callback_tensor_inputs):
        self._check_positive_int("num_images_per_class", num_images_per_class)
        self._check_positive_int("num_inference_steps", num_inference_steps)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_callback_tensor_inputs(callback_tensor_inputs, self._callback_tensor_inputs)

    def _latent_shape(self, batch_size: int):
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, config.in_channels, height, width)

    def prepare_latents(self, batch_size, dtype, device, generator, latents=None, scheduler=None):
        """Starting noise `(images, channels, height, width)`, times the scheduler's `init_noise_sigma`."""
        scheduler = scheduler or self.scheduler
        shape = self._latent_shape(batch_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = check_latents(latents, shape).to(device=device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta, scheduler=None):
        # Only some schedulers (DDIM) take `eta`, and only some take a generator.
        parameters = set(inspect.signature((scheduler or self.scheduler).step).parameters)
        extra = {}
        if "eta" in parameters:
            extra["eta"] = eta
        if "generator" in parameters:
            extra["generator"] = generator
        return extra

    def prepare_control_image(self, control_image, num_images_per_class: int, num_labels: int, dtype, device):
        """`control_image` checked against the controlnet and repeated to one per image, or None without a
        controlnet. The checks run here, before denoising, so that a bad condition fails at once."""
        if control_image is None and self.controlnet is None:
            return None
        if self.controlnet is None:
            raise ValueError(
                "`control_image` was given, but this pipeline has no controlnet. Load or build one with a controlnet "
                "(ClassConditionalPipeline(..., controlnet=ControlNetLiteModel.from_unet(unet, ...))), or drop "
                "`control_image`."
            )
        if control_image is None:
            raise ValueError(
                "This pipeline has a controlnet, so it needs `control_image`: a (batch, channels, height, width) "
                "tensor in [0, 1] at the image resolution, one per class label or one for all. To generate without "
                "control, use ClassConditionalPipeline.from_pipe(pipe, controlnet=None)."
            )
        if not isinstance(control_image, torch.Tensor) or control_image.ndim != 4:
            shape = tuple(control_image.shape) if isinstance(control_image, torch.Tensor) else None
            raise ValueError(
                "`control_image` must be a (batch, channels, height, width) tensor in [0, 1], got "
                f"{type(control_image).__name__}{'' if shape is None else f' of shape {shape}'}."
            )
        if control_image.shape[0] not in (1, num_labels):
            raise ValueError(
                f"`control_image` has {control_image.shape[0]} images; give one per class label ({num_labels}) or one "
                "for all."
            )
        control_image = control_image.to(device=device, dtype=dtype)
        if not torch.isfinite(control_image).all() or control_image.min() < 0 or control_image.max() > 1:
            raise ValueError("`control_image` must hold finite values in [0, 1] (the ControlNet's training range).")
        # the size and channels the ControlNet needs, checked on a shape-only latent
        check_condition_size(torch.empty(self._latent_shape(1), device="meta"), control_image, self.controlnet.config)
        if control_image.shape[0] == 1:
            return control_image.expand(num_labels * num_images_per_class, -1, -1, -1)
        return control_image.repeat_interleave(num_images_per_class, dim=0)

    def prepare_coherence(self, coherence, negative_coherence, negative_class, num_labels: int, num_images_per_class):
        """Checked coherence inputs: `(negative_class, coherence per image or None, negative_coherence or None)`.

        For a coherence-aware UNet, `coherence` (one value, or one per class label) defaults to 1.0 and
        `negative_class` to "same"; for any other denoiser only the defaults (no coherence, the null class) are
        allowed, and the coherence values come back as None."""
        if negative_class is not None and negative_class not in NEGATIVE_CLASSES:
            raise ValueError(
                f"`negative_class` must be one of {NEGATIVE_CLASSES} (or None for the default), got {negative_class!r}."
            )
        if not is_real_number(negative_coherence):
            raise TypeError(f"`negative_coherence` must be a float in [0, 1], got {negative_coherence!r}.")
        if coherence is not None:
            if isinstance(coherence, torch.Tensor) and coherence.ndim <= 1:
                coherence = coherence.reshape(-1).tolist()
            values = coherence if isinstance(coherence, (list, tuple)) else [coherence]
            if not values or not all(is_real_number(value) for value in values):
                raise TypeError(
                    "`coherence` must be a float in [0, 1] or a list of them (one per class label), got "
                    f"{coherence!r}."
                )
        if not self.is_coherence_aware:
            denoiser = type(self.denoiser).__name__
            if coherence is not None or negative_coherence != 0.0:
                raise ValueError(
                    f"The denoiser ({denoiser}) has no coherence input, so `coherence` and `negative_coherence` do not "
                    "apply; use a CoherenceAwareUNet2DModel for coherence-aware generation."
                )
            if negative_class == "same":
                raise ValueError(
                    f"`negative_class='same'` needs a coherence-aware denoiser; {denoiser} guides against the null "
                    "class only (`negative_class='null'`, the default)."
                )
            return "null", None, None
        values = [1.0] if coherence is None else values
        values = [float(value) for value in values]
        check_coherence(values)  # raises, naming the values outside [0, 1]
        if len(values) not in (1, num_labels):
            raise ValueError(
                f"`coherence` has {len(values)} values; give one per class label ({num_labels}) or a single float."
            )
        values = values * num_labels if len(values) == 1 else values
        per_image = [value for value in values for _ in range(num_images_per_class)]
        check_coherence(float(negative_coherence))
        return negative_class or "same", per_image, float(negative_coherence)

    def _predict_noise(
        self,
        scheduler,
        latents: torch.Tensor,
        t,
        class_labels: torch.Tensor,
        control_image: Optional[torch.Tensor] = None,
        conditioning_scale: float = 1.0,
        coherence: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        model_input = scheduler.scale_model_input(latents, t)
        timesteps = t if torch.is_tensor(t) else torch.tensor(t, device=latents.device)
        timesteps = timesteps.reshape(-1)[:1].to(latents.device).expand(latents.shape[0])
        if control_image is not None:
            down, mid = self.controlnet(model_input, timesteps, None, control_image, conditioning_scale=conditioning_scale,
                                        class_labels=class_labels, return_dict=False)  # fmt: skip
            output = unet2d_forward_with_residuals(self.unet, model_input, timesteps, class_labels, down, mid).sample
        elif coherence is not None:
            output = self.unet(model_input, timesteps, class_labels=class_labels, coherence=coherence).sample
        elif self.unet is not None:
            output = self.unet(model_input, timesteps, class_labels=class_labels).sample
        else:
            output = self.transformer(model_input, timestep=timesteps, class_labels=class_labels).sample
        # A DiT with learned variance predicts [eps, variance]; the samplers here only need eps.
        channels = latents.shape[1]
        if output.shape[1] == 2 * channels:
            output = output[:, :channels]
        return output

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        if self.vae is not None:
            scaling_factor = getattr(self.vae.config, "scaling_factor", 1.0)
            latents = latents.to(self.vae.dtype) / scaling_factor
            images = self.vae.decode(latents).sample
        else:
            images = latents
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = self.numpy_to_pil(images)
        return images

    # ---------------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        class_labels: Union[int, str, Sequence[Union[int, str]], torch.Tensor],
        num_images_per_class: int = 1,
        guidance_scale: float = 4.0,
        guidance_schedule: GuidanceScheduleLike = "static",
        num_inference_steps: int = 50,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, Any, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        control_image: Optional[torch.Tensor] = None,
        controlnet_conditioning_scale: float = 1.0,
        coherence: Optional[Union[float, List[float]]] = None,
        negative_coherence: float = 0.0,
        negative_class: Optional[str] = None,
    ) -> Union[ClassConditionalPipelineOutput, tuple]:
        r"""Generate images of the given classes.

        Args:
            class_labels (`int`, `str`, `list` or 1-D `torch.Tensor`):
                Classes to generate, as indices `0..num_classes-1` or as names from `id2label`.
            num_images_per_class (`int`, defaults to 1):
                Images per entry of `class_labels`; the batch is `len(class_labels) * num_images_per_class`,
                ordered class by class.
            guidance_scale (`float`, defaults to 4.0):
                Diffusers' CFG scale `g = 1 + w`; `g <= 1` turns guidance off with the static schedule.
            guidance_schedule (`str`, `GuidanceSchedule`, list of scales or callable, defaults to `"static"`):
                How the scale varies over the steps (see [`GuidanceSchedule`]). Steps with `g_i <= 1` skip the
                null-class (negative) pass.
            num_inference_steps (`int`, defaults to 50):
                Number of denoising steps.
            generator (`torch.Generator` or list of them, *optional*):
                Makes generation deterministic; a list needs exactly one generator per image
                (`len(class_labels) * num_images_per_class`).
            latents (`torch.Tensor`, *optional*):
                Starting noise of shape `(batch, channels, height, width)`, finite, before scaling by the scheduler's
                `init_noise_sigma`.
            eta (`float`, defaults to 0.0):
                DDIM's eta; ignored by schedulers that do not take it.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` (`(batch, H, W, C)` in [0, 1]), `"pt"` (`(batch, C, H, W)` in [0, 1]) or `"latent"`.
            return_dict (`bool`, defaults to `True`):
                Return a [`ClassConditionalPipelineOutput`] instead of a tuple `(images, class_labels,
                guidance_scales)`, with `coherence` appended for a coherence-aware UNet.
            callback_on_step_end (callable or `PipelineCallback`, *optional*):
                Called as `callback_on_step_end(self, step_index, timestep, callback_kwargs)` after each step; it may
                return a dict with replacement tensors (e.g. `latents`), set `self._guidance_scale` (see the class
                docstring for how it applies) or set `self._interrupt = True`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`.
            control_image (`torch.Tensor`, *optional*):
                The ControlNet's condition, `(batch, channels, height, width)` in [0, 1] at the image resolution:
                one per entry of `class_labels`, or one for all. Required with a `controlnet`, refused without. As in
                the original ControlNet, the null-class (unconditional) half of CFG keeps the condition.
            controlnet_conditioning_scale (`float`, defaults to 1.0):
                Multiplies the ControlNet's residuals; 0 turns the control off.
            coherence (`float` or `list[float]`, *optional*):
                Coherence-aware UNet only: the coherence c in [0, 1] of the positive branch, one for all or one per
                entry of `class_labels`; defaults to 1.0 (the class fully describes the image). Lower values move the
                samples towards the unconditional distribution. Refused for a denoiser without coherence input.
            negative_coherence (`float`, defaults to 0.0):
                Coherence-aware UNet only: the coherence of the negative (guidance) branch.
            negative_class (`str`, *optional*):
                The negative branch's class: `"same"` (the image's own class at `negative_coherence`: CA-CFG, the
                default for a coherence-aware UNet) or `"null"` (the null class, at `negative_coherence` for a
                coherence-aware UNet: standard CFG; the only choice, and the default, for other denoisers).

        Example:
            ```py
            >>> from storydiff import ClassConditionalPipeline
            >>> from storydiff.checkpoints import digits_pipeline_path
            >>> pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
            >>> out = pipe(class_labels=[0, 1, 2], guidance_scale=3.0, guidance_schedule="linear",
            ...            num_inference_steps=25, generator=torch.manual_seed(0), output_type="np")
            >>> out.images.shape
            (3, 16, 16, 1)
            ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(num_images_per_class, num_inference_steps, output_type, callback_on_step_end_tensor_inputs)
        labels_per_entry = self._class_label_list(class_labels)
        labels = [label for label in labels_per_entry for _ in range(num_images_per_class)]
        negative_class, coherence, negative_coherence = self.prepare_coherence(
            coherence, negative_coherence, negative_class, len(labels_per_entry), num_images_per_class
        )
        schedule = GuidanceSchedule.from_any(guidance_schedule)
        scales = schedule.scales(guidance_scale, num_inference_steps)

        device = self._execution_device
        dtype = self.denoiser.dtype
        batch_size = len(labels)
        check_generator(generator, batch_size)
        check_guidance_scales(scales, dtype)
        if isinstance(controlnet_conditioning_scale, bool) or not isinstance(
            controlnet_conditioning_scale, (int, float)
        ):
            raise TypeError(
                f"`controlnet_conditioning_scale` must be a float, got {type(controlnet_conditioning_scale).__name__}."
            )
        control = self.prepare_control_image(control_image, num_images_per_class, len(labels) // num_images_per_class,
                                             dtype, device)  # fmt: skip
        control_and_control = None if control is None else torch.cat([control, control])
        class_tensor = torch.tensor(labels, device=device, dtype=torch.long)
        if negative_class == "same":
            negative_tensor = class_tensor
        else:
            negative_tensor = torch.full_like(class_tensor, self.null_class_label)
        class_and_negative = torch.cat([class_tensor, negative_tensor])
        coherence_tensor = coherence_and_negative = None
        if coherence is not None:
            coherence_tensor = torch.tensor(coherence, device=device, dtype=torch.float32)
            coherence_and_negative = torch.cat(
                [coherence_tensor, torch.full_like(coherence_tensor, negative_coherence)]
            )

        # Sampling state lives in a copy of the scheduler, so that concurrent calls cannot disturb each other.
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if len(timesteps) != num_inference_steps:
            # Second-order schedulers repeat timesteps; a per-step schedule needs one scale per model call.
            raise ValueError(
                f"The scheduler runs {len(timesteps)} model evaluations for {num_inference_steps} steps; "
                "ClassConditionalPipeline needs a first-order scheduler (one evaluation per step), e.g. DDIM."
            )
        latents = self.prepare_latents(batch_size, dtype, device, generator, latents, scheduler=scheduler)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta, scheduler=scheduler)

        guidance = StepGuidance(schedule, scales, guidance_scale)
        applied_scales = []
        self._guidance_scale = guidance.scale(0)
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            step_scale = guidance.scale(i)
            applied_scales.append(step_scale)
            if step_scale > 1:
                # the negative half keeps the condition: guidance is over the class, not over the control
                noise = self._predict_noise(scheduler, torch.cat([latents, latents]), t, class_and_negative,
                                            control_and_control, controlnet_conditioning_scale,
                                            coherence_and_negative)  # fmt: skip
                noise_positive, noise_negative = noise.chunk(2)
                noise_pred = noise_negative + step_scale * (noise_positive - noise_negative)
            else:
                # No guidance on this step: the negative half is not computed at all, by the ControlNet either.
                noise_pred = self._predict_noise(scheduler, latents, t, class_tensor, control,
                                                 controlnet_conditioning_scale, coherence_tensor)  # fmt: skip

            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

            if callback_on_step_end is not None:
                step_tensors = {"latents": latents}
                callback_kwargs = {name: step_tensors[name] for name in callback_on_step_end_tensor_inputs}
                self._guidance_scale = step_scale
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                guidance.after_callback(step_scale, self._guidance_scale)
                latents = callback_outputs.pop("latents", latents)

        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        self._guidance_scales = torch.tensor(applied_scales, dtype=torch.float64)
        if not return_dict:
            return (images, labels, applied_scales) + (() if coherence is None else (coherence,))
        return ClassConditionalPipelineOutput(
            images=images, class_labels=labels, guidance_scales=applied_scales, coherence=coherence
        )
