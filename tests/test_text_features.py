import json

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from storydiff.text_features import encode_text, load_text_encoder, null_text_features, text_embed_dim


def tiny_clip(tmp_path, hidden_size=32, with_projection=False):
    letters = "abcdefghijklmnopqrstuvwxyz.,"
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"]
    vocab += list(letters) + [c + "</w>" for c in letters]
    (tmp_path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="!")
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval(), tokenizer


def test_clip_pooled_is_eot_token_after_final_norm(tmp_path):
    text_encoder, tokenizer = tiny_clip(tmp_path)
    features = encode_text(text_encoder, tokenizer, ["the camera trucks right.", "pushes in"])
    assert features.pooled.shape == (2, 32)
    assert features.tokens.shape == (2, 77, 32)
    assert features.mask.dtype == torch.bool
    lengths = features.mask.sum(1)
    # the pooled vector is the last real token (EOT) of the token sequence
    for i in range(2):
        torch.testing.assert_close(features.pooled[i], features.tokens[i, lengths[i] - 1])
        assert torch.all(features.tokens[i, lengths[i] :] == 0)
    assert text_embed_dim(text_encoder) == 32


def test_clip_with_projection_uses_text_transformer(tmp_path):
    text_encoder, tokenizer = tiny_clip(tmp_path, with_projection=True)
    plain = text_encoder.text_model  # the un-projected CLIPTextModel inside
    a = encode_text(text_encoder, tokenizer, "booms top")
    b = encode_text(plain, tokenizer, "booms top")
    torch.testing.assert_close(a.pooled, b.pooled)


def test_minilm_mean_pooling():
    text_encoder, tokenizer = load_text_encoder()
    features = encode_text(text_encoder, tokenizer, ["The camera pushes in.", "The camera trucks left slowly."])
    assert features.pooled.shape == (2, 384) and features.tokens.shape == (2, 77, 384)
    n = features.mask[0].sum()
    torch.testing.assert_close(features.pooled[0], features.tokens[0, :n].mean(0), rtol=1e-5, atol=1e-5)


def test_bad_prompts(tmp_path):
    text_encoder, tokenizer = tiny_clip(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        encode_text(text_encoder, tokenizer, ["ok", "  "])
    with pytest.raises(ValueError):
        encode_text(text_encoder, tokenizer, [])
    with pytest.raises(TypeError):
        encode_text(text_encoder, tokenizer, [3])


def test_null_features():
    null = null_text_features(3, 16, max_length=5)
    assert null.pooled.shape == (3, 16) and null.tokens.shape == (3, 5, 16)
    assert not null.mask.any() and not null.tokens.any()
