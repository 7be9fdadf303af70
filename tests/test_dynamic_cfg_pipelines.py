"""DynamicCFGStableDiffusionPipeline and DynamicCFGStableDiffusionXLPipeline on tiny random components.

The static schedule must reproduce the stock pipelines bit for bit; other schedules must apply g_i at step i and
skip the unconditional half of the batch on every step with g_i == 1.
"""

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    HeunDiscreteScheduler,
    KDPM2DiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback
from diffusers.models.attention_processor import AttnProcessor
from diffusers.utils import logging as diffusers_logging
from tiny_stable_diffusion import add_tiny_ip_adapter, tiny_sd_components, tiny_sdxl_components

from storydiff import (
    GUIDANCE_SCHEDULE_KINDS,
    DynamicCFGStableDiffusionPipeline,
    DynamicCFGStableDiffusionXLPipeline,
    GuidanceSchedule,
    custom_pipeline_path,
)
from storydiff.custom_pipelines.dynamic_cfg_stable_diffusion import schedule_step_indices

PROMPTS = ["the cat", "a dog"]
NEGATIVE_PROMPTS = ["blurry", "dark"]


@dataclass
class Flavour:
    name: str
    stock_class: type
    dynamic_class: type
    components: Callable
    file_name: str
    cutoff_callback: type


FLAVOURS = {
    "sd": Flavour(
        "sd",
        StableDiffusionPipeline,
        DynamicCFGStableDiffusionPipeline,
        tiny_sd_components,
        "dynamic_cfg_stable_diffusion",
        SDCFGCutoffCallback,
    ),
    "sdxl": Flavour(
        "sdxl",
        StableDiffusionXLPipeline,
        DynamicCFGStableDiffusionXLPipeline,
        tiny_sdxl_components,
        "dynamic_cfg_stable_diffusion_xl",
        SDXLCFGCutoffCallback,
    ),
}


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


@pytest.fixture(params=list(FLAVOURS))
def flavour(request) -> Flavour:
    return FLAVOURS[request.param]


def make_pipes(flavour: Flavour, tmp_path, **component_kwargs):
    """Stock and dynamic pipelines sharing the same component objects."""
    components = flavour.components(tmp_path, **component_kwargs)
    stock = flavour.stock_class(**components)
    dynamic = flavour.dynamic_class(**components)
    for pipe in (stock, dynamic):
        pipe.set_progress_bar_config(disable=True)
    return stock, dynamic


def run(pipe, seed=0, **kwargs):
    arguments = {"prompt": PROMPTS, "num_inference_steps": 3, "output_type": "np"}
    arguments.update(kwargs)
    return pipe(**arguments, generator=torch.Generator().manual_seed(seed)).images


def unet_batch_sizes(pipe):
    """Record the UNet's batch size on every call; returns the list and the hook handle."""
    sizes = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes, handle


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_static_schedule_is_bit_identical_to_stock(flavour, tmp_path, output_type):
    stock, dynamic = make_pipes(flavour, tmp_path)
    kwargs = {
        "negative_prompt": NEGATIVE_PROMPTS,
        "num_images_per_prompt": 2,
        "guidance_rescale": 0.7,
        "output_type": output_type,
    }
    expected = run(stock, **kwargs)
    assert expected.shape[0] == 4
    for schedule in ("static", None, GuidanceSchedule()):
        got = run(dynamic, guidance_schedule=schedule, **kwargs)
        if output_type == "latent":
            assert torch.equal(got, expected)
        else:
            assert np.array_equal(got, expected)
    # the default guidance_schedule is static, and a single string prompt works too
    assert np.array_equal(
        run(dynamic, prompt="the cat", guidance_scale=3, output_type="np"),
        run(stock, prompt="the cat", guidance_scale=3, output_type="np"),
    )
    assert torch.equal(dynamic.guidance_scales, torch.full((3,), 3.0, dtype=torch.float64))


def test_static_schedule_is_identical_with_stock_callbacks(flavour, tmp_path):
    stock, dynamic = make_pipes(flavour, tmp_path)

    def damp_latents(pipe, step_index, timestep, callback_kwargs):
        assert callback_kwargs["prompt_embeds"].shape[0] == 2 * len(PROMPTS)  # the full CFG batch, as in stock
        return {"latents": callback_kwargs["latents"] * 0.9}

    kwargs = {"callback_on_step_end": damp_latents, "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"]}
    assert np.array_equal(run(dynamic, **kwargs), run(stock, **kwargs))

    # diffusers' cutoff callback sets `pipe._guidance_scale = 0` and slices the embeddings mid-run
    cutoff = {
        "callback_on_step_end": flavour.cutoff_callback(cutoff_step_ratio=None, cutoff_step_index=1),
        "prompt": "the cat",
    }
    assert np.array_equal(run(dynamic, **cutoff), run(stock, **cutoff))


