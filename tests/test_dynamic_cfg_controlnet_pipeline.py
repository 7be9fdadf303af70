"""DynamicCFGStableDiffusionControlNetPipeline on tiny random components.

The static schedule must reproduce the stock `StableDiffusionControlNetPipeline` bit for bit (one ControlNet, several,
guess mode, batches); other schedules must skip the unconditional half in the UNet and in the ControlNet(s) on every
step with g_i == 1; bad ControlNet input must fail before any denoising with an error that says what to pass.
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DiffusionPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.callbacks import SDCFGCutoffCallback
from diffusers.models import MultiControlNetModel
from diffusers.utils import logging as diffusers_logging
from tiny_stable_diffusion import tiny_sd_components

from storydiff import DynamicCFGStableDiffusionControlNetPipeline, custom_pipeline_path

PROMPTS = ["the cat", "a dog"]
NEGATIVE_PROMPTS = ["blurry", "dark"]
IMAGE_SIZE = 32  # tiny_sd_components: 16 x 16 latents, the VAE downsamples by 2


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


def tiny_controlnet(unet: UNet2DConditionModel, conditioning_channels: int = 3, seed: int = 1) -> ControlNetModel:
    """A ControlNet copied from `unet` whose zero convolutions hold small random weights.

    The conditioning embedding downsamples `2 ** (len(channels) - 1)` times: (4, 8) halves the condition, as the tiny
    VAE halves the image, so a condition at image resolution meets the latents. A fresh ControlNet's zero
    convolutions would make it a no-op, and every equality with the stock pipeline trivially true."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(4, 8), conditioning_channels=conditioning_channels
    )
    generator = torch.Generator().manual_seed(seed)
    zero_convolutions = [
        controlnet.controlnet_cond_embedding.conv_out,
        *controlnet.controlnet_down_blocks,
        controlnet.controlnet_mid_block,
    ]
    with torch.no_grad():
        for convolution in zero_convolutions:
            for parameter in convolution.parameters():
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return controlnet.eval()


