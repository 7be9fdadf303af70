"""VideoLDMPipeline: equal to Stable Diffusion frame by frame while the temporal layers are at init, output types,
prompt embeddings, guidance schedules and skipped unconditional passes, step callbacks, known frames (replacement
and reconstruction guidance, checked against the paper's formula), long videos, save/load through every entry point,
and errors on bad input.

Tiny random SD components (tests/tiny_stable_diffusion.py) on 8x8 latents (16x16 pixels), 2-3 DDIM steps.
"""

import copy

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import logging as diffusers_logging
from tiny_stable_diffusion import tiny_sd_components

from storydiff import GuidanceSchedule, VideoLDMPipeline, VideoLDMPipelineOutput, VideoLDMUNet, custom_pipeline_path

LATENT, PIXELS, CHANNELS = 8, 16, 4
FRAMES, MAX_FRAMES = 3, 4


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


def perturb_temporal(unet: VideoLDMUNet, seed: int = 0, std: float = 0.3) -> None:
    """Random temporal weights, so that the video model is no longer the image model frame by frame."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.temporal_parameters().items():
            if "temporal_blender" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


def make_pipe(tmp_path, perturbed: bool = False, num_frames: int = FRAMES, **settings):
    """A VideoLDMPipeline around the tiny SD components, and the untouched SD components."""
    components = tiny_sd_components(tmp_path, sample_size=LATENT)
    unet = VideoLDMUNet.from_unet2d(
        copy.deepcopy(components["unet"]),
        temporal_attention_head_dim=4,
        num_frames=num_frames,
        max_frames=MAX_FRAMES,
        **settings,
    )
    if perturbed:
        perturb_temporal(unet)
    pipe = VideoLDMPipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=unet,
        scheduler=components["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, components


def noise(batch: int = 1, frames: int = FRAMES, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, frames, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def seed(value: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(value)


def count_batch_sizes(model) -> list:
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


# ------------------------------------------------------------------------------------------------ equal to SD


def test_equals_stable_diffusion_frame_by_frame_at_init(tmp_path):
    pipe, components = make_pipe(tmp_path)
    sd = StableDiffusionPipeline(**components, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    common = dict(guidance_scale=3.0, num_inference_steps=3)

    latents = noise()
    frames = pipe("a cat", num_frames=FRAMES, latents=latents, **common).frames
    images = sd("a cat", num_images_per_prompt=FRAMES, latents=latents[0].permute(1, 0, 2, 3), **common,
                output_type="np").images  # fmt: skip
    assert frames.shape == (1, FRAMES, PIXELS, PIXELS, 3)
    assert np.array_equal(frames[0], images)

    prompts = ["a cat", "the dog"]
    latents = noise(batch=2, seed=1)
    frames = pipe(prompts, num_frames=FRAMES, latents=latents, **common).frames
    for index, prompt in enumerate(prompts):
        images = sd(prompt, num_images_per_prompt=FRAMES, latents=latents[index].permute(1, 0, 2, 3), **common,
                    output_type="np").images  # fmt: skip
        assert np.array_equal(frames[index], images), prompt


# ------------------------------------------------------------------------------------------------ outputs


def test_output_types_and_shapes(tmp_path):
    pipe, _ = make_pipe(tmp_path)
    call = dict(prompt="a cat", num_inference_steps=2, guidance_scale=3.0)
    out = pipe(**call, generator=seed())
    assert isinstance(out, VideoLDMPipelineOutput)
    assert out.frames.shape == (1, FRAMES, PIXELS, PIXELS, 3) and out.frames.dtype == np.float32
    assert out.frames.min() >= 0.0 and out.frames.max() <= 1.0
    assert out.guidance_scales == [3.0, 3.0]

    pt = pipe(**call, generator=seed(), output_type="pt").frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, FRAMES, 3, PIXELS, PIXELS)
    np.testing.assert_allclose(pt.permute(0, 1, 3, 4, 2).numpy(), out.frames, atol=1e-6)
    pil = pipe(**call, generator=seed(), output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == FRAMES
    assert all(isinstance(image, PIL.Image.Image) and image.size == (PIXELS, PIXELS) for image in pil[0])
    latents = pipe(**call, generator=seed(), output_type="latent").frames
    assert latents.shape == (1, CHANNELS, FRAMES, LATENT, LATENT)

    frames, scales = pipe(**call, generator=seed(), num_frames=2, return_dict=False)
    assert frames.shape == (1, 2, PIXELS, PIXELS, 3) and scales == [3.0, 3.0]
    assert pipe(**call, height=8, width=12, output_type="latent").frames.shape == (1, CHANNELS, FRAMES, 4, 6)


def test_num_videos_per_prompt_and_one_generator_per_video(tmp_path):
    pipe, _ = make_pipe(tmp_path)
    call = dict(num_inference_steps=2, guidance_scale=3.0, output_type="latent")
    out = pipe(["a cat", "the dog"], num_videos_per_prompt=2, generator=[seed(i) for i in range(4)], **call).frames
    assert out.shape == (4, CHANNELS, FRAMES, LATENT, LATENT)
    # video i is the video its own generator gives alone
    alone = pipe("the dog", generator=seed(3), **call).frames
    torch.testing.assert_close(out[3:], alone, rtol=1e-5, atol=1e-5)
    alone = pipe("a cat", generator=seed(1), **call).frames
    torch.testing.assert_close(out[1:2], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(ValueError, match="list of 3 generators, but this call generates 4 samples"):
        pipe(["a cat", "the dog"], num_videos_per_prompt=2, generator=[seed(i) for i in range(3)], **call)
    with pytest.raises(ValueError, match="`num_videos_per_prompt` must be a positive int"):
        pipe("a cat", num_videos_per_prompt=0, **call)


def test_encode_prompt_reproduces_the_call(tmp_path):
    pipe, _ = make_pipe(tmp_path)
    call = dict(num_inference_steps=2, guidance_scale=3.0, latents=noise(batch=2), output_type="latent")
    expected = pipe(["a cat", "the dog"], negative_prompt="blur", **call).frames
    embeds, negative = pipe.encode_prompt(["a cat", "the dog"], torch.device("cpu"), negative_prompt="blur")
    assert embeds.shape == negative.shape == (2, pipe.tokenizer.model_max_length, 32)
    got = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, **call).frames
    assert torch.equal(got, expected)
    # without guidance no negative embedding is made
    assert pipe.encode_prompt("a cat", torch.device("cpu"), do_classifier_free_guidance=False)[1] is None


# ------------------------------------------------------------------------------------------------ guidance


@pytest.mark.parametrize(
    "schedule, guidance_scale",
    [("linear", 3.0), ([1.0, 2.5, 1.0], 7.0), ("static", 1.0), ("static", 3.0)],
)
def test_guidance_schedule_scales_and_skipped_unconditional_passes(tmp_path, schedule, guidance_scale):
    pipe, _ = make_pipe(tmp_path)
    sizes = count_batch_sizes(pipe.unet)
    out = pipe(["a cat", "the dog"], num_inference_steps=3, guidance_scale=guidance_scale,
               guidance_schedule=schedule, output_type="latent")  # fmt: skip
    expected = GuidanceSchedule.from_any(schedule).scales(guidance_scale, 3).tolist()
    assert out.guidance_scales == expected
    assert pipe.guidance_scales.tolist() == expected
    assert sizes == [4 if scale > 1 else 2 for scale in expected]  # the unet sees (videos, ...) batches
    if schedule == "static" and guidance_scale == 1.0:
        assert sizes == [2, 2, 2]
    if schedule == "linear":
        assert expected[0] == 1.0 and sizes[0] == 2


# ------------------------------------------------------------------------------------------------ callbacks


def test_step_callbacks(tmp_path):
    pipe, _ = make_pipe(tmp_path)
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, int(t), p.num_timesteps, tuple(kwargs), kwargs["latents"].shape))
        return {}

    pipe("a cat", num_inference_steps=3, callback_on_step_end=record,
         callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    timesteps = DDIMScheduler.from_config(pipe.scheduler.config)
    timesteps.set_timesteps(3)
    shape = (1, CHANNELS, FRAMES, LATENT, LATENT)
    assert seen == [(i, int(t), 3, ("latents", "prompt_embeds"), shape) for i, t in enumerate(timesteps.timesteps)]

    def replace_last(p, i, t, kwargs):
        return {"latents": torch.full_like(kwargs["latents"], 0.25)} if i == 2 else {}

    out = pipe("a cat", num_inference_steps=3, callback_on_step_end=replace_last, output_type="latent").frames
    assert torch.equal(out, torch.full(shape, 0.25))

    sizes = count_batch_sizes(pipe.unet)

    def interrupt(p, i, t, kwargs):
        p._interrupt = True
        return {}

    out = pipe("a cat", num_inference_steps=3, callback_on_step_end=interrupt, output_type="latent")
    assert len(sizes) == 1 and out.guidance_scales == [7.5]

    with pytest.raises(ValueError, match=r"has \['noise'\]; this pipeline can pass \['latents'"):
        pipe("a cat", num_inference_steps=2, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise"])


# ------------------------------------------------------------------------------------------------ known frames


def known_frames(count: int = 2, batch: int = 1) -> np.ndarray:
    return np.random.RandomState(0).rand(batch, count, PIXELS, PIXELS, 3).astype(np.float32)


@pytest.mark.parametrize("mode", ["reconstruction_guidance", "replacement"])
def test_known_frames_are_returned_as_given(tmp_path, mode):
    pipe, _ = make_pipe(tmp_path, perturbed=True, num_frames=4)
    frames, indices = known_frames(), [0, 3]
    call = dict(prompt="a cat", num_frames=4, num_inference_steps=2, guidance_scale=3.0, conditioning_frames=frames,
                conditioning_frame_indices=indices, conditioning_mode=mode)  # fmt: skip
    encoded = pipe.encode_frames(frames)
    assert encoded.shape == (1, CHANNELS, 2, LATENT, LATENT)
    latents = pipe(**call, generator=seed(), output_type="latent").frames
    assert torch.equal(latents[:, :, indices], encoded)
    pixels = pipe(**call, generator=seed()).frames
    round_trip = pipe.video_processor.postprocess_video(pipe.decode_latents(encoded), "np")
    np.testing.assert_allclose(pixels[:, indices], round_trip, atol=1e-5)
    # the same frames as a tensor, as latents, and for a batch of videos
    as_tensor = torch.from_numpy(frames).permute(0, 1, 4, 2, 3)
    assert torch.equal(pipe.encode_frames(as_tensor), encoded)
    as_bytes = (frames * 255).round().astype(np.uint8)
    as_pil = [[PIL.Image.fromarray(frame) for frame in one_video] for one_video in as_bytes]
    assert torch.equal(pipe.encode_frames(as_pil), pipe.encode_frames(as_bytes))
    assert torch.equal(pipe.encode_frames(as_pil[0]), pipe.encode_frames(as_bytes[0]))
    from_latents = pipe(**{**call, "conditioning_frames": None}, conditioning_latents=encoded, generator=seed(),
                        output_type="latent").frames  # fmt: skip
    assert torch.equal(from_latents, latents)
    two = pipe(**{**call, "prompt": ["a cat", "the dog"]}, generator=seed(), output_type="latent").frames
    assert torch.equal(two[:, :, indices], encoded.expand(2, -1, -1, -1, -1))


def test_reconstruction_guidance_zero_weight_is_replacement_and_positive_weight_differs(tmp_path):
    pipe, _ = make_pipe(tmp_path, perturbed=True, num_frames=4)
    call = dict(prompt="a cat", num_frames=4, num_inference_steps=3, guidance_scale=3.0,
                conditioning_frames=known_frames(), conditioning_frame_indices=[0, 3], output_type="latent")  # fmt: skip
    replacement = pipe(**call, conditioning_mode="replacement", generator=seed()).frames
    zero = pipe(**call, reconstruction_guidance_scale=0.0, generator=seed()).frames
    assert torch.equal(zero, replacement)
    guided = pipe(**call, reconstruction_guidance_scale=2.0, generator=seed()).frames
    assert torch.equal(guided[:, :, [0, 3]], replacement[:, :, [0, 3]])
    assert (guided[:, :, [1, 2]] - replacement[:, :, [1, 2]]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "prediction_type, guidance_scale", [("epsilon", 1.0), ("epsilon", 3.0), ("v_prediction", 3.0), ("sample", 3.0)]
)
def test_reconstruction_guidance_step_follows_the_paper(tmp_path, prediction_type, guidance_scale):
    """One DDIM step from the same noisy latents z_t: the guided step differs from the replacement step, on the
    unknown frames b only, by DDIM's map of the paper's correction of the clean estimate,
    x_tilde_b - x_hat_b = -(w_r alpha_t / 2) grad_{z_b} ||x_a - x_hat_a(z_t)||^2 (alpha_t = sqrt(alpha_bar_t)),
    computed here by autograd through the denoiser: so the guided step moves z_b down the reconstruction error."""
    pipe, _ = make_pipe(tmp_path, perturbed=True, num_frames=4)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    indices, unknown, w_r = [0, 3], [1, 2], 2.0
    known = pipe.encode_frames(known_frames())
    inputs = []
    pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))

    def first_step(mode):
        inputs.clear()
        after = []
        pipe("a cat", num_frames=4, num_inference_steps=2, guidance_scale=guidance_scale, conditioning_latents=known,
             conditioning_frame_indices=indices, conditioning_mode=mode, reconstruction_guidance_scale=w_r,
             generator=seed(3), output_type="latent",
             callback_on_step_end=lambda p, i, t, kwargs: after.append(kwargs["latents"].clone()) or {})  # fmt: skip
        return inputs[0][:1], after[0]

    z, replaced = first_step("replacement")
    z_guided, guided = first_step("reconstruction_guidance")
    assert torch.equal(z, z_guided)  # the same z_t, known frames replaced by their noisy versions
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(2)
    t, t_next = (int(step) for step in scheduler.timesteps)
    alpha_bar, alpha_bar_next = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_next]
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    embeds, negative = pipe.encode_prompt("a cat", torch.device("cpu"))

    def reconstruction_error(latents):
        if guidance_scale > 1:
            uncond, cond = pipe.unet(torch.cat([latents, latents]), t, torch.cat([negative, embeds])).sample.chunk(2)
            output = uncond + guidance_scale * (cond - uncond)
        else:
            output = pipe.unet(latents, t, embeds).sample
        x_hat = {
            "epsilon": lambda: (latents - sigma * output) / alpha,
            "v_prediction": lambda: alpha * latents - sigma * output,
            "sample": lambda: output,
        }[prediction_type]()
        return (known - x_hat[:, :, indices]).square().sum()

    z = z.requires_grad_(True)
    (gradient,) = torch.autograd.grad(reconstruction_error(z), z)
    # DDIM (eta = 0): z_next = sqrt(alpha_bar_next) x0 + sqrt(1 - alpha_bar_next) (z - alpha x0) / sigma
    ddim = alpha_bar_next.sqrt() - (1 - alpha_bar_next).sqrt() * alpha / sigma
    expected = -ddim * (w_r * alpha / 2) * gradient
    difference = guided - replaced
    assert difference[:, :, unknown].abs().max() > 1e-2
    torch.testing.assert_close(difference[:, :, unknown], expected[:, :, unknown], rtol=1e-4, atol=1e-5)
    assert difference[:, :, indices].abs().max() < 1e-5  # known frames: replaced again before the next step
    # a small move along the guided direction lowers the reconstruction error at this noise level
    with torch.no_grad():
        step = torch.zeros_like(z)
        step[:, :, unknown] = difference[:, :, unknown]
        before = reconstruction_error(z.detach())
        assert reconstruction_error(z.detach() + 1e-2 * step) < before


# ------------------------------------------------------------------------------------------------ long videos


def test_generate_long_video_by_extension(tmp_path):
    pipe, _ = make_pipe(tmp_path, perturbed=True)
    call = dict(num_inference_steps=2, guidance_scale=3.0)
    long = pipe.generate_long_video("a cat", 7, method="extend", overlap=1, window=FRAMES, generator=seed(), **call,
                                    output_type="latent")  # fmt: skip
    assert long.shape == (1, CHANNELS, 7, LATENT, LATENT)
    first = pipe("a cat", num_frames=FRAMES, generator=seed(), output_type="latent", **call).frames
    assert torch.equal(long[:, :, :FRAMES], first)
    pixels = pipe.generate_long_video("a cat", 6, method="extend", overlap=2, generator=seed(), **call)
    assert pixels.shape == (1, 6, PIXELS, PIXELS, 3) and 0 <= pixels.min() and pixels.max() <= 1


def test_generate_long_video_by_key_frames(tmp_path):
    pipe, _ = make_pipe(tmp_path, perturbed=True)
    call = dict(num_inference_steps=2, guidance_scale=3.0)
    long = pipe.generate_long_video("a cat", 7, method="key_frames", window=FRAMES, generator=seed(), **call,
                                    output_type="latent")  # fmt: skip
    assert long.shape == (1, CHANNELS, 7, LATENT, LATENT)
    # 4 key frames, each neighbouring pair the ends of a 3-frame interpolation window
    keys = pipe("a cat", num_frames=4, generator=seed(), output_type="latent", **call).frames
    assert torch.equal(long[:, :, :: FRAMES - 1], keys)
    pil = pipe.generate_long_video("a cat", 5, method="key_frames", generator=seed(), output_type="pil", **call)
    assert len(pil) == 1 and len(pil[0]) == 5 and isinstance(pil[0][0], PIL.Image.Image)


# ------------------------------------------------------------------------------------------------ save and load


def test_save_and_load_through_every_entry_point(tmp_path):
    pipe, _ = make_pipe(tmp_path, perturbed=True)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p("a cat", num_inference_steps=2, guidance_scale=3.0, guidance_schedule="linear", generator=seed())

    expected = run(pipe).frames
    loaders = {
        "class": lambda: VideoLDMPipeline.from_pretrained(folder),
        "plain": lambda: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
        "custom_pipeline": lambda: DiffusionPipeline.from_pretrained(
            folder, custom_pipeline=custom_pipeline_path("video_ldm"), trust_remote_code=True
        ),
    }
    for how, load in loaders.items():
        loaded = load()
        assert type(loaded).__name__ == "VideoLDMPipeline", how
        assert isinstance(loaded.unet, VideoLDMUNet), how
        assert loaded.unet.config.num_frames == FRAMES and loaded.unet.config.max_frames == MAX_FRAMES
        assert np.array_equal(run(loaded).frames, expected), how
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        DiffusionPipeline.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(prompt=None), "Give exactly one of `prompt` and `prompt_embeds`"),
        (dict(prompt_embeds=torch.zeros(1, 16, 32)), "Give exactly one of `prompt` and `prompt_embeds`"),
        (dict(num_frames=5), "`num_frames`=5 is over the model's max_frames=4; use `generate_long_video`"),
        (dict(height=15), "`height` must be a positive multiple of 2, got 15"),
        (dict(output_type="gif"), r"`output_type` must be one of \('np', 'pil', 'pt', 'latent'\), got 'gif'"),
        (dict(latents=torch.zeros(1, CHANNELS, 2, LATENT, LATENT)), r"`latents` must have shape \(1, 4, 3, 8, 8\)"),
        (dict(conditioning_frame_indices=[0]), "`conditioning_frame_indices` needs `conditioning_frames`"),
    ],
)
def test_bad_call_arguments(tmp_path, changes, match):
    pipe, _ = make_pipe(tmp_path)
    with pytest.raises(ValueError, match=match):
        pipe(**{"prompt": "a cat", "num_inference_steps": 2, **changes})


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(conditioning_frame_indices=[0, 4]), r"distinct frame indices in 0..3, got \[0, 4\]"),
        (dict(conditioning_frame_indices=[-1, 2]), r"distinct frame indices in 0..3, got \[-1, 2\]"),
        (dict(conditioning_frame_indices=[1, 1]), r"distinct frame indices in 0..3, got \[1, 1\]"),
        (dict(conditioning_frame_indices=[1]), "Got 2 conditioning frames but 1 `conditioning_frame_indices`"),
        (
            dict(conditioning_frames=known_frames()[:, :, :8]),
            r"encode to latents of shape \(1, 4, 2, 4, 8\), this call needs \(1, 4, 2, 8, 8\)",
        ),
        (dict(conditioning_frames=known_frames(batch=3)), r"encode to latents of shape \(3, 4, 2, 8, 8\)"),
        (
            dict(conditioning_frames=known_frames()[..., :2]),
            r"must be \(batch, frames, H, W, 3\) or \(frames, H, W, 3\)",
        ),
        (dict(conditioning_frames=known_frames()[0, 0]), r"must be \(batch, frames, H, W, 3\)"),
        (dict(conditioning_frames=known_frames() * 2), r"must be finite and in \[0, 1\]"),
        (dict(conditioning_frames=known_frames(4)), "All 4 frames are given: nothing is left to generate"),
        (dict(conditioning_latents=torch.zeros(1, CHANNELS, 2, LATENT, LATENT)), "not both"),
        (
            dict(conditioning_mode="inpaint"),
            r"`conditioning_mode` must be one of \('reconstruction_guidance', 'replacement'\)",
        ),
        (dict(reconstruction_guidance_scale=-1.0), "`reconstruction_guidance_scale` must be a finite number >= 0"),
    ],
)
def test_bad_conditioning(tmp_path, changes, match):
    pipe, _ = make_pipe(tmp_path, num_frames=4)
    call = dict(
        prompt="a cat", num_inference_steps=2, conditioning_frames=known_frames(), conditioning_frame_indices=None
    )
    if "conditioning_frame_indices" not in changes and "conditioning_frames" not in changes:
        call["conditioning_frame_indices"] = [0, 3]
    with pytest.raises(ValueError, match=match):
        pipe(**{**call, **changes})


def test_bad_components_and_schedulers(tmp_path):
    pipe, components = make_pipe(tmp_path)
    with pytest.raises(
        TypeError, match="`unet` must be a storydiff VideoLDMUNet, got UNet2DConditionModel.*from_unet2d"
    ):
        VideoLDMPipeline(vae=components["vae"], text_encoder=components["text_encoder"],
                         tokenizer=components["tokenizer"], unet=components["unet"], scheduler=components["scheduler"])  # fmt: skip
    heun = VideoLDMPipeline.from_pipe(pipe, scheduler=HeunDiscreteScheduler.from_config(pipe.scheduler.config))
    heun.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="runs 3 model evaluations for 2 steps.*first-order scheduler"):
        heun("a cat", num_inference_steps=2)
    euler = VideoLDMPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    euler.set_progress_bar_config(disable=True)
    assert euler("a cat", num_inference_steps=2, output_type="latent").frames.shape[2] == FRAMES
    with pytest.raises(ValueError, match="needs a variance-preserving scheduler.*EulerDiscreteScheduler is not"):
        euler("a cat", num_inference_steps=2, conditioning_frames=known_frames(1))
    with pytest.raises(TypeError, match="must be a numpy array, a torch tensor or PIL images, got str"):
        pipe("a cat", num_inference_steps=2, conditioning_frames="frames.png")


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(method="loop"), r"`method` must be one of \('extend', 'key_frames'\), got 'loop'"),
        (dict(overlap=0), "`overlap` must be an int in 1..2, got 0"),
        (dict(overlap=3), "`overlap` must be an int in 1..2, got 3"),
        (dict(num_frames=0), "`num_frames` must be a positive int"),
        (dict(output_type="gif"), "`output_type` must be one of"),
        (dict(conditioning_frames=known_frames()), "`conditioning_frames` is set by generate_long_video itself"),
        (dict(num_frames=200, method="key_frames"), "200 frames need 101 key frames, over max_frames"),
    ],
)
def test_bad_long_video_arguments(tmp_path, changes, match):
    pipe, _ = make_pipe(tmp_path)
    with pytest.raises(ValueError, match=match):
        pipe.generate_long_video(**{"prompt": "a cat", "num_frames": 7, "window": FRAMES, **changes})
