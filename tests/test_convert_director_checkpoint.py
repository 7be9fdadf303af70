"""The converter against an independent re-statement of the reference DIRECTOR forward pass, written with plain torch
ops over the reference key names (github.com/robincourant/DIRECTOR, src/models/modules/director.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from storydiff import DirectorModel, DirectorPipeline
from storydiff.training.convert_director_checkpoint import convert_checkpoint, convert_state_dict, infer_config

HIDDEN, HEADS, LAYERS, FRAMES, TEXT, TOKENS, REGISTERS, MLP = 32, 4, 2, 12, 16, 77, 3, 4


def original_state_dict(variant, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {}

    def linear(name, fan_in, fan_out):
        shapes[f"{name}.weight"] = (fan_out, fan_in)
        shapes[f"{name}.bias"] = (fan_out,)

    def norm(name):
        shapes[f"{name}.weight"] = (HIDDEN,)
        shapes[f"{name}.bias"] = (HIDDEN,)

    def self_attention_block(name, affine=True):
        if affine:
            norm(f"{name}.initial_ln")
            norm(f"{name}.middle_ln")
        linear(f"{name}.sa.qkv", HIDDEN, 3 * HIDDEN)
        linear(f"{name}.sa.out", HIDDEN, HIDDEN)
        linear(f"{name}.ffn.0", HIDDEN, MLP * HIDDEN)
        linear(f"{name}.ffn.3", MLP * HIDDEN, HIDDEN)

    linear("input_projection.0", 9, HIDDEN)
    linear("time_embedding.map_time.0", HIDDEN // 4, HIDDEN)
    linear("time_embedding.map_time.2", HIDDEN, HIDDEN)
    if variant == "in_context":
        linear("cond_projection.0", 3 * FRAMES, HIDDEN)
        linear("cond_projection.1", TEXT, HIDDEN)
    elif variant == "adaln":
        linear("joint_cond_projection", 3 * FRAMES + TEXT, HIDDEN)
    else:
        linear("cond_projection.0", 3, HIDDEN)
        linear("cond_projection.1", TEXT, HIDDEN)
        shapes["cond_registers"] = (REGISTERS, HIDDEN)
        for i in range(2):
            self_attention_block(f"cond_sa.{i}")
    for i in range(LAYERS):
        name = f"backbone_module.{i}"
        self_attention_block(name, affine=variant != "adaln")
        if variant == "adaln":
            linear(f"{name}.adaln_modulation.1", HIDDEN, 6 * HIDDEN)
        if variant == "cross_attention":
            norm(f"{name}.ca_ln")
            linear(f"{name}.ca.q", HIDDEN, HIDDEN)
            linear(f"{name}.ca.kv", HIDDEN, 2 * HIDDEN)
            linear(f"{name}.ca.out", HIDDEN, HIDDEN)
    if variant != "adaln":
        norm("final_norm")
    else:
        linear("final_adaln.1", HIDDEN, 2 * HIDDEN)
    linear("final_linear", HIDDEN, 9)
    state = {k: torch.randn(shape, generator=g) * 0.2 for k, shape in shapes.items()}
    for k in state:
        if k.endswith("ln.weight") or k == "final_norm.weight":
            state[k] = 1.0 + state[k]
    state["input_projection.1.pe"] = torch.zeros(1, 100, HIDDEN)  # buffers the converter must skip
    state["time_embedding.encode_time.freqs"] = torch.zeros(HIDDEN // 8)
    return state


# ---- the reference forward pass, restated


def positions(length, dim):
    pe = torch.zeros(length, dim)
    position = torch.arange(length, dtype=torch.float).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
    return pe


def lin(s, name, x):
    return F.linear(x, s[f"{name}.weight"], s.get(f"{name}.bias"))


def ln(s, name, x):
    if f"{name}.weight" in s:
        return F.layer_norm(x, (HIDDEN,), s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)
    return F.layer_norm(x, (HIDDEN,), eps=1e-6)


def attention(s, name, x_to, x_from=None):
    if x_from is None:
        q, k, v = lin(s, f"{name}.qkv", x_to).chunk(3, dim=-1)
    else:
        q = lin(s, f"{name}.q", x_to)
        k, v = lin(s, f"{name}.kv", x_from).chunk(2, dim=-1)
    heads = [t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*heads).transpose(1, 2).flatten(2)
    return lin(s, f"{name}.out", out)


def ffn(s, name, x):
    return lin(s, f"{name}.ffn.3", F.gelu(lin(s, f"{name}.ffn.0", x)))


def sa_block(s, name, x):
    x = x + attention(s, f"{name}.sa", ln(s, f"{name}.initial_ln", x))
    return x + ffn(s, name, ln(s, f"{name}.middle_ln", x))


def reference_denoiser(s, variant, x_bcn, sigma, char_feature, text_feature):
    sd = 0.5
    sigma = sigma.reshape(-1, 1, 1)
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log().flatten() / 4

    x = lin(s, "input_projection.0", (c_in * x_bcn).transpose(1, 2)) + positions(FRAMES, HIDDEN)
    channels = HIDDEN // 4
    freqs = (1 / 10000) ** (2 * torch.arange(channels // 2).float() / channels)
    z = torch.outer(c_noise * 1000, freqs)
    time = torch.cat([z.cos(), z.sin()], dim=1)
    time = (time - time.mean(-1, keepdim=True)) / time.std(-1, keepdim=True)
    t = lin(s, "time_embedding.map_time.2", F.silu(lin(s, "time_embedding.map_time.0", time)))

    if variant == "in_context":
        cond = torch.stack(
            [t, lin(s, "cond_projection.0", char_feature), lin(s, "cond_projection.1", text_feature)], 1
        )
        x = torch.cat([cond, x], dim=1)
        for i in range(LAYERS):
            x = sa_block(s, f"backbone_module.{i}", x)
        out = lin(s, "final_linear", ln(s, "final_norm", x[:, 3:]))
    elif variant == "adaln":
        c = lin(s, "joint_cond_projection", torch.cat([char_feature, text_feature], dim=-1)) + t
        for i in range(LAYERS):
            name = f"backbone_module.{i}"
            mods = [m.unsqueeze(1) for m in lin(s, f"{name}.adaln_modulation.1", F.silu(c)).chunk(6, dim=-1)]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
            x = x + gate_msa * attention(s, f"{name}.sa", ln(s, "none", x) * (1 + scale_msa) + shift_msa)
            x = x + gate_mlp * ffn(s, name, ln(s, "none", x) * (1 + scale_mlp) + shift_mlp)
        shift, scale = lin(s, "final_adaln.1", F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        out = lin(s, "final_linear", ln(s, "none", x) * (1 + scale) + shift)
    else:
        batch = x.shape[0]
        cond = torch.cat(
            [
                s["cond_registers"].unsqueeze(0).expand(batch, -1, -1),
                t.unsqueeze(1),
                lin(s, "cond_projection.0", char_feature.transpose(1, 2)),
                lin(s, "cond_projection.1", text_feature.transpose(1, 2)),
            ],
            dim=1,
        )
        cond = cond + positions(cond.shape[1], HIDDEN)
        for i in range(2):
            cond = sa_block(s, f"cond_sa.{i}", cond)
        for i in range(LAYERS):
            name = f"backbone_module.{i}"
            x = x + attention(s, f"{name}.ca", ln(s, f"{name}.ca_ln", x), cond)
            x = sa_block(s, name, x)
        out = lin(s, "final_linear", ln(s, "final_norm", x))
    return c_skip * x_bcn + c_out * out.transpose(1, 2)


@pytest.mark.parametrize("variant", ["in_context", "adaln", "cross_attention"])
def test_conversion_matches_reference_forward(tmp_path, variant):
    state = original_state_dict(variant)
    lightning = {
        "state_dict": {
            **{f"net.model.{k}": v for k, v in state.items()},
            **{f"ema.ema_model.model.{k}": v for k, v in state.items()},
            "ema.initted": torch.tensor(True),
            "ema.step": torch.tensor(3),
        },
        "epoch": 3,
        "global_step": 100,
    }
    torch.save(lightning, tmp_path / "director.ckpt")
    convert_checkpoint(
        tmp_path / "director.ckpt", tmp_path / "out", num_heads=HEADS, num_frames=FRAMES, text_embed_dim=TEXT
    )
    pipeline = DirectorPipeline.from_pretrained(tmp_path / "out")
    model = pipeline.model.eval()
    assert (tmp_path / "out" / "model" / "diffusion_pytorch_model.safetensors").exists()
    assert model.config.conditioning_type == variant and model.config.num_frames == FRAMES
    assert pipeline.scheduler.config.rho == 40.0

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, FRAMES, 9, generator=g)
    sigma = torch.tensor([0.2, 7.0])
    character = torch.randn(2, FRAMES, 3, generator=g)
    pooled = torch.randn(2, TEXT, generator=g)
    tokens = torch.randn(2, TOKENS, TEXT, generator=g)
    tokens[:, 9:] = 0.0  # E.T.'s stored CLIP sequences are zero-padded
    mask = torch.zeros(2, TOKENS, dtype=torch.bool)
    mask[:, :9] = True
    if variant == "cross_attention":
        char_feature, text_feature = character.transpose(1, 2), tokens.transpose(1, 2)
    else:
        char_feature, text_feature = character.flatten(1), pooled  # frame-major flattening, as in the reference
    expected = reference_denoiser(state, variant, x.transpose(1, 2), sigma, char_feature, text_feature).transpose(1, 2)
    ours = model(x, sigma, character, pooled, tokens, mask).sample
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_every_key_maps_and_unknown_keys_fail():
    state = original_state_dict("cross_attention")
    converted = convert_state_dict(state)
    config = infer_config(state, num_heads=HEADS, num_frames=FRAMES)
    model_keys = set(DirectorModel(**config).state_dict())
    assert set(converted) == model_keys
    with pytest.raises(ValueError, match="Unmapped"):
        convert_state_dict({**state, "extra_head.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="adaln"):
        infer_config(original_state_dict("adaln"), conditioning_type="in_context", text_embed_dim=TEXT)


def test_refuses_unsafe_pickle(tmp_path):
    import argparse

    # any object beyond tensors and plain containers (here an argparse.Namespace) is refused, not unpickled
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "unsafe.ckpt")
    with pytest.raises(ValueError, match="Refusing"):
        convert_checkpoint(tmp_path / "unsafe.ckpt", tmp_path / "out")
