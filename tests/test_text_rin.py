"""TextRINModel (coherence-aware diffusion's RIN backbone): shapes and patch layout, the conditioning mask, the
timestep, latent self-conditioning, save / load, attention processors, gradient checkpointing, layerwise casting,
input errors and feeding it a real CoherenceConditioner. Tiny random models on CPU.

The output projection starts at zero (a new model predicts zeros), so every test that looks at how an input moves
the output first gives that projection (and the zero-initialised self-conditioning projection) random weights."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from storydiff import CoherenceConditioner, TextRINModel

BATCH, LENGTH, CROSS_DIM, LATENTS, LATENT_DIM = 2, 5, 16, 8, 32
TINY = dict(
    sample_size=8,
    in_channels=4,
    interface_dim=16,
    latent_dim=LATENT_DIM,
    num_latents=LATENTS,
    num_blocks=2,
    compute_layers=1,
    num_heads=2,
    cross_attention_dim=CROSS_DIM,
)


def randomise_zero_inits(model: TextRINModel) -> TextRINModel:
    """Random weights for the zero-initialised projections, so signal reaches the output."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        zero_initialised = [model.proj_out]
        if model.config.self_conditioning:
            zero_initialised.append(model.self_conditioning_proj)
        for layer in zero_initialised:
            for parameter in layer.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


def tiny_rin(randomise: bool = True, **overrides) -> TextRINModel:
    torch.manual_seed(0)
    model = TextRINModel(**{**TINY, **overrides}).eval()
    return randomise_zero_inits(model) if randomise else model


def inputs(batch: int = BATCH, channels: int = 4, size: int = 8, seed: int = 1):
    """(sample, timestep, encoder_hidden_states, encoder_attention_mask): the first prompt has 2 padded tokens."""
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, size, size, generator=generator)
    context = torch.randn(batch, LENGTH, CROSS_DIM, generator=generator)
    mask = torch.ones(batch, LENGTH)
    mask[0, 3:] = 0
    return sample, torch.tensor([10, 500])[:batch], context, mask


# ------------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("patch_size, out_channels", [(1, None), (2, None), (2, 6)])
def test_output_shapes(patch_size, out_channels):
    model = tiny_rin(patch_size=patch_size, out_channels=out_channels)
    output = model(*inputs())
    assert output.sample.shape == (BATCH, out_channels or 4, 8, 8)
    assert output.latents.shape == (BATCH, LATENTS, LATENT_DIM)
    assert torch.isfinite(output.sample).all()
    assert model.config.out_channels == (out_channels or 4)


def test_unpatchify_puts_each_token_back_on_its_patch():
    model = tiny_rin(patch_size=2, out_channels=3)
    captured = {}
    model.proj_out.register_forward_hook(lambda module, args, output: captured.update(tokens=output))
    sample = model(*inputs()).sample
    tokens = captured["tokens"]  # (batch, 4 * 4 patches in row-major order, 2 * 2 * 3)
    for row, column, a, b, channel in [(0, 0, 0, 0, 0), (1, 2, 0, 1, 2), (3, 1, 1, 0, 1), (3, 3, 1, 1, 2)]:
        token = tokens[:, row * 4 + column, (a * 2 + b) * 3 + channel]
        assert torch.equal(sample[:, channel, 2 * row + a, 2 * column + b], token)


def test_new_model_predicts_zeros_and_return_dict_false_gives_a_tuple():
    model = tiny_rin(randomise=False)
    output = model(*inputs())
    assert torch.equal(output.sample, torch.zeros_like(output.sample))  # zero-initialised output projection
    assert output.latents.abs().sum() > 0
    as_tuple = model(*inputs(), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], output.sample) and torch.equal(as_tuple[1], output.latents)


# ----------------------------------------------------------------------------------------- conditioning and time


def test_padded_conditioning_tokens_are_ignored_and_real_ones_are_not():
    model = tiny_rin()
    sample, timestep, context, mask = inputs()
    reference = model(sample, timestep, context, mask).sample
    # random changes (a constant shift would vanish in the pre-attention LayerNorm)
    padded_changed = context.clone()
    padded_changed[0, 3:] = torch.randn(2, CROSS_DIM)  # prompt 0's padding
    assert torch.equal(model(sample, timestep, padded_changed, mask).sample, reference)
    real_changed = context.clone()
    real_changed[0, 1] = torch.randn(CROSS_DIM)
    changed = model(sample, timestep, real_changed, mask).sample
    assert not torch.allclose(changed[0], reference[0], atol=1e-4)
    assert torch.equal(changed[1], reference[1])  # the other prompt is untouched
    # without the mask the padding is attended to
    assert not torch.allclose(model(sample, timestep, padded_changed).sample[0], reference[0], atol=1e-4)


