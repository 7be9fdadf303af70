"""Stable Diffusion with a classifier-free guidance weight schedule (Wang et al., TMLR 2024).

`DynamicCFGStableDiffusionPipeline` is the stock `StableDiffusionPipeline` with one more `__call__` argument,
`guidance_schedule`. It loads any Stable Diffusion checkpoint, directly or through `custom_pipeline=`:

```py
>>> import storydiff
>>> from diffusers import DiffusionPipeline

>>> pipe = DiffusionPipeline.from_pretrained(
...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
...     custom_pipeline=storydiff.custom_pipeline_path("dynamic_cfg_stable_diffusion"),
...     trust_remote_code=True,
... )
>>> image = pipe("a photo of an astronaut riding a horse", guidance_scale=7.5, guidance_schedule="linear").images[0]
```
"""

from typing import Any, Callable, Optional

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
    StableDiffusionPipeline,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils import deprecate, is_torch_xla_available

from storydiff.pipeline_checks import check_generator, check_guidance_scales, check_latents
from storydiff.pipeline_mixins import SavedAsStockPipelineMixin
from storydiff.schedulers.guidance_schedule import (
    GuidanceSchedule,
    GuidanceScheduleLike,
    StepGuidance,
    conditional_half,
    schedule_step_indices,
)

if is_torch_xla_available():
    import torch_xla.core.xla_model as xm

    XLA_AVAILABLE = True
else:
    XLA_AVAILABLE = False


