"""CoherenceAwareUNet2DModel: shapes, the coherence input, from_unet, bins in the config, bad input, inherited
features (gradient checkpointing, attention processors, layerwise casting)."""

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import AttnProcessor

from storydiff import CoherenceAwareUNet2DModel

NUM_CLASSES = 4
SIZE = 8
TINY = dict(
    sample_size=SIZE,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=4,
    norm_num_groups=4,
    num_class_embeds=NUM_CLASSES + 1,
)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return CoherenceAwareUNet2DModel(**{**TINY, **kwargs}).eval()


def tiny_plain_unet():
    torch.manual_seed(0)
    return UNet2DModel(**TINY).eval()


def inputs(batch=3):
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(batch, 1, SIZE, SIZE, generator=generator)
    timesteps = torch.tensor([10, 500, 999][:batch])
    labels = torch.tensor([0, NUM_CLASSES, 2][:batch])
    return sample, timesteps, labels


def test_shapes_config_and_modules():
    model = tiny_model()
    sample, timesteps, labels = inputs()
    out = model(sample, timesteps, labels, torch.tensor([0.0, 0.5, 1.0]))
    assert out.sample.shape == sample.shape
    assert model(sample, timesteps, labels, 0.5, return_dict=False)[0].shape == sample.shape
    # a (batch, 1) coherence and a single label broadcast like a float does
    torch.testing.assert_close(
        model(sample, timesteps, 2, torch.full((3, 1), 0.25)).sample,
        model(sample, timesteps, torch.tensor([2, 2, 2]), 0.25).sample,
    )
    assert model.config.class_embed_type is None and model.config.num_class_embeds == NUM_CLASSES + 1
    assert model.label_embedding.weight.shape == (NUM_CLASSES + 1, 32)  # the time-embedding width, 4 * 8
    assert model.coherence_embedding.config.dim == 32


def test_coherence_changes_the_output():
    model = tiny_model()
    sample, timesteps, labels = inputs()
    low = model(sample, timesteps, labels, 0.0).sample
    high = model(sample, timesteps, labels, 1.0).sample
    assert (low - high).abs().max() > 1e-4
    torch.testing.assert_close(model(sample, timesteps, labels, 1.0).sample, high)


def test_from_unet_is_bit_identical_at_init_and_keeps_the_class_table():
    unet = tiny_plain_unet()
    model = CoherenceAwareUNet2DModel.from_unet(unet, coherence_num_bins=4).eval()
    assert torch.equal(model.label_embedding.weight, unet.class_embedding.weight)
    assert model.config.coherence_num_bins == 4 and model.config.coherence_bin_edges == [0.25, 0.5, 0.75]
    sample, timesteps, labels = inputs()
    with torch.no_grad():
        expected = unet(sample, timesteps, class_labels=labels).sample
        for coherence in (0.0, 0.3, 1.0):
            assert torch.equal(model(sample, timesteps, labels, coherence).sample, expected)
    # the coherence path is trainable: one step makes the coherence matter
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(sample, timesteps, labels, torch.tensor([0.0, 0.5, 1.0])).sample.square().mean()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.equal(
            model(sample, timesteps, labels, 0.0).sample, model(sample, timesteps, labels, 1.0).sample
        )
    # the source UNet is untouched
    assert not any(name.startswith("coherence") for name, _ in unet.named_parameters())


def test_from_unet_refuses_a_unet_without_a_class_table():
    with pytest.raises(ValueError, match="not class-conditional"):
        CoherenceAwareUNet2DModel.from_unet(UNet2DModel(**{**TINY, "num_class_embeds": None}))
    with pytest.raises(TypeError, match="UNet2DModel"):
        CoherenceAwareUNet2DModel.from_unet(tiny_model())


