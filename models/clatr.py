"""CLaTr: a contrastive language-trajectory embedding, the feature extractor behind DIRECTOR's metrics.

CLaTr follows TEMOS / TMR: two ACTOR-style VAE encoders (one over the 9-d camera features of a trajectory, one over
the token features of its caption) map both modalities into one latent space, and a transformer decoder turns a
latent back into a trajectory. Training ties the modalities with reconstruction from both encoders, KL terms, a
latent-matching term and an InfoNCE loss. Evaluation uses the mean embeddings (`encode_trajectory`,
`encode_text`): FD_CLaTr, P/R/D/C and the CLaTr-Score in `storydiff.metrics` are computed on them.

The blocks are post-LayerNorm transformer layers, like the `torch.nn.TransformerEncoderLayer` /
`TransformerDecoderLayer` of the reference code (github robincourant/CLaTr), built from diffusers `Attention` and
`FeedForward` so that attention processors (SDPA, xformers) apply. One difference: diffusers' processors do not drop
attention probabilities, so dropout acts on the attention output only.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class CLaTrModelOutput(BaseOutput):
    """Mean embeddings (batch, latent_dim) of whichever modalities were given to `CLaTrModel.forward`."""

    trajectory_embeddings: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None


def sinusoidal_positions(num_positions: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(num_positions, dim) sin/cos table of "Attention is all you need" (sin on even, cos on odd channels)."""
    position = torch.arange(num_positions, device=device, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table.to(dtype)


def _key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, length) validity mask -> (batch, 1, length) additive bias: 0 where valid, a large negative where not."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)[:, None]


class CLaTrEncoderLayer(nn.Module):
    """Post-LayerNorm self-attention layer: x = LN(x + SA(x)); x = LN(x + FF(x))."""

    def __init__(self, dim: int, num_heads: int, ff_size: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads=num_heads, dim_head=dim // num_heads, dropout=dropout, bias=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, inner_dim=ff_size, dropout=dropout, activation_fn="gelu", final_dropout=True)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        hidden_states = self.norm1(hidden_states + self.self_attn(hidden_states, attention_mask=attention_bias))
        return self.norm2(hidden_states + self.ff(hidden_states))


class CLaTrDecoderLayer(nn.Module):
    """Post-LayerNorm decoder layer: self-attention over frame queries, cross-attention to the latent, FF."""

    def __init__(self, dim: int, num_heads: int, ff_size: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(dim, heads=num_heads, dim_head=dim // num_heads, dropout=dropout, bias=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = Attention(
            dim, cross_attention_dim=dim, heads=num_heads, dim_head=dim // num_heads, dropout=dropout, bias=True
        )
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, inner_dim=ff_size, dropout=dropout, activation_fn="gelu", final_dropout=True)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, hidden_states, memory, attention_bias):
        hidden_states = self.norm1(hidden_states + self.self_attn(hidden_states, attention_mask=attention_bias))
        hidden_states = self.norm2(hidden_states + self.cross_attn(hidden_states, encoder_hidden_states=memory))
        return self.norm3(hidden_states + self.ff(hidden_states))


class CLaTrVAEEncoder(nn.Module):
    """ACTOR-style encoder: two learned tokens (mu, logvar) read a padded sequence through self-attention."""

    def __init__(self, input_dim: int, dim: int, num_layers: int, num_heads: int, ff_size: int, dropout: float):
        super().__init__()
        self.projection = nn.Linear(input_dim, dim)
        self.distribution_tokens = nn.Parameter(torch.randn(2, dim))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(CLaTrEncoderLayer(dim, num_heads, ff_size, dropout) for _ in range(num_layers))
        self.gradient_checkpointing = False  # switched by `CLaTrModel.enable_gradient_checkpointing()`

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, length, _ = inputs.shape
        hidden_states = self.projection(inputs)
        tokens = self.distribution_tokens[None].expand(batch_size, -1, -1).to(hidden_states.dtype)
        hidden_states = torch.cat([tokens, hidden_states], dim=1)
        positions = sinusoidal_positions(
            length + 2, hidden_states.shape[-1], hidden_states.device, hidden_states.dtype
        )
        hidden_states = self.dropout(hidden_states + positions)
        token_mask = torch.ones(batch_size, 2, dtype=torch.bool, device=mask.device)
        attention_bias = _key_padding_bias(torch.cat([token_mask, mask], dim=1), hidden_states.dtype)
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states, attention_bias)
            else:
                hidden_states = layer(hidden_states, attention_bias)
        return hidden_states[:, 0], hidden_states[:, 1]