def test_timestep_changes_the_output_and_every_timestep_form_agrees():
    model = tiny_rin()
    sample, _, context, mask = inputs()
    as_int = model(sample, 250, context, mask).sample
    assert torch.equal(model(sample, torch.tensor(250), context, mask).sample, as_int)
    assert torch.equal(model(sample, torch.tensor([250, 250]), context, mask).sample, as_int)
    assert torch.equal(model(sample, torch.tensor([250.0]), context, mask).sample, as_int)
    assert not torch.allclose(model(sample, 900, context, mask).sample, as_int, atol=1e-4)
    per_sample = model(sample, torch.tensor([250, 900]), context, mask).sample
    assert torch.allclose(per_sample[0], as_int[0], atol=1e-6)
    assert not torch.allclose(per_sample[1], as_int[1], atol=1e-4)


# ------------------------------------------------------------------------------------------ self-conditioning


def test_self_conditioning_has_no_effect_at_init():
    model = tiny_rin(randomise=False)
    with torch.no_grad():
        model.proj_out.weight.normal_()  # signal reaches the output, self-conditioning projection still zero
    arguments = inputs()
    previous = torch.randn(BATCH, LATENTS, LATENT_DIM)
    without = model(*arguments).sample
    assert without.abs().sum() > 0
    assert torch.equal(model(*arguments, self_conditioning_latents=previous).sample, without)


def test_self_conditioning_latents_change_the_output_once_trained():
    model = tiny_rin()
    arguments = inputs()
    first = model(*arguments)
    assert first.latents.shape == (BATCH, LATENTS, LATENT_DIM)
    fed_back = model(*arguments, self_conditioning_latents=first.latents.detach())
    assert not torch.allclose(fed_back.sample, first.sample, atol=1e-4)
    # None means zeros through the same path (what training feeds on its steps without self-conditioning)
    zeros = torch.zeros(BATCH, LATENTS, LATENT_DIM)
    assert torch.equal(model(*arguments, self_conditioning_latents=zeros).sample, first.sample)


def test_model_without_self_conditioning():
    model = tiny_rin(self_conditioning=False)
    assert not hasattr(model, "self_conditioning_proj")
    assert model(*inputs()).sample.shape == (BATCH, 4, 8, 8)


# ----------------------------------------------------------------------------------------------- save and load


def test_save_and_load_round_trip(tmp_path):
    model = tiny_rin(patch_size=2, out_channels=6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = TextRINModel.from_pretrained(tmp_path).eval()
    arguments = inputs()
    previous = torch.randn(BATCH, LATENTS, LATENT_DIM)
    expected = model(*arguments, self_conditioning_latents=previous)
    actual = loaded(*arguments, self_conditioning_latents=previous)
    assert torch.equal(actual.sample, expected.sample) and torch.equal(actual.latents, expected.latents)


def test_config_round_trip():
    model = tiny_rin(randomise=False, out_channels=None, self_conditioning=False)
    assert model.config.out_channels == 4  # None is recorded as in_channels
    rebuilt = TextRINModel.from_config(model.config)
    assert dict(rebuilt.config) == dict(model.config)
    assert {name: p.shape for name, p in rebuilt.named_parameters()} == {
        name: p.shape for name, p in model.named_parameters()
    }


# ------------------------------------------------------------------------------------ diffusers model features


def test_attention_processors_agree():
    model = tiny_rin()
    arguments = inputs()
    default = model(*arguments).sample
    # condition, read, compute (1 layer) and write attention in each of the 2 blocks
    assert len(model.attn_processors) == 2 * 4
    model.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in model.attn_processors.values())
    assert torch.allclose(model(*arguments).sample, default, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    def loss_and_gradients(checkpointing: bool):
        model = tiny_rin().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        sample, timestep, context, mask = inputs()
        output = model(sample, timestep, context, mask, self_conditioning_latents=torch.ones(BATCH, LATENTS, 32))
        loss = output.sample.pow(2).mean() + output.latents.pow(2).mean()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients(False)
    checkpointed_loss, checkpointed_gradients = loss_and_gradients(True)
    assert torch.allclose(checkpointed_loss, loss)
    assert gradients.keys() == checkpointed_gradients.keys()
    assert "blocks.0.read.attn.to_k.weight" in gradients and "pos_embed" in gradients
    for name, gradient in gradients.items():
        assert torch.allclose(checkpointed_gradients[name], gradient, atol=1e-6), name


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="this torch build has no float8_e4m3fn")
def test_layerwise_casting_runs_and_stays_finite():
    model = tiny_rin()
    reference = model(*inputs()).sample
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.blocks[0].read.attn.to_q.weight.dtype == torch.float8_e4m3fn
    output = model(*inputs())
    assert output.sample.dtype == torch.float32
    assert torch.isfinite(output.sample).all() and torch.isfinite(output.latents).all()
    assert output.sample.abs().sum() > 0 and not torch.equal(output.sample, reference)  # float8 storage rounds