def test_fitted_bins_round_trip_through_save_and_config(tmp_path):
    model = tiny_model()
    coherences = torch.linspace(0.0, 1.0, 101) ** 2
    assert model.fit_bins(coherences, num_bins=4) is model
    edges = model.config.coherence_bin_edges
    assert model.config.coherence_num_bins == 4 and len(edges) == 3
    assert edges == model.coherence_embedding.config.bin_edges
    sample, timesteps, labels = inputs()
    coherence = torch.tensor([0.1, 0.45, 0.9])
    with torch.no_grad():
        expected = model(sample, timesteps, labels, coherence).sample

    model.save_pretrained(tmp_path)
    loaded = CoherenceAwareUNet2DModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CoherenceAwareUNet2DModel
    assert loaded.config.coherence_bin_edges == edges and loaded.coherence_embedding.config.bin_edges == edges
    assert loaded.config.class_embed_type is None and loaded.config.num_class_embeds == NUM_CLASSES + 1
    with torch.no_grad():
        assert torch.equal(loaded(sample, timesteps, labels, coherence).sample, expected)

    rebuilt = CoherenceAwareUNet2DModel.from_config(model.config)
    assert type(rebuilt) is CoherenceAwareUNet2DModel and rebuilt.coherence_embedding.config.bin_edges == edges
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(sample, timesteps, labels, coherence).sample, expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": None}, "num_class_embeds"),
        ({"num_class_embeds": 1}, "num_class_embeds"),
        ({"coherence_num_bins": 4, "coherence_bin_edges": [0.5, 0.2, 0.7]}, "increasing"),
        ({"coherence_bin_edges": [0.5]}, "without `num_bins`"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoherenceAwareUNet2DModel(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    "class_labels, coherence, match",
    [
        (None, 0.5, "class_labels.*missing"),
        ("labels", None, "coherence missing"),
        ("labels", 1.5, r"\[0, 1\]"),
        ("labels", float("nan"), r"\[0, 1\]"),
        ("labels", torch.tensor([0.1, -0.2, 0.3]), r"\[-0.2"),
        ("labels", torch.tensor([0.1, 0.2]), "2 coherence values for a batch of 3"),
        ("labels", torch.zeros(3, 2), "shape"),
        (torch.tensor([0, 1]), 0.5, "2 class labels for a batch of 3"),
        (torch.tensor([0, 1, NUM_CLASSES + 1]), 0.5, r"0\.\.4"),
        (torch.tensor([0.0, 1.0, 2.0]), 0.5, "integer"),
    ],
)
def test_bad_forward_inputs(class_labels, coherence, match):
    model = tiny_model()
    sample, timesteps, labels = inputs()
    class_labels = labels if isinstance(class_labels, str) else class_labels
    with pytest.raises(ValueError, match=match):
        model(sample, timesteps, class_labels=class_labels, coherence=coherence)


def test_gradient_checkpointing_attention_processors_and_layerwise_casting():
    sample, timesteps, labels = inputs()
    coherence = torch.tensor([0.2, 0.6, 1.0])
    model = tiny_model().train()
    model(sample, timesteps, labels, coherence).sample.sum().backward()
    plain_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    model(sample, timesteps, labels, coherence).sample.sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, plain_grads[name], msg=name)
    assert model.coherence_embedding.mlp[0].weight.grad.abs().sum() > 0

    model = tiny_model()
    with torch.no_grad():
        expected = model(sample, timesteps, labels, coherence).sample
        assert len(model.attn_processors) == 4  # down block 1, the mid block, up block 0 (two layers)
        calls = []

        class CountingProcessor(AttnProcessor):
            def __call__(self, *args, **kwargs):
                calls.append(1)
                return super().__call__(*args, **kwargs)

        model.set_attn_processor(CountingProcessor())
        torch.testing.assert_close(model(sample, timesteps, labels, coherence).sample, expected)
        assert len(calls) == 4
        model.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        assert model.coherence_embedding.mlp[0].weight.dtype == torch.bfloat16
        cast = model(sample, timesteps, labels, coherence).sample
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, expected, atol=0.05, rtol=0.05)
