"""Text-to-image with coherence-aware diffusion (CAD; Dufour, Besnier, Kalogeiton, Picard, CVPR 2024).

A CAD model was trained on (image, caption, coherence) triples, coherence c in [0, 1] saying how well the caption
describes the image. At test time c is a knob (c = 0 ~ ignore the caption, c = 1 ~ follow it fully) and guidance is
coherence-aware CFG (CA-CFG):

    eps_hat = eps(x, y+, c+) + w * (eps(x, y+, c+) - eps(x, y-, c-))
            = eps(x, y-, c-) + g * (eps(x, y+, c+) - eps(x, y-, c-))        with diffusers' g = 1 + w

with c+ = `coherence` (1.0), c- = `negative_coherence` (0.0) and, in the paper's pure form, y- = y+ (the same prompt:
`negative_prompt=None`). The authors' code also offers the empty prompt (`negative_prompt=""`) and random strings
(`random_negative_prompt=True`); their `cfg` values are the paper's w, so their cfg = 15 is `guidance_scale=16` here.

The pipeline works with any denoiser that takes `(sample, timestep, encoder_hidden_states=...,
encoder_attention_mask=...)`: a stock `UNet2DConditionModel` (fine-tuned with a conditioner) or storydiff's
`TextRINModel` (the paper's backbone; its latent self-conditioning is carried separately for the two CFG branches, as
in the authors' sampler). The `CoherenceConditioner` turns the text encoder's hidden states and c into the
denoiser's context once per call, so CA-CFG costs what plain CFG costs.

```py
>>> import torch
>>> from storydiff import CoherenceAwarePipeline
>>> pipe = CoherenceAwarePipeline.from_pretrained("path/to/a/cad/pipeline")
>>> images = pipe("a small red 7 in the top left corner", coherence=[1.0], guidance_scale=4.0,
...               num_inference_steps=25, generator=torch.manual_seed(0)).images
```
Also loadable as `DiffusionPipeline.from_pretrained(folder, custom_pipeline=storydiff.custom_pipeline_path(
"coherence_aware"), trust_remote_code=True)`.
"""

