"""VideoLDMUNet: an exact identity at init (text, class, timestep_cond and SDXL added conditions; every timestep
layout), what the temporal layers may and may not touch (image-only frames, other videos, the wrapped 2D UNet),
freezing, temporal-layer and whole-model save/load, diffusers model contracts, and errors on bad input.

Tiny random UNets from tests/tiny_stable_diffusion.py on 8x8 latents; temporal heads of 4 channels divide both block
widths (8, 16). "Perturbed" temporal layers get random weights, so they are no longer the identity.
"""

import copy
import json
import os
import threading

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from tiny_stable_diffusion import TEXT_HIDDEN_SIZE, tiny_sd_components, tiny_sdxl_components

from storydiff import VideoLDMUNet

BATCH, CHANNELS, FRAMES, SIZE = 2, 4, 3, 8
TEMPORAL = dict(temporal_attention_head_dim=4, num_frames=FRAMES, max_frames=4)


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


def small_unet(**overrides) -> UNet2DConditionModel:
    """The tiny SD UNet's architecture on 8x8 latents, with `overrides` (class embeddings, other widths ...)."""
    torch.manual_seed(0)
    config = dict(
        sample_size=SIZE,
        in_channels=CHANNELS,
        out_channels=CHANNELS,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN_SIZE,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return UNet2DConditionModel(**{**config, **overrides}).eval()


@pytest.fixture(scope="module")
def base_unets(tmp_path_factory):
    """The 2D UNets the tests wrap (always wrap a deep copy: from_unet2d changes the UNet it is given)."""
    folder = tmp_path_factory.mktemp("tokenizers")
    return {
        "text": tiny_sd_components(folder, sample_size=SIZE)["unet"],
        "class": small_unet(num_class_embeds=5),
        "timestep_cond": tiny_sd_components(folder, sample_size=SIZE, time_cond_proj_dim=6)["unet"],
        "sdxl": tiny_sdxl_components(folder, sample_size=SIZE)["unet"],
    }


def inputs(unet: UNet2DConditionModel, seed: int = 1) -> dict:
    """A random batch of BATCH videos for `unet`: sample, per-video timesteps, text and the extra conditions."""
    generator = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(BATCH, CHANNELS, FRAMES, SIZE, SIZE, generator=generator),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(BATCH, 5, unet.config.cross_attention_dim, generator=generator),
    }
    if unet.config.num_class_embeds:
        kwargs["class_labels"] = torch.tensor([1, 4])
    if unet.config.time_cond_proj_dim:
        kwargs["timestep_cond"] = torch.randn(BATCH, unet.config.time_cond_proj_dim, generator=generator)
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(BATCH, 32, generator=generator),
            "time_ids": torch.randn(BATCH, 6, generator=generator),
        }
    return kwargs


def per_frame_2d(unet: UNet2DConditionModel, sample, timestep, encoder_hidden_states, **conditions) -> torch.Tensor:
    """The image model on every frame: the flat (batch * frames) batch, every per-video input repeated per frame."""
    batch, channels, frames, height, width = sample.shape
    timestep = torch.as_tensor(timestep)
    if timestep.ndim == 0:
        flat_timestep = timestep.expand(batch * frames)
    elif timestep.ndim == 1:
        flat_timestep = timestep.repeat_interleave(frames)
    else:
        flat_timestep = timestep.reshape(-1)

    def repeat(value):
        if isinstance(value, dict):
            return {key: repeat(item) for key, item in value.items()}
        return value.repeat_interleave(frames, dim=0)

    flat = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
    with torch.no_grad():
        out = unet(flat, flat_timestep, repeat(encoder_hidden_states), **{k: repeat(v) for k, v in conditions.items()})
    return out.sample.reshape(batch, frames, -1, height, width).permute(0, 2, 1, 3, 4)


