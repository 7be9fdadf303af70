"""DIRECTOR: a diffusion transformer that generates camera trajectories from a caption and a character trajectory
(Courant et al., "E.T. the Exceptional Trajectories", ECCV 2024).

Three ways to bring in the conditions, chosen by `conditioning_type`:

* `"in_context"` (variant A): three tokens `[time, Linear(flattened character), Linear(pooled text)]` are prepended
  to the frame tokens of a plain self-attention transformer and dropped at the end.
* `"adaln"` (variant B, DiT-like): one vector `Linear(concat(flattened character, pooled text)) + time` drives
  zero-initialised adaptive layer norms (shift, scale, gate) in every block and before the output layer.
* `"cross_attention"` (variant C): a condition sequence `[registers, time, character tokens, text tokens]` with
  positions goes through `num_condition_layers` self-attention blocks; every block of the main transformer
  cross-attends to it, then self-attends, then applies its MLP.

Samples are channels-last: `(batch, frames, 9)` trajectory features (6D rotation + translation, standardised and,
as in the paper's "EDM2 normalisation", multiplied by `sigma_data`). The model applies Karras et al.'s EDM
preconditioning itself, so `forward` returns the denoised sample `D(x; sigma)`.
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention, AttnProcessor
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

CONDITIONING_TYPES = ("in_context", "adaln", "cross_attention")
_VARIANT_NAMES = {"a": "in_context", "b": "adaln", "c": "cross_attention"}


@dataclass
class DirectorModelOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, frames, sample_dim)`):
            The denoised sample `D(x; sigma)` (EDM's clean-sample estimate), in the model's sample space.
    """

    sample: torch.Tensor


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Transformer positions (Vaswani et al.): sine on even channels, cosine on odd ones, shape `(length, dim)`."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    frequencies = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    positions = torch.zeros(length, dim)
    positions[:, 0::2] = torch.sin(position * frequencies)
    positions[:, 1::2] = torch.cos(position * frequencies[: dim // 2])
    return positions


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop a residual branch for whole samples, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    keep = torch.empty(x.shape[0], *([1] * (x.ndim - 1)), device=x.device, dtype=x.dtype).bernoulli_(keep_prob)
    return x * keep / keep_prob


def padding_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean key mask `(batch, keys)` -> additive attention bias `(batch, 1, keys)`: 0 where valid, the dtype's
    most negative value where not. A bias (not a boolean mask) works with every diffusers attention processor."""
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(~valid, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


class DirectorTimeEmbedding(nn.Module):
    """EDM noise level -> vector: `c_noise * 1000` -> sinusoidal features (cos, sin), standardised over channels
    as in the reference code, -> MLP."""

    def __init__(self, num_channels: int, hidden_size: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(num_channels, hidden_size)

    def forward(self, c_noise: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`dtype` is the model's compute dtype; it is not read from a weight because under layerwise casting
        (`enable_layerwise_casting`) weights are stored in another dtype (float8, float16) between calls."""
        features = self.time_proj(c_noise.float() * 1000.0)
        features = (features - features.mean(-1, keepdim=True)) / features.std(-1, keepdim=True)
        return self.time_embedding(features.to(dtype))


class DirectorBlock(nn.Module):
    """Pre-LayerNorm transformer block: [cross-attention ->] self-attention -> MLP, each a residual branch with
    stochastic depth. With `adaln=True` the two norms lose their affine weights and a conditioning vector sets
    shift, scale and gate of both branches (zero-initialised, so every block starts as the identity)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        stochastic_depth: float = 0.0,
        cross_attention: bool = False,
        adaln: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.stochastic_depth = stochastic_depth
        self.adaln = adaln
        if cross_attention:
            self.norm_cross = nn.LayerNorm(hidden_size, eps=norm_eps)
            self.attn_cross = Attention(
                query_dim=hidden_size,
                cross_attention_dim=hidden_size,
                heads=num_heads,
                dim_head=head_dim,
                bias=True,
                out_bias=True,
            )
        else:
            self.norm_cross = self.attn_cross = None
        self.norm1 = nn.LayerNorm(hidden_size, eps=norm_eps, elementwise_affine=not adaln)
        self.attn1 = Attention(query_dim=hidden_size, heads=num_heads, dim_head=head_dim, bias=True, out_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, eps=norm_eps, elementwise_affine=not adaln)
        self.ff = FeedForward(hidden_size, mult=mlp_ratio, dropout=dropout, activation_fn="gelu", bias=True)
        if adaln:
            self.adaln_modulation = nn.Linear(hidden_size, 6 * hidden_size)
            nn.init.zeros_(self.adaln_modulation.weight)
            nn.init.zeros_(self.adaln_modulation.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_bias: Optional[torch.Tensor] = None,
        condition: Optional[torch.Tensor] = None,
        condition_bias: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if self.attn_cross is not None:
            attended = self.attn_cross(
                self.norm_cross(hidden_states), encoder_hidden_states=condition, attention_mask=condition_bias
            )
            hidden_states = hidden_states + drop_path(attended, self.stochastic_depth, self.training)

        if self.adaln:
            modulation = self.adaln_modulation(F.silu(condition)).unsqueeze(1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)
            attended = self.attn1(
                self.norm1(hidden_states) * (1 + scale_msa) + shift_msa, attention_mask=attention_bias
            )
            hidden_states = hidden_states + drop_path(gate_msa * attended, self.stochastic_depth, self.training)
            mlp_out = self.ff(self.norm2(hidden_states) * (1 + scale_mlp) + shift_mlp)
            return hidden_states + drop_path(gate_mlp * mlp_out, self.stochastic_depth, self.training)

        attended = self.attn1(self.norm1(hidden_states), attention_mask=attention_bias)
        hidden_states = hidden_states + drop_path(attended, self.stochastic_depth, self.training)
        return hidden_states + drop_path(self.ff(self.norm2(hidden_states)), self.stochastic_depth, self.training)


class DirectorModel(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    r"""DIRECTOR's denoiser with EDM preconditioning.

    Args:
        conditioning_type (`str`, defaults to `"cross_attention"`):
            `"in_context"` (variant A), `"adaln"` (variant B) or `"cross_attention"` (variant C); `"a"`, `"b"`, `"c"`
            are accepted and stored as the full name.
        num_frames (`int`, defaults to 300): the longest trajectory; any length up to it works (padding mask).
        sample_dim (`int`, defaults to 9): features per frame (6D rotation + translation).
        character_dim (`int`, defaults to 3): character features per frame (standardised centre velocities).
        hidden_size (`int`, defaults to 512), num_layers (`int`, defaults to 8), num_heads (`int`, defaults to 16),
        mlp_ratio (`int`, defaults to 4): transformer size.
        text_embed_dim (`int`, defaults to 512): width of the text features (512 for CLIP ViT-B/32, 384 for MiniLM).
        max_text_length (`int`, defaults to 77): text token positions (variant C).
        num_registers (`int`, defaults to 16): learned register tokens of the condition sequence (variant C).
        num_condition_layers (`int`, defaults to 2): self-attention blocks over the condition sequence (variant C).
        time_embed_dim (`int`, defaults to 128): sinusoidal channels of the noise-level embedding.
        dropout (`float`, defaults to 0.1): MLP dropout. stochastic_depth (`float`, defaults to 0.1): residual drop.
        sigma_data (`float`, defaults to 0.5): EDM's data standard deviation.
        mask_condition_padding (`bool`, defaults to `True`): variant C's cross-attention and condition self-attention
            ignore padded character frames and padded text tokens. The reference code attends to them (they are
            zero vectors); converted original checkpoints set this to `False` to behave as trained.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.

    Preconditioning (Karras et al. 2022), with `s = sigma` and `sd = sigma_data`:
    `D(x; s) = c_skip x + c_out F(c_in x; c_noise)`, `c_in = 1/sqrt(s^2+sd^2)`, `c_skip = sd^2/(s^2+sd^2)`,
    `c_out = s sd/sqrt(s^2+sd^2)`, `c_noise = ln(s)/4`. `forward` returns `D`; `forward_network` is the raw `F`.

    Like a stock diffusers transformer it takes attention processors, PEFT LoRA adapters (`add_adapter`,
    `save_lora_adapter`, `load_lora_adapter`; see docs/director/model.md for the target modules),
    `enable_gradient_checkpointing()` and `enable_layerwise_casting` (fp8 / fp16 storage, fp32 compute).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DirectorBlock"]

    @register_to_config
    def __init__(
        self,
        conditioning_type: str = "cross_attention",
        num_frames: int = 300,
        sample_dim: int = 9,
        character_dim: int = 3,
        hidden_size: int = 512,
        num_layers: int = 8,
        num_heads: int = 16,
        mlp_ratio: int = 4,
        text_embed_dim: int = 512,
        max_text_length: int = 77,
        num_registers: int = 16,
        num_condition_layers: int = 2,
        time_embed_dim: int = 128,
        dropout: float = 0.1,
        stochastic_depth: float = 0.1,
        sigma_data: float = 0.5,
        mask_condition_padding: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        conditioning_type = _VARIANT_NAMES.get(str(conditioning_type).lower(), conditioning_type)
        if conditioning_type not in CONDITIONING_TYPES:
            raise ValueError(f"`conditioning_type` must be one of {CONDITIONING_TYPES}, got {conditioning_type!r}.")
        if hidden_size % num_heads:
            raise ValueError(f"`hidden_size` ({hidden_size}) must be divisible by `num_heads` ({num_heads}).")
        self.register_to_config(conditioning_type=conditioning_type)
        self.conditioning_type = conditioning_type
        self.gradient_checkpointing = False

        self.proj_in = nn.Linear(sample_dim, hidden_size)
        self.time_embedding = DirectorTimeEmbedding(time_embed_dim, hidden_size)
        condition_length = num_registers + 1 + num_frames + max_text_length
        self.register_buffer(
            "positions", sinusoidal_positions(max(num_frames, condition_length), hidden_size), persistent=False
        )

        block_kwargs = dict(
            hidden_size=hidden_size,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            stochastic_depth=stochastic_depth,
            norm_eps=norm_eps,
        )
        if conditioning_type == "in_context":
            self.character_embedding = nn.Linear(num_frames * character_dim, hidden_size)
            self.text_embedding = nn.Linear(text_embed_dim, hidden_size)
        elif conditioning_type == "adaln":
            self.condition_embedding = nn.Linear(num_frames * character_dim + text_embed_dim, hidden_size)
        else:
            self.character_embedding = nn.Linear(character_dim, hidden_size)
            self.text_embedding = nn.Linear(text_embed_dim, hidden_size)
            self.registers = nn.Parameter(torch.zeros(num_registers, hidden_size))
            nn.init.trunc_normal_(self.registers, std=0.02, a=-0.04, b=0.04)
            self.condition_blocks = nn.ModuleList([DirectorBlock(**block_kwargs) for _ in range(num_condition_layers)])

        self.transformer_blocks = nn.ModuleList(
            [
                DirectorBlock(
                    **block_kwargs,
                    cross_attention=conditioning_type == "cross_attention",
                    adaln=conditioning_type == "adaln",
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(hidden_size, eps=norm_eps, elementwise_affine=conditioning_type != "adaln")
        if conditioning_type == "adaln":
            self.adaln_out = nn.Linear(hidden_size, 2 * hidden_size)
            nn.init.zeros_(self.adaln_out.weight)
            nn.init.zeros_(self.adaln_out.bias)
        self.proj_out = nn.Linear(hidden_size, sample_dim)

    def set_default_attn_processor(self):
        """Use diffusers' plain (non-SDPA) attention processor everywhere."""
        self.set_attn_processor(AttnProcessor())

    # ------------------------------------------------------------------------------------------------------------
    # EDM preconditioning

    def preconditioning(self, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(c_in, c_skip, c_out, c_noise)` for noise levels `sigma` of shape `(batch,)`, each shaped `(batch, 1, 1)`
        except `c_noise` `(batch,)`."""
        sd = self.config.sigma_data
        sigma = sigma.reshape(-1, 1, 1)
        c_in = 1.0 / (sigma**2 + sd**2).sqrt()
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4.0
        return c_in, c_skip, c_out, c_noise

    def forward(
        self,
        sample: torch.Tensor,
        sigma,
        character_features: Optional[torch.Tensor] = None,
        text_pooled: Optional[torch.Tensor] = None,
        text_tokens: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        frame_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ):
        r"""Denoise `sample` at noise level `sigma`: returns `D(x; sigma)`, the estimate of the clean sample.

        Args:
            sample (`torch.Tensor` of shape `(batch, frames, sample_dim)`): noisy trajectory features, `frames <=
                num_frames`.
            sigma (`float` or `torch.Tensor` of shape `()` or `(batch,)`): EDM noise level(s), > 0.
            character_features (`torch.Tensor` of shape `(batch, frames, character_dim)`, *optional*): standardised
                character velocities (`storydiff.trajectories.encode_character`); `None` is the null condition (zeros).
            text_pooled (`torch.Tensor` of shape `(batch, text_embed_dim)`, *optional*): pooled text (A and B).
            text_tokens (`torch.Tensor` of shape `(batch, tokens, text_embed_dim)`, *optional*): text tokens (C),
                `tokens <= max_text_length`.
            text_mask (`torch.BoolTensor` of shape `(batch, tokens)`, *optional*): real text tokens (C).
            frame_mask (`torch.BoolTensor` of shape `(batch, frames)`, *optional*): valid frames; padded frames are
                never attended to and never change the valid frames' outputs. `None` means all frames are valid.
            return_dict (`bool`, defaults to `True`): return a [`DirectorModelOutput`] rather than a tuple.
        """
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"`sample` must be a torch.Tensor, got {type(sample).__name__}.")
        sigma = torch.as_tensor(sigma, device=sample.device, dtype=torch.float32)
        if sigma.ndim == 0 or sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(sample.shape[0])
        if sigma.shape != (sample.shape[0],):
            raise ValueError(f"`sigma` must be a scalar or have shape ({sample.shape[0]},), got {tuple(sigma.shape)}.")
        c_in, c_skip, c_out, c_noise = self.preconditioning(sigma)
        network_output = self.forward_network(
            (c_in * sample.float()).to(sample.dtype),
            c_noise,
            character_features=character_features,
            text_pooled=text_pooled,
            text_tokens=text_tokens,
            text_mask=text_mask,
            frame_mask=frame_mask,
        )
        denoised = (c_skip * sample.float() + c_out * network_output.float()).to(sample.dtype)
        if not return_dict:
            return (denoised,)
        return DirectorModelOutput(sample=denoised)

    # ------------------------------------------------------------------------------------------------------------
    # the network F

    def _check_inputs(self, sample, character_features, text_pooled, text_tokens, text_mask, frame_mask):
        config = self.config
        if not isinstance(sample, torch.Tensor):
            raise TypeError(f"`sample` must be a torch.Tensor, got {type(sample).__name__}.")
        if sample.ndim != 3 or sample.shape[-1] != config.sample_dim:
            raise ValueError(
                f"`sample` must have shape (batch, frames, {config.sample_dim}), got {tuple(sample.shape)}."
            )
        batch, frames = sample.shape[:2]
        if frames > config.num_frames or frames < 1:
            raise ValueError(f"`sample` has {frames} frames; this model handles 1 to {config.num_frames}.")
        expected = {
            "character_features": (character_features, (batch, frames, config.character_dim)),
            "text_pooled": (text_pooled, (batch, config.text_embed_dim)),
            "frame_mask": (frame_mask, (batch, frames)),
        }
        for name, (value, shape) in expected.items():
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"`{name}` must have shape {shape}, got {tuple(value.shape)}.")
        if text_tokens is not None:
            if (
                text_tokens.ndim != 3
                or text_tokens.shape[0] != batch
                or text_tokens.shape[-1] != config.text_embed_dim
                or text_tokens.shape[1] > config.max_text_length
            ):
                raise ValueError(
                    f"`text_tokens` must have shape ({batch}, <= {config.max_text_length}, {config.text_embed_dim}), "
                    f"got {tuple(text_tokens.shape)}."
                )
            if text_mask is not None and tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
                raise ValueError(
                    f"`text_mask` must have shape {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}."
                )

    def forward_network(
        self,
        scaled_sample: torch.Tensor,
        c_noise: torch.Tensor,
        character_features: Optional[torch.Tensor] = None,
        text_pooled: Optional[torch.Tensor] = None,
        text_tokens: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        frame_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The raw network `F(c_in x; c_noise)` (EDM's `F_theta`), same arguments as `forward` but with the already
        scaled sample and `c_noise` of shape `(batch,)`."""
        self._check_inputs(scaled_sample, character_features, text_pooled, text_tokens, text_mask, frame_mask)
        config = self.config
        batch, frames, _ = scaled_sample.shape
        # `self.dtype` is the compute dtype, also under layerwise casting (a weight's own dtype is then the storage one)
        device, dtype = scaled_sample.device, self.dtype
        if frame_mask is None:
            frame_mask = torch.ones(batch, frames, dtype=torch.bool, device=device)
        frame_mask = frame_mask.to(device=device, dtype=torch.bool)
        valid = frame_mask.unsqueeze(-1).to(dtype)

        # Padded frames are zeroed so that whatever they hold cannot reach the valid frames (variants A and B read
        # the whole flattened character trajectory).
        hidden_states = self.proj_in(scaled_sample.to(dtype) * valid) + self.positions[:frames].to(dtype)
        time = self.time_embedding(c_noise.to(device).reshape(-1).expand(batch), dtype)

        if character_features is None:
            character_features = torch.zeros(batch, frames, config.character_dim, device=device, dtype=dtype)
        character = character_features.to(dtype) * valid
        character = F.pad(character, (0, 0, 0, config.num_frames - frames))  # always num_frames long
        character_valid = F.pad(frame_mask, (0, config.num_frames - frames), value=False)
        if text_pooled is None:
            text_pooled = torch.zeros(batch, config.text_embed_dim, device=device, dtype=dtype)
        text_pooled = text_pooled.to(dtype)

        condition = condition_bias = None
        frame_bias = padding_bias(frame_mask, dtype)
        if self.conditioning_type == "in_context":
            prefix = torch.stack(
                [time, self.character_embedding(character.flatten(1)), self.text_embedding(text_pooled)], dim=1
            )
            hidden_states = torch.cat([prefix, hidden_states], dim=1)
            frame_bias = padding_bias(F.pad(frame_mask, (prefix.shape[1], 0), value=True), dtype)
        elif self.conditioning_type == "adaln":
            condition = self.condition_embedding(torch.cat([character.flatten(1), text_pooled], dim=-1)) + time
        else:
            condition, condition_valid = self._condition_sequence(
                time, character, character_valid, text_tokens, text_mask
            )
            condition_bias = padding_bias(condition_valid, dtype) if config.mask_condition_padding else None
            for block in self.condition_blocks:
                condition = self._run_block(block, condition, condition_bias, None, None)

        for block in self.transformer_blocks:
            hidden_states = self._run_block(block, hidden_states, frame_bias, condition, condition_bias)

        if self.conditioning_type == "in_context":
            hidden_states = hidden_states[:, 3:]
        hidden_states = self.norm_out(hidden_states)
        if self.conditioning_type == "adaln":
            shift, scale = self.adaln_out(F.silu(condition)).unsqueeze(1).chunk(2, dim=-1)
            hidden_states = hidden_states * (1 + scale) + shift
        return self.proj_out(hidden_states)

    def _condition_sequence(self, time, character, character_valid, text_tokens, text_mask):
        config = self.config
        batch, dtype, device = time.shape[0], time.dtype, time.device
        if text_tokens is None:
            text_tokens = torch.zeros(batch, config.max_text_length, config.text_embed_dim, device=device, dtype=dtype)
            text_mask = torch.zeros(batch, config.max_text_length, dtype=torch.bool, device=device)
        elif text_mask is None:
            text_mask = torch.ones(text_tokens.shape[:2], dtype=torch.bool, device=device)
        pad = config.max_text_length - text_tokens.shape[1]
        text_tokens = F.pad(text_tokens.to(dtype), (0, 0, 0, pad))
        text_mask = F.pad(text_mask.to(device=device, dtype=torch.bool), (0, pad), value=False)
        text_tokens = text_tokens * text_mask.unsqueeze(-1).to(dtype)

        sequence = torch.cat(
            [
                self.registers.to(dtype).unsqueeze(0).expand(batch, -1, -1),
                time.unsqueeze(1),
                self.character_embedding(character),
                self.text_embedding(text_tokens),
            ],
            dim=1,
        )
        sequence = sequence + self.positions[: sequence.shape[1]].to(dtype)
        always_valid = torch.ones(batch, config.num_registers + 1, dtype=torch.bool, device=device)
        return sequence, torch.cat([always_valid, character_valid, text_mask], dim=1)

    def _run_block(self, block, hidden_states, attention_bias, condition, condition_bias):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, hidden_states, attention_bias, condition, condition_bias)
        return block(hidden_states, attention_bias, condition, condition_bias)


# ----------------------------------------------------------------------------------------------------------------
# training helpers


def sample_edm_sigmas(
    batch_size: int, p_mean: float = -1.2, p_std: float = 1.2, generator=None, device=None
) -> torch.Tensor:
    """Training noise levels `sigma ~ LogNormal(p_mean, p_std)` (EDM), shape `(batch_size,)`."""
    normal = torch.randn(batch_size, generator=generator, device=generator.device if generator else None)
    return (normal * p_std + p_mean).exp().to(device)


def edm_loss(
    model: DirectorModel,
    clean: torch.Tensor,
    frame_mask: Optional[torch.Tensor] = None,
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: Optional[torch.Generator] = None,
    sigma_data: Optional[float] = None,
    **conditions,
) -> torch.Tensor:
    """EDM training loss: `sigma ~ LogNormal(p_mean, p_std)`, `x = clean + sigma * n`, weighted squared error
    `(s^2+sd^2)/(s*sd)^2 * |D(x; s) - clean|^2`, averaged over valid frames and features only (the reference code
    also averages over padding). `conditions` go to the model (`character_features`, `text_pooled`, ...). `model` may
    be wrapped (DDP); `sigma_data` defaults to the model's."""
    batch = clean.shape[0]
    sd = sigma_data if sigma_data is not None else getattr(model, "module", model).config.sigma_data
    sigma = sample_edm_sigmas(batch, p_mean, p_std, generator=generator, device=clean.device)
    noise = torch.randn(clean.shape, generator=generator, device=generator.device if generator else None)
    noisy = clean + noise.to(clean.device, clean.dtype) * sigma.view(-1, 1, 1).to(clean.dtype)
    denoised = model(noisy, sigma, frame_mask=frame_mask, **conditions).sample
    weight = ((sigma**2 + sd**2) / (sigma * sd) ** 2).view(-1, 1, 1)
    squared_error = weight * (denoised.float() - clean.float()) ** 2
    if frame_mask is None:
        return squared_error.mean()
    valid = frame_mask.to(squared_error.device, squared_error.dtype).unsqueeze(-1)
    return (squared_error * valid).sum() / (valid.sum() * clean.shape[-1]).clamp(min=1.0)


def drop_conditions(
    character_features: torch.Tensor,
    text_pooled: torch.Tensor,
    text_tokens: torch.Tensor,
    text_mask: torch.Tensor,
    probability: float = 0.1,
    generator: Optional[torch.Generator] = None,
):
    """DIRECTOR's label dropout for classifier-free guidance: each sample draws one shared drop and one drop per
    modality (character, text), each with `probability`; a dropped modality becomes the null condition, all zeros
    (text mask all `False`). Returns the four tensors, dropped where drawn."""
    batch = character_features.shape[0]
    if probability <= 0:
        return character_features, text_pooled, text_tokens, text_mask
    draws = torch.rand(3, batch, generator=generator, device=generator.device if generator else None)
    draws = draws.to(character_features.device) < probability
    drop_character, drop_text = draws[0] | draws[1], draws[0] | draws[2]
    keep_character = (~drop_character).to(character_features.dtype).view(-1, 1, 1)
    keep_text = (~drop_text).to(text_pooled.dtype)
    return (
        character_features * keep_character,
        text_pooled * keep_text.view(-1, 1),
        text_tokens * keep_text.view(-1, 1, 1),
        text_mask & ~drop_text.view(-1, 1),
    )