import copy
import inspect
import math
import string
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, ControlNetModel, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (diffusers' loader looks for it here)
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from storydiff.models.coherence import CoherenceConditioner, check_coherence
from storydiff.models.controlnet_variants import check_condition_size
from storydiff.models.text_rin import TextRINModel
from storydiff.pipeline_checks import (
    check_callback_tensor_inputs,
    check_generator,
    check_guidance_scales,
    check_latents,
)
from storydiff.pipeline_mixins import SavedPipelineClassMixin, StepCallbackStateMixin
from storydiff.schedulers.guidance_schedule import GuidanceSchedule, GuidanceScheduleLike, StepGuidance

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class CoherenceAwarePipelineOutput(BaseOutput):
    """Output of [`CoherenceAwarePipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            PIL images, a `(batch, height, width, channels)` array in [0, 1], a `(batch, channels, height, width)`
            tensor in [0, 1], or the final latents for `output_type="latent"`.
        coherence (`list[float]`):
            The coherence each image was generated with (the positive branch's c), in image order.
    """

    images: Union[List[PIL.Image.Image], np.ndarray, torch.Tensor]
    coherence: List[float]


def encode_text(tokenizer, text_encoder, texts: Sequence[str], device=None) -> tuple:
    """`(hidden_states, attention_mask)` of `texts`: tokens padded to the tokenizer's `model_max_length`, the text
    encoder's last hidden state and the tokenizer's mask (1 = real token). Training and sampling both call this, so a
    CAD model sees its text the same way in both."""
    device = device or text_encoder.device
    tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")  # fmt: skip
    mask = tokens.attention_mask.to(device)
    hidden_states = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
    return hidden_states, mask


def random_prompts(prompts: Sequence[str], generator: Optional[torch.Generator] = None) -> List[str]:
    """The authors' random-string negative: for each prompt, lowercase letters in words of the prompt's word lengths
    (so the negative has a prompt's shape but no meaning). Deterministic for a given `generator`."""
    letters = string.ascii_lowercase
    negatives = []
    for prompt in prompts:
        lengths = [len(word) for word in prompt.split()] or [5]
        draws = torch.randint(0, len(letters), (sum(lengths),), generator=generator).tolist()
        words, start = [], 0
        for length in lengths:
            words.append("".join(letters[k] for k in draws[start : start + length]))
            start += length
        negatives.append(" ".join(words))
    return negatives


class CoherenceAwarePipeline(SavedPipelineClassMixin, StepCallbackStateMixin, DiffusionPipeline):
    r"""Text-to-image with a coherence knob and coherence-aware classifier-free guidance (CA-CFG).

    Step `i` uses the diffusers scale `g_i` of `GuidanceSchedule.from_any(guidance_schedule).scales(guidance_scale,
    num_inference_steps)`. A step with `g_i > 1` runs both branches in one batch; a step with `g_i <= 1` runs the
    positive branch only (the negative pass is skipped). Step callbacks follow diffusers' protocol (`pipe.guidance_scale`,
    `pipe.num_timesteps`, `pipe._interrupt`; see `StepGuidance` for how a callback's `pipe._guidance_scale` applies).

    Args:
        vae ([`AutoencoderKL`], *optional*): decodes latents; without it the denoiser works in pixel space ([-1, 1]).
        text_encoder (`transformers.PreTrainedModel`): a text encoder returning hidden states (CLIP text, T5, ...).
        tokenizer (`transformers.PreTrainedTokenizer`): its tokenizer.
        conditioner ([`CoherenceConditioner`]): text hidden states + coherence -> the denoiser's context. Its
            `text_dim` must be the text encoder's width and its `cross_attention_dim` the denoiser's.
        denoiser (`UNet2DConditionModel`, [`TextRINModel`] or any diffusers model with the same call): predicts the noise (or v,
            as the scheduler's `prediction_type` says) from `(sample, timestep, encoder_hidden_states=...,
            encoder_attention_mask=...)`.
        scheduler ([`SchedulerMixin`]): a first-order scheduler (one model evaluation per step), e.g. DDIM.
        controlnet (`ControlNetModel`, *optional*): a ControlNet built from the UNet denoiser (storydiff's
            `ControlNetFullModel.from_unet(unet)` / `ControlNetLiteModel.from_unet(unet)` or diffusers'); every call
            then takes a `control_image`. Control and coherence are separate knobs: the ControlNet reads the same
            coherence-aware context as the UNet in each CFG branch, and both branches keep the condition image (as
            the original ControlNet's unconditional branch does). diffusers' `ControlNetModel` takes no
            `encoder_attention_mask`, so the ControlNet (not the UNet) also attends to the padded text positions of
            the context.
    """

    model_cpu_offload_seq = "text_encoder->conditioner->controlnet->denoiser->vae"
    _optional_components = ["vae", "controlnet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        text_encoder,
        tokenizer,
        conditioner: CoherenceConditioner,
        denoiser: Union[UNet2DConditionModel, TextRINModel],
        scheduler: KarrasDiffusionSchedulers,
        vae: Optional[AutoencoderKL] = None,
        controlnet: Optional[ControlNetModel] = None,
    ):
        super().__init__()
        self._check_widths(text_encoder, conditioner, denoiser)
        if controlnet is not None:
            self._check_controlnet(controlnet, conditioner, denoiser)
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, conditioner=conditioner,
                              denoiser=denoiser, scheduler=scheduler, controlnet=controlnet)  # fmt: skip
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @staticmethod
    def _check_widths(text_encoder, conditioner, denoiser) -> None:
        text_width = getattr(text_encoder.config, "hidden_size", None) or getattr(text_encoder.config, "d_model", None)
        if text_width is not None and text_width != conditioner.config.text_dim:
            raise ValueError(
                f"The text encoder gives {text_width}-wide hidden states but the conditioner was built for "
                f"text_dim={conditioner.config.text_dim}; build it with CoherenceConditioner(text_dim={text_width}, ...)."
            )
        context_width = getattr(denoiser.config, "cross_attention_dim", None)
        if isinstance(context_width, (list, tuple)):
            context_width = context_width[0] if len(set(context_width)) == 1 else None
        if context_width is not None and context_width != conditioner.config.cross_attention_dim:
            raise ValueError(
                f"The denoiser cross-attends to {context_width}-wide context but the conditioner outputs "
                f"cross_attention_dim={conditioner.config.cross_attention_dim}; build the conditioner with "
                f"cross_attention_dim={context_width}."
            )

    @staticmethod
    def _check_controlnet(controlnet, conditioner, denoiser) -> None:
        if not isinstance(controlnet, ControlNetModel):
            raise TypeError(
                "`controlnet` must be a ControlNetModel (storydiff's ControlNetFullModel / ControlNetLiteModel built "
                f"with from_unet(unet), or diffusers'), got {type(controlnet).__name__}."
            )
        if not isinstance(denoiser, UNet2DConditionModel):
            raise ValueError(
                f"A ControlNet adds residuals to a UNet's skip connections; this denoiser is a "
                f"{type(denoiser).__name__}, which has none. Use a UNet2DConditionModel denoiser, or drop the controlnet."
            )
        width = controlnet.config.cross_attention_dim
        if width != conditioner.config.cross_attention_dim:
            raise ValueError(
                f"The controlnet cross-attends to {width}-wide context but the conditioner outputs "
                f"{conditioner.config.cross_attention_dim}: build the ControlNet from this pipeline's UNet."
            )

    def prepare_control_image(self, control_image, num_prompts: int, num_images_per_prompt: int, latents, dtype):
        """`control_image` checked against the controlnet and repeated to one per image, or None without one. The
        checks run before denoising, so that a bad condition fails at once."""
        if self.controlnet is None:
            if control_image is not None:
                raise ValueError(
                    "`control_image` was given, but this pipeline has no controlnet; drop `control_image`."
                )
            return None
        if not isinstance(control_image, torch.Tensor) or control_image.ndim != 4:
            raise ValueError(
                "This pipeline has a controlnet, so it needs `control_image`: a (batch, channels, height, width) tensor "
                f"in [0, 1] at the image size, one per prompt or one for all; got {type(control_image).__name__}."
            )
        if control_image.shape[0] not in (1, num_prompts):
            raise ValueError(
                f"`control_image` has {control_image.shape[0]} images; give one per prompt ({num_prompts}) or one."
            )
        control_image = control_image.to(device=latents.device, dtype=dtype)
        if not torch.isfinite(control_image).all() or control_image.min() < 0 or control_image.max() > 1:
            raise ValueError("`control_image` must hold finite values in [0, 1] (the ControlNet's training range).")
        check_condition_size(latents[:1], control_image, self.controlnet.config)
        if control_image.shape[0] == 1:
            return control_image.expand(num_prompts * num_images_per_prompt, -1, -1, -1)
        return control_image.repeat_interleave(num_images_per_prompt, dim=0)

    @property
    def takes_self_conditioning(self) -> bool:
        """Whether the denoiser uses latent self-conditioning (storydiff's `TextRINModel` built with it)."""
        parameters = inspect.signature(type(self.denoiser).forward).parameters
        return "self_conditioning_latents" in parameters and getattr(self.denoiser.config, "self_conditioning", False)

    # ------------------------------------------------------------------------------------------------ conditioning

    def encode_prompt(
        self,
        prompt: Union[str, List[str]],
        device: Optional[torch.device] = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        random_negative_prompt: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> tuple:
        """Text hidden states and masks of the prompts and, with guidance, of the negative prompts:
        `(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_attention_mask)`, each repeated to
        `num_images_per_prompt` per prompt. The negative is the prompt itself when `negative_prompt` is None (CA-CFG's
        pure form; the text is encoded once), random strings with `random_negative_prompt=True`, else the given
        negative prompt(s). Without guidance the negatives are None."""
        device = device or self._execution_device
        prompts = self._prompt_list(prompt)
        embeds, mask = encode_text(self.tokenizer, self.text_encoder, prompts, device)
        negative_embeds = negative_mask = None
        if do_classifier_free_guidance:
            if random_negative_prompt and negative_prompt is not None:
                raise ValueError("Give either `negative_prompt` or `random_negative_prompt=True`, not both.")
            if random_negative_prompt:
                negative_embeds, negative_mask = encode_text(self.tokenizer, self.text_encoder,
                                                             random_prompts(prompts, generator), device)  # fmt: skip
            elif negative_prompt is None:
                negative_embeds, negative_mask = embeds, mask
            else:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
                if not isinstance(negatives, (list, tuple)) or not all(isinstance(n, str) for n in negatives):
                    raise TypeError("`negative_prompt` must be a string or a list of strings.")
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or as many."
                    )
                negative_embeds, negative_mask = encode_text(self.tokenizer, self.text_encoder, negatives, device)

        def repeat(tensor):
            return None if tensor is None else tensor.repeat_interleave(num_images_per_prompt, dim=0)

        return repeat(embeds), repeat(mask), repeat(negative_embeds), repeat(negative_mask)

    def condition(self, text_embeds: torch.Tensor, text_attention_mask: torch.Tensor, coherence) -> tuple:
        """`(encoder_hidden_states, encoder_attention_mask)` for the denoiser: the conditioner's output for these
        texts at coherence `coherence` (a float or one value per text)."""
        output = self.conditioner(text_embeds.to(self.conditioner.dtype), coherence, text_attention_mask)
        return output.encoder_hidden_states.to(self.denoiser.dtype), output.encoder_attention_mask

    @staticmethod
    def drop_padding(context: torch.Tensor, context_mask: torch.Tensor) -> tuple:
        """The context without the positions that are padding in every row, and its mask (None once no padding is
        left). The denoiser gives masked positions a weight of exactly 0, so this changes nothing but the cost: a
        short caption padded to the tokenizer's length would otherwise be attended over at full length, and a mask
        keeps attention off its fastest kernels."""
        keep = context_mask.bool().any(dim=0)
        context, context_mask = context[:, keep], context_mask[:, keep]
        return context, (None if context_mask.bool().all() else context_mask)

    # ------------------------------------------------------------------------------------------------------ checks

    @staticmethod
    def _prompt_list(prompt) -> List[str]:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {prompt!r}.")
        return list(prompts)

    @staticmethod
    def _coherence_list(name: str, value, num_prompts: int) -> List[float]:
        """One checked coherence per prompt from a float or a list with one value per prompt."""
        if isinstance(value, bool):
            raise TypeError(f"`{name}` must be a float in [0, 1] or a list of them, got a bool.")
        values = [value] * num_prompts if isinstance(value, (int, float)) else value
        if torch.is_tensor(values):
            values = values.reshape(-1).tolist()
        if not isinstance(values, (list, tuple)):
            raise TypeError(f"`{name}` must be a float in [0, 1] or a list with one per prompt, got {value!r}.")
        if len(values) != num_prompts:
            raise ValueError(f"`{name}` has {len(values)} values for {num_prompts} prompts; give one or as many.")
        try:
            return check_coherence([float(v) for v in values]).tolist()
        except ValueError as error:
            raise ValueError(f"`{name}`: {error}") from None
        except TypeError:
            raise TypeError(f"`{name}` must hold numbers, got {values!r}.") from None

    def check_inputs(self, num_images_per_prompt, num_inference_steps, height, width, output_type, tensor_inputs):
        for name, value in (("num_images_per_prompt", num_images_per_prompt), ("num_inference_steps", num_inference_steps)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        multiple = self.vae_scale_factor * getattr(self.denoiser.config, "patch_size", 1)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"`{name}` must be a positive multiple of {multiple}, got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_callback_tensor_inputs(tensor_inputs, self._callback_tensor_inputs)

    # -------------------------------------------------------------------------------------------------- sampling

    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None, scheduler=None):
        """Starting noise `(images, channels, height / f, width / f)`, times the scheduler's `init_noise_sigma`."""
        shape = (batch_size, self.denoiser.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # fmt: skip
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = check_latents(latents, shape).to(device=device, dtype=dtype)
        return latents * (scheduler or self.scheduler).init_noise_sigma

    def _denoise(
        self, model_input, timestep, context, context_mask, self_conditioning, control=None, control_scale=1.0
    ):
        """One denoiser call (with the ControlNet's residuals when there is a control image); returns
        `(prediction, latents for self-conditioning or None)`."""
        timesteps = timestep.reshape(-1)[:1].to(model_input.device).expand(model_input.shape[0])
        kwargs = {"encoder_hidden_states": context, "encoder_attention_mask": context_mask}
        if control is not None:
            down, mid = self.controlnet(model_input, timesteps, encoder_hidden_states=context, controlnet_cond=control,
                                        conditioning_scale=control_scale, return_dict=False)  # fmt: skip
            kwargs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        if self_conditioning is not None:
            output = self.denoiser(model_input, timesteps, self_conditioning_latents=self_conditioning, **kwargs)
            return output.sample, output.latents
        return self.denoiser(model_input, timesteps, **kwargs).sample, None

    def decode_latents(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        if self.vae is not None:
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        else:
            images = latents
        return self.image_processor.postprocess(images, output_type=output_type)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str]],
        coherence: Union[float, Sequence[float]] = 1.0,
        negative_coherence: Union[float, Sequence[float]] = 0.0,
        negative_prompt: Optional[Union[str, List[str]]] = None,
        random_negative_prompt: bool = False,
        guidance_scale: float = 4.0,
        guidance_schedule: GuidanceScheduleLike = "static",
        num_inference_steps: int = 50,
        num_images_per_prompt: int = 1,
        height: Optional[int] = None,
        width: Optional[int] = None,
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
    ) -> Union[CoherenceAwarePipelineOutput, tuple]:
        r"""Generate images for `prompt` at coherence `coherence`, with CA-CFG.

        Args:
            prompt (`str` or `list[str]`): the prompts.
            coherence (`float` or `list[float]`, defaults to 1.0): the positive branch's c in [0, 1], one for all
                prompts or one per prompt. 1 asks for images the prompt describes fully, 0 for images it need not.
            negative_coherence (`float` or `list[float]`, defaults to 0.0): the negative branch's c.
            negative_prompt (`str` or `list[str]`, *optional*): the negative branch's text. None: the prompt itself
                (the paper's pure CA-CFG; the branches then differ in coherence only). `""` is the authors' empty-prompt
                option and what a model trained with condition dropout (`baseline` mode) expects.
            random_negative_prompt (`bool`, defaults to False): random strings as the negative text (the authors'
                default), drawn from `generator` (the first one, for a list).
            guidance_scale (`float`, defaults to 4.0): diffusers' g = 1 + w; the authors' cfg value w is
                `guidance_scale - 1`. `g <= 1` turns guidance off with the static schedule.
            guidance_schedule (`str`, `GuidanceSchedule`, list of scales or callable, defaults to `"static"`): how g
                varies over the steps (see [`GuidanceSchedule`]); steps with `g_i <= 1` skip the negative pass.
            num_inference_steps (`int`, defaults to 50), num_images_per_prompt (`int`, defaults to 1).
            height, width (`int`, *optional*): image size; defaults to the denoiser's `sample_size` times the VAE's
                scale factor.
            generator, latents, eta, output_type, return_dict, callback_on_step_end,
            callback_on_step_end_tensor_inputs: as in diffusers' pipelines (`generator` lists need one per image;
                `output_type` one of "pil", "np", "pt", "latent").
            control_image (`torch.Tensor`, *optional*): with a `controlnet` (required then, refused without): the
                condition, `(batch, channels, height, width)` in [0, 1] at the image size, one per prompt or one for all.
            controlnet_conditioning_scale (`float`, defaults to 1.0): multiplies the ControlNet's residuals.

        Returns:
            [`CoherenceAwarePipelineOutput`] or a tuple `(images, coherence)`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        sample_size = self.denoiser.config.sample_size
        sample_height, sample_width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        height = height or sample_height * self.vae_scale_factor
        width = width or sample_width * self.vae_scale_factor
        self.check_inputs(num_images_per_prompt, num_inference_steps, height, width, output_type,
                          callback_on_step_end_tensor_inputs)  # fmt: skip
        prompts = self._prompt_list(prompt)
        positive_coherence = self._coherence_list("coherence", coherence, len(prompts))
        negative_coherence = self._coherence_list("negative_coherence", negative_coherence, len(prompts))
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        schedule = GuidanceSchedule.from_any(guidance_schedule)
        scales = schedule.scales(guidance_scale, num_inference_steps)
        guided = bool((scales > 1).any())
        batch_size = len(prompts) * num_images_per_prompt
        check_generator(generator, batch_size)
        device = self._execution_device
        dtype = self.denoiser.dtype
        check_guidance_scales(scales, dtype)

        first_generator = generator[0] if isinstance(generator, (list, tuple)) else generator
        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            prompts, device, num_images_per_prompt, guided, negative_prompt, random_negative_prompt,
            first_generator if first_generator is None or first_generator.device.type == "cpu" else None,
        )  # fmt: skip
        per_image = [c for c in positive_coherence for _ in range(num_images_per_prompt)]
        negative_per_image = [c for c in negative_coherence for _ in range(num_images_per_prompt)]
        positive_context, positive_mask = self.condition(embeds, mask, torch.tensor(per_image))
        context, context_mask = self.drop_padding(positive_context, positive_mask)
        both = {}  # [negative, positive] context and mask, made on the first guided step

        def both_branches() -> tuple:
            if not both:
                if negative_embeds is None:
                    raise ValueError(
                        "A step callback turned guidance on in a call that started without it (guidance_scale <= 1): "
                        "the negative branch was never encoded. Start with guidance_scale > 1."
                    )
                negative_context, negative_context_mask = self.condition(negative_embeds, negative_mask,
                                                                         torch.tensor(negative_per_image))  # fmt: skip
                both["context"], both["mask"] = self.drop_padding(torch.cat([negative_context, positive_context]),
                                                                  torch.cat([negative_context_mask, positive_mask]))  # fmt: skip
            return both["context"], both["mask"]

        # Sampling state lives in a copy of the scheduler, so that concurrent calls cannot disturb each other.
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if len(timesteps) != num_inference_steps:
            raise ValueError(
                f"The scheduler runs {len(timesteps)} model evaluations for {num_inference_steps} steps; "
                "CoherenceAwarePipeline needs a first-order scheduler (one evaluation per step), e.g. DDIM."
            )
        latents = self.prepare_latents(batch_size, height, width, dtype, device, generator, latents, scheduler)
        if isinstance(controlnet_conditioning_scale, bool) or not isinstance(
            controlnet_conditioning_scale, (int, float)
        ):
            raise TypeError(f"`controlnet_conditioning_scale` must be a float, got {controlnet_conditioning_scale!r}.")
        control = self.prepare_control_image(control_image, len(prompts), num_images_per_prompt, latents, dtype)
        control_both = None if control is None else torch.cat([control, control])
        step_parameters = set(inspect.signature(scheduler.step).parameters)
        extra_step_kwargs = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_parameters}

        # Latent self-conditioning (TextRIN): each CFG branch warm-starts from its own previous latents.
        self_conditioning = None
        if self.takes_self_conditioning:
            shape = (batch_size, self.denoiser.config.num_latents, self.denoiser.config.latent_dim)
            self_conditioning = {"positive": torch.zeros(shape, device=device, dtype=dtype)}
            self_conditioning["negative"] = torch.zeros_like(self_conditioning["positive"])

        guidance = StepGuidance(schedule, scales, guidance_scale)
        self._guidance_scale = guidance.scale(0)
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        applied_scales = []
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            step_scale = guidance.scale(i)
            applied_scales.append(step_scale)
            model_input = scheduler.scale_model_input(latents, t)
            timestep = t if torch.is_tensor(t) else torch.tensor(t)
            if step_scale > 1:
                both_context, both_mask = both_branches()
                both_self_conditioning = None
                if self_conditioning is not None:
                    both_self_conditioning = torch.cat([self_conditioning["negative"], self_conditioning["positive"]])
                prediction, branch_latents = self._denoise(torch.cat([model_input, model_input]), timestep,
                                                           both_context, both_mask, both_self_conditioning,
                                                           control_both, controlnet_conditioning_scale)  # fmt: skip
                negative_prediction, positive_prediction = prediction.chunk(2)
                noise_pred = negative_prediction + step_scale * (positive_prediction - negative_prediction)
                if self_conditioning is not None:
                    self_conditioning["negative"], self_conditioning["positive"] = branch_latents.chunk(2)
            else:
                # No guidance on this step: the negative branch is not computed at all.
                positive_self_conditioning = None if self_conditioning is None else self_conditioning["positive"]
                noise_pred, branch_latents = self._denoise(model_input, timestep, context, context_mask,
                                                           positive_self_conditioning, control,
                                                           controlnet_conditioning_scale)  # fmt: skip
                if self_conditioning is not None:
                    self_conditioning["positive"] = branch_latents

            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample

            if callback_on_step_end is not None:
                callback_kwargs = {name: {"latents": latents}[name] for name in callback_on_step_end_tensor_inputs}
                self._guidance_scale = step_scale
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                guidance.after_callback(step_scale, self._guidance_scale)
                latents = callback_outputs.pop("latents", latents)

        images = self.decode_latents(latents, output_type)
        self.maybe_free_model_hooks()
        self._guidance_scales = torch.tensor(applied_scales, dtype=torch.float64)
        if not return_dict:
            return (images, per_image)
        return CoherenceAwarePipelineOutput(images=images, coherence=per_image)