def test_each_step_uses_its_scheduled_scale(flavour, tmp_path):
    """Per-step scales equal the stock pipeline driven by a callback that sets `_guidance_scale` before each step."""
    stock, dynamic = make_pipes(flavour, tmp_path)
    scales = [3.0, 6.5, 2.0, 4.25]

    def set_next_scale(pipe, step_index, timestep, callback_kwargs):
        if step_index + 1 < len(scales):
            pipe._guidance_scale = scales[step_index + 1]
        return callback_kwargs

    common = {"num_inference_steps": 4, "negative_prompt": NEGATIVE_PROMPTS, "guidance_rescale": 0.5}
    expected = run(stock, guidance_scale=scales[0], callback_on_step_end=set_next_scale, **common)
    got = run(dynamic, guidance_scale=7.0, guidance_schedule=scales, **common)
    assert np.array_equal(got, expected)
    assert torch.equal(dynamic.guidance_scales, torch.tensor(scales, dtype=torch.float64))


def test_unguided_steps_run_the_conditional_half_only(flavour, tmp_path):
    """With g_i == 1 on every step, the CFG-batched pipeline must give what stock gives without CFG: this checks the
    conditional half is sliced right for several prompts and several images per prompt."""
    stock, dynamic = make_pipes(flavour, tmp_path)
    common = {"num_images_per_prompt": 2, "num_inference_steps": 3}
    expected = run(stock, guidance_scale=1.0, **common)
    sizes, handle = unet_batch_sizes(dynamic)
    got = run(dynamic, guidance_scale=7.5, negative_prompt=NEGATIVE_PROMPTS, guidance_schedule=[1.0] * 3, **common)
    handle.remove()
    assert sizes == [4, 4, 4]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_ip_adapter_image_embeds_are_sliced_on_unguided_steps(flavour, tmp_path):
    stock, dynamic = make_pipes(flavour, tmp_path)
    add_tiny_ip_adapter(dynamic.unet)  # shared with `stock`
    negative, positive = torch.zeros(1, 1, 8), torch.randn(1, 1, 8, generator=torch.Generator().manual_seed(3))
    common = {"num_images_per_prompt": 2, "num_inference_steps": 3}
    cfg_embeds = [torch.cat([negative, positive])]

    guided = {"negative_prompt": NEGATIVE_PROMPTS, "ip_adapter_image_embeds": cfg_embeds, **common}
    assert np.array_equal(run(dynamic, **guided), run(stock, **guided))

    expected = run(stock, guidance_scale=1.0, ip_adapter_image_embeds=[positive], **common)
    got = run(dynamic, guidance_scale=7.5, guidance_schedule=[1.0] * 3, **guided)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # the image embedding matters: the unconditional one gives another image
    other = run(stock, guidance_scale=1.0, ip_adapter_image_embeds=[negative], **common)
    assert not np.allclose(other, expected, atol=1e-4)


@pytest.mark.parametrize(
    "schedule, expected_guided",
    [
        ("static", [True, True, True, True]),
        ("linear", [False, True, True, True]),  # linear starts at w_0 = 0
        ("cosine", [False, True, True, True]),
        ("invlinear", [True, True, True, False]),  # and invlinear ends there
        (GuidanceSchedule("interval", interval=(0.5, 1.0)), [False, False, True, True]),
        (GuidanceSchedule("clamp-linear", clamp=0.0), [False, True, True, True]),
        ([1.0, 4.0, 1.0, 1.0], [False, True, False, False]),
    ],
)
def test_unconditional_pass_is_skipped_where_weight_is_zero(flavour, tmp_path, schedule, expected_guided):
    _, dynamic = make_pipes(flavour, tmp_path)
    sizes, handle = unet_batch_sizes(dynamic)
    run(dynamic, guidance_scale=5.0, num_inference_steps=4, guidance_schedule=schedule, num_images_per_prompt=2)
    handle.remove()
    conditional_batch = 2 * len(PROMPTS)
    assert sizes == [2 * conditional_batch if guided else conditional_batch for guided in expected_guided]
    assert [bool(scale != 1) for scale in dynamic.guidance_scales] == expected_guided
    # cost model: k zero-weight steps out of N cost (2N - k) / (2N) of static CFG in denoiser samples
    steps, zero_weight_steps = len(expected_guided), expected_guided.count(False)
    assert sum(sizes) / (2 * conditional_batch * steps) == (2 * steps - zero_weight_steps) / (2 * steps)


