"""training/convert_clatr_checkpoint.py: a state dict with the reference CLaTr key names converts, and the
converted CLaTrModel computes what a plain-torch rebuild of the reference architecture computes."""

import math

import pytest
import torch
from torch import nn

from storydiff import CLaTrModel
from storydiff.training.convert_clatr_checkpoint import convert_checkpoint, convert_state_dict, infer_config

D, HEADS, FF, LAYERS = 16, 2, 24, 2


def _positions(length, dim):
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2).float() * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * frequency), torch.cos(position * frequency)
    return table


class ReferenceEncoder(nn.Module):
    """ACTOR-style VAE encoder with the reference attribute names (projection, tokens, seqTransEncoder)."""

    def __init__(self, num_feats):
        super().__init__()
        self.projection = nn.Linear(num_feats, D)
        self.tokens = nn.Parameter(torch.randn(2, D))
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu", batch_first=True)
        self.seqTransEncoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def forward(self, x, mask):
        x = torch.cat([self.tokens[None].expand(len(x), -1, -1), self.projection(x)], 1)
        x = x + _positions(x.shape[1], D)
        full_mask = torch.cat([torch.ones(len(x), 2, dtype=torch.bool), mask], 1)
        return self.seqTransEncoder(x, src_key_padding_mask=~full_mask)[:, 0]


class ReferenceDecoder(nn.Module):
    def __init__(self, num_feats):
        super().__init__()
        layer = nn.TransformerDecoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu", batch_first=True)
        self.seqTransDecoder = nn.TransformerDecoder(layer, LAYERS)
        self.final_layer = nn.Linear(D, num_feats)

    def forward(self, z, mask):
        queries = _positions(mask.shape[1], D)[None].expand(len(z), -1, -1)
        out = self.final_layer(self.seqTransDecoder(queries, z[:, None], tgt_key_padding_mask=~mask))
        return out * mask[..., None]


class ReferenceCLaTr(nn.Module):
    def __init__(self):
        super().__init__()
        self.traj_encoder, self.text_encoder = ReferenceEncoder(9), ReferenceEncoder(12)
        self.traj_decoder = ReferenceDecoder(9)


@pytest.fixture()
def reference():
    torch.manual_seed(0)
    return ReferenceCLaTr().eval()


def test_infer_config_and_keys(reference):
    state = {f"clatr.{k}": v for k, v in reference.state_dict().items()}  # as inside a DIRECTOR checkpoint
    config = infer_config(state)
    assert config == dict(
        trajectory_dim=9, text_embed_dim=12, latent_dim=D, num_layers=LAYERS, num_heads=4, ff_size=FF
    )
    model = CLaTrModel(**{**config, "num_heads": HEADS})
    assert set(convert_state_dict(state)) == set(model.state_dict())


def test_converted_model_matches_the_reference(reference, tmp_path):
    path = tmp_path / "clatr-e100.ckpt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 100}, path)
    model, _ = convert_checkpoint(str(path), str(tmp_path / "out"), num_heads=HEADS, text_encoder_id="test")
    model = CLaTrModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.text_encoder_id == "test"
    features, text = torch.randn(3, 10, 9), torch.randn(3, 6, 12)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 7:] = False
    text_mask = torch.ones(3, 6, dtype=torch.bool)
    text_mask[2, 3:] = False
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_trajectory(features, mask), reference.traj_encoder(features, mask), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            model.encode_text(text, text_mask), reference.text_encoder(text, text_mask), atol=1e-5, rtol=1e-5
        )
        latent = torch.randn(3, D)
        torch.testing.assert_close(
            model.decode(latent, mask), reference.traj_decoder(latent, mask), atol=1e-5, rtol=1e-5
        )


def test_rejects_other_state_dicts(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.model.proj_in.weight": torch.zeros(2, 2)}}, path)
    with pytest.raises(ValueError, match="Not a CLaTr state dict"):
        convert_checkpoint(str(path))
