"""Text-to-video with a Video LDM (`storydiff.VideoLDMUNet`: an image LDM with temporal layers), classifier-free
guidance with guidance schedules, and conditioning on known frames by reconstruction guidance.

Known frames (`conditioning_frames` at `conditioning_frame_indices`) give interpolation between key frames and
block-autoregressive extension with one model. Two ways to condition (Ho et al., "Video Diffusion Models", 2022):

* `"replacement"`: at every step the known frames' latents are replaced by a fresh noisy version of the known
  latents `z_a ~ q(z_t | x_a)`; the other frames only see them through the model.
* `"reconstruction_guidance"` (default): replacement plus, for the unknown frames, the model's clean estimate is
  corrected towards agreeing with the known frames:
  `x_tilde_b = x_hat_b - (w_r * alpha_t / 2) * grad_{z_b} ||x_a - x_hat_a||^2`, with `alpha_t = sqrt(alpha_bar_t)`
  and `w_r = reconstruction_guidance_scale`; the gradient runs through the denoiser inside the sampling loop.

`generate_long_video` makes videos longer than the model's window by extension or key frames + interpolation.

Usable as `VideoLDMPipeline.from_pretrained(folder)` and as `DiffusionPipeline.from_pretrained(folder,
custom_pipeline=storydiff.custom_pipeline_path("video_ldm"), trust_remote_code=True)`.
"""

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import CLIPTextModel, CLIPTokenizer

from storydiff.models.video_ldm_unet import VideoLDMUNet
from storydiff.pipeline_checks import (
    check_callback_tensor_inputs,
    check_generator,
    check_guidance_scales,
    check_latents,
)
from storydiff.pipeline_mixins import SavedPipelineClassMixin, StepCallbackStateMixin
from storydiff.schedulers.guidance_schedule import GuidanceSchedule, GuidanceScheduleLike, StepGuidance

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
CONDITIONING_MODES = ("reconstruction_guidance", "replacement")
LONG_VIDEO_METHODS = ("extend", "key_frames")


@dataclass
class VideoLDMPipelineOutput(BaseOutput):
    """Output of [`VideoLDMPipeline`].

    Args:
        frames: `np.ndarray` `(batch, frames, height, width, 3)` in [0, 1] (`output_type="np"`), a list of lists of
            PIL images (`"pil"`), a tensor `(batch, frames, 3, height, width)` in [0, 1] (`"pt"`), or the latents
            `(batch, channels, frames, height, width)` (`"latent"`).
        guidance_scales (`list[float]`): The guidance scale applied at each step, step 0 (noisiest) first.
    """

    frames: Union[np.ndarray, torch.Tensor, List[List[PIL.Image.Image]]]
    guidance_scales: List[float]