class DynamicCFGStableDiffusionPipeline(SavedAsStockPipelineMixin, StableDiffusionPipeline):
    r"""[`StableDiffusionPipeline`] with a per-step classifier-free guidance weight schedule.

    The only new `__call__` argument is `guidance_schedule` (a kind name such as `"linear"` or `"cosine"`, a
    [`~storydiff.GuidanceSchedule`], a list of per-step scales, or a callable; default `"static"`). Step `i` uses the
    diffusers scale `g_i = 1 + w_i` from `GuidanceSchedule.scales(guidance_scale, num_inference_steps)`.

    - With the `static` schedule the output is identical to [`StableDiffusionPipeline`] for the same inputs.
    - Whether the loop batches an unconditional half is decided from `guidance_scale` exactly as in the stock
      pipeline. On any step where `g_i == 1` (`w_i == 0`) the unconditional half is not computed at all: the UNet
      runs on the conditional batch only, so a schedule with `k` zero-weight steps out of `N` costs `(2N - k)/(2N)`
      of static CFG in denoiser evaluations.
    - `guidance_rescale` applies on guided steps only (it is the identity on unguided ones).
    - The scales used by the last call are available as [`guidance_scales`].

    Everything else (components, loaders for LoRA / textual inversion / IP-Adapter / single files, attention
    processors, offloading, `callback_on_step_end`) is inherited from [`StableDiffusionPipeline`].
    """

    @property
    def guidance_scales(self) -> Optional[torch.Tensor]:
        """Per-step diffusers guidance scales `g_i` (float64, step 0 the noisiest) of the last call, or None before
        the first call. With classifier-free guidance on (`guidance_scale > 1`), steps with scale 1 ran without
        the unconditional pass."""
        return getattr(self, "_guidance_scales", None)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        guidance_schedule: GuidanceScheduleLike = "static",
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation. All arguments but `guidance_schedule` are those of
        [`StableDiffusionPipeline.__call__`] and behave the same.

        Args:
            guidance_schedule (`str`, [`~storydiff.GuidanceSchedule`], `list[float]` or `callable`, defaults to `"static"`):
                How the guidance weight `w = guidance_scale - 1` is spread over the denoising steps: a kind name
                (`static`, `linear`, `invlinear`, `cosine`, `sine`, `v-shape`, `lambda-shape`; the parametrised kinds
                `pcs`, `clamp-linear`, `clamp-cosine` and `interval` need a `GuidanceSchedule` with their parameter),
                a `GuidanceSchedule`, a list of per-step diffusers scales `g_i >= 1` (one per step, step 0 the
                noisiest; `guidance_scale` then only decides whether CFG batching is on), or a callable
                `(step_index, num_inference_steps, guidance_scale) -> g_i`. Steps run from the noisiest
                (`s_i = i / (N - 1) = 0`, paper time `t = T`) to the cleanest; increasing kinds (`linear`, `cosine`)
                start at `w_0 = 0`, so their first step skips the unconditional pass.

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`: as the stock pipeline.

        Examples:
            ```py
            >>> from storydiff import DynamicCFGStableDiffusionPipeline, GuidanceSchedule

            >>> pipe = DynamicCFGStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
            >>> schedule = GuidanceSchedule("clamp-linear", clamp=2.0)
            >>> image = pipe("a corgi on the beach", guidance_scale=7.5, guidance_schedule=schedule).images[0]
            >>> pipe.guidance_scales[:3]  # the scales that were used, step 0 first
            ```
        """

        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider using `callback_on_step_end`",
            )

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        if not height or not width:
            height = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[0]
            )
            width = (
                self.unet.config.sample_size
                if self._is_unet_config_sample_size_int
                else self.unet.config.sample_size[1]
            )
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
        # to deal with lora scaling and other possible forward hooks

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            height,
            width,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            callback_on_step_end_tensor_inputs,
        )
        # Parse the schedule before any work: an unknown kind or a bad parameter fails here.
        guidance_schedule = GuidanceSchedule.from_any(guidance_schedule)
        check_latents(latents)

        self._guidance_scale = guidance_scale
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        if prompt is not None and isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None and isinstance(prompt, list):
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]

        check_generator(generator, batch_size * num_images_per_prompt)

        device = self._execution_device

        # 3. Encode input prompt
        lora_scale = (
            self.cross_attention_kwargs.get("scale", None) if self.cross_attention_kwargs is not None else None
        )

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # For classifier free guidance, we need to do two forward passes.
        # Here we concatenate the unconditional and text embeddings into a single batch
        # to avoid doing two forward passes
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds])

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 4. Prepare timesteps
        timestep_device = device
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )

        # 4.1 Per-step guidance scales g_i and the schedule step of every denoiser evaluation
        guidance_scales = self._prepare_guidance_scales(guidance_schedule, guidance_scale, num_inference_steps)
        step_indices = schedule_step_indices(timesteps, num_inference_steps, self.scheduler.order)
        guidance = StepGuidance(guidance_schedule, guidance_scales, guidance_scale)

        # 5. Prepare latent variables
        num_channels_latents = self.unet.config.in_channels
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            num_channels_latents,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 6.1 Add image embeds for IP-Adapter
        added_cond_kwargs = (
            {"image_embeds": image_embeds}
            if (ip_adapter_image is not None or ip_adapter_image_embeds is not None)
            else None
        )

        # 6.2 Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # StepGuidance applies storydiff's one rule for callbacks that change `pipe._guidance_scale`: under the
                # static schedule their value wins (as with the stock pipeline), under others only <= 1 (guidance off).
                step_guidance_scale = guidance.scale(step_indices[i])
                guide_this_step = self.do_classifier_free_guidance and step_guidance_scale != 1

                if guide_this_step:
                    # expand the latents: the batch holds the unconditional and the conditional half
                    latent_model_input = torch.cat([latents] * 2)
                    step_prompt_embeds, step_added_cond_kwargs = prompt_embeds, added_cond_kwargs
                elif self.do_classifier_free_guidance:
                    # g_i == 1: the unconditional prediction is not needed, run the conditional half only
                    latent_model_input = latents
                    step_prompt_embeds = conditional_half(prompt_embeds)
                    step_added_cond_kwargs = (
                        {"image_embeds": [conditional_half(embeds) for embeds in image_embeds]}
                        if added_cond_kwargs is not None
                        else None
                    )
                else:
                    latent_model_input = latents
                    step_prompt_embeds, step_added_cond_kwargs = prompt_embeds, added_cond_kwargs
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=step_prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=step_added_cond_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if guide_this_step:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + step_guidance_scale * (noise_pred_text - noise_pred_uncond)

                if guide_this_step and self.guidance_rescale > 0.0:
                    # Based on 3.4. in https://huggingface.co/papers/2305.08891
                    noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale=self.guidance_rescale)

                # compute the previous noisy sample x_t -> x_t-1
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    guidance_scale_seen = self._guidance_scale
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    guidance.after_callback(guidance_scale_seen, self._guidance_scale)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[
                0
            ]
            image, has_nsfw_concept = self.run_safety_checker(image, device, prompt_embeds.dtype)
        else:
            image = latents
            has_nsfw_concept = None

        if has_nsfw_concept is None:
            do_denormalize = [True] * image.shape[0]
        else:
            do_denormalize = [not has_nsfw for has_nsfw in has_nsfw_concept]
        if XLA_AVAILABLE:
            xm.mark_step()
        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)

        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    def _prepare_guidance_scales(
        self, guidance_schedule: GuidanceSchedule, guidance_scale: float, num_inference_steps: int
    ) -> torch.Tensor:
        """The schedule's per-step scales for this call, checked against what the pipeline can apply."""
        guidance_scales = guidance_schedule.scales(guidance_scale, num_inference_steps)
        if not guidance_schedule.is_static and not self.do_classifier_free_guidance and (guidance_scales != 1).any():
            reason = (
                "the UNet is guidance-distilled (`time_cond_proj_dim` is set), so it runs without CFG"
                if self.unet.config.time_cond_proj_dim is not None
                else f"guidance_scale={guidance_scale} <= 1 turns classifier-free guidance off"
            )
            raise ValueError(
                f"The {guidance_schedule.config.kind!r} guidance schedule asks for scales above 1, but {reason}. "
                "Pass guidance_scale > 1 to enable CFG, or use the 'static' schedule."
            )
        check_guidance_scales(guidance_scales, self.unet.dtype)
        self._guidance_scales = guidance_scales
        return guidance_scales