def video(model: VideoLDMUNet, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def perturb_temporal(model: VideoLDMUNet, seed: int = 0, std: float = 0.3) -> VideoLDMUNet:
    """Random temporal weights (alpha left as it is), so that the temporal layers change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.temporal_parameters().items():
            if "temporal_blender" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def wrapped(base_unets, kind: str = "text", perturbed: bool = False, **settings) -> VideoLDMUNet:
    model = VideoLDMUNet.from_unet2d(copy.deepcopy(base_unets[kind]), **{**TEMPORAL, **settings})
    return perturb_temporal(model) if perturbed else model


# ------------------------------------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("kind", ["text", "class", "timestep_cond", "sdxl"])
@pytest.mark.parametrize("timestep", ["per_video", "scalar", "per_frame"])
def test_identity_at_init_equals_the_2d_unet_frame_by_frame(base_unets, kind, timestep):
    reference = copy.deepcopy(base_unets[kind])
    model = wrapped(base_unets, kind)
    kwargs = inputs(reference)
    kwargs["timestep"] = {
        "per_video": torch.tensor([10, 700]),
        "scalar": 321,
        "per_frame": torch.tensor([[1, 400, 999], [20, 21, 22]]),
    }[timestep]
    out = video(model, **kwargs)
    assert out.shape == kwargs["sample"].shape
    assert torch.equal(out, per_frame_2d(reference, **kwargs))


def test_identity_with_a_projected_text_unet_and_no_temporal_cross_attention():
    unet = small_unet(encoder_hid_dim=24, encoder_hid_dim_type="text_proj")
    reference = copy.deepcopy(unet)
    model = VideoLDMUNet.from_unet2d(unet, temporal_cross_attention=False, **TEMPORAL)
    kwargs = inputs(reference)
    kwargs["encoder_hidden_states"] = torch.randn(BATCH, 5, 24)
    assert torch.equal(video(model, **kwargs), per_frame_2d(reference, **kwargs))


# ------------------------------------------------------------------------------------------------ temporal layers


def test_perturbed_temporal_layers_change_video_frames_but_not_image_only_frames(base_unets):
    model = wrapped(base_unets, perturbed=True)
    kwargs = inputs(model.unet)
    image_model = per_frame_2d(model.unet, **kwargs)
    out = video(model, **kwargs)
    assert (out - image_model).abs().max() > 1e-3

    all_images = video(model, **kwargs, image_only_indicator=torch.ones(BATCH, FRAMES))
    assert torch.equal(all_images, image_model)

    # one video of separate images, one real video: each gets exactly its own result
    mixed = video(model, **kwargs, image_only_indicator=torch.tensor([[1.0, 1, 1], [0, 0, 0]]))
    assert torch.equal(mixed[0], image_model[0])
    assert torch.equal(mixed[1], out[1])

    # single image-only frames inside a video keep the 2D output; the others do not
    partly = video(model, **kwargs, image_only_indicator=torch.tensor([[1.0, 0, 1], [0, 0, 0]]))
    assert torch.equal(partly[:, :, [0, 2]][0], image_model[0, :, [0, 2]])
    assert (partly[0, :, 1] - image_model[0, :, 1]).abs().max() > 1e-3

    with model.temporal_layers_disabled():
        assert torch.equal(video(model, **kwargs), image_model)
    assert torch.equal(video(model, **kwargs), out)  # the context restores the temporal layers


@pytest.mark.parametrize("merge_strategy", ["learned", "fixed"])
def test_temporal_layers_disabled_gives_the_image_model_for_every_merge_strategy(base_unets, merge_strategy):
    """`temporal_layers_disabled()` is the image model for every merge strategy (AlphaBlender itself honours the
    image-only indicator for `learned_with_images` alone)."""
    model = wrapped(base_unets, perturbed=True, merge_strategy=merge_strategy)
    kwargs = inputs(model.unet)
    image_model = per_frame_2d(model.unet, **kwargs)
    assert (video(model, **kwargs) - image_model).abs().max() > 1e-3
    with model.temporal_layers_disabled():
        disabled = video(model, **kwargs)
    assert torch.equal(disabled, image_model), (
        f"temporal_layers_disabled() does not disable the temporal layers with merge_strategy={merge_strategy!r} "
        f"(max difference to the image model {(disabled - image_model).abs().max():.3g}); its docstring promises "
        "exactly the image model applied frame by frame"
    )


def test_wrapped_2d_unet_is_still_the_image_model(base_unets):
    unet = copy.deepcopy(base_unets["text"])
    kwargs = inputs(unet)
    flat = kwargs["sample"][:, :, 0]
    text = kwargs["encoder_hidden_states"]
    with torch.no_grad():
        before = unet(flat, 10, text).sample
    model = perturb_temporal(VideoLDMUNet.from_unet2d(unet, **TEMPORAL))
    assert model.unet is unet
    with torch.no_grad():
        assert torch.equal(unet(flat, 10, text).sample, before)
    video(model, **kwargs)
    with torch.no_grad():
        assert torch.equal(unet(flat, 10, text).sample, before)
    model(**kwargs).sample.sum().backward()  # a training forward (no gradient checkpointing)
    with torch.no_grad():
        assert torch.equal(unet(flat, 10, text).sample, before)


@pytest.mark.parametrize("perturbed", [False, True])
def test_temporal_layers_mix_only_over_the_frames_of_one_video(base_unets, perturbed):
    model = wrapped(base_unets, perturbed=perturbed)
    kwargs = inputs(model.unet)
    out = video(model, **kwargs)
    changed = dict(kwargs, sample=kwargs["sample"].clone())
    changed["sample"][0, :, 1] += 1.0  # change frame 1 of video 0
    new = video(model, **changed)
    assert (new[0, :, 1] - out[0, :, 1]).abs().max() > 1e-3
    assert torch.equal(new[1], out[1])  # the other video never sees it
    others = new[0, :, [0, 2]], out[0, :, [0, 2]]
    if perturbed:  # the other frames of the same video see it through the temporal layers only
        assert (others[0] - others[1]).abs().max() > 1e-4
    else:
        assert torch.equal(*others)


# ------------------------------------------------------------------------------------------------ training


def test_freeze_spatial_trains_only_temporal_layers(base_unets):
    model = wrapped(base_unets)
    model.freeze_spatial()
    temporal = model.temporal_parameters()
    assert temporal and all(name.startswith("unet.") for name in temporal)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (name in temporal), name
    model.train()
    model(**inputs(model.unet)).sample.square().mean().backward()
    for name, parameter in model.named_parameters():
        if name in temporal:
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    # the zero-initialised output layers of every temporal branch get a gradient at once
    resnets = [name for name, module in model.named_modules() if type(module).__name__ == "SpatioTemporalResnet"]
    transformers = [n for n, module in model.named_modules() if type(module).__name__ == "SpatioTemporalTransformer"]
    assert (len(resnets), len(transformers)) == (8, 4)
    zero_initialised = [f"{name}.temporal_conv.conv2.{kind}" for name in resnets for kind in ("weight", "bias")]
    zero_initialised += [f"{name}.temporal_transformer.{layer}.{kind}" for name in transformers
                         for layer in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2", "ff_in.net.2")
                         for kind in ("weight", "bias")]  # fmt: skip
    for name in zero_initialised:
        assert temporal[name].grad.abs().max() > 0, name
    # (conv block, blender) per resnet, (transformer, position embedding, blender) per spatial transformer
    assert len(model.temporal_modules()) == 2 * len(resnets) + 3 * len(transformers)


def test_gradient_checkpointing_gives_the_same_gradients(base_unets):
    model = wrapped(base_unets, perturbed=True).train()
    kwargs = inputs(model.unet)

    def gradients():
        model.zero_grad(set_to_none=True)
        out = model(**kwargs).sample
        out.square().mean().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    out, expected = gradients()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    checkpointed_out, got = gradients()
    assert torch.equal(checkpointed_out, out)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_with_two_forwards_before_backward(base_unets):
    """With gradient checkpointing each wrapper is recomputed during backward with its own pass's frames, text and
    image_only_indicator: a loss over two forwards (two clips, image + video batches of joint training) gets the
    gradients it gets without checkpointing."""
    model = wrapped(base_unets, perturbed=True).train()
    kwargs = inputs(model.unet)
    second = dict(
        kwargs,
        encoder_hidden_states=torch.randn(BATCH, 5, TEXT_HIDDEN_SIZE, generator=torch.Generator().manual_seed(9)),
    )
    second["image_only_indicator"] = torch.tensor([[1.0, 1, 1], [0, 0, 0]])

    def gradients():
        model.zero_grad(set_to_none=True)
        (model(**kwargs).sample.square().mean() + model(**second).sample.square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients()
    model.enable_gradient_checkpointing()
    got = gradients()
    worst = max(((got[name] - expected[name]).abs().max() / expected[name].abs().max().clamp(min=1e-12)).item()
                for name in expected)  # fmt: skip
    assert worst < 1e-4, (
        f"gradient checkpointing changes the gradients of a two-forward loss (worst relative difference {worst:.3g}): "
        "the recomputation in backward uses the second forward's text / image_only_indicator for the first"
    )


def test_wrapped_2d_unet_is_the_image_model_after_a_checkpointed_training_forward(base_unets):
    """After a checkpointed training forward the wrapped 2D UNet called on its own (e.g. for validation images) is
    the image model: no frame layout is left behind."""
    unet = copy.deepcopy(base_unets["text"])
    flat = torch.randn(
        4, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(3)
    )  # 4 images: not a multiple of FRAMES
    text = torch.randn(4, 5, TEXT_HIDDEN_SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = unet(flat, 10, text).sample
    model = perturb_temporal(VideoLDMUNet.from_unet2d(unet, **TEMPORAL)).train()
    model.enable_gradient_checkpointing()
    model(**inputs(unet)).sample.square().mean().backward()
    model.eval()
    try:
        with torch.no_grad():
            after = unet(flat, 10, text).sample
    except RuntimeError as error:
        pytest.fail(f"the wrapped 2D UNet fails after a checkpointed training forward of the VideoLDMUNet: {error}")
    assert torch.equal(after, before), "the wrapped 2D UNet is not the image model after a checkpointed forward"


def test_concurrent_forwards_on_one_model_do_not_share_frame_state(base_unets):
    """The frame layout (frames, text, image_only_indicator) of a forward is per thread, so two threads using one
    VideoLDMUNet (one pipeline, or `from_pipe` per request as the serving guide recommends) do not change each other's
    results. The interleaving is forced: A waits in its mid block while B runs a whole forward."""
    model = wrapped(base_unets, perturbed=True)
    first = inputs(model.unet, seed=1)
    second = inputs(model.unet, seed=2)
    second["sample"] = second["sample"][:, :, :2]  # another frame count
    expected = video(model, **first)
    a_in_mid_block, b_done = threading.Event(), threading.Event()
    results, errors = {}, []

    def pause_a(module, args):
        if threading.current_thread().name == "A":
            a_in_mid_block.set()
            b_done.wait(timeout=60)

    def run(name, kwargs, before=None):
        try:
            if before is not None:
                before.wait(timeout=60)
            results[name] = video(model, **kwargs)
        except BaseException as error:
            errors.append(error)
        finally:
            if name == "B":
                b_done.set()

    hook = model.unet.mid_block.register_forward_pre_hook(pause_a)
    try:
        threads = [
            threading.Thread(target=run, args=("A", first), name="A"),
            threading.Thread(target=run, args=("B", second, a_in_mid_block), name="B"),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        hook.remove()
    assert not errors, f"a concurrent forward failed: {errors[0]!r}"
    assert torch.equal(results["A"], expected), (
        "a forward that overlaps another forward on the same VideoLDMUNet gives another output (max difference "
        f"{(results['A'] - expected).abs().max():.3g}): the per-call frame layout lives on the shared model"
    )


# ------------------------------------------------------------------------------------------------ saving


def test_save_and_load_temporal_layers(base_unets, tmp_path):
    model = wrapped(base_unets, perturbed=True)
    kwargs = inputs(model.unet)
    expected = video(model, **kwargs)
    folder = tmp_path / "temporal"
    model.save_temporal_layers(folder)
    assert sorted(os.listdir(folder)) == ["temporal_config.json", "temporal_layers.safetensors"]
    saved = load_file(folder / "temporal_layers.safetensors")
    assert saved.keys() == model.temporal_parameters().keys()
    assert all(any(part.startswith("temporal_") for part in name.split(".")) for name in saved)
    assert not any(".spatial." in name for name in saved)
    temporal_bytes = 4 * sum(tensor.numel() for tensor in saved.values())
    model.save_pretrained(tmp_path / "whole")
    whole_bytes = os.path.getsize(tmp_path / "whole" / "diffusion_pytorch_model.safetensors")
    file_bytes = os.path.getsize(folder / "temporal_layers.safetensors")
    assert temporal_bytes <= file_bytes < temporal_bytes + 64 * 1024  # the weights plus a header, nothing else
    assert file_bytes < 0.6 * whole_bytes  # none of the image model (these tiny temporal layers are ~45% of it)
    settings = json.loads((folder / "temporal_config.json").read_text())
    assert settings["base_unet_block_out_channels"] == [8, 16] and settings["num_frames"] == FRAMES

    fresh = VideoLDMUNet.from_unet2d(copy.deepcopy(base_unets["text"]), **TEMPORAL)
    assert not torch.equal(video(fresh, **kwargs), expected)
    fresh.load_temporal_layers(folder)
    assert torch.equal(video(fresh, **kwargs), expected)

    # straight from from_unet2d
    loaded = VideoLDMUNet.from_unet2d(copy.deepcopy(base_unets["text"]), temporal_layers=folder, **TEMPORAL)
    assert (loaded.config.num_frames, loaded.config.max_frames) == (FRAMES, 4)
    assert torch.equal(video(loaded, **kwargs), expected)


def test_load_temporal_layers_errors(base_unets, tmp_path):
    model = wrapped(base_unets)
    folder = tmp_path / "temporal"
    model.save_temporal_layers(folder)
    no_cross = wrapped(base_unets, temporal_cross_attention=False)
    with pytest.raises(ValueError, match="other settings.*temporal_cross_attention"):
        no_cross.load_temporal_layers(folder)
    with pytest.raises(ValueError, match="other settings.*temporal_conv_kernel_size"):
        wrapped(base_unets, temporal_conv_kernel_size=5).load_temporal_layers(folder)
    wider = VideoLDMUNet.from_unet2d(small_unet(block_out_channels=(16, 32)), **TEMPORAL)
    with pytest.raises(ValueError, match="base UNets differ"):
        wider.load_temporal_layers(folder)
    deeper = VideoLDMUNet.from_unet2d(small_unet(layers_per_block=2), **TEMPORAL)
    with pytest.raises(ValueError, match="do not fit this UNet.*another base model"):
        deeper.load_temporal_layers(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="temporal_layers.safetensors is missing.*save_temporal_layers"):
        model.load_temporal_layers(tmp_path / "empty")


def test_load_temporal_layers_from_a_missing_folder_says_so(base_unets, tmp_path):
    """Reported (error message): a local folder that does not exist is handed to `hf_hub_download` as a repository id,
    and the user reads "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    model = wrapped(base_unets)
    missing = tmp_path / "no-such-folder"
    with pytest.raises(Exception) as raised:
        model.load_temporal_layers(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert isinstance(raised.value, OSError) and "Repo id must be" not in message, (
        f"loading temporal layers from a missing local folder gives {type(raised.value).__name__}: {message!r}, "
        "which does not say that the folder does not exist"
    )


def test_save_pretrained_and_from_pretrained_round_trip(base_unets, tmp_path):
    model = wrapped(base_unets, "class", perturbed=True, merge_strategy="learned", mix_factor=0.2)
    kwargs = inputs(model.unet)
    expected = video(model, **kwargs)

    rebuilt = VideoLDMUNet.from_config(model.config)
    assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in model.named_parameters()]
    assert set(rebuilt.attn_processors) == set(model.attn_processors)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(video(rebuilt.eval(), **kwargs), expected)

    model.save_pretrained(tmp_path)
    loaded = VideoLDMUNet.from_pretrained(tmp_path)
    assert isinstance(loaded, VideoLDMUNet)
    assert loaded.config.merge_strategy == "learned" and loaded.config.num_frames == FRAMES
    assert loaded.unet.config.num_class_embeds == 5
    assert torch.equal(video(loaded, **kwargs), expected)


# ------------------------------------------------------------------------------------------------ diffusers contracts


def test_attention_processors(base_unets):
    model = wrapped(base_unets, perturbed=True)
    kwargs = inputs(model.unet)
    expected = video(model, **kwargs)
    names = list(model.attn_processors)
    assert any("temporal_transformer.attn1" in name for name in names)
    assert any("temporal_transformer.attn2" in name for name in names)
    assert any(".spatial." in name for name in names)
    model.set_attn_processor(AttnProcessor())
    assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
    torch.testing.assert_close(video(model, **kwargs), expected, rtol=1e-5, atol=1e-5)
    model.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(video(model, **kwargs), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("storage_dtype, tolerance", [(torch.bfloat16, 0.05), (torch.float8_e4m3fn, 0.3)])
def test_layerwise_casting(base_unets, storage_dtype, tolerance):
    model = wrapped(base_unets, perturbed=True)
    kwargs = inputs(model.unet)
    expected = video(model, **kwargs)
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
    conv = model.unet.down_blocks[0].resnets[0].temporal_conv
    assert conv.conv1.weight.dtype == storage_dtype
    assert conv.norm1.weight.dtype == torch.float32  # norms and alpha are kept in full precision
    assert model.unet.down_blocks[0].resnets[0].temporal_blender.mix_factor.dtype == torch.float32
    out = video(model, **kwargs)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - expected).abs().max() < tolerance * expected.abs().max()


def test_float64(base_unets):
    model = wrapped(base_unets, perturbed=True)
    kwargs = inputs(model.unet)
    expected = video(model, **kwargs)
    model.to(torch.float64)
    assert model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.temporal_parameters().values())
    kwargs = {key: value.double() if value.is_floating_point() else value for key, value in kwargs.items()}
    out = video(model, **kwargs)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ bad input


