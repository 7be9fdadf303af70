"""Stable Diffusion + ControlNet with a classifier-free guidance weight schedule (Wang et al., TMLR 2024).

`DynamicCFGStableDiffusionControlNetPipeline` is the stock `StableDiffusionControlNetPipeline` with one more
`__call__` argument, `guidance_schedule`. It loads any Stable Diffusion checkpoint with one or several ControlNets,
directly or through `custom_pipeline=`:

```py
>>> import storydiff
>>> from diffusers import ControlNetModel, DiffusionPipeline

>>> controlnet = ControlNetModel.from_pretrained("lllyasviel/sd-controlnet-canny")
>>> pipe = DiffusionPipeline.from_pretrained(
...     "stable-diffusion-v1-5/stable-diffusion-v1-5",
...     controlnet=controlnet,
...     custom_pipeline=storydiff.custom_pipeline_path("dynamic_cfg_stable_diffusion_controlnet"),
...     trust_remote_code=True,
... )
>>> image = pipe("a bird", image=canny_edges, guidance_scale=7.5, guidance_schedule="linear").images[0]
```
"""

from typing import Any, Callable, Optional

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.models import ControlNetModel, MultiControlNetModel
from diffusers.pipelines.controlnet.pipeline_controlnet import StableDiffusionControlNetPipeline, retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.utils import deprecate, is_torch_xla_available
from diffusers.utils.torch_utils import empty_device_cache, is_compiled_module, is_torch_version

# storydiff's ControlNet variants must be imported for diffusers to load a saved folder that names them
import storydiff.models.controlnet_variants  # noqa: F401, E402
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


