import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import storydiff
from storydiff import DirectorModel, DirectorPipeline, EDMHeunScheduler
from storydiff.text_features import encode_text, load_text_encoder

FRAMES = 16


def tiny_clip(folder, hidden_size=16):
    letters = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + list(letters) + [c + "</w>" for c in letters]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!")
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    return CLIPTextModel(config).eval(), tokenizer


def tiny_pipeline(tmp_path, conditioning_type="cross_attention", text_dim=16, max_text_length=77):
    text_encoder, tokenizer = tiny_clip(tmp_path / "tokenizer_files", hidden_size=text_dim)
    torch.manual_seed(0)
    model = DirectorModel(
        conditioning_type=conditioning_type,
        num_frames=FRAMES,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        text_embed_dim=text_dim,
        max_text_length=max_text_length,
        num_registers=2,
        num_condition_layers=1,
    ).eval()
    return DirectorPipeline(model=model, scheduler=EDMHeunScheduler(), text_encoder=text_encoder, tokenizer=tokenizer)


def assert_rigid(poses):
    rotation = poses[..., :3, :3]
    identity = np.broadcast_to(np.eye(3), rotation.shape)
    np.testing.assert_allclose(rotation @ np.swapaxes(rotation, -1, -2), identity, atol=1e-4)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0, atol=1e-4)
    np.testing.assert_allclose(poses[..., 3, :], np.broadcast_to([0, 0, 0, 1.0], poses[..., 3, :].shape))