def test_from_unet2d_refuses_other_models_and_wrapped_unets(base_unets):
    image_unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
                             down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))  # fmt: skip
    with pytest.raises(TypeError, match="needs a diffusers UNet2DConditionModel, got UNet2DModel"):
        VideoLDMUNet.from_unet2d(image_unet)
    model = wrapped(base_unets)
    with pytest.raises(ValueError, match="already has temporal layers"):
        VideoLDMUNet.from_unet2d(model.unet)
    projected = small_unet(encoder_hid_dim=24, encoder_hid_dim_type="text_proj")
    with pytest.raises(ValueError, match="encoder_hid_dim_type.*temporal_cross_attention=False"):
        VideoLDMUNet.from_unet2d(projected, **TEMPORAL)


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(num_frames=5, max_frames=4), r"`num_frames` \(5\) cannot exceed `max_frames` \(4\)"),
        (dict(num_frames=0), "`num_frames` must be a positive int"),
        (dict(temporal_conv_kernel_size=2), "`temporal_conv_kernel_size` must be a positive odd int, got 2"),
        (dict(merge_strategy="mean"), r"Unknown `merge_strategy` 'mean'; choose one of \('learned_with_images'"),
        (dict(temporal_attention_head_dim=3), "`temporal_attention_head_dim`=3, which does not divide.*divisor"),
    ],
)
def test_bad_temporal_settings(base_unets, settings, match):
    unet = copy.deepcopy(base_unets["text"])
    with pytest.raises(ValueError, match=match):
        VideoLDMUNet.from_unet2d(unet, **{**TEMPORAL, **settings})
    with pytest.raises(ValueError, match=match):
        VideoLDMUNet(unet_config=dict(unet.config), **{**TEMPORAL, **settings})