# ----------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(sample=torch.randn(2, 3, 8, 8)), r"in_channels=4"),
        (dict(sample=torch.randn(2, 4, 8)), r"shape \(batch, in_channels=4, height, width\)"),
        (dict(sample=torch.randn(2, 4, 7, 8)), r"divisible by patch_size=2"),
        (dict(sample=torch.randn(2, 4, 12, 12)), r"built for 8x8 samples"),
        (dict(context=torch.randn(2, LENGTH, 8)), r"CoherenceConditioner's cross_attention_dim must equal"),
        (dict(context=torch.randn(3, LENGTH, CROSS_DIM)), r"batch=2"),
        (dict(mask=torch.ones(2, LENGTH + 1)), r"`encoder_attention_mask` must have shape \(batch, length\)"),
        (dict(previous=torch.randn(2, LATENTS, 16)), r"num_latents, latent_dim\) = \(2, 8, 32\)"),
        (dict(timestep=torch.tensor([1, 2, 3])), r"`timestep` must be"),
    ],
)
def test_bad_inputs_raise(change, words):
    model = tiny_rin(patch_size=2)
    sample, timestep, context, mask = inputs()
    arguments = {**dict(sample=sample, timestep=timestep, context=context, mask=mask, previous=None), **change}
    with pytest.raises(ValueError, match=words):
        model(
            arguments["sample"],
            arguments["timestep"],
            arguments["context"],
            arguments["mask"],
            self_conditioning_latents=arguments["previous"],
        )


def test_self_conditioning_latents_without_self_conditioning_raise():
    model = tiny_rin(self_conditioning=False)
    with pytest.raises(ValueError, match="self_conditioning=False"):
        model(*inputs(), self_conditioning_latents=torch.randn(BATCH, LATENTS, LATENT_DIM))


@pytest.mark.parametrize(
    "config, words",
    [(dict(sample_size=7, patch_size=2), "`sample_size` \\(7\\)"), (dict(latent_dim=33), "`latent_dim` \\(33\\)")],
)
def test_bad_config_raises(config, words):
    with pytest.raises(ValueError, match=words):
        TextRINModel(**{**TINY, **config})


# --------------------------------------------------------------------------------------- with the conditioner


def test_works_with_a_real_coherence_conditioner():
    torch.manual_seed(0)
    conditioner = CoherenceConditioner(
        text_dim=12, dim=16, cross_attention_dim=CROSS_DIM, num_registers=2, num_layers=1, num_heads=2
    ).eval()
    model = tiny_rin()
    generator = torch.Generator().manual_seed(2)
    text = torch.randn(BATCH, LENGTH, 12, generator=generator)
    text_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    text_mask[0, 3:] = 0
    sample = torch.randn(BATCH, 4, 8, 8, generator=generator)

    def predict(text, coherence):
        condition = conditioner(text, coherence, text_mask)
        return model(sample, 100, condition.encoder_hidden_states, condition.encoder_attention_mask).sample

    reference = predict(text, torch.tensor([1.0, 0.5]))
    assert reference.shape == (BATCH, 4, 8, 8)
    padding_changed = text.clone()
    padding_changed[0, 3:] = torch.randn(2, 12)
    assert torch.equal(predict(padding_changed, torch.tensor([1.0, 0.5])), reference)
    assert not torch.allclose(predict(text, torch.tensor([0.0, 0.5]))[0], reference[0], atol=1e-4)  # coherence

    # a conditioner built for another width is caught with a message that names both
    wide = CoherenceConditioner(
        text_dim=12, dim=16, cross_attention_dim=24, num_registers=2, num_layers=1, num_heads=2
    )
    condition = wide(text, 1.0, text_mask)
    with pytest.raises(ValueError, match="cross_attention_dim=16"):
        model(sample, 100, condition.encoder_hidden_states, condition.encoder_attention_mask)
