"""DirectorModel and CLaTrModel carry the diffusers model mixins of a stock transformer, checked the way diffusers'
own model tests check them: layerwise casting (fp8 / fp16 storage, fp32 compute), attention processors, PEFT LoRA
adapters (add, save, unload, load) and gradient checkpointing."""

import os

import pytest
import safetensors.torch
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from storydiff import CLaTrModel, DirectorModel
from storydiff.models.director import edm_loss

VARIANTS = ["in_context", "adaln", "cross_attention"]
FRAMES, TEXT_DIM, TEXT_LEN = 24, 16, 8
# the LoRA targets docs/director/model.md recommends for fine-tuning DIRECTOR on one's own trajectories
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
MLP_TARGETS = ["ff.net.0.proj", "ff.net.2"]


def tiny_director(conditioning_type, **kwargs):
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
    for name, parameter in model.named_parameters():
        if "adaln" in name:  # zero-initialised adaLN would hide the conditions and the blocks' weights
            torch.nn.init.normal_(parameter, std=0.05)
    return model.eval()


def director_inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    text_mask = torch.ones(batch, TEXT_LEN, dtype=torch.bool)
    text_mask[:, 5:] = False
    frame_mask = torch.ones(batch, FRAMES, dtype=torch.bool)
    frame_mask[1, 15:] = False
    return dict(
        sample=torch.randn(batch, FRAMES, 9, generator=generator),
        sigma=torch.tensor([0.3, 4.0])[:batch],
        character_features=torch.randn(batch, FRAMES, 3, generator=generator),
        text_pooled=torch.randn(batch, TEXT_DIM, generator=generator),
        text_tokens=torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=generator),
        text_mask=text_mask,
        frame_mask=frame_mask,
    )


def tiny_clatr(**overrides):
    torch.manual_seed(0)
    config = dict(text_embed_dim=12, latent_dim=16, num_layers=2, num_heads=2, ff_size=32, max_frames=40)
    config.update(overrides)
    return CLaTrModel(**config).eval()


def clatr_inputs(batch=4, frames=20, tokens=7):
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    mask[1, 12:] = False
    text_mask = torch.ones(batch, tokens, dtype=torch.bool)
    text_mask[0, 4:] = False
    return dict(
        trajectory_features=torch.randn(batch, frames, 9, generator=generator),
        trajectory_mask=mask,
        text_tokens=torch.randn(batch, tokens, 12, generator=generator),
        text_mask=text_mask,
    )


def clatr_outputs(model, inputs):
    """Both embeddings and a decoding, so that every attention block of CLaTr is exercised."""
    output = model(**inputs)
    decoded = model.decode(output.trajectory_embeddings, inputs["trajectory_mask"])
    return torch.cat([output.trajectory_embeddings, output.text_embeddings, decoded.flatten(1)], dim=1)


def lora_is_set(model):
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


# ---------------------------------------------------------------------------------------------------------------------
# layerwise casting


@pytest.mark.parametrize("storage_dtype", [torch.float16, torch.float8_e4m3fn])
@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_director_runs_under_layerwise_casting(conditioning_type, storage_dtype):
    model = tiny_director(conditioning_type)
    inputs = director_inputs()
    with torch.no_grad():
        reference = model(**inputs).sample
        model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
        stored = model.time_embedding.time_embedding.linear_1.weight.dtype
        output = model(**inputs).sample
    assert stored == storage_dtype  # the weights really are stored narrow between calls
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    if storage_dtype == torch.float16:
        torch.testing.assert_close(output, reference, rtol=5e-3, atol=5e-3)
    else:  # 3 mantissa bits: same output up to the precision of the stored weights
        assert (output - reference).abs().mean() < 0.1 * reference.abs().mean()


@pytest.mark.parametrize("storage_dtype", [torch.float16, torch.float8_e4m3fn])
def test_clatr_runs_under_layerwise_casting(storage_dtype):
    model = tiny_clatr()
    inputs = clatr_inputs()
    with torch.no_grad():
        reference = clatr_outputs(model, inputs)
        model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
        output = clatr_outputs(model, inputs)
    assert model.trajectory_encoder.projection.weight.dtype == storage_dtype
    assert output.dtype == torch.float32 and torch.isfinite(output).all()
    if storage_dtype == torch.float16:
        torch.testing.assert_close(output, reference, rtol=5e-3, atol=5e-3)
    else:
        assert (output - reference).abs().mean() < 0.1 * reference.abs().mean()


# ---------------------------------------------------------------------------------------------------------------------
# attention processors


def test_clatr_attention_processors():
    model = tiny_clatr()
    inputs = clatr_inputs()
    processors = model.attn_processors
    # 2 layers in each encoder (self-attention) and 2 decoder layers (self- and cross-attention)
    assert len(processors) == 2 + 2 + 2 * 2
    assert all(isinstance(processor, AttnProcessor2_0) for processor in processors.values())
    with torch.no_grad():
        sdpa = clatr_outputs(model, inputs)
        model.set_default_attn_processor()
        assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
        torch.testing.assert_close(clatr_outputs(model, inputs), sdpa, rtol=1e-4, atol=1e-5)
        # a dict of processors, one per name, as diffusers accepts
        model.set_attn_processor({name: AttnProcessor2_0() for name in processors})
        torch.testing.assert_close(clatr_outputs(model, inputs), sdpa, rtol=1e-4, atol=1e-5)