class CLaTrTrajectoryDecoder(nn.Module):
    """ACTOR-style decoder: sinusoidal frame queries attend to one latent token; padded frames come out as 0."""

    def __init__(self, output_dim: int, dim: int, num_layers: int, num_heads: int, ff_size: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(CLaTrDecoderLayer(dim, num_heads, ff_size, dropout) for _ in range(num_layers))
        self.output_projection = nn.Linear(dim, output_dim)
        self.gradient_checkpointing = False  # switched by `CLaTrModel.enable_gradient_checkpointing()`

    def forward(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch_size, num_frames = mask.shape
        queries = sinusoidal_positions(num_frames, latent.shape[-1], latent.device, latent.dtype)
        hidden_states = self.dropout(queries[None].expand(batch_size, -1, -1))
        attention_bias = _key_padding_bias(mask, hidden_states.dtype)
        memory = latent[:, None]
        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states, memory, attention_bias)
            else:
                hidden_states = layer(hidden_states, memory, attention_bias)
        return self.output_projection(hidden_states) * mask[..., None].to(hidden_states.dtype)


class CLaTrModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    r"""Contrastive Language-Trajectory embedding (CLaTr), TEMOS/TMR-style, as used by DIRECTOR's metrics.

    Args:
        trajectory_dim: features per frame (9: 6D rotation + translation, see `storydiff.trajectories`).
        text_embed_dim: width of the text token features (512 for CLIP ViT-B/32, 384 for all-MiniLM-L6-v2).
        latent_dim: width of the transformers and of the embeddings (256 in the paper).
        num_layers / num_heads / ff_size: per transformer (6 / 4 / 1024 in the paper).
        dropout: dropout after positional encoding, on attention outputs and in the feed-forward blocks.
        max_frames: longest trajectory accepted (300 in E.T.).
        reconstruction_weight, kl_weight, latent_weight, contrastive_weight: loss weights (1, 1e-5, 1e-5, 0.1).
        temperature: InfoNCE softmax temperature (0.1).
        duplicate_threshold: in-batch pairs whose pooled caption features have a cosine similarity above this are
            not used as negatives (0.99, the reference's `threshold_selfsim` 0.995 mapped from [0, 1] to [-1, 1]).
        text_encoder_id: which text encoder produced the token features the model was trained on (a Hub id, or
            "all-MiniLM-L6-v2" for the offline MiniLM), recorded so that evaluation uses the same one. The tokens
            come from `storydiff.text_features.encode_text`.

    Like a stock diffusers transformer it takes attention processors (`attn_processors`, `set_attn_processor`,
    `set_default_attn_processor`), PEFT LoRA adapters (`add_adapter`, `save_lora_adapter`, `load_lora_adapter`;
    targets `to_q`, `to_k`, `to_v`, `to_out.0`), `enable_gradient_checkpointing()` and `enable_layerwise_casting`.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = True
    _no_split_modules = ["CLaTrEncoderLayer", "CLaTrDecoderLayer"]

    @register_to_config
    def __init__(
        self,
        trajectory_dim: int = 9,
        text_embed_dim: int = 512,
        latent_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 4,
        ff_size: int = 1024,
        dropout: float = 0.1,
        max_frames: int = 300,
        reconstruction_weight: float = 1.0,
        kl_weight: float = 1e-5,
        latent_weight: float = 1e-5,
        contrastive_weight: float = 0.1,
        temperature: float = 0.1,
        duplicate_threshold: float = 0.99,
        text_encoder_id: str | None = None,
    ):
        super().__init__()
        if latent_dim % num_heads:
            raise ValueError(f"`latent_dim` ({latent_dim}) must be divisible by `num_heads` ({num_heads}).")
        if temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {temperature}.")
        blocks = dict(dim=latent_dim, num_layers=num_layers, num_heads=num_heads, ff_size=ff_size, dropout=dropout)
        self.trajectory_encoder = CLaTrVAEEncoder(trajectory_dim, **blocks)
        self.text_encoder = CLaTrVAEEncoder(text_embed_dim, **blocks)
        self.trajectory_decoder = CLaTrTrajectoryDecoder(trajectory_dim, **blocks)

    def set_default_attn_processor(self):
        """Use diffusers' plain (non-SDPA) attention processor everywhere."""
        self.set_attn_processor(AttnProcessor())

    # ----------------------------------------------------------------------------------------------------------------
    # Input checks

    def _check_sequence(self, values, mask, width: int, name: str, max_length: int | None = None):
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(values).__name__}.")
        if values.ndim != 3 or values.shape[-1] != width:
            raise ValueError(f"`{name}` must have shape (batch, length, {width}), got {tuple(values.shape)}.")
        if max_length is not None and values.shape[1] > max_length:
            raise ValueError(f"`{name}` has {values.shape[1]} frames; this model accepts at most {max_length}.")
        if not torch.isfinite(values).all():
            raise ValueError(f"`{name}` contains non-finite values.")
        if mask is None:
            mask = torch.ones(values.shape[:2], dtype=torch.bool, device=values.device)
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"The mask of `{name}` must be a torch.Tensor, got {type(mask).__name__}.")
        if mask.shape != values.shape[:2]:
            raise ValueError(
                f"The mask of `{name}` must have shape {tuple(values.shape[:2])}, got {tuple(mask.shape)}."
            )
        mask = mask.to(device=values.device, dtype=torch.bool)
        if not mask.any(dim=1).all():
            raise ValueError(f"Every row of `{name}` needs at least one valid (mask True) position.")
        return values.to(self.dtype), mask

    # ----------------------------------------------------------------------------------------------------------------
    # Encoding and decoding

    @staticmethod
    def _sample(mean, logvar, generator=None):
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + noise * torch.exp(0.5 * logvar)

    def encode_trajectory_distribution(self, features, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (batch, latent_dim), of standardised trajectory features (batch, frames, 9)."""
        features, mask = self._check_sequence(
            features, mask, self.config.trajectory_dim, "features", self.config.max_frames
        )
        return self.trajectory_encoder(features, mask)

    def encode_text_distribution(self, tokens, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, logvar), each (batch, latent_dim), of text token features (batch, tokens, text_embed_dim)."""
        tokens, mask = self._check_sequence(tokens, mask, self.config.text_embed_dim, "tokens")
        return self.text_encoder(tokens, mask)

    def encode_trajectory(self, features, mask=None, sample: bool = False, generator=None) -> torch.Tensor:
        """Trajectory embedding (batch, latent_dim): the mean (used by the metrics), or a VAE sample."""
        mean, logvar = self.encode_trajectory_distribution(features, mask)
        return self._sample(mean, logvar, generator) if sample else mean

    def encode_text(self, tokens, mask=None, sample: bool = False, generator=None) -> torch.Tensor:
        """Caption embedding (batch, latent_dim): the mean (used by the metrics), or a VAE sample."""
        mean, logvar = self.encode_text_distribution(tokens, mask)
        return self._sample(mean, logvar, generator) if sample else mean

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Trajectory features (batch, frames, trajectory_dim) from latents (batch, latent_dim); 0 where mask False."""
        if not isinstance(latent, torch.Tensor) or latent.ndim != 2 or latent.shape[1] != self.config.latent_dim:
            raise ValueError(f"`latent` must be a tensor of shape (batch, {self.config.latent_dim}).")
        if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != latent.shape[0]:
            raise ValueError(f"`mask` must be a (batch, frames) tensor with batch {latent.shape[0]}.")
        if mask.shape[1] > self.config.max_frames:
            raise ValueError(f"`mask` asks for {mask.shape[1]} frames; at most {self.config.max_frames}.")
        return self.trajectory_decoder(latent.to(self.dtype), mask.to(device=latent.device, dtype=torch.bool))

    def forward(
        self, trajectory_features=None, trajectory_mask=None, text_tokens=None, text_mask=None, return_dict=True
    ):
        """Mean embeddings of the given trajectories and/or captions."""
        if trajectory_features is None and text_tokens is None:
            raise ValueError("Pass `trajectory_features`, `text_tokens` or both.")
        trajectory = (
            None if trajectory_features is None else self.encode_trajectory(trajectory_features, trajectory_mask)
        )
        text = None if text_tokens is None else self.encode_text(text_tokens, text_mask)
        if not return_dict:
            return (trajectory, text)
        return CLaTrModelOutput(trajectory_embeddings=trajectory, text_embeddings=text)

    # ----------------------------------------------------------------------------------------------------------------
    # Training objective

    @staticmethod
    def _kl(mean_q, logvar_q, mean_p, logvar_p) -> torch.Tensor:
        """KL(q || p) between diagonal Gaussians, averaged over batch and channels (as TEMOS)."""
        log_ratio = logvar_q - logvar_p
        return 0.5 * (log_ratio.exp() + (mean_p - mean_q).pow(2) / logvar_p.exp() - 1 - log_ratio).mean()

    def contrastive_loss(self, text_latents, trajectory_latents, text_pooled=None) -> torch.Tensor:
        """Symmetric InfoNCE over in-batch pairs; near-duplicate captions are removed from the negatives."""
        logits = F.normalize(text_latents, dim=-1) @ F.normalize(trajectory_latents, dim=-1).T
        logits = logits / self.config.temperature
        if text_pooled is not None:
            pooled = F.normalize(text_pooled.to(logits.dtype), dim=-1)
            similarity = pooled @ pooled.T
            duplicates = similarity > self.config.duplicate_threshold
            duplicates.fill_diagonal_(False)  # the positive pair always stays
            logits = logits.masked_fill(duplicates, float("-inf"))
        labels = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    def compute_loss(
        self, trajectory_features, trajectory_mask, text_tokens, text_mask, text_pooled=None, generator=None
    ) -> dict[str, torch.Tensor]:
        """The TMR objective; returns the weighted total as "loss" and each term.

        - "reconstruction": SmoothL1 between the reference features and the decodings of both the text latent and
          the trajectory latent (averaged over valid frames only; the reference also counts padded zeros);
        - "kl": KL(text || trajectory) + KL(trajectory || text) + KL(each || N(0, I));
        - "latent": SmoothL1 between the sampled text and trajectory latents;
        - "contrastive": InfoNCE between them, with `text_pooled` (batch, width), e.g. the CLIP EOT token or a
          pooled sentence embedding, used to find near-duplicate captions.
        """
        features, mask = self._check_sequence(
            trajectory_features, trajectory_mask, self.config.trajectory_dim, "trajectory_features",
            self.config.max_frames,
        )  # fmt: skip
        tokens, token_mask = self._check_sequence(text_tokens, text_mask, self.config.text_embed_dim, "text_tokens")
        if tokens.shape[0] != features.shape[0]:
            raise ValueError(f"Batch sizes differ: {features.shape[0]} trajectories, {tokens.shape[0]} captions.")
        if text_pooled is not None and (text_pooled.ndim != 2 or text_pooled.shape[0] != features.shape[0]):
            raise ValueError(
                f"`text_pooled` must have shape ({features.shape[0]}, width), got {tuple(text_pooled.shape)}."
            )

        text_mean, text_logvar = self.text_encoder(tokens, token_mask)
        trajectory_mean, trajectory_logvar = self.trajectory_encoder(features, mask)
        text_latents = self._sample(text_mean, text_logvar, generator)
        trajectory_latents = self._sample(trajectory_mean, trajectory_logvar, generator)

        valid = mask[..., None].expand_as(features)
        reconstruction = sum(
            F.smooth_l1_loss(self.trajectory_decoder(latents, mask)[valid], features[valid])
            for latents in (text_latents, trajectory_latents)
        )
        zeros = torch.zeros_like(text_mean)
        kl = (
            self._kl(text_mean, text_logvar, trajectory_mean, trajectory_logvar)
            + self._kl(trajectory_mean, trajectory_logvar, text_mean, text_logvar)
            + self._kl(trajectory_mean, trajectory_logvar, zeros, zeros)
            + self._kl(text_mean, text_logvar, zeros, zeros)
        )
        latent = F.smooth_l1_loss(text_latents, trajectory_latents)
        contrastive = self.contrastive_loss(text_latents, trajectory_latents, text_pooled)
        config = self.config
        loss = (
            config.reconstruction_weight * reconstruction
            + config.kl_weight * kl
            + config.latent_weight * latent
            + config.contrastive_weight * contrastive
        )
        return {"loss": loss, "reconstruction": reconstruction, "kl": kl, "latent": latent, "contrastive": contrastive}
