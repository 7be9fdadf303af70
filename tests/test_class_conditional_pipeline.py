"""ClassConditionalPipeline: outputs, CFG against a hand-written loop, skipped null passes, save/load, bad input."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTTransformer2DModel, UNet2DModel

from storydiff import ClassConditionalPipeline, ClassConditionalPipelineOutput, GuidanceSchedule, custom_pipeline_path

NUM_CLASSES = 4
SIZE = 8


def tiny_unet(num_class_embeds=NUM_CLASSES + 1):
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=num_class_embeds,
    ).eval()


def unet_pipeline(**kwargs):
    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_pipeline():
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # learned variance, as in DiT
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
        norm_type="ada_norm_zero",
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), transformer=transformer, vae=vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_batch_sizes(model):
    sizes = []
    model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]), with_kwargs=True)
    return sizes


def reference_latents(unet, scheduler_config, labels, scales, steps, seed):
    """Plain constant/per-step CFG written out by hand: the definition the pipeline must match."""
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn((len(labels), 1, SIZE, SIZE), generator=generator) * scheduler.init_noise_sigma
    labels = torch.tensor(labels)
    null = torch.full_like(labels, NUM_CLASSES)
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if scales[i] > 1:
                batch = torch.cat([latents, latents])
                timesteps = torch.full((batch.shape[0],), int(t))
                eps_class, eps_null = unet(batch, timesteps, class_labels=torch.cat([labels, null])).sample.chunk(2)
                eps = eps_null + scales[i] * (eps_class - eps_null)
            else:  # no guidance: the conditional prediction alone
                eps = unet(latents, torch.full((len(labels),), int(t)), class_labels=labels).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def test_output_types_and_shapes():
    pipe = unet_pipeline()
    out = pipe(class_labels=[0, 3], num_images_per_class=2, num_inference_steps=2, output_type="np")
    assert isinstance(out, ClassConditionalPipelineOutput)
    assert out.images.shape == (4, SIZE, SIZE, 1) and out.images.dtype == np.float32
    assert out.images.min() >= 0.0 and out.images.max() <= 1.0
    assert out.class_labels == [0, 0, 3, 3]
    assert out.guidance_scales == [4.0, 4.0]

    pt = pipe(class_labels=1, num_inference_steps=2, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 1, SIZE, SIZE)
    latents = pipe(class_labels=torch.tensor([1, 2]), num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 1, SIZE, SIZE)
    pil = pipe(class_labels=[2], num_inference_steps=2).images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].mode == "L" and pil[0].size == (SIZE, SIZE)
    images, labels, scales = pipe(class_labels=[2], num_inference_steps=3, guidance_scale=2.0, return_dict=False)
    assert labels == [2] and scales == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("guidance_scale", [1.5, 4.0])
def test_static_schedule_equals_hand_written_cfg(guidance_scale):
    pipe = unet_pipeline()
    labels, steps = [0, 1, 3], 4
    got = pipe(
        class_labels=labels,
        guidance_scale=guidance_scale,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
    ).images
    expected = reference_latents(pipe.unet, pipe.scheduler.config, labels, [guidance_scale] * steps, steps, seed=7)
    assert torch.equal(got, expected)


def test_dynamic_schedule_equals_hand_written_cfg_with_its_scales():
    pipe = unet_pipeline()
    steps = 5
    got = pipe(
        class_labels=[2, 0],
        guidance_scale=3.0,
        guidance_schedule="cosine",
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
    ).images
    scales = GuidanceSchedule("cosine").scales(3.0, steps)
    assert torch.equal(pipe.guidance_scales, scales)
    assert scales[0] == 1.0  # cosine starts without guidance
    expected = reference_latents(pipe.unet, pipe.scheduler.config, [2, 0], scales.tolist(), steps, seed=3)
    assert torch.equal(got, expected)
    assert not torch.equal(got, pipe(class_labels=[2, 0], guidance_scale=3.0, num_inference_steps=steps,
                                     generator=torch.Generator().manual_seed(3), output_type="latent").images)  # fmt: skip


@pytest.mark.parametrize(
    "schedule, guidance_scale, expected_cfg_steps",
    [
        ("static", 3.0, [True] * 6),
        ("static", 1.0, [False] * 6),
        ("linear", 3.0, [False] + [True] * 5),
        (GuidanceSchedule("interval", interval=(0.5, 1.0)), 3.0, [False, False, False, True, True, True]),
        ([1.0, 2.0, 1.0, 2.0, 1.0, 1.0], 1.0, [False, True, False, True, False, False]),
    ],
)
def test_null_pass_is_skipped_where_guidance_is_off(schedule, guidance_scale, expected_cfg_steps):
    pipe = unet_pipeline()
    sizes = count_batch_sizes(pipe.unet)
    pipe(class_labels=[0, 1, 2], guidance_scale=guidance_scale, guidance_schedule=schedule, num_inference_steps=6)
    assert sizes == [6 if cfg else 3 for cfg in expected_cfg_steps]
    assert [g > 1 for g in pipe.guidance_scales.tolist()] == expected_cfg_steps


def test_skipped_step_matches_conditional_only_prediction():
    """A step with g = 1 must give exactly the conditional-only update (no null half computed or mixed in)."""
    pipe = unet_pipeline()
    got = pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=3,
               generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(3)
    latents = torch.randn((1, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = pipe.unet(latents, t.reshape(1), class_labels=torch.tensor([1])).sample
            latents = scheduler.step(eps, t, latents).prev_sample
    assert torch.equal(got, latents)


def test_dit_with_vae_and_skipping():
    pipe = dit_pipeline()
    assert pipe.config.num_classes == NUM_CLASSES and pipe.null_class_label == NUM_CLASSES
    sizes = count_batch_sizes(pipe.transformer)
    out = pipe(class_labels=[0, 3], guidance_scale=2.0, guidance_schedule="linear", num_inference_steps=3,
               output_type="np")  # fmt: skip
    assert out.images.shape == (2, 8, 8, 3)
    assert sizes == [2, 4, 4]


def test_save_load_and_custom_pipeline_loading(tmp_path):
    pipe = unet_pipeline(id2label={0: "zero", 1: "one", 2: "two, deux", 3: "three"})
    kwargs = dict(class_labels=["two", 0], guidance_scale=2.5, guidance_schedule="linear", num_inference_steps=3)

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p(**kwargs, generator=torch.Generator().manual_seed(1), output_type="np").images

    expected = run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    assert loaded.config.num_classes == NUM_CLASSES and loaded.transformer is None and loaded.vae is None
    assert loaded.labels == {"zero": 0, "one": 1, "two": 2, "deux": 2, "three": 3}
    assert loaded.get_label_ids(["deux", "one"]) == [2, 1]
    np.testing.assert_array_equal(run(loaded), expected)

    remote = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=custom_pipeline_path("class_conditional"), trust_remote_code=True
    )
    assert type(remote).__name__ == "ClassConditionalPipeline"
    np.testing.assert_array_equal(run(remote), expected)


def test_dit_pipeline_round_trip(tmp_path):
    pipe = dit_pipeline()
    expected = pipe(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet is None and isinstance(loaded.transformer, DiTTransformer2DModel)
    got = loaded(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    torch.testing.assert_close(got, expected)


def test_callback_on_step_end_sees_and_replaces_latents():
    pipe = unet_pipeline()
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, pipeline.guidance_scale, callback_kwargs["latents"].shape))
        return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    out = pipe(class_labels=[0, 1], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=3,
               callback_on_step_end=callback, output_type="latent")  # fmt: skip
    assert [s[0] for s in seen] == [0, 1, 2] and [s[1] for s in seen] == [1.0, 3.0, 5.0]
    assert torch.equal(out.images, torch.zeros(2, 1, SIZE, SIZE))


def test_given_latents_and_eta_are_deterministic():
    pipe = unet_pipeline()
    latents = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def run():
        return pipe(class_labels=[0, 1], latents=latents, eta=1.0, num_inference_steps=3,
                    generator=torch.Generator().manual_seed(5), output_type="latent").images  # fmt: skip

    torch.testing.assert_close(run(), run(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"class_labels": [NUM_CLASSES]}, ValueError, "null class"),
        ({"class_labels": [-1]}, ValueError, "out of range"),
        ({"class_labels": []}, ValueError, "empty"),
        ({"class_labels": [1.0]}, TypeError, "int or a class name"),
        ({"class_labels": [True]}, TypeError, "int or a class name"),
        ({"class_labels": 1.5}, TypeError, "class_labels"),
        ({"class_labels": torch.tensor([[0, 1]])}, TypeError, "1-D"),
        ({"class_labels": torch.tensor([0.0])}, TypeError, "integer dtype"),
        ({"class_labels": ["cat"]}, ValueError, "Unknown class name"),
        ({"class_labels": [0], "num_images_per_class": 0}, ValueError, "num_images_per_class"),
        ({"class_labels": [0], "num_inference_steps": 2.0}, TypeError, "num_inference_steps"),
        ({"class_labels": [0], "output_type": "jpg"}, ValueError, "output_type"),
        ({"class_labels": [0], "guidance_scale": "high"}, TypeError, "guidance_scale"),
        ({"class_labels": [0], "guidance_schedule": "quadratic"}, ValueError, "Valid kinds"),
        ({"class_labels": [0], "guidance_schedule": [2.0, 2.0]}, ValueError, "one scale per step"),
        ({"class_labels": [0], "latents": torch.zeros(2, 1, SIZE, SIZE)}, ValueError, "latents"),
        ({"class_labels": [0], "latents": np.zeros((1, 1, SIZE, SIZE))}, TypeError, "latents"),
        ({"class_labels": [0], "callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "tensor_inputs"),
    ],
)
def test_bad_call_inputs(kwargs, error, match):
    pipe = unet_pipeline()
    kwargs.setdefault("num_inference_steps", 3)
    with pytest.raises(error, match=match):
        pipe(**kwargs)


def test_bad_components():
    with pytest.raises(ValueError, match="exactly one denoiser"):
        ClassConditionalPipeline(scheduler=DDIMScheduler())
    with pytest.raises(ValueError, match="not class-conditional"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(num_class_embeds=None))
    with pytest.raises(ValueError, match="between 1 and 4"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(), num_classes=5)
    with pytest.raises(TypeError, match="num_classes"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(), num_classes="4")
    with pytest.raises(ValueError, match="id2label"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(), id2label={7: "seven"})


def test_shipped_digits_checkpoint_loads_and_samples():
    from storydiff.checkpoints import checkpoint_path, digits_pipeline_path

    pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.num_classes == 10 and pipe.labels["7"] == 7
    out = pipe(class_labels=[0, 9], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=2,
               generator=torch.manual_seed(0), output_type="np")  # fmt: skip
    assert out.images.shape == (2, 16, 16, 1) and np.isfinite(out.images).all()
    with pytest.raises(ValueError, match="Available: .*digits-class-conditional"):
        checkpoint_path("no-such-checkpoint")


# ----------------------------------------------------------------------------------------------------- ControlNet


def control_pipeline(kind: str = "lite", random_weights: bool = False):
    from storydiff import ControlNetFullModel, ControlNetLiteModel

    unet = tiny_unet()
    cls = ControlNetLiteModel if kind == "lite" else ControlNetFullModel
    # pixel space: a stride-1 conditioning embedding (one width), the condition at the image size
    controlnet = cls.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,)).eval()
    if random_weights:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in controlnet.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=unet, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CONTROL_CALL = dict(class_labels=[0, 3], num_images_per_class=2, guidance_scale=3.0, guidance_schedule="linear",
                    num_inference_steps=4, output_type="np")  # fmt: skip


def control_images(count: int = 2):
    return torch.rand(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("kind", ["lite", "full"])
def test_a_zero_initialised_controlnet_changes_nothing_and_a_trained_one_does(kind):
    expected = unet_pipeline()(**CONTROL_CALL, generator=torch.Generator().manual_seed(0)).images
    zero = control_pipeline(kind)(**CONTROL_CALL, control_image=control_images(), generator=torch.manual_seed(0))
    np.testing.assert_array_equal(zero.images, expected)
    controlled = control_pipeline(kind, random_weights=True)
    images = controlled(**CONTROL_CALL, control_image=control_images(), generator=torch.manual_seed(0)).images
    assert np.abs(images - expected).max() > 1e-3
    # one condition for all equals that condition repeated per class label
    one = controlled(**CONTROL_CALL, control_image=control_images(1), generator=torch.manual_seed(0)).images
    repeated = controlled(**CONTROL_CALL, control_image=control_images(1).repeat(2, 1, 1, 1),
                          generator=torch.manual_seed(0)).images  # fmt: skip
    np.testing.assert_array_equal(one, repeated)
    # the scale is the ControlNet's own knob: 0 turns control off whatever the guidance
    off = controlled(**CONTROL_CALL, control_image=control_images(), controlnet_conditioning_scale=0.0,
                     generator=torch.manual_seed(0)).images  # fmt: skip
    np.testing.assert_allclose(off, expected, atol=1e-6)


def test_the_controlnet_sees_the_null_class_half_only_on_guided_steps():
    pipe = control_pipeline(random_weights=True)
    controlnet_sizes = count_batch_sizes(pipe.controlnet)
    labels_seen = []
    pipe.controlnet.register_forward_pre_hook(
        lambda module, args, kwargs: labels_seen.append(kwargs["class_labels"].tolist()), with_kwargs=True
    )
    conditions_seen = []
    pipe.controlnet.register_forward_pre_hook(lambda module, args: conditions_seen.append(args[3].clone()))
    # the linear schedule is 0 at the first step (no guidance), then rises
    out = pipe(class_labels=[1, 2], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=4,
               control_image=control_images(), output_type="np")  # fmt: skip
    guided = [scale > 1 for scale in out.guidance_scales]
    assert guided == [False, True, True, True]
    assert controlnet_sizes == [4 if on else 2 for on in guided]
    assert labels_seen[0] == [1, 2] and labels_seen[1] == [1, 2, NUM_CLASSES, NUM_CLASSES]
    # the null-class half keeps the condition (the original ControlNet's unconditional branch)
    torch.testing.assert_close(conditions_seen[1][:2], conditions_seen[1][2:], rtol=0, atol=0)


def test_save_load_with_a_controlnet_component(tmp_path):
    from storydiff import ControlNetLiteModel

    pipe = control_pipeline(random_weights=True)
    call = dict(CONTROL_CALL, control_image=control_images())
    expected = pipe(**call, generator=torch.manual_seed(0)).images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["controlnet"] == ["storydiff.models.controlnet_variants", "ControlNetLiteModel"]
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    assert type(loaded.controlnet) is ControlNetLiteModel
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded(**call, generator=torch.manual_seed(0)).images, expected)
    remote = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=custom_pipeline_path("class_conditional"), trust_remote_code=True
    )
    remote.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(remote(**call, generator=torch.manual_seed(0)).images, expected)
    # a folder without a controlnet still loads with none, and from_pipe drops one
    unet_pipeline().save_pretrained(tmp_path / "plain")
    assert ClassConditionalPipeline.from_pretrained(tmp_path / "plain").controlnet is None
    assert ClassConditionalPipeline.from_pipe(pipe, controlnet=None).controlnet is None


@pytest.mark.parametrize(
    "pipe_kind, kwargs, error, match",
    [
        ("plain", dict(control_image=torch.rand(1, 1, SIZE, SIZE)), ValueError, "no controlnet"),
        ("control", dict(), ValueError, "needs `control_image`"),
        ("control", dict(control_image=torch.rand(1, 3, SIZE, SIZE)), ValueError, "conditioning_channels=1"),
        ("control", dict(control_image=torch.rand(1, 1, 2 * SIZE, 2 * SIZE)), ValueError, "needs"),
        ("control", dict(control_image=torch.rand(3, 1, SIZE, SIZE)), ValueError, "one per class label"),
        ("control", dict(control_image=torch.rand(1, 1, SIZE, SIZE) * 3), ValueError, r"\[0, 1\]"),
        ("control", dict(control_image=torch.rand(1, SIZE, SIZE)), ValueError, "batch, channels"),
        ("control", dict(control_image=torch.rand(1, 1, SIZE, SIZE), controlnet_conditioning_scale="1"), TypeError,
         "controlnet_conditioning_scale"),
    ],
)  # fmt: skip
def test_bad_control_inputs_fail_before_denoising(pipe_kind, kwargs, error, match):
    pipe = unet_pipeline() if pipe_kind == "plain" else control_pipeline()
    calls = count_batch_sizes(pipe.unet)
    with pytest.raises(error, match=match):
        pipe(class_labels=[0, 1], num_inference_steps=2, **kwargs)
    assert calls == []


def test_a_controlnet_needs_a_matching_unet():
    from storydiff import ControlNetLiteModel

    controlnet = ControlNetLiteModel.from_unet(
        tiny_unet(), conditioning_channels=1, conditioning_embedding_out_channels=(4,)
    )
    dit = dit_pipeline()
    with pytest.raises(ValueError, match="UNet2DModel.*only"):
        ClassConditionalPipeline(
            scheduler=DDIMScheduler(), transformer=dit.transformer, vae=dit.vae, controlnet=controlnet
        )
    other = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4,
                        num_class_embeds=NUM_CLASSES + 1)  # fmt: skip
    with pytest.raises(ValueError, match="block_out_channels"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=other, controlnet=controlnet)
    with pytest.raises(TypeError, match="must be a ControlNetModel"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_unet(), controlnet=torch.nn.Conv2d(1, 1, 1))