def test_failed_from_unet2d_leaves_the_unet_unchanged(base_unets):
    """Every block is checked before any is wrapped: a refused conversion (a block width that
    `temporal_attention_head_dim` does not divide) leaves the user's UNet as it was, and a retry with valid settings
    works."""
    unet = copy.deepcopy(base_unets["text"])
    with pytest.raises(ValueError, match="does not divide"):
        VideoLDMUNet.from_unet2d(unet, **{**TEMPORAL, "temporal_attention_head_dim": 3})
    converted = [name for name, module in unet.named_modules() if type(module).__name__.startswith("SpatioTemporal")]
    assert not converted, f"a failed from_unet2d left the given UNet with temporal layers in {converted}"
    VideoLDMUNet.from_unet2d(unet, **TEMPORAL)


def test_bad_forward_inputs(base_unets):
    model = wrapped(base_unets)
    kwargs = inputs(model.unet)

    def fails(match, **changes):
        with pytest.raises(ValueError, match=match):
            model(**{**kwargs, **changes})

    sample = kwargs["sample"]
    fails(r"`sample` must be \(batch, channels, frames, height, width\).*frames = 1", sample=sample[:, :, 0])
    fails("`sample` has 3 channels, the UNet takes 4", sample=sample[:, :3])
    five = torch.randn(BATCH, CHANNELS, 5, SIZE, SIZE)
    fails("Got 5 frames but this model takes at most max_frames=4", sample=five)
    per_frame_text = kwargs["encoder_hidden_states"].repeat_interleave(FRAMES, dim=0)
    fails(r"`encoder_hidden_states` must be \(batch=2, tokens, dim\), the text once per video",
          encoder_hidden_states=per_frame_text)  # fmt: skip
    fails(r"`image_only_indicator` must be \(batch=2, frames=3\)", image_only_indicator=torch.ones(BATCH * FRAMES))
    fails(r"`timestep` must be a scalar, \(batch=2,\) or \(batch=2, frames=3\)", timestep=torch.tensor([1, 2, 3]))
    fails(r"`timestep` must be a scalar", timestep=torch.ones(BATCH, FRAMES + 1))
    assert model.layout.current is None  # a failed call leaves no frame layout behind
