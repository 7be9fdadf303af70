"""CLaTrModel: shapes, padding invariance, the training objective, save/load."""

import pytest
import torch

from storydiff import CLaTrModel


def _tiny(**overrides):
    config = dict(text_embed_dim=12, latent_dim=16, num_layers=2, num_heads=2, ff_size=32, max_frames=40)
    config.update(overrides)
    torch.manual_seed(0)
    return CLaTrModel(**config).eval()


def _batch(batch_size=4, frames=20, tokens=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, frames, 9, generator=generator)
    mask = torch.ones(batch_size, frames, dtype=torch.bool)
    mask[1, 12:] = False
    text = torch.randn(batch_size, tokens, 12, generator=generator)
    text_mask = torch.ones(batch_size, tokens, dtype=torch.bool)
    text_mask[0, 4:] = False
    return features, mask, text, text_mask


def test_shapes_and_forward():
    model = _tiny()
    features, mask, text, text_mask = _batch()
    with torch.no_grad():
        assert model.encode_trajectory(features, mask).shape == (4, 16)
        assert model.encode_text(text, text_mask).shape == (4, 16)
        decoded = model.decode(model.encode_trajectory(features, mask), mask)
        output = model(trajectory_features=features, trajectory_mask=mask, text_tokens=text, text_mask=text_mask)
    assert decoded.shape == (4, 20, 9)
    assert torch.all(decoded[1, 12:] == 0)
    assert output.trajectory_embeddings.shape == output.text_embeddings.shape == (4, 16)


def test_padding_does_not_change_valid_outputs():
    model = _tiny()
    features, mask, text, text_mask = _batch()
    garbage_features = features.clone()
    garbage_features[1, 12:] = 1e3
    garbage_text = text.clone()
    garbage_text[0, 4:] = -1e3
    with torch.no_grad():
        embedding = model.encode_trajectory(features, mask)
        torch.testing.assert_close(model.encode_trajectory(garbage_features, mask), embedding)
        torch.testing.assert_close(model.encode_text(garbage_text, text_mask), model.encode_text(text, text_mask))
        # A shorter padded tensor gives the same embedding as the trimmed sequence.
        trimmed = model.encode_trajectory(features[1:2, :12], mask[1:2, :12])
        torch.testing.assert_close(trimmed, embedding[1:2], atol=1e-5, rtol=1e-5)
        decoded = model.decode(embedding, mask)
        torch.testing.assert_close(
            model.decode(embedding[1:2], mask[1:2, :12]), decoded[1:2, :12], atol=1e-5, rtol=1e-5
        )


def test_sampling_uses_the_generator():
    model = _tiny()
    features, mask, _, _ = _batch()
    with torch.no_grad():
        a = model.encode_trajectory(features, mask, sample=True, generator=torch.Generator().manual_seed(1))
        b = model.encode_trajectory(features, mask, sample=True, generator=torch.Generator().manual_seed(1))
        mean = model.encode_trajectory(features, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, mean)


def test_contrastive_filter_masks_near_duplicate_captions():
    model = _tiny()
    text_latents, trajectory_latents = torch.randn(3, 16), torch.randn(3, 16)
    pooled = torch.tensor([[1.0, 0.0], [1.0, 0.001], [0.0, 1.0]])  # captions 0 and 1 are near duplicates
    filtered = model.contrastive_loss(text_latents, trajectory_latents, pooled)
    logits = (
        torch.nn.functional.normalize(text_latents, dim=-1)
        @ torch.nn.functional.normalize(trajectory_latents, dim=-1).T
    )
    logits = logits / 0.1
    logits[0, 1] = logits[1, 0] = float("-inf")
    labels = torch.arange(3)
    expected = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    torch.testing.assert_close(filtered, expected)
    assert not torch.allclose(filtered, model.contrastive_loss(text_latents, trajectory_latents))


def test_loss_is_finite_and_decreases():
    model = _tiny(dropout=0.0).train()
    features, mask, text, text_mask = _batch(batch_size=8, frames=12)
    # Smooth, learnable trajectories (white noise cannot be reconstructed from a 16-d latent).
    time = torch.arange(12.0)[None, :, None]
    features = torch.sin(0.3 * time * torch.arange(1.0, 10.0) + torch.arange(8.0)[:, None, None])
    mask = mask[:, :12]
    pooled = text.mean(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        terms = model.compute_loss(
            features, mask, text, text_mask, pooled, generator=torch.Generator().manual_seed(step)
        )
        assert all(torch.isfinite(value) for value in terms.values())
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5


def test_save_and_load_roundtrip(tmp_path):
    model = _tiny()
    features, mask, text, text_mask = _batch()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = CLaTrModel.from_pretrained(tmp_path).eval()
    assert loaded.config.text_embed_dim == 12
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_trajectory(features, mask), model.encode_trajectory(features, mask))
        torch.testing.assert_close(loaded.encode_text(text, text_mask), model.encode_text(text, text_mask))


def test_bad_input():
    model = _tiny()
    features, mask, text, text_mask = _batch()
    with pytest.raises(ValueError, match=r"\(batch, length, 12\)"):
        model.encode_text(torch.randn(2, 5, 384))
    with pytest.raises(ValueError, match="at most 40"):
        model.encode_trajectory(torch.randn(1, 41, 9))
    with pytest.raises(ValueError, match="non-finite"):
        model.encode_trajectory(torch.full((1, 5, 9), float("nan")))
    with pytest.raises(ValueError, match="at least one valid"):
        model.encode_trajectory(features, torch.zeros_like(mask))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model.encode_trajectory(features.numpy())
    with pytest.raises(ValueError, match="Batch sizes differ"):
        model.compute_loss(features, mask, text[:2], text_mask[:2])
    with pytest.raises(ValueError, match="divisible"):
        CLaTrModel(latent_dim=10, num_heads=3)