class DynamicCFGStableDiffusionControlNetPipeline(SavedAsStockPipelineMixin, StableDiffusionControlNetPipeline):
    r"""[`StableDiffusionControlNetPipeline`] with a per-step classifier-free guidance weight schedule.

    The only new `__call__` argument is `guidance_schedule`, as in [`~storydiff.DynamicCFGStableDiffusionPipeline`]:
    a kind name such as `"linear"` or `"cosine"`, a [`~storydiff.GuidanceSchedule`], a list of per-step scales, or a
    callable; default `"static"`. Step `i` uses the diffusers scale `g_i = 1 + w_i` from
    `GuidanceSchedule.scales(guidance_scale, num_inference_steps)`.

    - With the `static` schedule the output is identical to [`StableDiffusionControlNetPipeline`] for the same inputs
      (one ControlNet or several, `guess_mode`, per-ControlNet scales and start / end fractions).
    - The unconditional CFG branch keeps the control hint, as in the original ControlNet: the ControlNet runs on
      both halves of the batch with the same condition image and only the text prompt differs. In `guess_mode` the
      ControlNet sees the conditional half only and the unconditional half gets no residuals (stock behaviour).
    - On any step where `g_i == 1` (`w_i == 0`) the unconditional half is not computed at all, by the UNet nor by the
      ControlNet(s): both run on the conditional batch only (latents, prompt embeddings and the control image are
      sliced alike), so a schedule with `k` zero-weight steps out of `N` saves `k / (2N)` of the UNet's and of the
      ControlNets' work under static CFG (in `guess_mode` the ControlNets already run on the conditional half only,
      so the saving is the UNet's). A callback that switches guidance off mid-run (diffusers'
      `SDCFGCutoffCallback`, or one that only sets `pipe._guidance_scale = 0`) works the same way; the stock
      pipeline fails there, its control image keeping the CFG batch.
    - Conditions with other than 3 channels (depth maps, masks, stacked hints): PIL images are converted to RGB, so
      pass a torch tensor `(B, C, H, W)` with values in `[0, 1]` whose `C` is the ControlNet's
      `config.conditioning_channels`. A mismatch raises before any denoising, as do condition, scale and
      start / end lists whose lengths do not match the number of ControlNets. (diffusers' image processor passes a
      4-channel tensor through unresized, taking it for latents: give those at the output resolution.)
    - A ControlNet whose config says `connect="mid_block"` (storydiff's mid-block-only variant) needs a UNet with a
      mid block.
    - The scales used by the last call are available as [`guidance_scales`].

    Everything else (components, loaders for LoRA / textual inversion / IP-Adapter / single files, attention
    processors, offloading, `callback_on_step_end`) is inherited from [`StableDiffusionControlNetPipeline`].
    """

    @property
    def guidance_scales(self) -> Optional[torch.Tensor]:
        """Per-step diffusers guidance scales `g_i` (float64, step 0 the noisiest) of the last call, or None before
        the first call. With classifier-free guidance on (`guidance_scale > 1`), steps with scale 1 ran without
        the unconditional pass, in the UNet and in the ControlNet(s)."""
        return getattr(self, "_guidance_scales", None)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] = None,
        image: PipelineImageInput = None,
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
        controlnet_conditioning_scale: float | list[float] = 1.0,
        guess_mode: bool = False,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (stock signature)
        guidance_schedule: GuidanceScheduleLike = "static",
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        r"""
        The call function to the pipeline for generation. All arguments but `guidance_schedule` are those of
        [`StableDiffusionControlNetPipeline.__call__`] and behave the same; `image` (the condition) must have the
        channel count of its ControlNet (`config.conditioning_channels`): PIL images become RGB, other counts are
        passed as torch tensors `(B, C, H, W)` in `[0, 1]`.

        Args:
            guidance_schedule (`str`, [`~storydiff.GuidanceSchedule`], `list[float]` or `callable`, defaults to `"static"`):
                How the guidance weight `w = guidance_scale - 1` is spread over the denoising steps: a kind name
                (`static`, `linear`, `invlinear`, `cosine`, `sine`, `v-shape`, `lambda-shape`; the parametrised kinds
                `pcs`, `clamp-linear`, `clamp-cosine` and `interval` need a `GuidanceSchedule` with their parameter),
                a `GuidanceSchedule`, a list of per-step diffusers scales `g_i >= 1` (one per step, step 0 the
                noisiest; `guidance_scale` then only decides whether CFG batching is on), or a callable
                `(step_index, num_inference_steps, guidance_scale) -> g_i`. Steps with `g_i == 1` run the UNet and
                the ControlNet(s) on the conditional half only. `control_guidance_start` / `control_guidance_end`
                decide independently of it on which steps the ControlNet(s) contribute.

        Returns:
            [`~pipelines.stable_diffusion.StableDiffusionPipelineOutput`] or `tuple`: as the stock pipeline.

        Examples:
            ```py
            >>> from storydiff import DynamicCFGStableDiffusionControlNetPipeline, GuidanceSchedule

            >>> pipe = DynamicCFGStableDiffusionControlNetPipeline.from_pretrained(
            ...     "stable-diffusion-v1-5/stable-diffusion-v1-5", controlnet=controlnet
            ... )
            >>> schedule = GuidanceSchedule("clamp-linear", clamp=2.0)
            >>> image = pipe("a bird", image=canny_edges, guidance_scale=7.5, guidance_schedule=schedule).images[0]
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

        controlnet = self.controlnet._orig_mod if is_compiled_module(self.controlnet) else self.controlnet

        # align format for control guidance
        if not isinstance(control_guidance_start, list) and isinstance(control_guidance_end, list):
            control_guidance_start = len(control_guidance_end) * [control_guidance_start]
        elif not isinstance(control_guidance_end, list) and isinstance(control_guidance_start, list):
            control_guidance_end = len(control_guidance_start) * [control_guidance_end]
        elif not isinstance(control_guidance_start, list) and not isinstance(control_guidance_end, list):
            mult = len(controlnet.nets) if isinstance(controlnet, MultiControlNetModel) else 1
            control_guidance_start, control_guidance_end = (
                mult * [control_guidance_start],
                mult * [control_guidance_end],
            )

        # 1. Check inputs. Raise error if not correct
        # The ControlNet checks come first: they give the counts and channels that the stock checks either word
        # vaguely or miss (a wrong-length `controlnet_conditioning_scale` list was silently truncated).
        self._check_controlnet_inputs(
            controlnet, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
        )
        self.check_inputs(
            prompt,
            image,
            callback_steps,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            ip_adapter_image,
            ip_adapter_image_embeds,
            controlnet_conditioning_scale,
            control_guidance_start,
            control_guidance_end,
            callback_on_step_end_tensor_inputs,
        )
        # Parse the schedule before any work: an unknown kind or a bad parameter fails here.
        guidance_schedule = GuidanceSchedule.from_any(guidance_schedule)
        check_latents(latents)

        self._guidance_scale = guidance_scale
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

        if isinstance(controlnet, MultiControlNetModel) and isinstance(controlnet_conditioning_scale, float):
            controlnet_conditioning_scale = [controlnet_conditioning_scale] * len(controlnet.nets)

        global_pool_conditions = (
            controlnet.config.global_pool_conditions
            if isinstance(controlnet, ControlNetModel)
            else controlnet.nets[0].config.global_pool_conditions
        )
        guess_mode = guess_mode or global_pool_conditions

        # 3. Encode input prompt
        text_encoder_lora_scale = (
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
            lora_scale=text_encoder_lora_scale,
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

        # 4. Prepare image
        # With CFG (and not guess mode) prepare_image stacks the condition twice, [unconditional, conditional], like
        # the embeddings: the unconditional branch keeps the control hint. Unguided steps take its conditional half.
        if isinstance(controlnet, ControlNetModel):
            image = self.prepare_image(
                image=image,
                width=width,
                height=height,
                batch_size=batch_size * num_images_per_prompt,
                num_images_per_prompt=num_images_per_prompt,
                device=device,
                dtype=controlnet.dtype,
                do_classifier_free_guidance=self.do_classifier_free_guidance,
                guess_mode=guess_mode,
            )
            height, width = image.shape[-2:]
        elif isinstance(controlnet, MultiControlNetModel):
            images = []

            # Nested lists as ControlNet condition
            if isinstance(image[0], list):
                # Transpose the nested image list
                image = [list(t) for t in zip(*image)]

            for image_ in image:
                image_ = self.prepare_image(
                    image=image_,
                    width=width,
                    height=height,
                    batch_size=batch_size * num_images_per_prompt,
                    num_images_per_prompt=num_images_per_prompt,
                    device=device,
                    dtype=controlnet.dtype,
                    do_classifier_free_guidance=self.do_classifier_free_guidance,
                    guess_mode=guess_mode,
                )

                images.append(image_)

            image = images
            height, width = image[0].shape[-2:]
        else:  # the stock checks refuse other ControlNet types before this point
            raise TypeError(f"Unsupported ControlNet type {type(controlnet).__name__}.")

        # 5. Prepare timesteps
        if XLA_AVAILABLE:
            timestep_device = "cpu"
        else:
            timestep_device = device
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, timestep_device, timesteps, sigmas
        )
        self._num_timesteps = len(timesteps)

        # 5.1 Per-step guidance scales g_i and the schedule step of every denoiser evaluation
        guidance_scales = self._prepare_guidance_scales(guidance_schedule, guidance_scale, num_inference_steps)
        step_indices = schedule_step_indices(timesteps, num_inference_steps, self.scheduler.order)
        guidance = StepGuidance(guidance_schedule, guidance_scales, guidance_scale)

        # 6. Prepare latent variables
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

        # 6.5 Optionally get Guidance Scale Embedding
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_scale_tensor = torch.tensor(self.guidance_scale - 1).repeat(batch_size * num_images_per_prompt)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_scale_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        # 7. Prepare extra step kwargs. TODO: Logic should ideally just be moved out of the pipeline
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 7.1 Add image embeds for IP-Adapter
        added_cond_kwargs = (
            {"image_embeds": image_embeds}
            if ip_adapter_image is not None or ip_adapter_image_embeds is not None
            else None
        )

        # 7.2 Create tensor stating which controlnets to keep
        controlnet_keep = []
        for i in range(len(timesteps)):
            keeps = [
                1.0 - float(i / len(timesteps) < s or (i + 1) / len(timesteps) > e)
                for s, e in zip(control_guidance_start, control_guidance_end)
            ]
            controlnet_keep.append(keeps[0] if isinstance(controlnet, ControlNetModel) else keeps)

        # 8. Denoising loop
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        is_unet_compiled = is_compiled_module(self.unet)
        is_controlnet_compiled = is_compiled_module(self.controlnet)
        is_torch_higher_equal_2_1 = is_torch_version(">=", "2.1")
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue

                # Relevant thread:
                # https://dev-discuss.pytorch.org/t/cudagraphs-in-pytorch-2-0/1428
                if (is_unet_compiled and is_controlnet_compiled) and is_torch_higher_equal_2_1:
                    torch._inductor.cudagraph_mark_step_begin()

                # StepGuidance applies storydiff's one rule for callbacks that change `pipe._guidance_scale`: under the
                # static schedule their value wins (as with the stock pipeline), under others only <= 1 (guidance off).
                step_guidance_scale = guidance.scale(step_indices[i])
                guide_this_step = self.do_classifier_free_guidance and step_guidance_scale != 1

                if guide_this_step:
                    # expand the latents: the batch holds the unconditional and the conditional half
                    latent_model_input = torch.cat([latents] * 2)
                    step_prompt_embeds, step_image, step_added_cond_kwargs = prompt_embeds, image, added_cond_kwargs
                else:
                    # g_i == 1 or guidance off: only the conditional prediction is needed. Tensors stacked for CFG
                    # give their conditional half; those with one row per sample (no CFG in this call, guess mode's
                    # control image, embeddings a cut-off callback already sliced) are used as they are.
                    rows = latents.shape[0]
                    latent_model_input = latents
                    step_prompt_embeds = _conditional_rows(prompt_embeds, rows)
                    step_image = (
                        [_conditional_rows(image_, rows) for image_ in image]
                        if isinstance(image, list)
                        else _conditional_rows(image, rows)
                    )
                    step_added_cond_kwargs = (
                        {"image_embeds": [_conditional_rows(embeds, rows) for embeds in image_embeds]}
                        if added_cond_kwargs is not None
                        else None
                    )
                latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)

                # controlnet(s) inference
                if guess_mode and guide_this_step:
                    # Infer ControlNet only for the conditional batch.
                    control_model_input = latents
                    control_model_input = self.scheduler.scale_model_input(control_model_input, t)
                    controlnet_prompt_embeds = prompt_embeds.chunk(2)[1]
                else:
                    control_model_input = latent_model_input
                    controlnet_prompt_embeds = step_prompt_embeds

                if isinstance(controlnet_keep[i], list):
                    cond_scale = [c * s for c, s in zip(controlnet_conditioning_scale, controlnet_keep[i])]
                else:
                    controlnet_cond_scale = controlnet_conditioning_scale
                    if isinstance(controlnet_cond_scale, list):
                        controlnet_cond_scale = controlnet_cond_scale[0]
                    cond_scale = controlnet_cond_scale * controlnet_keep[i]

                down_block_res_samples, mid_block_res_sample = self.controlnet(
                    control_model_input,
                    t,
                    encoder_hidden_states=controlnet_prompt_embeds,
                    controlnet_cond=step_image,
                    conditioning_scale=cond_scale,
                    guess_mode=guess_mode,
                    return_dict=False,
                )

                if guess_mode and guide_this_step:
                    # Inferred ControlNet only for the conditional batch.
                    # To apply the output of ControlNet to both the unconditional and conditional batches,
                    # add 0 to the unconditional batch to keep it unchanged.
                    down_block_res_samples = [torch.cat([torch.zeros_like(d), d]) for d in down_block_res_samples]
                    mid_block_res_sample = torch.cat([torch.zeros_like(mid_block_res_sample), mid_block_res_sample])

                # predict the noise residual
                noise_pred = self.unet(
                    latent_model_input,
                    t,
                    encoder_hidden_states=step_prompt_embeds,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=self.cross_attention_kwargs,
                    down_block_additional_residuals=down_block_res_samples,
                    mid_block_additional_residual=mid_block_res_sample,
                    added_cond_kwargs=step_added_cond_kwargs,
                    return_dict=False,
                )[0]

                # perform guidance
                if guide_this_step:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + step_guidance_scale * (noise_pred_text - noise_pred_uncond)

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
                    image = callback_outputs.pop("image", image)

                # call the callback, if provided
                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
                    if callback is not None and i % callback_steps == 0:
                        step_idx = i // getattr(self.scheduler, "order", 1)
                        callback(step_idx, t, latents)

                if XLA_AVAILABLE:
                    xm.mark_step()
        # If we do sequential model offloading, let's offload unet and controlnet
        # manually for max memory savings
        if hasattr(self, "final_offload_hook") and self.final_offload_hook is not None:
            self.unet.to("cpu")
            self.controlnet.to("cpu")
            empty_device_cache()

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

        image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=do_denormalize)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image, has_nsfw_concept)

        return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw_concept)

    def _check_controlnet_inputs(
        self, controlnet, image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end
    ) -> None:
        """One condition, one scale and one start / end fraction per ControlNet, conditions with the channel count
        each ControlNet takes, and a UNet that has the block each ControlNet connects to."""
        is_multi = isinstance(controlnet, MultiControlNetModel)
        nets = list(controlnet.nets) if is_multi else [controlnet]
        count = len(nets)
        names = [f"ControlNet {k} (of {count})" for k in range(count)] if is_multi else ["The ControlNet"]

        for name, net in zip(names, nets):
            # storydiff's mid-block-only ControlNets add their one residual after the UNet's mid block; a UNet without
            # one would add it to the down path's output instead, a connection the ControlNet was not trained for.
            if getattr(net.config, "connect", "all") == "mid_block" and self.unet.mid_block is None:
                raise ValueError(
                    f"{name} connects to the UNet's mid block only (config.connect='mid_block'), but this UNet has no "
                    "mid block (mid_block_type=None): the pipeline cannot honour a mid-block-only connection. Use a "
                    "UNet with a mid block, or a ControlNet with connect='all'."
                )

        if is_multi:
            if not isinstance(image, (list, tuple)):
                raise ValueError(
                    f"{count} ControlNets need a list of {count} condition images (one per ControlNet, in the order "
                    f"of `controlnet`), got a single {type(image).__name__}."
                )
            if len(image) > 0 and all(isinstance(item, (list, tuple)) for item in image):
                # a list per prompt: [[condition for ControlNet 0, condition for ControlNet 1], ...]
                lengths = sorted({len(item) for item in image})
                if lengths != [count]:
                    raise ValueError(
                        f"`image` is a list of per-prompt lists of {' / '.join(map(str, lengths))} conditions, but "
                        f"there are {count} ControlNets: each per-prompt list needs one condition per ControlNet."
                    )
                conditions = [list(column) for column in zip(*image)]
            elif len(image) != count:
                raise ValueError(
                    f"`image` has {len(image)} conditions for {count} ControlNets: pass one condition (image or "
                    f"batch) per ControlNet, in the order of `controlnet`."
                )
            else:
                conditions = list(image)
            if (
                isinstance(controlnet_conditioning_scale, (list, tuple))
                and len(controlnet_conditioning_scale) != count
            ):
                raise ValueError(
                    f"`controlnet_conditioning_scale` has {len(controlnet_conditioning_scale)} values for {count} "
                    "ControlNets: pass one float per ControlNet, or a single float for all."
                )
        else:
            conditions = [image]

        if len(control_guidance_start) != len(control_guidance_end):
            raise ValueError(
                f"`control_guidance_start` has {len(control_guidance_start)} values but `control_guidance_end` has "
                f"{len(control_guidance_end)}: pass one (start, end) pair per ControlNet, or single floats."
            )
        if len(control_guidance_start) != count:
            raise ValueError(
                f"`control_guidance_start` / `control_guidance_end` have {len(control_guidance_start)} values for "
                f"{count} ControlNet{'s' if count > 1 else ''}: pass one per ControlNet, or a single float for all."
            )

        for name, net, condition in zip(names, nets, conditions):
            expected = getattr(net.config, "conditioning_channels", 3)
            for item in condition if isinstance(condition, (list, tuple)) else [condition]:
                channels = _condition_channels(item)
                if channels is not None and channels != expected:
                    raise ValueError(
                        f"{name} takes conditions with {expected} channels (config.conditioning_channels), but its "
                        f"condition has {channels} ({_describe_condition(item)}). PIL images are converted to RGB (3 "
                        "channels); for other channel counts pass a torch tensor (B, C, H, W) with values in [0, 1]."
                    )

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


def _conditional_rows(tensor: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """The conditional part of a tensor that may hold a CFG batch: diffusers stacks `[unconditional, conditional]`,
    so a tensor with `2 * rows` rows gives its second half; any other tensor already has one row per sample."""
    if tensor is not None and tensor.shape[0] == 2 * rows:
        return conditional_half(tensor)
    return tensor


def _condition_channels(condition) -> Optional[int]:
    """The channel count the control image processor gives `condition`, or None where it cannot be told here."""
    if isinstance(condition, PIL.Image.Image):
        return 3  # the control image processor converts PIL images to RGB
    if isinstance(condition, torch.Tensor):
        return {4: condition.shape[1], 3: condition.shape[0]}.get(condition.ndim)  # (B, C, H, W) or (C, H, W)
    if isinstance(condition, np.ndarray):
        return {4: condition.shape[-1], 3: condition.shape[-1], 2: 1}.get(condition.ndim)  # channels last
    return None


def _describe_condition(condition) -> str:
    if isinstance(condition, PIL.Image.Image):
        return f"a PIL image in mode {condition.mode}"
    return f"a {type(condition).__name__} of shape {tuple(condition.shape)}"