def test_callback_tensor_inputs_keep_the_full_batch_on_unguided_steps(tmp_path):
    _, dynamic = make_pipes(FLAVOURS["sdxl"], tmp_path)
    seen = []

    def record(pipe, step_index, timestep, callback_kwargs):
        seen.append({name: tensor.shape[0] for name, tensor in callback_kwargs.items()})
        return {}

    tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    run(
        dynamic,
        guidance_schedule="linear",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=tensor_inputs,
    )
    assert seen == [{"latents": 2, "prompt_embeds": 4, "add_text_embeds": 4, "add_time_ids": 4}] * 3


def test_guidance_scales_property_reports_the_last_call(flavour, tmp_path):
    _, dynamic = make_pipes(flavour, tmp_path)
    assert dynamic.guidance_scales is None
    schedule = GuidanceSchedule("pcs", power=1.0)
    run(dynamic, prompt="the cat", guidance_scale=4.0, num_inference_steps=5, guidance_schedule=schedule)
    assert torch.equal(dynamic.guidance_scales, schedule.scales(4.0, 5))
    run(dynamic, prompt="the cat", num_inference_steps=2, guidance_schedule=lambda i, n, g: 1.0 + i)
    assert dynamic.guidance_scales.tolist() == [1.0, 2.0]


def test_denoising_end_schedules_over_the_steps_actually_run(tmp_path):
    _, dynamic = make_pipes(FLAVOURS["sdxl"], tmp_path)
    sizes, handle = unet_batch_sizes(dynamic)
    run(dynamic, num_inference_steps=6, denoising_end=0.5, guidance_schedule="linear", output_type="latent")
    handle.remove()
    assert len(sizes) == len(dynamic.guidance_scales) < 6
    assert dynamic.guidance_scales.mean().item() == pytest.approx(5.0)  # normalised over the steps run


@pytest.mark.parametrize(
    "scheduler_class, expected_sizes",
    [
        # PNDM repeats its second timestep; both evaluations there share step 1 of the schedule
        (PNDMScheduler, [2, 4, 4, 4]),
        # Heun evaluates twice per step at repeated timesteps: [t0, t1, t1, t2, t2]
        (HeunDiscreteScheduler, [2, 4, 4, 4, 4]),
        # KDPM2 evaluates at intermediate timesteps; evaluations are grouped by the scheduler's order
        (KDPM2DiscreteScheduler, [2, 2, 4, 4, 4]),
    ],
)
def test_multi_evaluation_schedulers_map_evaluations_to_schedule_steps(tmp_path, scheduler_class, expected_sizes):
    _, dynamic = make_pipes(FLAVOURS["sd"], tmp_path)
    # skip_prk_steps: Stable Diffusion's PNDM configuration
    dynamic.scheduler = scheduler_class.from_config(dynamic.scheduler.config, skip_prk_steps=True)
    sizes, handle = unet_batch_sizes(dynamic)
    image = run(dynamic, num_inference_steps=3, guidance_schedule="linear")
    handle.remove()
    assert sizes == expected_sizes
    assert np.isfinite(image).all()


def test_schedule_step_indices():
    assert schedule_step_indices(torch.tensor([900, 600, 300]), 3, 1) == [0, 1, 2]
    assert schedule_step_indices(torch.tensor([800, 600, 600, 400, 200, 0]), 5, 1) == [0, 1, 1, 2, 3, 4]
    assert schedule_step_indices(torch.tensor([9.0, 7.0, 7.0, 5.0, 5.0]), 3, 2) == [0, 1, 1, 2, 2]
    assert schedule_step_indices(torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0]), 3, 2) == [0, 0, 1, 1, 2]


def test_guidance_distilled_unet_keeps_stock_behaviour_and_rejects_schedules(tmp_path):
    stock, dynamic = make_pipes(FLAVOURS["sd"], tmp_path, time_cond_proj_dim=8)
    assert np.array_equal(run(dynamic, guidance_scale=6.0), run(stock, guidance_scale=6.0))
    with pytest.raises(ValueError, match="guidance-distilled"):
        run(dynamic, guidance_scale=6.0, guidance_schedule="linear")


