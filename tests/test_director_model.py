import inspect

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from storydiff import DirectorModel
from storydiff.models.director import drop_conditions, edm_loss

VARIANTS = ["in_context", "adaln", "cross_attention"]
FRAMES, TEXT_DIM, TEXT_LEN = 24, 16, 8


def tiny_model(conditioning_type, **kwargs):
    torch.manual_seed(0)
    config = dict(
        conditioning_type=conditioning_type,
        num_frames=FRAMES,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        text_embed_dim=TEXT_DIM,
        max_text_length=TEXT_LEN,
        num_registers=4,
    )
    config.update(kwargs)
    model = DirectorModel(**config)
    if conditioning_type == "adaln":  # zero-initialised adaLN is the identity; make the test see the conditions
        for name, parameter in model.named_parameters():
            if "adaln" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


def inputs(batch=2, frames=FRAMES, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    text_mask[:, 5:] = False
    return dict(
        sample=torch.randn(batch, frames, 9, generator=g),
        sigma=torch.tensor([0.3, 4.0])[:batch],
        character_features=torch.randn(batch, frames, 3, generator=g),
        text_pooled=torch.randn(batch, TEXT_DIM, generator=g),
        text_tokens=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g),
        text_mask=text_mask,
    )


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_shapes_and_conditions_matter(conditioning_type):
    model = tiny_model(conditioning_type)
    x = inputs()
    out = model(**x).sample
    assert out.shape == (2, FRAMES, 9) and torch.isfinite(out).all()
    for name in ("character_features", "text_pooled" if conditioning_type != "cross_attention" else "text_tokens"):
        changed = dict(x, **{name: x[name] + 1.0})
        assert not torch.allclose(model(**changed).sample, out), name


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_padding_does_not_change_valid_outputs(conditioning_type):
    model = tiny_model(conditioning_type)
    x = inputs()
    valid = 13
    frame_mask = torch.ones(2, FRAMES, dtype=torch.bool)
    frame_mask[:, valid:] = False
    padded = model(**x, frame_mask=frame_mask).sample
    # garbage in the padding does not leak into valid frames
    garbage = dict(x)
    garbage["sample"] = x["sample"].clone()
    garbage["sample"][:, valid:] = 1e3
    garbage["character_features"] = x["character_features"].clone()
    garbage["character_features"][:, valid:] = -50.0
    torch.testing.assert_close(model(**garbage, frame_mask=frame_mask).sample[:, :valid], padded[:, :valid])
    # and a padded batch equals the unpadded shorter trajectory
    short = dict(x, sample=x["sample"][:, :valid], character_features=x["character_features"][:, :valid])
    torch.testing.assert_close(model(**short).sample, padded[:, :valid], rtol=1e-5, atol=1e-5)