def condition(channels: int = 3, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A condition image as users pass non-RGB hints: a tensor (B, C, H, W) in [0, 1]."""
    return torch.rand(batch, channels, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def make_pipes(tmp_path, channels=(3,), multi: bool = False, **component_kwargs):
    """Stock and dynamic pipelines sharing the same component objects; one ControlNet per entry of `channels`
    (a MultiControlNetModel when `multi`)."""
    components = tiny_sd_components(tmp_path, **component_kwargs)
    nets = [tiny_controlnet(components["unet"], c, seed=k + 1) for k, c in enumerate(channels)]
    controlnet = nets if multi else nets[0]
    stock = StableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    dynamic = DynamicCFGStableDiffusionControlNetPipeline(**components, controlnet=controlnet)
    for pipe in (stock, dynamic):
        pipe.set_progress_bar_config(disable=True)
    return stock, dynamic


def run(pipe, seed=0, **kwargs):
    arguments = {"prompt": PROMPTS, "num_inference_steps": 3, "output_type": "latent"}
    arguments.update(kwargs)
    return pipe(**arguments, generator=torch.Generator().manual_seed(seed)).images


# name -> (ControlNet channels, MultiControlNetModel?, call arguments)
SETUPS = {
    "single": ((3,), False, {"image": condition(), "controlnet_conditioning_scale": 0.8}),
    "single_per_prompt_conditions": ((3,), False, {"image": condition(batch=2)}),
    "multi": (
        (3, 3),
        True,
        {
            "image": [condition(seed=1), condition(seed=2)],
            "controlnet_conditioning_scale": [0.7, 1.3],
            "control_guidance_start": [0.0, 0.3],
            "control_guidance_end": [0.7, 1.0],
        },
    ),
    # one list per prompt, one condition per ControlNet in each
    "multi_nested_per_prompt": (
        (3, 3),
        True,
        {"image": [[condition(seed=s)[0], condition(seed=s + 1)[0]] for s in (3, 5)]},
    ),
    "guess_mode": ((3,), False, {"image": condition(batch=2), "guess_mode": True}),
    "multi_guess_mode": ((3, 3), True, {"image": [condition(seed=1), condition(seed=2)], "guess_mode": True}),
    # conditions that are not RGB images go in as tensors
    "one_and_five_channels": ((1, 5), True, {"image": [condition(1, seed=1), condition(5, batch=2, seed=2)]}),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_static_schedule_is_bit_identical_to_stock(name, tmp_path):
    channels, multi, arguments = SETUPS[name]
    stock, dynamic = make_pipes(tmp_path, channels, multi)
    kwargs = {"negative_prompt": NEGATIVE_PROMPTS, "num_images_per_prompt": 2, "num_inference_steps": 4, **arguments}
    expected = run(stock, **kwargs)
    assert expected.shape == (4, 4, 16, 16)
    for schedule in ("static", None):
        got = run(dynamic, guidance_schedule=schedule, **kwargs) if schedule else run(dynamic, **kwargs)
        assert torch.equal(got, expected)
    assert torch.equal(dynamic.guidance_scales, torch.full((4,), 7.5, dtype=torch.float64))
    # the ControlNet(s) do change the sample: the equality above is not that of two plain UNets
    plain = StableDiffusionPipeline(**{n: c for n, c in stock.components.items() if n != "controlnet"})
    plain.set_progress_bar_config(disable=True)
    without_controlnet = run(plain, **{k: v for k, v in kwargs.items() if k in ("negative_prompt", "num_images_per_prompt", "num_inference_steps")})  # fmt: skip
    assert not torch.allclose(expected, without_controlnet, atol=1e-3)


def test_static_schedule_is_bit_identical_with_images_and_a_single_prompt(tmp_path):
    stock, dynamic = make_pipes(tmp_path)
    pil_condition = PIL.Image.fromarray((condition()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    kwargs = {"prompt": "the cat", "image": pil_condition, "guidance_scale": 3, "output_type": "np"}
    assert np.array_equal(run(dynamic, **kwargs), run(stock, **kwargs))


def test_static_schedule_is_identical_with_stock_callbacks(tmp_path):
    stock, dynamic = make_pipes(tmp_path)

    def damp_latents(pipe, step_index, timestep, callback_kwargs):
        # the full CFG batch, as in stock: the control image is stacked [unconditional, conditional] too
        assert callback_kwargs["prompt_embeds"].shape[0] == callback_kwargs["image"].shape[0] == 2 * len(PROMPTS)
        return {"latents": callback_kwargs["latents"] * 0.9}

    kwargs = {
        "image": condition(),
        "callback_on_step_end": damp_latents,
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds", "image"],
    }
    assert torch.equal(run(dynamic, **kwargs), run(stock, **kwargs))


def test_each_step_uses_its_scheduled_scale(tmp_path):
    """Per-step scales equal the stock pipeline driven by a callback that sets `_guidance_scale` before each step."""
    channels, multi, arguments = SETUPS["multi"]
    stock, dynamic = make_pipes(tmp_path, channels, multi)
    scales = [3.0, 6.5, 2.0, 4.25]

    def set_next_scale(pipe, step_index, timestep, callback_kwargs):
        if step_index + 1 < len(scales):
            pipe._guidance_scale = scales[step_index + 1]
        return callback_kwargs

    common = {"num_inference_steps": 4, "negative_prompt": NEGATIVE_PROMPTS, **arguments}
    expected = run(stock, guidance_scale=scales[0], callback_on_step_end=set_next_scale, **common)
    got = run(dynamic, guidance_scale=7.0, guidance_schedule=scales, **common)
    assert torch.equal(got, expected)
    assert torch.equal(dynamic.guidance_scales, torch.tensor(scales, dtype=torch.float64))


def record_batch_sizes(pipe):
    """Record, per call, the batch size of the UNet's sample and, for every ControlNet, those of its sample,
    condition image and text embeddings. Returns the record and a function that removes the hooks."""
    record = {"unet": [], "controlnets": []}
    nets = pipe.controlnet.nets if isinstance(pipe.controlnet, MultiControlNetModel) else [pipe.controlnet]

    def unet_hook(module, args, kwargs):
        record["unet"].append(args[0].shape[0])

    def controlnet_hook(index):
        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]  # MultiControlNetModel passes keywords
            sizes = (sample.shape[0], kwargs["controlnet_cond"].shape[0], kwargs["encoder_hidden_states"].shape[0])
            record["controlnets"].append((index, sizes))

        return hook

    handles = [pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True)]
    handles += [net.register_forward_pre_hook(controlnet_hook(k), with_kwargs=True) for k, net in enumerate(nets)]
    return record, lambda: [handle.remove() for handle in handles]


@pytest.mark.parametrize("name", ["single", "multi", "guess_mode", "multi_guess_mode", "one_and_five_channels"])
def test_unconditional_half_is_skipped_in_unet_and_controlnets_where_weight_is_zero(name, tmp_path):
    channels, multi, arguments = SETUPS[name]
    _, dynamic = make_pipes(tmp_path, channels, multi)
    record, remove_hooks = record_batch_sizes(dynamic)
    # linear starts at w_0 = 0 and the list skips steps 2 and 3: steps 0, 2 and 3 need no unconditional pass
    for schedule in ("linear", [4.0, 2.0, 1.0, 1.0]):
        record["unet"].clear(), record["controlnets"].clear()
        run(dynamic, guidance_scale=5.0, num_inference_steps=4, guidance_schedule=schedule, num_images_per_prompt=2,
            **arguments)  # fmt: skip
        guided = [bool(scale != 1) for scale in dynamic.guidance_scales]
        conditional = 2 * len(PROMPTS)
        assert record["unet"] == [2 * conditional if g else conditional for g in guided]
        for index in range(len(channels)):
            sizes = [size for k, size in record["controlnets"] if k == index]
            if arguments.get("guess_mode"):  # the ControlNet sees the conditional half on every step, as in stock
                assert sizes == [(conditional,) * 3] * 4
            else:  # sample, condition image and embeddings sliced alike
                assert sizes == [(2 * conditional if g else conditional,) * 3 for g in guided]
    remove_hooks()


@pytest.mark.parametrize("name", ["single_per_prompt_conditions", "multi_nested_per_prompt", "guess_mode"])
def test_all_unguided_steps_give_stock_without_cfg(name, tmp_path):
    """With g_i == 1 on every step, the CFG-batched call must give what stock gives without CFG: the latents, the
    embeddings and the (per-prompt) control images are sliced to the same conditional rows."""
    channels, multi, arguments = SETUPS[name]
    stock, dynamic = make_pipes(tmp_path, channels, multi)
    common = {"num_images_per_prompt": 2, **arguments}
    expected = run(stock, guidance_scale=1.0, **common)
    got = run(dynamic, guidance_scale=7.5, negative_prompt=NEGATIVE_PROMPTS, guidance_schedule=[1.0] * 3, **common)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("slices_embeddings", [True, False])
def test_cutoff_callbacks_switch_guidance_off_in_unet_and_controlnet(tmp_path, slices_embeddings):
    # the stock pipeline fails here: its control image keeps the CFG batch after the cut-off. One prompt, because
    # diffusers' SDCFGCutoffCallback keeps the last row of the embeddings only.
    _, dynamic = make_pipes(tmp_path)
    one_prompt = {"prompt": "the cat", "image": condition(), "guidance_scale": 4.0}

    def set_guidance_off(pipe, step_index, timestep, callback_kwargs):
        if step_index == 1:
            pipe._guidance_scale = 0.0
        return callback_kwargs

    cutoff = (
        SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1) if slices_embeddings else set_guidance_off
    )
    record, remove_hooks = record_batch_sizes(dynamic)
    got = run(dynamic, callback_on_step_end=cutoff, **one_prompt)
    remove_hooks()
    assert record["unet"] == [2, 2, 1]
    assert [size for _, size in record["controlnets"]] == [(2, 2, 2), (2, 2, 2), (1, 1, 1)]
    assert torch.equal(got, run(dynamic, guidance_schedule=[4.0, 4.0, 1.0], **one_prompt))


def test_callback_image_keeps_the_full_batch_on_unguided_steps(tmp_path):
    _, dynamic = make_pipes(tmp_path)
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        seen.append({name: tensor.shape[0] for name, tensor in callback_kwargs.items()})
        return {}

    run(dynamic, image=condition(), guidance_schedule="linear", callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "image"])  # fmt: skip
    assert seen == [{"latents": 2, "prompt_embeds": 4, "image": 4}] * 3


BAD_INPUTS = [
    # (ControlNet channels, multi, call arguments, error message)
    ((3, 3), True, {"image": [condition()]}, r"`image` has 1 conditions for 2 ControlNets"),
    ((3, 3), True, {"image": condition()}, r"2 ControlNets need a list of 2 condition images"),
    ((3, 3), True, {"image": [[condition()[0]], [condition()[0]]]}, r"per-prompt lists of 1 conditions, but there are 2"),
    ((3, 3), True, {"image": [condition(), condition()], "controlnet_conditioning_scale": [0.5, 1.0, 2.0]},
     r"`controlnet_conditioning_scale` has 3 values for 2 ControlNets"),
    ((3, 3), True, {"image": [condition(), condition()], "control_guidance_start": [0.0]},
     r"have 1 values for 2 ControlNets"),
    ((3,), False, {"image": condition(), "control_guidance_start": [0.0, 0.5], "control_guidance_end": [0.5, 1.0]},
     r"have 2 values for 1 ControlNet:"),
    ((3, 3), True, {"image": [condition(), condition()], "control_guidance_start": [0.0, 0.1],
                    "control_guidance_end": [1.0, 1.0, 1.0]}, r"`control_guidance_start` has 2 values but `control_guidance_end` has 3"),
    ((3,), False, {"image": condition(1)}, r"The ControlNet takes conditions with 3 channels .* has 1 \(a Tensor of shape \(1, 1, 32, 32\)\)"),
    ((1, 5), True, {"image": [condition(1), condition(3)]}, r"ControlNet 1 \(of 2\) takes conditions with 5 channels"),
    ((1,), False, {"image": PIL.Image.new("L", (32, 32))}, r"has 3 \(a PIL image in mode L\)\. PIL images are converted to RGB"),
]  # fmt: skip


@pytest.mark.parametrize("channels, multi, arguments, message", BAD_INPUTS)
def test_bad_controlnet_inputs_fail_before_any_denoising(tmp_path, channels, multi, arguments, message):
    _, dynamic = make_pipes(tmp_path, channels, multi)
    record, remove_hooks = record_batch_sizes(dynamic)
    with pytest.raises(ValueError, match=message):
        run(dynamic, **arguments)
    remove_hooks()
    assert record == {"unet": [], "controlnets": []}


def test_mid_block_only_controlnet_needs_a_unet_with_a_mid_block(tmp_path):
    _, dynamic = make_pipes(tmp_path)
    # (from_config would read mid_block_type=None as "use the default block")
    config = {key: value for key, value in dynamic.unet.config.items() if not key.startswith("_")}
    without_mid_block = UNet2DConditionModel(**{**config, "mid_block_type": None}).eval()
    assert without_mid_block.mid_block is None
    dynamic.controlnet.register_to_config(connect="mid_block")  # as storydiff's mid-block-only ControlNets say
    run(dynamic, image=condition(), num_inference_steps=1)  # with a mid block: fine

    dynamic.unet = without_mid_block
    with pytest.raises(ValueError, match="cannot honour a mid-block-only connection"):
        run(dynamic, image=condition())
    dynamic.controlnet.register_to_config(connect="all")
    assert torch.isfinite(run(dynamic, image=condition(), num_inference_steps=1)).all()


def test_non_rgb_controlnets_take_tensor_conditions(tmp_path):
    _, dynamic = make_pipes(tmp_path, channels=(1, 5), multi=True)
    image = [condition(1, seed=1), condition(5, seed=2)]
    got = run(dynamic, image=image, guidance_schedule="cosine")
    assert got.shape == (2, 4, 16, 16) and torch.isfinite(got).all()
    # each condition matters
    other = run(dynamic, image=[condition(1, seed=1), condition(5, seed=9)], guidance_schedule="cosine")
    assert not torch.allclose(got, other, atol=1e-4)


def test_bad_schedules_are_rejected(tmp_path):
    _, dynamic = make_pipes(tmp_path)
    with pytest.raises(ValueError, match="Valid kinds"):
        run(dynamic, image=condition(), guidance_schedule="quadratic")
    with pytest.raises(ValueError, match="num_inference_steps is 3"):
        run(dynamic, image=condition(), guidance_schedule=[2.0, 3.0])
    with pytest.raises(ValueError, match="turns classifier-free guidance off"):
        run(dynamic, image=condition(), guidance_scale=1.0, guidance_schedule=[2.0, 3.0, 4.0])


def test_loads_as_custom_pipeline_from_a_saved_stock_folder(tmp_path):
    stock, dynamic = make_pipes(tmp_path)
    stock.save_pretrained(tmp_path / "stock")
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "stock",
        custom_pipeline=custom_pipeline_path("dynamic_cfg_stable_diffusion_controlnet"),
        trust_remote_code=True,
        local_files_only=True,
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "DynamicCFGStableDiffusionControlNetPipeline"
    assert isinstance(loaded, StableDiffusionControlNetPipeline)
    kwargs = {"image": condition(), "guidance_schedule": "linear", "guidance_scale": 4.0}
    assert torch.equal(run(loaded, **kwargs), run(dynamic, **kwargs))
    assert torch.equal(loaded.guidance_scales, dynamic.guidance_scales)


@pytest.mark.parametrize("multi", [False, True])
def test_save_and_load_round_trip(tmp_path, multi):
    _, dynamic = make_pipes(tmp_path, channels=(3, 1) if multi else (3,), multi=multi)
    image = [condition(3), condition(1)] if multi else condition()
    dynamic.save_pretrained(tmp_path / "saved")
    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    # a stock folder: the storydiff class extends the stock one and keeps its components
    assert model_index["_class_name"] == "StableDiffusionControlNetPipeline"
    loaded = DynamicCFGStableDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is DynamicCFGStableDiffusionControlNetPipeline
    assert isinstance(loaded.controlnet, MultiControlNetModel) == multi
    assert torch.equal(run(loaded, image=image, guidance_schedule="cosine"), run(dynamic, image=image, guidance_schedule="cosine"))  # fmt: skip
    # the stock class and plain DiffusionPipeline load it as it is, without trust_remote_code
    for stock in (
        StableDiffusionControlNetPipeline.from_pretrained(tmp_path / "saved", local_files_only=True),
        DiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True),
    ):
        stock.set_progress_bar_config(disable=True)
        assert type(stock) is StableDiffusionControlNetPipeline
        assert torch.equal(run(stock, image=image), run(dynamic, image=image))