class VideoLDMPipeline(SavedPipelineClassMixin, StepCallbackStateMixin, DiffusionPipeline):
    r"""Text-to-video with a [`VideoLDMUNet`], classifier-free guidance schedules and known-frame conditioning.

    CFG follows diffusers, `eps = eps_uncond + g_i (eps_text - eps_uncond)` with `g_i` from `guidance_schedule`;
    steps with `g_i <= 1` skip the unconditional pass. Step callbacks follow diffusers' protocol (`StepGuidance`
    documents how a callback's `pipe._guidance_scale` applies, the same in every storydiff pipeline).

    Args:
        vae ([`AutoencoderKL`]): Encodes and decodes frames (frame by frame, in chunks).
        text_encoder ([`CLIPTextModel`]), tokenizer ([`CLIPTokenizer`]): The image model's text encoder.
        unet ([`VideoLDMUNet`]): The video denoiser.
        scheduler ([`SchedulerMixin`]): A first-order scheduler such as DDIM; known-frame conditioning needs a
            variance-preserving one (`alphas_cumprod`, `init_noise_sigma == 1`: DDIM, DDPM, DPM-Solver).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: VideoLDMUNet,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        if not isinstance(unet, VideoLDMUNet):
            raise TypeError(
                f"`unet` must be a storydiff VideoLDMUNet, got {type(unet).__name__}; build one from an image UNet "
                "with VideoLDMUNet.from_unet2d(unet)."
            )
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.video_processor = VideoProcessor(do_resize=False, vae_scale_factor=self.vae_scale_factor)

    # ----------------------------------------------------------------------------------------------- text

    def encode_prompt(
        self,
        prompt: Union[str, List[str], None],
        device: torch.device,
        num_videos_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Union[str, List[str], None] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
    ) -> tuple:
        """Text embeddings `(batch * num_videos_per_prompt, tokens, dim)` for the prompts and, with guidance, for the
        negative prompts (`""` by default), as Stable Diffusion encodes them."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode_text(prompts, device)
        batch = prompt_embeds.shape[0]
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [""] * batch if negative_prompt is None else negative_prompt
            negatives = [negatives] * batch if isinstance(negatives, str) else list(negatives)
            if len(negatives) != batch:
                raise ValueError(f"Got {len(negatives)} negative prompts for {batch} prompts; give one or as many.")
            negative_prompt_embeds = self._encode_text(negatives, device)
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"`negative_prompt_embeds` {tuple(negative_prompt_embeds.shape)} must have the shape of "
                f"`prompt_embeds` {tuple(prompt_embeds.shape)}."
            )
        prompt_embeds = prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device).repeat_interleave(num_videos_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(self, texts: List[str], device) -> torch.Tensor:
        ids = self.tokenizer(
            texts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids  # fmt: skip
        return self.text_encoder(ids.to(device))[0].to(self.unet.dtype)

    # ----------------------------------------------------------------------------------------------- frames

    @torch.no_grad()
    def encode_frames(self, frames, device=None) -> torch.Tensor:
        """VAE latents `(batch, channels, frames, h, w)` (the posterior mean, scaled) of pixel frames given as this
        pipeline outputs them: np `(batch, frames, H, W, 3)` in [0, 1], pt `(batch, frames, 3, H, W)` in [0, 1], a list
        of lists of PIL images, or one video (np `(frames, H, W, 3)`, a list of PIL images)."""
        video = _video_tensor(frames)  # (batch, frames, 3, H, W) in [0, 1]
        device = device or self._execution_device
        batch, count = video.shape[:2]
        pixels = (video.reshape(batch * count, *video.shape[2:]) * 2.0 - 1.0).to(device, self.vae.dtype)
        latents = torch.cat([self.vae.encode(chunk).latent_dist.mean for chunk in pixels.split(16)])
        latents = latents * self.vae.config.scaling_factor
        return latents.reshape(batch, count, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, decode_chunk_size: int = 16) -> torch.Tensor:
        """Pixel video `(batch, 3, frames, H, W)` in [-1, 1], decoding `decode_chunk_size` frames at a time."""
        batch, channels, frames = latents.shape[:3]
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, *latents.shape[3:])
        flat = flat.to(self.vae.dtype) / self.vae.config.scaling_factor
        decoded = torch.cat([self.vae.decode(chunk).sample for chunk in flat.split(decode_chunk_size)])
        return decoded.reshape(batch, frames, *decoded.shape[1:]).permute(0, 2, 1, 3, 4)

    # ----------------------------------------------------------------------------------------------- checks

    def check_inputs(self, prompt, prompt_embeds, num_frames, height, width, steps, output_type, tensor_inputs):
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("Give exactly one of `prompt` and `prompt_embeds`.")
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt)):
            raise TypeError(f"`prompt` must be a string or a non-empty list of strings, got {type(prompt).__name__}.")
        for name, value in (("num_frames", num_frames), ("num_inference_steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
        if num_frames > self.unet.config.max_frames:
            raise ValueError(
                f"`num_frames`={num_frames} is over the model's max_frames={self.unet.config.max_frames}; use "
                "`generate_long_video` for longer videos."
            )
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % self.vae_scale_factor:
                raise ValueError(f"`{name}` must be a positive multiple of {self.vae_scale_factor}, got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        check_callback_tensor_inputs(tensor_inputs, self._callback_tensor_inputs)

    def _check_conditioning(self, known, indices, batch, num_frames, latent_shape, mode, scheduler):
        """Known latents `(batch, channels, k, h, w)` and their frame indices, checked."""
        if known is None:
            if indices is not None:
                raise ValueError(
                    "`conditioning_frame_indices` needs `conditioning_frames` (or `conditioning_latents`)."
                )
            return None, None
        if mode not in CONDITIONING_MODES:
            raise ValueError(f"`conditioning_mode` must be one of {CONDITIONING_MODES}, got {mode!r}.")
        if not (hasattr(scheduler, "alphas_cumprod") and float(scheduler.init_noise_sigma) == 1.0):
            raise ValueError(
                f"Known-frame conditioning needs a variance-preserving scheduler (DDIM, DDPM, DPM-Solver); "
                f"{type(scheduler).__name__} is not."
            )
        count = known.shape[2]
        if indices is None:
            indices = list(range(count))  # extension: the known frames come first
        indices = [int(i) for i in indices]
        if len(indices) != count:
            raise ValueError(f"Got {count} conditioning frames but {len(indices)} `conditioning_frame_indices`.")
        if len(set(indices)) != count or not all(0 <= i < num_frames for i in indices):
            raise ValueError(
                f"`conditioning_frame_indices` must be distinct frame indices in 0..{num_frames - 1}, got {indices}."
            )
        if count >= num_frames:
            raise ValueError(f"All {num_frames} frames are given: nothing is left to generate.")
        if known.shape[0] == 1 and batch > 1:
            known = known.expand(batch, *known.shape[1:])
        expected = (batch, latent_shape[1], count, *latent_shape[3:])
        if tuple(known.shape) != expected:
            raise ValueError(
                f"The conditioning frames encode to latents of shape {tuple(known.shape)}, this call needs {expected} "
                "(one video of known frames, or one per generated video, at the call's height and width)."
            )
        return known, indices

    # ----------------------------------------------------------------------------------------------- sampling

    def _guided_prediction(self, latents, t, embeds, negative, scale, scheduler):
        model_input = scheduler.scale_model_input(latents, t)
        if scale > 1:
            both = self.unet(torch.cat([model_input, model_input]), t, torch.cat([negative, embeds])).sample
            uncond, cond = both.chunk(2)
            return uncond + scale * (cond - uncond)
        return self.unet(model_input, t, embeds).sample

    @staticmethod
    def _as_x0_and_eps(output, latents, alpha_bar, prediction_type):
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        if prediction_type == "epsilon":
            return (latents - s * output) / a, output
        if prediction_type == "v_prediction":
            return a * latents - s * output, s * latents + a * output
        if prediction_type == "sample":
            return output, (latents - a * output) / s
        raise ValueError(f"Unsupported prediction_type {prediction_type!r}.")

    @staticmethod
    def _as_model_output(x0, eps, alpha_bar, prediction_type):
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "v_prediction":
            return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0
        return x0

    def _conditioned_step_output(self, latents, t, embeds, negative, scale, scheduler, known, indices, mode, w_r):
        """The denoiser output for one step with known frames: replacement, plus reconstruction guidance."""
        prediction_type = scheduler.config.prediction_type
        alpha_bar = scheduler.alphas_cumprod.to(latents.device)[int(t)].to(latents.dtype)
        if mode == "replacement" or w_r == 0:
            return self._guided_prediction(latents, t, embeds, negative, scale, scheduler)
        with torch.enable_grad():
            z = latents.detach().requires_grad_(True)
            output = self._guided_prediction(z, t, embeds, negative, scale, scheduler)
            x0, _ = self._as_x0_and_eps(output, z, alpha_bar, prediction_type)
            error = (known - x0[:, :, indices]).float().square().sum()
            (gradient,) = torch.autograd.grad(error, z)
        output, x0 = output.detach(), x0.detach()
        unknown = torch.ones(latents.shape[2], device=latents.device, dtype=latents.dtype)
        unknown[indices] = 0
        x0 = x0 - (w_r * alpha_bar.sqrt() / 2) * gradient.to(x0.dtype) * unknown[None, None, :, None, None]
        # the corrected clean estimate, as the noise (or v) the scheduler expects, for the same latents
        eps = (latents - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return self._as_model_output(x0, eps, alpha_bar, prediction_type)

    # ----------------------------------------------------------------------------------------------- call

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, List[str], None] = None,
        num_frames: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_schedule: GuidanceScheduleLike = "static",
        negative_prompt: Union[str, List[str], None] = None,
        num_videos_per_prompt: int = 1,
        eta: float = 0.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        latents: Optional[torch.Tensor] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
        negative_prompt_embeds: Optional[torch.Tensor] = None,
        conditioning_frames=None,
        conditioning_latents: Optional[torch.Tensor] = None,
        conditioning_frame_indices: Optional[Sequence[int]] = None,
        conditioning_mode: str = "reconstruction_guidance",
        reconstruction_guidance_scale: float = 2.0,
        decode_chunk_size: int = 16,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Optional[
            Union[Callable[[Any, int, Any, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]
        ] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> Union[VideoLDMPipelineOutput, tuple]:
        r"""Generate videos.

        Args:
            prompt: One prompt or a list (or give `prompt_embeds`).
            num_frames: Frames per video; the model's `num_frames` by default.
            height, width: In pixels; the UNet's `sample_size` times the VAE factor by default.
            num_inference_steps, guidance_scale, guidance_schedule, negative_prompt, eta, generator: As in diffusers'
                Stable Diffusion pipeline; `guidance_scale` is `g = 1 + w` and `guidance_schedule` any
                [`GuidanceSchedule`].
            num_videos_per_prompt: Videos per prompt; a list of generators needs one per video.
            latents: Starting noise `(batch, channels, frames, h, w)`.
            conditioning_frames: Known frames in pixels (np `(batch, k, H, W, 3)` or `(k, H, W, 3)` in [0, 1], pt
                `(batch, k, 3, H, W)`, lists of PIL images): one video for all, or one per generated video.
            conditioning_latents: The known frames as latents `(batch or 1, channels, k, h, w)` instead (for chaining
                calls with `output_type="latent"`).
            conditioning_frame_indices: Where the known frames go; `0..k-1` (extension) by default. Interpolation:
                e.g. `[0, num_frames - 1]`.
            conditioning_mode: `"reconstruction_guidance"` (default) or `"replacement"`.
            reconstruction_guidance_scale: `w_r` of the reconstruction guidance.
            decode_chunk_size: Frames the VAE decodes at once.
            output_type: `"np"` (default), `"pil"`, `"pt"` or `"latent"`.
            callback_on_step_end, callback_on_step_end_tensor_inputs: diffusers' step-callback protocol.

        Example:
            ```py
            >>> from storydiff import VideoLDMPipeline
            >>> from storydiff.checkpoints import video_ldm_pipeline
            >>> from diffusers.utils import export_to_gif
            >>> pipe = video_ldm_pipeline()  # or VideoLDMPipeline.from_pretrained(folder)
            >>> video = pipe("a large red 3 moves slowly to the left", num_inference_steps=25,
            ...              guidance_scale=4.0, generator=torch.manual_seed(0), output_type="pil").frames[0]
            >>> export_to_gif(video, "red_3.gif")
            ```
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = list(callback_on_step_end_tensor_inputs)
        num_frames = num_frames or self.unet.config.num_frames
        sample_size = self.unet.unet.config.sample_size
        sample_size = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        height = height or sample_size[0] * self.vae_scale_factor
        width = width or sample_size[1] * self.vae_scale_factor
        self.check_inputs(prompt, prompt_embeds, num_frames, height, width, num_inference_steps, output_type, tensor_inputs)  # fmt: skip
        if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) or num_videos_per_prompt < 1:  # fmt: skip
            raise ValueError(f"`num_videos_per_prompt` must be a positive int, got {num_videos_per_prompt!r}.")
        if conditioning_frames is not None and conditioning_latents is not None:
            raise ValueError("Give `conditioning_frames` or `conditioning_latents`, not both.")

        device = self._execution_device
        schedule = GuidanceSchedule.from_any(guidance_schedule)
        scales = schedule.scales(guidance_scale, num_inference_steps)
        check_guidance_scales(scales, self.unet.dtype)
        uses_guidance = bool((scales > 1).any()) or schedule.is_static
        embeds, negative = self.encode_prompt(
            prompt,
            device,
            num_videos_per_prompt,
            uses_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
        )
        batch = embeds.shape[0]
        check_generator(generator, batch)
        latent_shape = (batch, self.unet.unet.config.in_channels, num_frames,
                        height // self.vae_scale_factor, width // self.vae_scale_factor)  # fmt: skip

        scheduler = copy.deepcopy(self.scheduler)  # per-call sampling state: concurrent calls cannot collide
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if len(timesteps) != num_inference_steps:
            raise ValueError(
                f"The scheduler runs {len(timesteps)} model evaluations for {num_inference_steps} steps; "
                "VideoLDMPipeline needs a first-order scheduler (one evaluation per step), e.g. DDIM."
            )
        known = self.encode_frames(conditioning_frames, device) if conditioning_frames is not None else conditioning_latents  # fmt: skip
        if known is not None:
            known = known.to(device, self.unet.dtype)
        known, indices = self._check_conditioning(
            known, conditioning_frame_indices, batch, num_frames, latent_shape, conditioning_mode, scheduler
        )
        known_index = torch.tensor(indices or [], dtype=torch.long, device=device)
        w_r = float(reconstruction_guidance_scale)
        if not np.isfinite(w_r) or w_r < 0:
            raise ValueError(f"`reconstruction_guidance_scale` must be a finite number >= 0, got {w_r!r}.")

        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=self.unet.dtype)
        else:
            latents = check_latents(latents, latent_shape).to(device, self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _extra_step_kwargs(scheduler, generator, eta)

        guidance = StepGuidance(schedule, scales, guidance_scale)
        applied = []
        self._guidance_scale = guidance.scale(0)
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                continue
            scale = guidance.scale(i)
            applied.append(scale)
            if known is not None:
                # replacement: the known frames at this step's noise level, drawn afresh each step
                noise = randn_tensor(known.shape, generator=generator, device=device, dtype=known.dtype)
                # out of place: a callback may hold on to the previous step's latents
                latents = latents.index_copy(2, known_index, scheduler.add_noise(known, noise, t.reshape(1)))
                output = self._conditioned_step_output(
                    latents, t, embeds, negative, scale, scheduler, known, indices, conditioning_mode, w_r
                )
            else:
                output = self._guided_prediction(latents, t, embeds, negative, scale, scheduler)
            latents = scheduler.step(output, t, latents, **step_kwargs).prev_sample

            if callback_on_step_end is not None:
                available = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
                self._guidance_scale = scale
                outputs = callback_on_step_end(self, i, t, {name: available[name] for name in tensor_inputs}) or {}
                guidance.after_callback(scale, self._guidance_scale)
                latents = outputs.pop("latents", latents)
                embeds = outputs.pop("prompt_embeds", embeds)
                negative = outputs.pop("negative_prompt_embeds", negative)

        if known is not None:
            latents = latents.index_copy(2, known_index, known)  # the known frames are given, not generated
        if output_type == "latent":
            frames = latents
        else:
            frames = self.video_processor.postprocess_video(
                self.decode_latents(latents, decode_chunk_size), output_type
            )
        self.maybe_free_model_hooks()
        self._guidance_scales = torch.tensor(applied, dtype=torch.float64)
        if not return_dict:
            return (frames, applied)
        return VideoLDMPipelineOutput(frames=frames, guidance_scales=applied)

    # ----------------------------------------------------------------------------------------------- long videos

    @torch.no_grad()
    def generate_long_video(
        self,
        prompt: Union[str, List[str]],
        num_frames: int,
        method: str = "extend",
        overlap: int = 2,
        window: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "np",
        **call_kwargs,
    ):
        """A video of `num_frames` (more than the model's window) from windows of `window` frames.

        * `"extend"`: block-autoregressive; each next window is conditioned on the last `overlap` frames so far
          (at its first positions) and adds `window - overlap` frames.
        * `"key_frames"`: one window of key frames, then each pair of neighbouring key frames is the first and last
          frame of an interpolation window (the Video LDM stack): `(keys - 1) * (window - 1) + 1` frames, as many
          key frames as needed, trimmed to `num_frames`.

        Other keyword arguments go to every `__call__` (guidance, steps, conditioning mode ...). Returns frames like
        `__call__` with `output_type`.
        """
        window = window or self.unet.config.num_frames
        if method not in LONG_VIDEO_METHODS:
            raise ValueError(f"`method` must be one of {LONG_VIDEO_METHODS}, got {method!r}.")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` must be a positive int, got {num_frames!r}.")
        if not isinstance(overlap, int) or not 1 <= overlap < window:
            raise ValueError(f"`overlap` must be an int in 1..{window - 1}, got {overlap!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        for name in ("num_frames", "conditioning_frames", "conditioning_latents", "conditioning_frame_indices"):
            if name in call_kwargs:
                raise ValueError(f"`{name}` is set by generate_long_video itself.")

        def run(count, **kwargs):
            return self(prompt, num_frames=count, generator=generator, output_type="latent", **call_kwargs, **kwargs).frames  # fmt: skip

        if method == "extend":
            video = run(min(window, num_frames))
            while video.shape[2] < num_frames:
                new = run(window, conditioning_latents=video[:, :, -overlap:])[:, :, overlap:]
                video = torch.cat([video, new], dim=2)
        else:
            keys_needed = -(-(num_frames - 1) // (window - 1)) + 1
            if keys_needed > self.unet.config.max_frames:
                raise ValueError(f"{num_frames} frames need {keys_needed} key frames, over max_frames.")
            keys = run(max(keys_needed, 2))
            pieces = [keys[:, :, :1]]
            for k in range(keys.shape[2] - 1):
                pair = keys[:, :, k : k + 2]
                middle = run(window, conditioning_latents=pair, conditioning_frame_indices=[0, window - 1])
                pieces.append(middle[:, :, 1:])
            video = torch.cat(pieces, dim=2)
        video = video[:, :, :num_frames]
        if output_type == "latent":
            return video
        return self.video_processor.postprocess_video(self.decode_latents(video), output_type)


def _extra_step_kwargs(scheduler, generator, eta) -> dict:
    parameters = set(inspect.signature(scheduler.step).parameters)
    extra = {}
    if "eta" in parameters:
        extra["eta"] = eta
    if "generator" in parameters:
        extra["generator"] = generator
    return extra


def _video_tensor(frames) -> torch.Tensor:
    """Known frames as a float tensor `(batch, frames, 3, H, W)` in [0, 1]."""
    if isinstance(frames, PIL.Image.Image):
        frames = [frames]
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("`conditioning_frames` is empty.")
        videos = [frames] if isinstance(frames[0], PIL.Image.Image) else list(frames)
        arrays = []
        for video in videos:
            if not all(isinstance(frame, PIL.Image.Image) for frame in video):
                raise TypeError("`conditioning_frames` as a list must hold PIL images or lists of PIL images.")
            arrays.append(np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) / 255.0 for frame in video]))
        if len({array.shape for array in arrays}) != 1:
            raise ValueError("Every conditioning video must have the same number and size of frames.")
        return torch.from_numpy(np.stack(arrays)).permute(0, 1, 4, 2, 3)
    if isinstance(frames, np.ndarray):
        array = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
        if array.ndim == 4:
            array = array[None]
        if array.ndim != 5 or array.shape[-1] != 3:
            raise ValueError(
                f"`conditioning_frames` as an array must be (batch, frames, H, W, 3) or (frames, H, W, 3), got shape "
                f"{frames.shape}."
            )
        tensor = torch.from_numpy(array).permute(0, 1, 4, 2, 3)
    elif isinstance(frames, torch.Tensor):
        tensor = frames.float()
        if tensor.ndim == 4:
            tensor = tensor[None]
        if tensor.ndim != 5 or tensor.shape[2] != 3:
            raise ValueError(
                f"`conditioning_frames` as a tensor must be (batch, frames, 3, H, W) in [0, 1], got shape "
                f"{tuple(frames.shape)}."
            )
    else:
        raise TypeError(
            f"`conditioning_frames` must be a numpy array, a torch tensor or PIL images, got {type(frames).__name__}."
        )
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError("`conditioning_frames` must be finite and in [0, 1] (uint8 arrays are read as 0..255).")
    return tensor
