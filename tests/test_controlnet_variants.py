"""ControlNetFullModel and ControlNetLiteModel: zero initialisation, the residual structure, the mid-block-only
connection, drop-in use with diffusers' stock pipeline and MultiControlNetModel, diffusers model contracts, bad
input."""

import json

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from tiny_stable_diffusion import tiny_sd_components

from storydiff import ControlNetFullModel, ControlNetLiteModel
from storydiff.models.controlnet_variants import unet2d_forward_with_residuals

EMBEDDING_CHANNELS = (4, 8)  # stride 2: the tiny VAE's downsampling


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def unet(components) -> UNet2DConditionModel:
    return components["unet"]


def inputs(batch: int = 2, channels: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=generator),
        torch.tensor([10, 600][:batch] + [300] * max(0, batch - 2)),
        torch.randn(batch, 16, 32, generator=generator),
        torch.rand(batch, channels, 32, 32, generator=generator),
    )


def make(kind: str, unet, connect: str = "all", channels: int = 3):
    cls = ControlNetFullModel if kind == "full" else ControlNetLiteModel
    return cls.from_unet(
        unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS, conditioning_channels=channels, connect=connect
    )


def randomised(model, seed: int = 1, std: float = 0.05):
    """Small random weights everywhere, zero convolutions included, so the residuals are not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def unet_output(unet, sample, timestep, text, residuals=None):
    if residuals is None:
        return unet(sample, timestep, text).sample
    down, mid = residuals
    return unet(sample, timestep, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


VARIANTS = [("full", "all"), ("full", "mid_block"), ("lite", "all"), ("lite", "mid_block")]


@pytest.mark.parametrize("kind,connect", VARIANTS)
def test_base_output_unchanged_at_init(unet, kind, connect):
    sample, timestep, text, cond = inputs()
    controlnet = make(kind, unet, connect)
    with torch.no_grad():
        residuals = controlnet(sample, timestep, text, cond, return_dict=False)
        assert all(torch.count_nonzero(r) == 0 for r in residuals[0]) and torch.count_nonzero(residuals[1]) == 0
        assert torch.equal(
            unet_output(unet, sample, timestep, text, residuals), unet_output(unet, sample, timestep, text)
        )


@pytest.mark.parametrize("kind", ["full", "lite"])
def test_residual_structure_matches_stock_controlnet(unet, kind):
    sample, timestep, text, cond = inputs()
    stock = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    with torch.no_grad():
        expected = stock(sample, timestep, text, cond, return_dict=False)
        got = make(kind, unet)(sample, timestep, text, cond, return_dict=False)
    assert [r.shape for r in got[0]] == [r.shape for r in expected[0]]
    assert got[1].shape == expected[1].shape


def test_full_with_all_connections_is_the_stock_controlnet(unet):
    sample, timestep, text, cond = inputs()
    stock = randomised(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS))
    full = make("full", unet)
    full.load_state_dict(stock.state_dict())
    with torch.no_grad():
        expected = stock(sample, timestep, text, cond, conditioning_scale=0.7, return_dict=False)
        got = full(sample, timestep, text, cond, conditioning_scale=0.7, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(got[0], expected[0])) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("kind", ["full", "lite"])
def test_mid_block_only_residual_reaches_the_unet(unet, kind):
    sample, timestep, text, cond = inputs()
    all_connected = randomised(make(kind, unet, "all"))
    mid_only = make(kind, unet, "mid_block")
    mid_only.load_state_dict(all_connected.state_dict())
    with torch.no_grad():
        down_all, mid_all = all_connected(sample, timestep, text, cond, return_dict=False)
        down, mid = mid_only(sample, timestep, text, cond, return_dict=False)
        assert all(torch.count_nonzero(r) == 0 for r in down)
        assert torch.equal(mid, mid_all) and torch.count_nonzero(mid) > 0
        base = unet_output(unet, sample, timestep, text)
        with_mid = unet_output(unet, sample, timestep, text, (down, mid))
        # the effect equals adding the mid residual alone to the middle block's output (down residuals of zero)
        zeros = [torch.zeros_like(r) for r in down_all]
        assert torch.equal(with_mid, unet_output(unet, sample, timestep, text, (zeros, mid_all)))
    assert (with_mid - base).abs().max() > 1e-4


def test_lite_residuals_change_every_skip(unet):
    sample, timestep, text, cond = inputs()
    lite = randomised(make("lite", unet))
    with torch.no_grad():
        down, mid = lite(sample, timestep, text, cond, return_dict=False)
        other_down, _ = lite(sample, timestep, text, torch.rand_like(cond), return_dict=False)
    assert all(torch.count_nonzero(r) > 0 for r in down)
    assert all(not torch.equal(a, b) for a, b in zip(down, other_down))  # the condition reaches every residual


def test_lite_guess_mode_and_scale_follow_controlnet_model(unet):
    sample, timestep, text, cond = inputs()
    lite = randomised(make("lite", unet))
    with torch.no_grad():
        plain_down, plain_mid = lite(sample, timestep, text, cond, return_dict=False)
        scaled_down, scaled_mid = lite(sample, timestep, text, cond, conditioning_scale=0.5, return_dict=False)
        guess_down, guess_mid = lite(sample, timestep, text, cond, guess_mode=True, return_dict=False)
    torch.testing.assert_close(scaled_mid, plain_mid * 0.5)
    scales = torch.logspace(-1, 0, len(plain_down) + 1)
    for plain, guessed, scale in zip(plain_down, guess_down, scales):
        torch.testing.assert_close(guessed, plain * scale)
    torch.testing.assert_close(guess_mid, plain_mid)


def test_lite_is_much_smaller_than_the_full_copy(unet):
    lite, full = make("lite", unet), make("full", unet)
    assert sum(p.numel() for p in lite.parameters()) < 0.3 * sum(p.numel() for p in full.parameters())


def test_stock_pipeline_and_multicontrolnet_accept_both(components):
    unet = components["unet"]
    lite, full = randomised(make("lite", unet)), randomised(make("full", unet, "mid_block"))
    assert isinstance(lite, ControlNetModel) and isinstance(full, ControlNetModel)
    condition = inputs(batch=1)[3]
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=lite)
    pipe.set_progress_bar_config(disable=True)
    single = pipe("a cat", image=condition, num_inference_steps=2, output_type="np", generator=torch.manual_seed(0))
    multi = StableDiffusionControlNetPipeline(**components, controlnet=[lite, full])
    assert isinstance(multi.controlnet, MultiControlNetModel)
    multi.set_progress_bar_config(disable=True)
    images = multi("a cat", image=[condition, condition], controlnet_conditioning_scale=[1.0, 0.5], num_inference_steps=2,
                   output_type="np", generator=torch.manual_seed(0)).images  # fmt: skip
    assert single.images.shape == images.shape == (1, 32, 32, 3)
    assert not torch.equal(torch.from_numpy(single.images), torch.from_numpy(images))


def test_multicontrolnet_sums_the_residuals(unet):
    sample, timestep, text, cond = inputs()
    lite, full = randomised(make("lite", unet), seed=2), randomised(make("full", unet), seed=3)
    second = torch.rand_like(cond)
    with torch.no_grad():
        down, mid = MultiControlNetModel([lite, full])(
            sample, timestep, text, [cond, second], [0.8, 0.3], return_dict=False
        )
        down_a, mid_a = lite(sample, timestep, text, cond, conditioning_scale=0.8, return_dict=False)
        down_b, mid_b = full(sample, timestep, text, second, conditioning_scale=0.3, return_dict=False)
    for total, a, b in zip(down, down_a, down_b):
        torch.testing.assert_close(total, a + b)
    torch.testing.assert_close(mid, mid_a + mid_b)


@pytest.mark.parametrize("channels", [1, 5])
def test_any_condition_channel_count(unet, channels):
    sample, timestep, text, cond = inputs(channels=channels)
    for kind in ("full", "lite"):
        down, _ = randomised(make(kind, unet, channels=channels))(sample, timestep, text, cond, return_dict=False)
        assert down[0].shape == (2, 8, 16, 16)


@pytest.mark.parametrize("kind", ["full", "lite"])
def test_config_round_trip(unet, kind, tmp_path):
    model = randomised(make(kind, unet, "mid_block", channels=2))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.connect == "mid_block" and loaded.config.conditioning_channels == 2
    public = lambda config: json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True)  # noqa: E731
    assert public(loaded.config) == public(model.config)
    sample, timestep, text, cond = inputs(channels=2)
    with torch.no_grad():
        assert torch.equal(
            loaded(sample, timestep, text, cond).mid_block_res_sample,
            model(sample, timestep, text, cond).mid_block_res_sample,
        )


def test_a_stock_controlnet_checkpoint_loads_with_a_connection(unet, tmp_path):
    stock = randomised(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS))
    stock.save_pretrained(tmp_path)
    full = ControlNetFullModel.from_pretrained(tmp_path, connect="mid_block")
    assert full.config.connect == "mid_block"
    sample, timestep, text, cond = inputs()
    with torch.no_grad():
        assert torch.equal(
            full(sample, timestep, text, cond).mid_block_res_sample,
            stock(sample, timestep, text, cond).mid_block_res_sample,
        )


def test_model_contracts(unet):
    sample, timestep, text, cond = inputs()
    full, lite = randomised(make("full", unet)), randomised(make("lite", unet))
    # attention processors: the full copy has diffusers attention, the lite one none
    full.set_attn_processor(AttnProcessor())
    assert full.attn_processors and lite.attn_processors == {}
    # gradient checkpointing: the full copy supports it; the lite chain has nothing worth recomputing
    full.enable_gradient_checkpointing()
    full.train()
    down, mid = full(sample, timestep, text, cond, return_dict=False)
    (sum(r.sum() for r in down) + mid.sum()).backward()
    assert full.controlnet_mid_block.weight.grad is not None
    with pytest.raises(ValueError, match="gradient checkpointing"):
        lite.enable_gradient_checkpointing()
    # layerwise casting: weights stored in bfloat16, computed in float32
    lite.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
    assert lite.encoder_convs[0].weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert lite(sample, timestep, text, cond).mid_block_res_sample.dtype == torch.float32


def test_peft_adapter_on_the_full_copy(unet):
    from peft import LoraConfig

    full = make("full", unet)
    full.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v"]))
    assert any("lora" in name for name, p in full.named_parameters() if p.requires_grad)


def test_bad_condition_size_is_an_error_not_a_broadcast(unet):
    sample, timestep, text, _ = inputs()
    for kind in ("full", "lite"):
        controlnet = make(kind, unet)
        with pytest.raises(ValueError, match=r"needs \(32, 32\)"):
            controlnet(sample, timestep, text, torch.rand(2, 3, 1, 1))
        with pytest.raises(ValueError, match=r"needs \(32, 32\)"):
            controlnet(sample, timestep, text, torch.rand(2, 3, 16, 16))
        with pytest.raises(ValueError, match="conditioning_channels=3"):
            controlnet(sample, timestep, text, torch.rand(2, 1, 32, 32))


def test_bad_connection_is_an_error(unet):
    with pytest.raises(ValueError, match="connect must be one of"):
        make("lite", unet, connect="decoder")
    with pytest.raises(ValueError, match="nothing to connect"):
        ControlNetLiteModel(block_out_channels=(8, 16), layers_per_block=1, mid_block_type=None,
                            conditioning_embedding_out_channels=(4, 8), connect="mid_block")  # fmt: skip
    with pytest.raises(ValueError, match="nothing to connect"):
        ControlNetFullModel(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                            mid_block_type=None, norm_num_groups=4, connect="mid_block")  # fmt: skip


# ------------------------------------------------------------------------ class-conditional UNet2DModel base models


def class_conditional_unet(down_block_types=("DownBlock2D",) * 3, add_attention=True, **kwargs) -> UNet2DModel:
    """The shape of the shipped digits-class-conditional UNet (pixel space, 11 classes with the null class), tiny."""
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=1,
                       down_block_types=down_block_types, up_block_types=("UpBlock2D",) * 3, norm_num_groups=4,
                       num_class_embeds=11, add_attention=add_attention, **kwargs).eval()  # fmt: skip


def class_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 1, 16, 16, generator=generator)
    return sample, torch.tensor([10, 600]), torch.tensor([3, 10]), torch.rand(2, 1, 16, 16, generator=generator)


UNET2D_SHAPES = [(("DownBlock2D",) * 3, True), (("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"), False)]


@pytest.mark.parametrize("down_block_types, add_attention", UNET2D_SHAPES)
def test_unet2d_forward_with_residuals_is_the_unet_without_them(down_block_types, add_attention):
    unet = class_conditional_unet(down_block_types, add_attention)
    sample, timestep, labels, _ = class_inputs()
    expected = unet(sample, timestep, class_labels=labels).sample
    assert torch.equal(unet2d_forward_with_residuals(unet, sample, timestep, labels).sample, expected)
    assert torch.equal(unet2d_forward_with_residuals(unet, sample, 10, labels).sample, unet(sample, 10, labels).sample)
    lite = ControlNetLiteModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,))
    down, mid = lite(sample, controlnet_cond=torch.rand(2, 1, 16, 16), return_dict=False)  # zero at initialisation
    assert torch.equal(unet2d_forward_with_residuals(unet, sample, timestep, labels, down, mid).sample, expected)
    with pytest.raises(ValueError, match="or neither"):
        unet2d_forward_with_residuals(unet, sample, timestep, labels, down, None)
    with pytest.raises(ValueError, match="skip connections"):
        unet2d_forward_with_residuals(unet, sample, timestep, labels, down[:-1], mid)


@pytest.mark.parametrize("kind", ["full", "lite"])
@pytest.mark.parametrize("down_block_types, add_attention", UNET2D_SHAPES)
def test_controlnets_from_a_class_conditional_unet2d(kind, down_block_types, add_attention, tmp_path):
    unet = class_conditional_unet(down_block_types, add_attention)
    cls = ControlNetFullModel if kind == "full" else ControlNetLiteModel
    controlnet = cls.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,)).eval()
    sample, timestep, labels, condition = class_inputs()
    expected = unet(sample, timestep, class_labels=labels).sample
    down, mid = controlnet(sample, timestep, None, condition, class_labels=labels, return_dict=False)
    assert len(down) == 6 and mid.shape == (2, 16, 4, 4)
    # zero initialisation: the base model's output is unchanged, bit for bit
    assert torch.equal(unet2d_forward_with_residuals(unet, sample, timestep, labels, down, mid).sample, expected)
    randomised(controlnet)
    down, mid = controlnet(sample, timestep, None, condition, class_labels=labels, return_dict=False)
    assert not torch.allclose(
        unet2d_forward_with_residuals(unet, sample, timestep, labels, down, mid).sample, expected
    )

    controlnet.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    again = loaded(sample, timestep, None, condition, class_labels=labels, return_dict=False)
    assert torch.equal(again[1], mid)


def test_the_full_copy_of_a_unet2d_is_its_encoder():
    """Same encoder and middle block weights, and the same features: the copy's middle block sees what the UNet's
    does (the condition embedding's last convolution starts at zero)."""
    unet = class_conditional_unet(("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    controlnet = ControlNetFullModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,))
    for name, tensor in unet.state_dict().items():
        if name.split(".")[0] in ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block"):
            assert torch.equal(controlnet.state_dict()[name], tensor), name
    features = {}
    unet.mid_block.register_forward_hook(lambda module, args, output: features.setdefault("unet", output))
    controlnet.mid_block.register_forward_hook(lambda module, args, output: features.setdefault("copy", output))
    sample, timestep, labels, condition = class_inputs()
    unet(sample, timestep, class_labels=labels)
    controlnet.eval()(sample, timestep, None, condition, class_labels=labels)
    assert torch.equal(features["unet"], features["copy"])


def test_unsupported_unet2d_blocks_point_to_the_lite_variant():
    unet = class_conditional_unet(("DownBlock2D", "SkipDownBlock2D", "DownBlock2D"))
    with pytest.raises(ValueError, match=r"SkipDownBlock2D.*ControlNetLiteModel"):
        ControlNetFullModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,))
    unet = class_conditional_unet(mid_block_type=None)
    with pytest.raises(ValueError, match="mid_block_type=None"):
        ControlNetFullModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,))
    lite = ControlNetLiteModel.from_unet(unet, conditioning_channels=1, conditioning_embedding_out_channels=(4,))
    sample, timestep, labels, condition = class_inputs()
    down, mid = lite(sample, controlnet_cond=condition, return_dict=False)
    assert torch.equal(unet2d_forward_with_residuals(unet, sample, timestep, labels, down, mid).sample,
                       unet(sample, timestep, labels).sample)  # fmt: skip
