"""Coherence-aware diffusion's conditioning modules: the coherence embedding (sinusoidal part, binning, config round
trip, errors) and the conditioner (shapes, padding mask, coherence reaching every position, attention processors,
gradient checkpointing, feeding a tiny UNet2DConditionModel). Tiny random models on CPU."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from diffusers.models.embeddings import get_timestep_embedding

from storydiff import CoherenceConditioner, CoherenceEmbedding

TEXT_DIM, DIM, CROSS_DIM, REGISTERS, LENGTH = 12, 16, 8, 3, 5
PREFIX = 1 + REGISTERS  # coherence token + registers come before the text


def tiny_conditioner(**overrides) -> CoherenceConditioner:
    torch.manual_seed(0)
    config = dict(
        text_dim=TEXT_DIM, dim=DIM, cross_attention_dim=CROSS_DIM, num_registers=REGISTERS, num_layers=2, num_heads=2
    )
    return CoherenceConditioner(**{**config, **overrides}).eval()


def text_batch(batch: int = 2, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, LENGTH, TEXT_DIM, generator=generator)
    mask = torch.ones(batch, LENGTH, dtype=torch.long)
    mask[0, 3:] = 0  # the first prompt has 3 real tokens, 2 padding
    return text, mask


# ---------------------------------------------------------------------------------------------- coherence embedding


def test_embedding_shapes_and_values():
    torch.manual_seed(0)
    embedding = CoherenceEmbedding(dim=DIM)
    assert embedding.config.frequency_dim == DIM // 4
    tokens = embedding(torch.tensor([0.0, 1.0, 0.0]))
    assert tokens.shape == (3, DIM)
    assert not torch.allclose(tokens[0], tokens[1])  # c = 0 and c = 1 differ
    assert torch.allclose(tokens[0], tokens[2], atol=1e-6)  # the same c, the same embedding (up to batched rounding)
    assert torch.equal(embedding(torch.tensor([[0.5], [0.25]])), embedding(torch.tensor([0.5, 0.25])))
    assert torch.equal(embedding(0.5), embedding(torch.tensor([0.5])))


def test_sinusoidal_part_is_the_timestep_embedding_of_c_times_1000():
    embedding = CoherenceEmbedding(dim=32, frequency_dim=10)
    coherence = torch.tensor([0.0, 0.3, 0.77, 1.0])
    reference = get_timestep_embedding(coherence * 1000, 10, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(embedding.frequency_embedding(coherence * 1000), reference)
    # standardised per vector over its channels
    standardised = (reference - reference.mean(-1, keepdim=True)) / (reference.std(-1, keepdim=True) + 1e-6)
    assert torch.allclose(embedding.frequency_features(coherence), standardised, atol=1e-6)
    features = embedding.frequency_features(coherence)
    assert torch.allclose(features.mean(-1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(features.std(-1), torch.ones(4), atol=1e-4)


def test_fit_bins_gives_quantile_edges_and_maps_to_bin_over_n_minus_1():
    embedding = CoherenceEmbedding(dim=DIM)
    embedding.fit_bins(torch.linspace(0, 1, 1001), num_bins=4)
    assert embedding.config.num_bins == 4
    assert embedding.config.bin_edges == pytest.approx([0.25, 0.5, 0.75])
    values = embedding.quantize(torch.tensor([0.0, 0.1, 0.25, 0.3, 0.6, 0.75, 0.9, 1.0]))
    assert values.tolist() == pytest.approx([0, 0, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1])
    # a skewed distribution: squares of a uniform grid have quantiles q -> q^2
    skewed = CoherenceEmbedding(dim=DIM).fit_bins(torch.linspace(0, 1, 100001) ** 2, num_bins=2)
    assert skewed.config.bin_edges == pytest.approx([0.25], abs=1e-4)


def test_binned_embedding_equals_unbinned_embedding_of_bin_value():
    binned = CoherenceEmbedding(dim=DIM, num_bins=3, bin_edges=[0.2, 0.6])
    plain = CoherenceEmbedding(dim=DIM)
    plain.load_state_dict(binned.state_dict())
    assert torch.allclose(binned(torch.tensor([0.1, 0.3, 0.9])), plain(torch.tensor([0.0, 0.5, 1.0])))


def test_uniform_bins_without_edges():
    embedding = CoherenceEmbedding(dim=DIM, num_bins=5)
    assert embedding.config.bin_edges == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_binning_round_trips_save_and_load(tmp_path):
    torch.manual_seed(0)
    embedding = CoherenceEmbedding(dim=DIM).fit_bins(torch.rand(500) ** 3, num_bins=8)
    embedding.save_pretrained(tmp_path / "embedding")
    loaded = CoherenceEmbedding.from_pretrained(tmp_path / "embedding")
    assert loaded.config.num_bins == 8
    assert loaded.config.bin_edges == embedding.config.bin_edges
    coherence = torch.rand(16)
    assert torch.equal(loaded.quantize(coherence), embedding.quantize(coherence))
    assert torch.allclose(loaded(coherence), embedding(coherence))


@pytest.mark.parametrize(
    "coherence, words",
    [
        (torch.tensor([0.5, 1.2]), "[1.2"),
        (torch.tensor([-0.1]), "-0.1"),
        (torch.tensor([float("nan")]), "nan"),
        (torch.tensor([float("inf")]), "inf"),
        (torch.zeros(2, 3), "shape (batch,) or (batch, 1)"),
    ],
)
def test_bad_coherence_raises(coherence, words):
    with pytest.raises(ValueError, match="Coherence must") as error:
        CoherenceEmbedding(dim=DIM)(coherence)
    assert words in str(error.value)


@pytest.mark.parametrize(
    "num_bins, edges, words",
    [
        (3, [0.6, 0.2], "strictly increasing"),
        (3, [0.5, 0.5], "strictly increasing"),
        (3, [0.0, 0.5], "strictly inside (0, 1)"),
        (3, [0.5, 1.0], "strictly inside (0, 1)"),
        (4, [0.2, 0.5], "4 bins need 3 interior bin edges, got 2"),
        (1, [], "integer >= 2"),
        (None, [0.5], "without `num_bins`"),
    ],
)
def test_bad_bin_edges_raise(num_bins, edges, words):
    with pytest.raises(ValueError) as error:
        CoherenceEmbedding(dim=DIM, num_bins=num_bins, bin_edges=edges)
    assert words in str(error.value)


def test_fit_bins_on_tied_data_raises():
    with pytest.raises(ValueError, match="strictly increasing"):
        CoherenceEmbedding(dim=DIM).fit_bins(torch.tensor([0.5] * 100 + [0.9]), num_bins=4)


# ------------------------------------------------------------------------------------------------------- conditioner


def test_conditioner_output_shape_and_mask():
    conditioner = tiny_conditioner()
    text, mask = text_batch()
    output = conditioner(text, torch.tensor([0.2, 0.9]), text_attention_mask=mask)
    assert output.encoder_hidden_states.shape == (2, PREFIX + LENGTH, CROSS_DIM)
    expected_mask = torch.cat([torch.ones(2, PREFIX), mask.float()], dim=1)
    assert torch.equal(output.encoder_attention_mask, expected_mask)
    hidden, mask_out = conditioner(text, 0.5, return_dict=False)  # a float applies to the whole batch
    assert hidden.shape == (2, PREFIX + LENGTH, CROSS_DIM) and bool(mask_out.all())


def test_padded_text_tokens_are_never_attended_to():
    conditioner = tiny_conditioner()
    text, mask = text_batch()
    coherence = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        before = conditioner(text, coherence, text_attention_mask=mask).encoder_hidden_states
        changed = text.clone()
        changed[0, 3:] = 100 * torch.randn(2, TEXT_DIM)  # only padded positions change
        after = conditioner(changed, coherence, text_attention_mask=mask).encoder_hidden_states
        unmasked = conditioner(changed, coherence).encoder_hidden_states
    kept = PREFIX + 3
    assert torch.allclose(before[0, :kept], after[0, :kept], atol=1e-6)  # coherence, registers, real text
    assert torch.equal(before[1], after[1])
    assert not torch.allclose(before[0, :kept], unmasked[0, :kept], atol=1e-3)  # without the mask they matter


def test_coherence_reaches_every_output_position():
    conditioner = tiny_conditioner()
    text, mask = text_batch()
    with torch.no_grad():
        low = conditioner(text, 0.0, text_attention_mask=mask).encoder_hidden_states
        high = conditioner(text, 1.0, text_attention_mask=mask).encoder_hidden_states
    difference = (low - high).abs().amax(-1)  # (batch, positions)
    assert bool((difference > 1e-5).all()), difference


def test_wrong_text_width_and_bad_inputs_raise():
    conditioner = tiny_conditioner()
    with pytest.raises(ValueError, match=r"gives 7-wide hidden states, this conditioner was built for text_dim=12"):
        conditioner(torch.randn(2, LENGTH, 7), 0.5)
    with pytest.raises(ValueError, match="3 coherence values for a batch of 2"):
        conditioner(torch.randn(2, LENGTH, TEXT_DIM), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="text_attention_mask"):
        conditioner(torch.randn(2, LENGTH, TEXT_DIM), 0.5, text_attention_mask=torch.ones(2, LENGTH + 1))
    with pytest.raises(ValueError, match=r"Coherence must .*\[2\.0\]"):
        conditioner(torch.randn(2, LENGTH, TEXT_DIM), torch.tensor([0.5, 2.0]))
    with pytest.raises(ValueError, match="divisible"):
        CoherenceConditioner(dim=10, num_heads=4)


def test_layer_scale_starts_at_0_1():
    conditioner = tiny_conditioner()
    for layer in conditioner.layers:
        assert torch.equal(layer.scale1, torch.full((DIM,), 0.1))
        assert torch.equal(layer.scale2, torch.full((DIM,), 0.1))


def test_config_round_trip_with_fitted_bins(tmp_path):
    conditioner = tiny_conditioner()
    conditioner.fit_bins(torch.linspace(0, 1, 801) ** 2, num_bins=4)
    assert conditioner.config.bin_edges == pytest.approx([1 / 16, 1 / 4, 9 / 16], abs=1e-4)
    conditioner.save_pretrained(tmp_path / "conditioner")
    assert (tmp_path / "conditioner" / "diffusion_pytorch_model.safetensors").exists()
    loaded = CoherenceConditioner.from_pretrained(tmp_path / "conditioner").eval()
    assert loaded.config.bin_edges == conditioner.config.bin_edges
    assert loaded.coherence_embedding.config.bin_edges == conditioner.config.bin_edges
    text, mask = text_batch()
    coherence = torch.tensor([0.1, 0.7])
    with torch.no_grad():
        expected = conditioner(text, coherence, text_attention_mask=mask).encoder_hidden_states
        got = loaded(text, coherence, text_attention_mask=mask).encoder_hidden_states
    assert torch.equal(expected, got)


def test_attention_processors_agree():
    conditioner = tiny_conditioner()
    text, mask = text_batch()
    with torch.no_grad():
        default = conditioner(text, torch.tensor([0.3, 0.6]), text_attention_mask=mask).encoder_hidden_states
        assert len(conditioner.attn_processors) == 2
        conditioner.set_attn_processor(AttnProcessor())
        classic = conditioner(text, torch.tensor([0.3, 0.6]), text_attention_mask=mask).encoder_hidden_states
    assert torch.allclose(default, classic, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    text, mask = text_batch()
    coherence = torch.tensor([0.3, 0.6])
    gradients = []
    for checkpointing in (False, True):
        conditioner = tiny_conditioner().train()
        if checkpointing:
            conditioner.enable_gradient_checkpointing()
            assert conditioner.is_gradient_checkpointing
        output = conditioner(text, coherence, text_attention_mask=mask).encoder_hidden_states
        (output**2).sum().backward()
        gradients.append({name: p.grad.clone() for name, p in conditioner.named_parameters()})
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        assert torch.allclose(gradients[0][name], gradients[1][name], atol=1e-6), name


def test_output_feeds_a_cross_attention_unet():
    conditioner = tiny_conditioner()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    text, mask = text_batch()
    with torch.no_grad():
        context = conditioner(text, torch.tensor([0.0, 1.0]), text_attention_mask=mask)
        sample = unet(
            torch.randn(2, 4, 8, 8),
            10,
            encoder_hidden_states=context.encoder_hidden_states,
            encoder_attention_mask=context.encoder_attention_mask,
        ).sample
    assert sample.shape == (2, 4, 8, 8) and bool(torch.isfinite(sample).all())


def test_fitted_bins_survive_from_config():
    coherences = torch.linspace(0, 1, 101) ** 2
    embedding = CoherenceEmbedding(dim=16).fit_bins(coherences, num_bins=4)
    assert CoherenceEmbedding.from_config(embedding.config).config.bin_edges == embedding.config.bin_edges
    conditioner = CoherenceConditioner(text_dim=8, dim=16, cross_attention_dim=8, num_registers=1, num_layers=1,
                                       num_heads=2).fit_bins(coherences, num_bins=4)  # fmt: skip
    rebuilt = CoherenceConditioner.from_config(conditioner.config)
    assert (
        rebuilt.config.num_bins == 4 and rebuilt.coherence_embedding.config.bin_edges == conditioner.config.bin_edges
    )