def test_director_default_attention_processor():
    model = tiny_director("cross_attention")
    inputs = director_inputs()
    with torch.no_grad():
        sdpa = model(**inputs).sample
        model.set_default_attn_processor()
        assert all(isinstance(processor, AttnProcessor) for processor in model.attn_processors.values())
        torch.testing.assert_close(model(**inputs).sample, sdpa, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# PEFT LoRA adapters


def check_lora_round_trip(build, run, targets, tmp_path):
    """diffusers' test_lora_save_load_adapter: add an adapter, save it, unload it, load it back (in the same model
    and in a freshly built one) and get identical outputs."""
    model = build()
    with torch.no_grad():
        without_lora = run(model)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    assert lora_is_set(model)
    with torch.no_grad():
        with_lora = run(model)
    assert not torch.allclose(with_lora, without_lora, atol=1e-4, rtol=1e-4)

    model.save_lora_adapter(tmp_path)
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    assert weights.is_file()
    saved = safetensors.torch.load_file(weights)
    assert saved and all("lora" in key for key in saved)

    model.unload_lora()
    assert not lora_is_set(model)
    with torch.no_grad():
        torch.testing.assert_close(run(model), without_lora)

    model.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    assert lora_is_set(model)
    retrieved = get_peft_model_state_dict(model, adapter_name="default_0")
    for key, value in saved.items():
        torch.testing.assert_close(retrieved[key], value)
    fresh = build()
    fresh.load_lora_adapter(tmp_path, prefix=None, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(run(model), with_lora)
        torch.testing.assert_close(run(fresh), with_lora)


@pytest.mark.parametrize("conditioning_type", VARIANTS)
def test_director_lora_save_load_round_trip(conditioning_type, tmp_path):
    inputs = director_inputs()
    check_lora_round_trip(
        lambda: tiny_director(conditioning_type),
        lambda model: model(**inputs).sample,
        ATTENTION_TARGETS + MLP_TARGETS,
        tmp_path,
    )


def test_clatr_lora_save_load_round_trip(tmp_path):
    inputs = clatr_inputs()
    check_lora_round_trip(tiny_clatr, lambda model: clatr_outputs(model, inputs), ATTENTION_TARGETS, tmp_path)


def test_director_lora_fine_tuning_trains_only_the_adapter():
    """The workflow docs/director/model.md describes: add a LoRA adapter, train it with the EDM loss; the base
    weights do not move, and the adapter alone changes the model."""
    model = tiny_director("cross_attention", dropout=0.0, stochastic_depth=0.0)
    base = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION_TARGETS))
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    inputs = director_inputs()
    conditions = {key: inputs[key] for key in ("character_features", "text_tokens", "text_mask")}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(3):
        optimizer.zero_grad()
        loss = edm_loss(
            model, inputs["sample"] * 0.5, inputs["frame_mask"], generator=torch.Generator().manual_seed(step),
            **conditions,
        )  # fmt: skip
        loss.backward()
        optimizer.step()
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(parameter, base[name.replace(".base_layer", "")], msg=name)
    assert any(not torch.all(p == 0) for n, p in model.named_parameters() if "lora_B" in n)


def test_save_pretrained_round_trip_still_holds(tmp_path):
    director, clatr = tiny_director("adaln"), tiny_clatr()
    director.save_pretrained(tmp_path / "director")
    clatr.save_pretrained(tmp_path / "clatr")
    loaded_director = DirectorModel.from_pretrained(tmp_path / "director").eval()
    loaded_clatr = CLaTrModel.from_pretrained(tmp_path / "clatr").eval()
    for loaded, original in ((loaded_director, director), (loaded_clatr, clatr)):
        public = {key: value for key, value in original.config.items() if not key.startswith("_")}
        assert {key: loaded.config[key] for key in public} == public
    inputs, text = director_inputs(), clatr_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded_director(**inputs).sample, director(**inputs).sample)
        torch.testing.assert_close(clatr_outputs(loaded_clatr, text), clatr_outputs(clatr, text))
    assert not any("lora" in name for name in os.listdir(tmp_path / "director"))


# ---------------------------------------------------------------------------------------------------------------------
# gradient checkpointing


def test_clatr_gradient_checkpointing_gives_identical_gradients():
    model = tiny_clatr(dropout=0.1).train()
    inputs = clatr_inputs()
    pooled = inputs["text_tokens"].mean(1)
    args = (inputs["trajectory_features"], inputs["trajectory_mask"], inputs["text_tokens"], inputs["text_mask"])

    def loss_and_gradients():
        model.zero_grad()
        torch.manual_seed(3)  # dropout masks: checkpointing replays the same random state
        loss = model.compute_loss(*args, pooled, generator=torch.Generator().manual_seed(1))["loss"]
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss, gradients = loss_and_gradients()
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.is_gradient_checkpointing
    assert model.trajectory_encoder.gradient_checkpointing and model.trajectory_decoder.gradient_checkpointing
    checkpointed_loss, checkpointed_gradients = loss_and_gradients()
    torch.testing.assert_close(checkpointed_loss, loss)
    assert checkpointed_gradients.keys() == gradients.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed_gradients[name], gradient, rtol=1e-5, atol=1e-7, msg=name)
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing
