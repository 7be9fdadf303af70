"""Stable Diffusion XL with a classifier-free guidance weight schedule (Wang et al., TMLR 2024).

`DynamicCFGStableDiffusionXLPipeline` is the stock `StableDiffusionXLPipeline` with one more `__call__` argument,
`guidance_schedule`. It loads any SDXL checkpoint, directly or through `custom_pipeline=`:

```py
>>> import storydiff
>>> from diffusers import DiffusionPipeline

>>> pipe = DiffusionPipeline.from_pretrained(
...     "stabilityai/stable-diffusion-xl-base-1.0",
...     custom_pipeline=storydiff.custom_pipeline_path("dynamic_cfg_stable_diffusion_xl"),
...     trust_remote_code=True,
... )
>>> schedule = storydiff.GuidanceSchedule("clamp-linear", clamp=4.0)  # the paper's best SDXL setting
>>> image = pipe("an astronaut riding a horse", guidance_scale=5.0, guidance_schedule=schedule).images[0]
```
"""

from typing import Any, Callable, Optional

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
    rescale_noise_cfg,
    retrieve_timesteps,
)
from diffusers.utils import deprecate, is_torch_xla_available
from diffusers.utils.torch_utils import get_module_execution_device

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


class DynamicCFGStableDiffusionXLPipeline(SavedAsStockPipelineMixin, StableDiffusionXLPipeline):
    r"""[`StableDiffusionXLPipeline`] with a per-step classifier-free guidance weight schedule.

    The only new `__call__` argument is `guidance_schedule` (a kind name such as `"linear"` or `"cosine"`, a
    [`~storydiff.GuidanceSchedule`], a list of per-step scales, or a callable; default `"static"`). Step `i` uses the
    diffusers scale `g_i = 1 + w_i` from `GuidanceSchedule.scales(guidance_scale, num_inference_steps)`; with
    `denoising_end` the schedule spans the steps this call actually runs.

    - With the `static` schedule the output is identical to [`StableDiffusionXLPipeline`] for the same inputs.
    - Whether the loop batches an unconditional half is decided from `guidance_scale` exactly as in the stock
      pipeline. On any step where `g_i == 1` (`w_i == 0`) the unconditional half is not computed at all: the UNet
      runs on the conditional half of the prompt embeddings, pooled embeddings, micro-conditioning time ids and
      IP-Adapter image embeddings only, so a schedule with `k` zero-weight steps out of `N` costs `(2N - k)/(2N)`
      of static CFG in denoiser evaluations.
    - `guidance_rescale` applies on guided steps only (it is the identity on unguided ones).
    - The scales used by the last call are available as [`guidance_scales`].

    Everything else (components, loaders for LoRA / textual inversion / IP-Adapter / single files, attention
    processors, offloading, `callback_on_step_end`) is inherited from [`StableDiffusionXLPipeline`].
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
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] = None,
        sigmas: list[float] = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image: PipelineImageInput | None = None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        guidance_schedule: GuidanceScheduleLike = "static",
        **kwargs,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        r"""
        Function invoked when calling the pipeline for generation. All arguments but `guidance_schedule` are those of
        [`StableDiffusionXLPipeline.__call__`] and behave the same.

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
            [`~pipelines.stable_diffusion_xl.StableDiffusionXLPipelineOutput`] or `tuple`: as the stock pipeline.

        Examples:
            ```py
            >>> from storydiff import DynamicCFGStableDiffusionXLPipeline, GuidanceSchedule

            >>> pipe = DynamicCFGStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
            >>> schedule = GuidanceSchedule("pcs", power=0.1)
            >>> image = pipe("a corgi on the beach", guidance_scale=5.0, guidance_schedule=schedule).images[0]
            >>> pipe.guidance_scales[:3]  # the scales that were used, step 0 first
            ```
        """

        callback = kwargs.pop("callback", None)
        callback_steps = kwargs.pop("callback_steps", None)

        if callback is not None:
            deprecate(
                "callback",
                "1.0.0",
                "Passing `callback` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )
        if callback_steps is not None:
            deprecate(
                "callback_steps",
                "1.0.0",
                "Passing `callback_steps` as an input argument to `__call__` is deprecated, consider use `callback_on_step_end`",
            )

        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to unet
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor

        original_size = original_size or (height, width)
        target_size = target_size or (height, width)

        # 1. Check inputs. Raise error if not correct
        self.check_inputs(
            prompt,
            prompt_2,
            height,
            width,
            callback_steps,
            negative_prompt,
            negative_prompt_2,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
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
        self._denoising_end = denoising_end
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

        (
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        ) = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=self.clip_skip,
        )

        # 4. Prepare timesteps
        is_neuron_device = device.type == "neuron"
        if XLA_AVAILABLE or is_neuron_device:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )

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

        # 7. Prepare added time ids & embeddings
        add_text_embeds = pooled_prompt_embeds
        if self.text_encoder_2 is None:
            text_encoder_projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            text_encoder_projection_dim = self.text_encoder_2.config.projection_dim

        add_time_ids = self._get_add_time_ids(
            original_size,
            crops_coords_top_left,
            target_size,
            dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=text_encoder_projection_dim,
        )
        if negative_original_size is not None and negative_target_size is not None:
            negative_add_time_ids = self._get_add_time_ids(
                negative_original_size,
                negative_crops_coords_top_left,
                negative_target_size,
                dtype=prompt_embeds.dtype,
                text_encoder_projection_dim=text_encoder_projection_dim,
            )
        else:
            negative_add_time_ids = add_time_ids

        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            add_text_embeds = torch.cat([negative_pooled_prompt_embeds, add_text_embeds], dim=0)
            add_time_ids = torch.cat([negative_add_time_ids, add_time_ids], dim=0)

        prompt_embeds = prompt_embeds.to(device)
        add_text_embeds = add_text_embeds.to(device)
        add_time_ids = add_time_ids.to(device).repeat(batch_size * num_images_per_prompt, 1)

        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image,
                ip_adapter_image_embeds,
                device,
                batch_size * num_images_per_prompt,
                self.do_classifier_free_guidance,
            )

        # 8. Denoising loop
        num_warmup_steps = max(len(timesteps) - num_inference_steps * self.scheduler.order, 0)

        # 8.1 Apply denoising_end
        if (
            self.denoising_end is not None
            and isinstance(self.denoising_end, float)
            and self.denoising_end > 0
            and self.denoising_end < 1
        ):
            discrete_timestep_cutoff = int(
                round(
                    self.scheduler.config.num_train_timesteps
                    - (self.denoising_end * self.scheduler.config.num_train_timesteps)
                )
            )
            num_inference_steps = len(list(filter(lambda ts: ts >= discrete_timestep_cutoff, timesteps)))
            timesteps = timesteps[:num_inference_steps]

        # 8.2 Per-step guidance scales g_i over the steps this call runs, and the schedule step of every evaluation
        guidance_scales = self._prepare_guidance_scales(guidance_schedule, guidance_scale, num_inference_steps)
        step_indices = schedule_step_indices(timesteps, num_inference_steps, self.scheduler.order)
        guidance = StepGuidance(guidance_schedule, guidance_scales, guidance_scale)

        # 9. Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # StepGuidance applies storydiff's one rule for callbacks that change `pipe._guidance_scale`: under the
                # static schedule their value wins (as with the stock pipeline), under others only <= 1 (guidance off).
                step_guidance_scale = guidance.scale(step_indices[i])
                guide_this_step = self.do_classifier_free_guidance and step_guidance_scale != 1

                added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
                if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
                    added_cond_kwargs["image_embeds"] = image_embeds
                if guide_this_step:
                    # expand the latents: the batch holds the unconditional and the conditional half
                    latent_model_input = torch.cat([latents] * 2)
                    step_prompt_embeds = prompt_embeds
                elif self.do_classifier_free_guidance:
                    # g_i == 1: the unconditional prediction is not needed, run the conditional half only
                    latent_model_input = latents
                    step_prompt_embeds = conditional_half(prompt_embeds)
                    added_cond_kwargs = {
                        name: [conditional_half(embeds) for embeds in value]
                        if name == "image_embeds"
                        else conditional_half(value)
                        for name, value in added_cond_kwargs.items()
                    }
                else:
                    latent_model_input = latents
                    step_prompt_embeds = prompt_embeds
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # predict the noise residual
                # [Neuron] pre-cast timestep to float32 on device. Neuron XLA does not support
                # int64 ops; the compiled UNet graph requires a float32 timestep input on-device.
                t_unet = t.to(torch.float32).to(device) if is_neuron_device else t
                noise_pred = self.unet(
                    latent_model_input,
                    t_unet,
                    encoder_hidden_states=step_prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    added_cond_kwargs=added_cond_kwargs,
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
                latents_dtype = latents.dtype
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if latents.dtype != latents_dtype:
                    if torch.backends.mps.is_available():
                        # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                        latents = latents.to(latents_dtype)

                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    guidance_scale_seen = self._guidance_scale
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    guidance.after_callback(guidance_scale_seen, self._guidance_scale)

                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    add_text_embeds = callback_outputs.pop("add_text_embeds", add_text_embeds)
                    add_time_ids = callback_outputs.pop("add_time_ids", add_time_ids)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()

        if not output_type == "latent":
            # make sure the VAE is in float32 mode, as it overflows in float16
            needs_upcasting = self.vae.dtype == torch.float16 and self.vae.config.force_upcast

            if needs_upcasting:
                self.upcast_vae()
                latents = latents.to(next(iter(self.vae.post_quant_conv.parameters())).dtype)
            elif latents.dtype != self.vae.dtype:
                if torch.backends.mps.is_available():
                    # some platforms (eg. apple mps) misbehave due to a pytorch bug: https://github.com/pytorch/pytorch/pull/99272
                    self.vae = self.vae.to(latents.dtype)

            # unscale/denormalize the latents
            # denormalize with the mean and std if available and not None
            has_latents_mean = hasattr(self.vae.config, "latents_mean") and self.vae.config.latents_mean is not None
            has_latents_std = hasattr(self.vae.config, "latents_std") and self.vae.config.latents_std is not None
            if has_latents_mean and has_latents_std:
                latents_mean = (
                    torch.tensor(self.vae.config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                )
                latents_std = (
                    torch.tensor(self.vae.config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                )
                latents = latents * latents_std / self.vae.config.scaling_factor + latents_mean
            else:
                latents = latents / self.vae.config.scaling_factor

            latents = latents.to(get_module_execution_device(self.vae))
            image = self.vae.decode(latents, return_dict=False)[0]

            # cast back to fp16 if needed
            if needs_upcasting:
                self.vae.to(dtype=torch.float16)
        else:
            image = latents

        if not output_type == "latent":
            # apply watermark if available
            if self.watermark is not None:
                image = self.watermark.apply_watermark(image)

            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return StableDiffusionXLPipelineOutput(images=image)

    # Copied from storydiff.custom_pipelines.dynamic_cfg_stable_diffusion.DynamicCFGStableDiffusionPipeline._prepare_guidance_scales
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