@pytest.mark.parametrize("conditioning_type", ["in_context", "adaln", "cross_attention"])
def test_end_to_end(tmp_path, conditioning_type):
    pipe = tiny_pipeline(tmp_path, conditioning_type)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("the camera trucks right.", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.trajectories.shape == (1, FRAMES, 4, 4) and out.features.shape == (1, FRAMES, 9)
    assert out.character.shape == (1, FRAMES, 3) and not out.character.any()  # static character at the origin
    assert np.isfinite(out.trajectories).all()
    assert_rigid(out.trajectories)
    assert out.guidance_scales == [1.4] * 3


def test_lengths_batches_and_reproducibility(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    character = np.cumsum(np.full((10, 3), 0.01), axis=0)
    out = pipe("pushes in", character_trajectory=character, num_inference_steps=2)
    assert out.trajectories.shape == (1, 10, 4, 4)
    np.testing.assert_allclose(out.character[0], character, atol=1e-6)
    out = pipe(["pushes in", "booms top"], character_trajectory=character, num_inference_steps=2, output_type="pt")
    assert isinstance(out.trajectories, torch.Tensor) and out.trajectories.shape == (2, 10, 4, 4)
    out = pipe("pushes in", character_trajectory=[character, character * 2], num_inference_steps=2)
    assert out.trajectories.shape == (2, 10, 4, 4)
    out = pipe("pushes in", num_frames=7, num_trajectories_per_prompt=3, num_inference_steps=2)
    assert out.trajectories.shape == (3, 7, 4, 4)
    a = pipe("pushes in", num_inference_steps=2, generator=torch.Generator().manual_seed(3)).trajectories
    b = pipe("pushes in", num_inference_steps=2, generator=torch.Generator().manual_seed(3)).trajectories
    np.testing.assert_array_equal(a, b)
    latent = pipe("pushes in", num_inference_steps=2, output_type="latent").trajectories
    assert latent.shape == (1, FRAMES, 9)


def test_guidance_and_null_condition(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    original_forward = pipe.model.forward

    def counting_forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original_forward(sample, *args, **kwargs)

    pipe.model.forward = counting_forward
    latents = torch.randn(1, FRAMES, 9, generator=torch.Generator().manual_seed(0))
    no_cfg = pipe("pushes in", num_inference_steps=3, guidance_scale=1.0, latents=latents).features
    assert calls == [1] * 5  # 2 * steps - 1 model calls, no null pass at g == 1
    calls.clear()
    cfg = pipe("pushes in", num_inference_steps=3, guidance_scale=1.0 + 1e-6, latents=latents).features
    assert calls == [2] * 5
    np.testing.assert_allclose(cfg, no_cfg, atol=1e-3)
    calls.clear()
    pipe("pushes in", num_inference_steps=3, guidance_scale=2.0, guidance_schedule="linear", latents=latents)
    assert calls[0] == 1 and calls[-1] == 2  # the linear schedule starts at g_0 = 1


def test_cfg_combines_conditional_and_null_predictions(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    model = pipe.model
    features = encode_text(pipe.text_encoder, pipe.tokenizer, "booms top", max_length=77)
    x = torch.randn(1, FRAMES, 9)
    sigma = torch.tensor([2.0])
    character = storydiff.trajectories.encode_character(torch.zeros(1, FRAMES, 3))
    cond = model(x, sigma, character, features.pooled, features.tokens, features.mask).sample
    uncond = model(x, sigma).sample  # all-zero null condition
    steps = []
    pipe(
        "booms top",
        num_inference_steps=1,
        guidance_scale=3.0,
        latents=x / 80.0,
        callback_on_step_end=lambda p, i, t, kw: steps.append(kw["latents"]) or kw,
    )
    # a single Heun step is Euler to sigma 0, so the result is the guided denoised sample of the first call
    scheduler = pipe.scheduler
    assert scheduler.sigmas[0] == pytest.approx(80.0)
    cond80 = model(x, torch.tensor([80.0]), character, features.pooled, features.tokens, features.mask).sample
    uncond80 = model(x, torch.tensor([80.0])).sample
    torch.testing.assert_close(steps[-1], uncond80 + 3.0 * (cond80 - uncond80), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cond, uncond)


def test_save_load_and_custom_pipeline(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert index["model"][0].startswith("storydiff") and index["model"][1] == "DirectorModel"
    assert index["scheduler"][1] == "EDMHeunScheduler"
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    expected = pipe("trucks left", **kwargs).trajectories
    loaded = DirectorPipeline.from_pretrained(tmp_path / "saved")
    kwargs["generator"] = torch.Generator().manual_seed(0)
    np.testing.assert_allclose(loaded("trucks left", **kwargs).trajectories, expected, atol=1e-5)
    custom = DiffusionPipeline.from_pretrained(
        tmp_path / "saved", custom_pipeline=storydiff.custom_pipeline_path("director"), trust_remote_code=True
    )
    assert type(custom).__name__ == "DirectorPipeline"
    kwargs["generator"] = torch.Generator().manual_seed(0)
    np.testing.assert_allclose(custom("trucks left", **kwargs).trajectories, expected, atol=1e-5)


def test_saved_without_text_encoder_reattaches_minilm(tmp_path):
    torch.manual_seed(0)
    model = DirectorModel(
        conditioning_type="in_context",
        num_frames=FRAMES,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        text_embed_dim=384,
    ).eval()
    DirectorPipeline(model=model, scheduler=EDMHeunScheduler()).save_pretrained(tmp_path / "small")
    assert not (tmp_path / "small" / "text_encoder").exists()
    bare = DirectorPipeline.from_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="no text encoder"):
        bare("pushes in")
    text_encoder, tokenizer = load_text_encoder()
    pipe = DirectorPipeline.from_pretrained(tmp_path / "small", text_encoder=text_encoder, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("The camera pushes in.", num_inference_steps=2)
    assert out.trajectories.shape == (1, FRAMES, 4, 4)


def test_bad_inputs(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=1)
    with pytest.raises(ValueError, match="maximum"):
        pipe("pushes in", character_trajectory=np.zeros((FRAMES + 1, 3)), **run)
    with pytest.raises(ValueError, match="shape"):
        pipe("pushes in", character_trajectory=np.zeros((5, 4)), **run)
    with pytest.raises(ValueError, match="NaN"):
        pipe("pushes in", character_trajectory=np.full((5, 3), np.nan), **run)
    with pytest.raises(TypeError):
        pipe("pushes in", character_trajectory="left", **run)
    with pytest.raises(ValueError, match="empty"):
        pipe("", **run)
    with pytest.raises(TypeError):
        pipe(3, **run)
    with pytest.raises(ValueError):
        pipe("pushes in", num_frames=FRAMES + 1, **run)
    with pytest.raises(ValueError):
        pipe("pushes in", character_trajectory=np.zeros((5, 3)), num_frames=6, **run)
    with pytest.raises(ValueError):
        pipe(["a", "b"], character_trajectory=np.zeros((3, 5, 3)), **run)
    with pytest.raises(ValueError):
        pipe("pushes in", output_type="pil", **run)
    with pytest.raises(ValueError):
        pipe("pushes in", latents=torch.zeros(1, 3, 9), **run)
    wrong_width = tiny_pipeline(tmp_path / "other", text_dim=16)
    wrong_width.text_encoder, wrong_width.tokenizer = tiny_clip(tmp_path / "wide", hidden_size=24)
    with pytest.raises(ValueError, match="width"):
        wrong_width("pushes in", **run)
