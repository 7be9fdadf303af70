"""ClassConditionalPipeline with a CoherenceAwareUNet2DModel (class-conditional CAD): what each CFG branch receives,
CA-CFG against a hand-written loop, skipped negative passes, per-label coherence, save/load, bad input."""

import inspect

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DModel

from storydiff import (
    ClassConditionalPipeline,
    CoherenceAwareUNet2DModel,
    ControlNetLiteModel,
    custom_pipeline_path,
)

NUM_CLASSES = 4
NULL = NUM_CLASSES
SIZE = 8
TINY = dict(
    sample_size=SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    num_class_embeds=NUM_CLASSES + 1,
)


def tiny_coherence_unet(**kwargs):
    torch.manual_seed(0)
    return CoherenceAwareUNet2DModel(**TINY, **kwargs).eval()


def tiny_plain_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY).eval()


def make_pipeline(unet=None, **kwargs):
    pipe = ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=unet or tiny_coherence_unet(), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_calls(unet):
    """Every UNet call's (class labels, coherence) as lists."""
    calls = []
    signature = inspect.signature(unet.forward)

    def hook(module, args, kwargs):
        inputs = signature.bind(*args, **kwargs).arguments
        calls.append((inputs["class_labels"].tolist(), inputs["coherence"].tolist()))

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


def reference_latents(unet, labels, coherence, negative_labels, negative_coherence, scales, seed):
    """CA-CFG written out by hand: eps_neg + g (eps_pos - eps_neg), the positive branch alone where g <= 1."""
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(len(scales))
    latents = torch.randn((len(labels), 1, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))
    labels, negative_labels = torch.tensor(labels), torch.tensor(negative_labels)
    coherence = torch.tensor(coherence)
    negative = torch.full_like(coherence, negative_coherence)
    with torch.no_grad():
        for scale, t in zip(scales, scheduler.timesteps):
            timesteps = torch.full((len(labels),), int(t))
            eps_positive = unet(latents, timesteps, labels, coherence).sample
            if scale > 1:
                eps_negative = unet(latents, timesteps, negative_labels, negative).sample
                eps = eps_negative + scale * (eps_positive - eps_negative)
            else:
                eps = eps_positive
            latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def test_defaults_output_and_tuple():
    pipe = make_pipeline()
    assert pipe.is_coherence_aware
    calls = record_calls(pipe.unet)
    out = pipe(class_labels=[0, 3], num_images_per_class=2, num_inference_steps=2, output_type="np")
    assert out.images.shape == (4, SIZE, SIZE, 1)
    assert out.class_labels == [0, 0, 3, 3] and out.coherence == [1.0] * 4
    # the default is CA-CFG: the same class at coherence 1 and at coherence 0
    assert calls == [([0, 0, 3, 3] * 2, [1.0] * 4 + [0.0] * 4)] * 2
    images, labels, scales, coherence = pipe(class_labels=[2], num_inference_steps=2, coherence=0.5,
                                             output_type="np", return_dict=False)  # fmt: skip
    assert labels == [2] and scales == [4.0, 4.0] and coherence == [0.5]


@pytest.mark.parametrize(
    "negative_class, negative_coherence, expected_negative_labels",
    [(None, 0.0, [1, 1, 3, 3]), ("same", 0.125, [1, 1, 3, 3]), ("null", 0.0, [NULL] * 4), ("null", 0.5, [NULL] * 4)],
)
def test_each_branch_gets_the_documented_class_and_coherence(
    negative_class, negative_coherence, expected_negative_labels
):
    pipe = make_pipeline()
    calls = record_calls(pipe.unet)
    scales = [3.0, 1.0, 2.0]  # the middle step has zero weight: positive branch only
    out = pipe(class_labels=[1, 3], num_images_per_class=2, coherence=[0.25, 0.75], negative_coherence=negative_coherence,
               negative_class=negative_class, guidance_schedule=scales, num_inference_steps=3,
               generator=torch.Generator().manual_seed(5), output_type="latent")  # fmt: skip
    positive_labels, positive_coherence = [1, 1, 3, 3], [0.25, 0.25, 0.75, 0.75]  # exact in float32
    guided = (positive_labels + expected_negative_labels, positive_coherence + [negative_coherence] * 4)
    assert calls[0] == calls[2] == guided
    assert calls[1] == (positive_labels, positive_coherence)
    assert len(calls) == 3 and out.guidance_scales == scales and out.coherence == positive_coherence

    expected = reference_latents(pipe.unet, positive_labels, positive_coherence, expected_negative_labels,
                                 negative_coherence, scales, seed=5)  # fmt: skip
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=1e-5)