def test_text_padding_masked_in_cross_attention():
    model = tiny_model("cross_attention")
    x = inputs()
    out = model(**x).sample
    noisy_padding = x["text_tokens"].clone()
    noisy_padding[:, 5:] = 9.0
    torch.testing.assert_close(model(**dict(x, text_tokens=noisy_padding)).sample, out)
    shorter = dict(x, text_tokens=x["text_tokens"][:, :5], text_mask=x["text_mask"][:, :5])
    torch.testing.assert_close(model(**shorter).sample, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_gradient_checkpointing_matches(conditioning_type):
    model = tiny_model(conditioning_type, dropout=0.0, stochastic_depth=0.0).train()
    x = inputs()
    loss = model(**x).sample.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    loss_ckpt = model(**x).sample.square().mean()
    loss_ckpt.backward()
    torch.testing.assert_close(loss_ckpt, loss)
    for name, parameter in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(parameter.grad, grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_attention_processor_swap(conditioning_type):
    model = tiny_model(conditioning_type)
    x = inputs()
    frame_mask = torch.ones(2, FRAMES, dtype=torch.bool)
    frame_mask[1, 10:] = False
    processors = model.attn_processors
    expected = 2 * (2 if conditioning_type == "cross_attention" else 1) + (
        2 if conditioning_type == "cross_attention" else 0
    )
    assert len(processors) == expected
    assert all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    sdpa = model(**x, frame_mask=frame_mask).sample
    model.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in model.attn_processors.values())
    torch.testing.assert_close(model(**x, frame_mask=frame_mask).sample, sdpa, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_save_load(tmp_path, conditioning_type):
    model = tiny_model(conditioning_type)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DirectorModel.from_pretrained(tmp_path).eval()
    assert loaded.config.conditioning_type == conditioning_type
    x = inputs()
    torch.testing.assert_close(loaded(**x).sample, model(**x).sample)


def test_edm_preconditioning():
    model = tiny_model("adaln")
    x = inputs()
    sigma = x["sigma"]
    c_in, c_skip, c_out, c_noise = model.preconditioning(sigma)
    sd = 0.5
    torch.testing.assert_close(c_skip.flatten(), sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    raw = model.forward_network(
        c_in * x["sample"], c_noise, x["character_features"], x["text_pooled"], x["text_tokens"], x["text_mask"]
    )
    torch.testing.assert_close(model(**x).sample, c_skip * x["sample"] + c_out * raw)
    # at tiny noise the denoiser returns (almost) its input
    tiny = dict(x, sigma=torch.full((2,), 1e-4))
    torch.testing.assert_close(model(**tiny).sample, x["sample"], rtol=1e-3, atol=1e-3)


def test_edm_loss_ignores_padding_and_trains():
    model = tiny_model("cross_attention", dropout=0.0, stochastic_depth=0.0).train()
    x = inputs()
    frame_mask = torch.ones(2, FRAMES, dtype=torch.bool)
    frame_mask[:, 15:] = False
    clean = x["sample"] * 0.5
    conditions = dict(
        character_features=x["character_features"], text_tokens=x["text_tokens"], text_mask=x["text_mask"]
    )
    loss = edm_loss(model, clean, frame_mask, generator=torch.Generator().manual_seed(1), **conditions)
    other = clean.clone()
    other[:, 15:] = 100.0
    loss_garbage = edm_loss(model, other, frame_mask, generator=torch.Generator().manual_seed(1), **conditions)
    torch.testing.assert_close(loss, loss_garbage)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        optimizer.zero_grad()
        value = edm_loss(model, clean, frame_mask, generator=torch.Generator().manual_seed(step % 3), **conditions)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert sum(losses[-3:]) < sum(losses[:3])


def test_label_dropout():
    batch = 4000
    character = torch.ones(batch, 5, 3)
    pooled, tokens = torch.ones(batch, 4), torch.ones(batch, 6, 4)
    mask = torch.ones(batch, 6, dtype=torch.bool)
    c, p, t, m = drop_conditions(character, pooled, tokens, mask, 0.1, torch.Generator().manual_seed(0))
    dropped_character = (c.sum((1, 2)) == 0).float().mean().item()
    dropped_text = (p.sum(1) == 0).float()
    assert dropped_character == pytest.approx(1 - 0.9**2, abs=0.02)
    assert dropped_text.mean().item() == pytest.approx(1 - 0.9**2, abs=0.02)
    both = ((c.sum((1, 2)) == 0) & (p.sum(1) == 0)).float().mean().item()
    assert both == pytest.approx(0.1 + 0.9 * 0.01, abs=0.015)  # the shared drop removes both together
    assert torch.equal(t.sum((1, 2)) == 0, p.sum(1) == 0) and torch.equal(~m.any(1), p.sum(1) == 0)


def test_bad_inputs():
    model = tiny_model("in_context")
    x = inputs()
    with pytest.raises(ValueError, match="frames"):
        model(**dict(x, sample=torch.randn(2, FRAMES + 1, 9), character_features=None))
    with pytest.raises(ValueError):
        model(**dict(x, sample=torch.randn(2, FRAMES, 7)))
    with pytest.raises(ValueError):
        model(**dict(x, character_features=torch.randn(2, FRAMES, 2)))
    with pytest.raises(ValueError):
        model(**dict(x, text_pooled=torch.randn(2, TEXT_DIM + 1)))
    with pytest.raises(TypeError):
        model(**dict(x, sample=[[0.0] * 9]))
    with pytest.raises(ValueError):
        DirectorModel(conditioning_type="film")
    assert (
        DirectorModel(
            conditioning_type="B", num_frames=4, hidden_size=8, num_layers=1, num_heads=2
        ).config.conditioning_type
        == "adaln"
    )


def test_paper_defaults():
    defaults = {k: v.default for k, v in inspect.signature(DirectorModel.__init__).parameters.items() if k != "self"}
    assert defaults["num_frames"] == 300 and defaults["hidden_size"] == 512 and defaults["num_layers"] == 8
    assert defaults["num_heads"] == 16 and defaults["num_registers"] == 16 and defaults["sigma_data"] == 0.5
    assert defaults["dropout"] == 0.1 and defaults["stochastic_depth"] == 0.1 and defaults["num_condition_layers"] == 2