def test_bad_schedules_are_rejected(flavour, tmp_path):
    _, dynamic = make_pipes(flavour, tmp_path)
    with pytest.raises(ValueError, match="Valid kinds") as error:
        run(dynamic, guidance_schedule="quadratic")
    assert all(kind in str(error.value) for kind in GUIDANCE_SCHEDULE_KINDS)
    with pytest.raises(ValueError, match="num_inference_steps is 3"):
        run(dynamic, guidance_schedule=[2.0, 3.0])
    with pytest.raises(ValueError, match="guidance_scale >= 1"):
        run(dynamic, guidance_scale=0.5, guidance_schedule="cosine")
    with pytest.raises(ValueError, match="turns classifier-free guidance off"):
        run(dynamic, guidance_scale=1.0, guidance_schedule=[2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="needs `clamp`"):
        run(dynamic, guidance_schedule="clamp-linear")
    with pytest.raises(ValueError, match=">= 1"):
        run(dynamic, guidance_schedule=[2.0, 0.5, 3.0])
    with pytest.raises(TypeError, match="guidance_schedule"):
        run(dynamic, guidance_schedule=3.0)
    # static keeps stock semantics: guidance_scale <= 1 simply turns CFG off
    sizes, handle = unet_batch_sizes(dynamic)
    run(dynamic, guidance_scale=0.5)
    handle.remove()
    assert sizes == [2, 2, 2]


def test_loads_as_custom_pipeline_from_a_saved_stock_folder(flavour, tmp_path):
    stock, dynamic = make_pipes(flavour, tmp_path)
    stock.save_pretrained(tmp_path / "stock")
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "stock",
        custom_pipeline=custom_pipeline_path(flavour.file_name),
        trust_remote_code=True,
        local_files_only=True,
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == flavour.dynamic_class.__name__
    assert isinstance(loaded, flavour.stock_class)
    kwargs = {"guidance_schedule": GuidanceSchedule("interval", interval=(0.3, 0.8)), "guidance_scale": 4.0}
    assert np.array_equal(run(loaded, **kwargs), run(dynamic, **kwargs))
    assert torch.equal(loaded.guidance_scales, dynamic.guidance_scales)


def test_save_and_load_round_trip(flavour, tmp_path):
    _, dynamic = make_pipes(flavour, tmp_path)
    dynamic.save_pretrained(tmp_path / "saved")
    model_index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    # a stock folder: the storydiff class extends the stock one and keeps its components
    assert model_index["_class_name"] == flavour.stock_class.__name__
    assert not (tmp_path / "saved" / "storydiff_pipeline.py").exists()
    loaded = flavour.dynamic_class.from_pretrained(tmp_path / "saved", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is flavour.dynamic_class
    assert np.array_equal(run(loaded, guidance_schedule="cosine"), run(dynamic, guidance_schedule="cosine"))
    # the stock class and plain DiffusionPipeline load it as it is, without trust_remote_code
    for stock in (
        flavour.stock_class.from_pretrained(tmp_path / "saved", local_files_only=True),
        DiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True),
    ):
        stock.set_progress_bar_config(disable=True)
        assert type(stock) is flavour.stock_class
        assert np.array_equal(run(stock), run(dynamic))


def test_lora_adapters_save_and_load(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    _, dynamic = make_pipes(FLAVOURS["sd"], tmp_path)
    without_lora = run(dynamic, guidance_schedule="linear")
    torch.manual_seed(1)
    lora_config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    lora_config.init_lora_weights = False  # random B, so the adapter changes the output
    dynamic.unet.add_adapter(lora_config)
    with_lora = run(dynamic, guidance_schedule="linear")
    assert not np.allclose(with_lora, without_lora, atol=1e-4)
    DynamicCFGStableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(dynamic.unet), safe_serialization=True
    )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    _, fresh = make_pipes(FLAVOURS["sd"], tmp_path)
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="tiny")
    np.testing.assert_allclose(run(fresh, guidance_schedule="linear"), with_lora, atol=1e-6)
    fresh.set_adapters("tiny", adapter_weights=0.0)
    np.testing.assert_allclose(run(fresh, guidance_schedule="linear"), without_lora, atol=1e-6)


def test_attention_processors_can_be_swapped(flavour, tmp_path):
    stock, dynamic = make_pipes(flavour, tmp_path)
    with_sdpa = run(dynamic, guidance_schedule="linear")
    dynamic.unet.set_attn_processor(AttnProcessor())  # shared with `stock`
    assert all(isinstance(p, AttnProcessor) for p in dynamic.unet.attn_processors.values())
    np.testing.assert_allclose(run(dynamic, guidance_schedule="linear"), with_sdpa, atol=1e-5)
    assert np.array_equal(run(dynamic), run(stock))


def test_output_types_and_tuple_return(tmp_path):
    _, dynamic = make_pipes(FLAVOURS["sd"], tmp_path)
    images = run(dynamic, guidance_schedule="linear", output_type="pil")
    assert len(images) == 2 and images[0].size == (32, 32)
    output = dynamic(
        "the cat",
        num_inference_steps=2,
        guidance_schedule="cosine",
        output_type="pt",
        return_dict=False,
        generator=torch.Generator().manual_seed(0),
    )
    assert isinstance(output, tuple) and output[0].shape == (1, 3, 32, 32)