def test_coherence_is_a_test_time_knob_and_one_value_broadcasts():
    pipe = make_pipeline()
    call = dict(class_labels=[0, 2], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    low = pipe(**call, coherence=0.0, generator=torch.manual_seed(0)).images
    high = pipe(**call, coherence=1.0, generator=torch.manual_seed(0)).images
    assert np.abs(low - high).max() > 1e-4
    np.testing.assert_array_equal(pipe(**call, coherence=[1.0, 1.0], generator=torch.manual_seed(0)).images, high)
    np.testing.assert_array_equal(pipe(**call, generator=torch.manual_seed(0)).images, high)  # default 1.0
    mixed = pipe(**call, coherence=[0.0, 1.0], generator=torch.manual_seed(0)).images
    np.testing.assert_array_equal(mixed[0], low[0])
    np.testing.assert_array_equal(mixed[1], high[1])


def test_from_unet_with_null_negative_matches_the_plain_pipeline():
    plain_unet = tiny_plain_unet()
    call = dict(class_labels=[0, 1, 3], guidance_scale=3.0, guidance_schedule="linear", num_inference_steps=3,
                output_type="np")  # fmt: skip
    expected = make_pipeline(plain_unet)(**call, generator=torch.manual_seed(3)).images
    pipe = make_pipeline(CoherenceAwareUNet2DModel.from_unet(plain_unet).eval())
    got = pipe(**call, negative_class="null", coherence=0.7, generator=torch.manual_seed(3)).images
    np.testing.assert_array_equal(got, expected)


def test_save_load_and_custom_pipeline_loading(tmp_path):
    unet = tiny_coherence_unet()
    unet.fit_bins(torch.linspace(0.0, 1.0, 50) ** 2, num_bins=4)
    pipe = make_pipeline(unet, id2label=["zero", "one", "two", "three"])
    kwargs = dict(class_labels=["two", 0], coherence=[0.3, 0.8], negative_coherence=0.1, guidance_scale=2.5,
                  guidance_schedule="linear", num_inference_steps=3, output_type="np")  # fmt: skip

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p(**kwargs, generator=torch.Generator().manual_seed(1)).images

    expected = run(pipe)
    pipe.save_pretrained(tmp_path)
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.unet, CoherenceAwareUNet2DModel) and loaded.is_coherence_aware
    assert loaded.unet.config.coherence_bin_edges == unet.config.coherence_bin_edges
    np.testing.assert_array_equal(run(loaded), expected)

    remote = DiffusionPipeline.from_pretrained(
        tmp_path, custom_pipeline=custom_pipeline_path("class_conditional"), trust_remote_code=True
    )
    assert type(remote).__name__ == "ClassConditionalPipeline" and type(remote.unet) is CoherenceAwareUNet2DModel
    np.testing.assert_array_equal(run(remote), expected)
    plain = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    np.testing.assert_array_equal(run(plain), expected)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"coherence": 1.5}, ValueError, r"\[0, 1\]"),
        ({"coherence": [0.5, float("nan")]}, ValueError, r"\[0, 1\]"),
        ({"coherence": [0.1, 0.2, 0.3]}, ValueError, "one per class label"),
        ({"coherence": "high"}, TypeError, "coherence"),
        ({"coherence": [True, 0.5]}, TypeError, "coherence"),
        ({"coherence": []}, TypeError, "coherence"),
        ({"negative_coherence": -0.1}, ValueError, r"\[0, 1\]"),
        ({"negative_coherence": None}, TypeError, "negative_coherence"),
        ({"negative_class": "random"}, ValueError, "negative_class"),
    ],
)
def test_bad_coherence_inputs(kwargs, error, match):
    pipe = make_pipeline()
    with pytest.raises(error, match=match):
        pipe(class_labels=[0, 1], num_inference_steps=2, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coherence": 0.5}, "no coherence input"),
        ({"coherence": [1.0]}, "no coherence input"),
        ({"negative_coherence": 0.3}, "no coherence input"),
        ({"negative_class": "same"}, "coherence-aware"),
    ],
)
def test_coherence_arguments_are_refused_for_a_plain_unet(kwargs, match):
    pipe = make_pipeline(tiny_plain_unet())
    assert not pipe.is_coherence_aware
    with pytest.raises(ValueError, match=match):
        pipe(class_labels=[0], num_inference_steps=2, **kwargs)
    # the plain pipeline's output and tuple are unchanged, and "null" is accepted explicitly
    out = pipe(class_labels=[0], num_inference_steps=2, negative_class="null", output_type="np")
    assert out.coherence is None and len(out.to_tuple()) == 3
    assert len(pipe(class_labels=[0], num_inference_steps=2, output_type="np", return_dict=False)) == 3


def test_a_controlnet_is_refused_with_a_coherence_aware_unet():
    controlnet = ControlNetLiteModel.from_unet(tiny_plain_unet(), conditioning_channels=1,
                                               conditioning_embedding_out_channels=(4,))  # fmt: skip
    with pytest.raises(ValueError, match="not supported with a CoherenceAwareUNet2DModel"):
        ClassConditionalPipeline(scheduler=DDIMScheduler(), unet=tiny_coherence_unet(), controlnet=controlnet)
