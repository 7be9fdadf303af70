"""Coherence-aware diffusion (CAD; Dufour, Besnier, Kalogeiton, Picard, CVPR 2024): the conditioning modules.

Every training triple (image, caption, coherence c in [0, 1]) conditions the denoiser on the caption *and* on how
well the caption describes the image. Two modules bring c into any cross-attention denoiser:

* `CoherenceEmbedding`: scalar c -> one coherence token, through the same embedder as a timestep (sinusoidal
  features of `c * 1000`, standardised, MLP `d/4 -> d, SiLU, d -> d`) plus a learned "coherence position" vector.
  Optional quantile binning first (the paper's 8 bins, value = bin / 7), with edges fitted on data (`fit_bins`) and
  kept in the config so `save_pretrained` / `from_pretrained` round-trip them.
* `CoherenceConditioner`: the paper's "Text RIN block" as a context encoder. The sequence
  `[coherence token, learned registers, Linear(text_dim -> dim)(text tokens)]` goes through pre-norm self-attention
  layers (LayerScale 0.1 on both residual branches) that never attend to padded text tokens, then a projection to
  `cross_attention_dim`. Its output is the `encoder_hidden_states` of any cross-attention denoiser (for instance
  `UNet2DConditionModel`), with the matching `encoder_attention_mask`.

Not yet here: the pipeline with a `coherence` argument, coherence-aware CFG and the training script.
"""

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

CoherenceInput = Union[float, Sequence[float], torch.Tensor]


def check_bin_edges(bin_edges: Sequence[float], num_bins: int) -> list:
    """Validate quantile-bin interior edges: `num_bins - 1` finite values, strictly increasing, inside (0, 1)."""
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"`num_bins` must be an integer >= 2 (or None for no binning), got {num_bins!r}.")
    edges = [float(edge) for edge in bin_edges]
    if len(edges) != num_bins - 1:
        raise ValueError(
            f"{num_bins} bins need {num_bins - 1} interior bin edges, got {len(edges)}: {edges}. "
            "Give only the edges between bins (not 0 and 1)."
        )
    outside = [edge for edge in edges if not (0.0 < edge < 1.0)]
    if outside:
        raise ValueError(f"Bin edges must lie strictly inside (0, 1); these do not: {outside}.")
    if any(later <= earlier for earlier, later in zip(edges, edges[1:])):
        raise ValueError(
            f"Bin edges must be strictly increasing, got {edges}. Quantile edges tie when many coherences share a "
            "value: fit fewer bins."
        )
    return edges


def quantile_bin_edges(coherences: CoherenceInput, num_bins: int) -> list:
    """The `num_bins - 1` interior edges that split `coherences` into `num_bins` equally populated bins (the
    `k / num_bins` quantiles, k = 1 .. num_bins - 1, linear interpolation between samples)."""
    values = check_coherence(coherences).double()
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"`num_bins` must be an integer >= 2, got {num_bins!r}.")
    levels = torch.arange(1, num_bins, dtype=torch.float64) / num_bins
    return check_bin_edges(torch.quantile(values, levels).tolist(), num_bins)


def register_fitted_config(model: ConfigMixin, **values) -> None:
    """Record values fitted after construction (bin edges) in `model.config` so that `from_config` keeps them too:
    diffusers lists every argument left at its default in `_use_default_values` and `from_config(config)` drops
    those keys, which would silently forget fitted bins."""
    used_defaults = [key for key in model.config.get("_use_default_values", []) if key not in values]
    model.register_to_config(**values, _use_default_values=used_defaults)


def check_coherence(coherence: CoherenceInput) -> torch.Tensor:
    """Coherence as a `(batch,)` tensor; a float or 0-d tensor is a batch of one, `(batch, 1)` is flattened.
    Raises a ValueError naming the offending values if any is non-finite or outside [0, 1]."""
    if not torch.is_tensor(coherence):
        coherence = torch.tensor(coherence, dtype=torch.float32)
    if coherence.ndim == 0:
        coherence = coherence.reshape(1)
    elif coherence.ndim == 2 and coherence.shape[1] == 1:
        coherence = coherence[:, 0]
    elif coherence.ndim != 1:
        raise ValueError(
            f"Coherence must be a float or a tensor of shape (batch,) or (batch, 1), got shape {tuple(coherence.shape)}."
        )
    if not coherence.is_floating_point():
        coherence = coherence.float()
    bad = ~torch.isfinite(coherence) | (coherence < 0) | (coherence > 1)
    if bad.any():
        raise ValueError(
            f"Coherence must be a finite value in [0, 1] (0 = the condition says nothing of the image, 1 = it "
            f"describes it fully); got {coherence[bad].tolist()} at batch positions {bad.nonzero()[:, 0].tolist()}."
        )
    return coherence


class CoherenceEmbedding(ModelMixin, ConfigMixin):
    r"""Scalar coherence c in [0, 1] -> one coherence token of width `dim`.

    Args:
        dim (`int`, defaults to 256): token width.
        frequency_dim (`int`, *optional*): sinusoidal channels; `dim // 4` when None (the paper's `d/4 -> d` MLP).
        num_bins (`int`, *optional*): quantise c into this many bins first (None = no binning). The paper uses 8.
        bin_edges (`list` of `float`, *optional*): the `num_bins - 1` interior edges, strictly increasing inside
            (0, 1). With `num_bins` and no edges the bins are uniform (`k / num_bins`); `fit_bins` fits quantile edges.

    The binned value is `bin_index / (num_bins - 1)`, so the lowest bin embeds as c = 0 and the highest as c = 1.
    """

    @register_to_config
    def __init__(
        self,
        dim: int = 256,
        frequency_dim: Optional[int] = None,
        num_bins: Optional[int] = None,
        bin_edges: Optional[Sequence[float]] = None,
    ):
        super().__init__()
        frequency_dim = frequency_dim or dim // 4
        if frequency_dim < 2 or frequency_dim % 2:
            raise ValueError(f"`frequency_dim` must be an even number >= 2, got {frequency_dim} (dim={dim}).")
        self.register_to_config(frequency_dim=frequency_dim)
        self._set_bins(num_bins, bin_edges)
        # [cos, sin] with frequencies exp(-ln(10000) k / (F/2)): the EDM / CAD positional embedding of a timestep.
        self.frequency_embedding = Timesteps(frequency_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.position = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.position, std=0.02, a=-0.04, b=0.04)

    def _set_bins(self, num_bins: Optional[int], bin_edges: Optional[Sequence[float]]) -> None:
        if num_bins is None:
            if bin_edges is not None:
                raise ValueError("`bin_edges` were given without `num_bins`: set `num_bins` to len(bin_edges) + 1.")
            edges = None
        elif bin_edges is None:
            if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
                raise ValueError(f"`num_bins` must be an integer >= 2 (or None for no binning), got {num_bins!r}.")
            edges = [k / num_bins for k in range(1, num_bins)]  # uniform bins until `fit_bins` fits quantile edges
        else:
            edges = check_bin_edges(bin_edges, num_bins)
        register_fitted_config(self, num_bins=num_bins, bin_edges=edges)
        # Derived from the config (not a weight): float64 so that an edge read back from JSON compares exactly.
        self.register_buffer("edges", torch.tensor(edges if edges else [], dtype=torch.float64), persistent=False)

    def fit_bins(self, coherences: CoherenceInput, num_bins: int = 8) -> "CoherenceEmbedding":
        """Fit quantile bin edges on training coherences (the paper: 8 bins on ~100k samples) and store them in the
        config, so `save_pretrained` keeps them. Returns `self`."""
        edges = quantile_bin_edges(coherences, num_bins)
        device = self.position.device
        self._set_bins(num_bins, edges)
        self.edges = self.edges.to(device)
        return self

    def quantize(self, coherence: CoherenceInput) -> torch.Tensor:
        """Checked coherence `(batch,)`, binned to `bin_index / (num_bins - 1)` when binning is on."""
        coherence = check_coherence(coherence).to(self.position.device)
        if self.config.num_bins is None:
            return coherence
        # bin index = how many interior edges are <= c (c on an edge goes to the upper bin)
        index = torch.bucketize(coherence.double(), self.edges.to(coherence.device), right=True)
        return (index.double() / (self.config.num_bins - 1)).to(coherence.dtype)

    def frequency_features(self, coherence: torch.Tensor) -> torch.Tensor:
        """Sinusoidal features of `c * 1000`, standardised.

        "Standardised" here means per vector, over its channels: subtract the vector's mean and divide by its
        standard deviation (a LayerNorm with no learned scale or shift). The raw [cos, sin] features are bounded in
        [-1, 1] but, for c in [0, 1], the low-frequency channels sit near cos = 1, sin = 0 for every c, so the vector
        has a large, nearly constant mean; standardising removes it and gives the MLP unit-scale inputs. This is the
        same standardisation storydiff's DIRECTOR time embedding applies to its timesteps."""
        features = self.frequency_embedding(coherence.float() * 1000.0)
        mean = features.mean(-1, keepdim=True)
        std = features.std(-1, keepdim=True)
        return (features - mean) / (std + 1e-6)

    def forward(self, coherence: CoherenceInput, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """`coherence`: float, `(batch,)` or `(batch, 1)` in [0, 1] -> `(batch, dim)` coherence tokens. `dtype` is
        the compute dtype (defaults to the position vector's)."""
        dtype = dtype or self.position.dtype
        features = self.frequency_features(self.quantize(coherence))
        return self.mlp(features.to(dtype)) + self.position.to(dtype)


@dataclass
class CoherenceConditionerOutput(BaseOutput):
    """
    Args:
        encoder_hidden_states (`torch.Tensor` of shape `(batch, 1 + num_registers + text_length, cross_attention_dim)`):
            The conditioning sequence `[coherence, registers, text]`, the context of a cross-attention denoiser.
        encoder_attention_mask (`torch.Tensor` of shape `(batch, 1 + num_registers + text_length)`):
            1 where the denoiser may attend, 0 at padded text tokens (diffusers' `encoder_attention_mask`).
    """

    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor


class CoherenceConditionerLayer(nn.Module):
    """Pre-norm self-attention layer: x + g1 * Attn(LN(x)), then x + g2 * FF(LN(x)), with LayerScale vectors g
    (CaiT) initialised small so a deep stack starts close to the identity."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, layer_scale_init: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(query_dim=dim, heads=num_heads, dim_head=dim // num_heads, bias=True, out_bias=True)
        self.scale1 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu", bias=True)
        self.scale2 = nn.Parameter(torch.full((dim,), float(layer_scale_init)))

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.scale1 * self.attn(
            self.norm1(hidden_states), attention_mask=attention_bias
        )
        return hidden_states + self.scale2 * self.ff(self.norm2(hidden_states))


class CoherenceConditioner(ModelMixin, ConfigMixin, AttentionMixin):
    r"""Text hidden states + coherence -> the conditioning sequence of a cross-attention denoiser (CAD's text block).

    Args:
        text_dim (`int`, defaults to 768): width of the text encoder's hidden states.
        dim (`int`, defaults to 256): width inside the conditioner.
        cross_attention_dim (`int`, defaults to 768): output width, the denoiser's `cross_attention_dim`.
        num_registers (`int`, defaults to 16): learned register tokens.
        num_layers (`int`, defaults to 2), num_heads (`int`, defaults to 4), mlp_ratio (`int`, defaults to 4):
            the self-attention stack.
        layer_scale_init (`float`, defaults to 0.1): initial LayerScale of both residual branches (the paper).
        frequency_dim, num_bins, bin_edges: the coherence embedding's (see `CoherenceEmbedding`).
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.

    `forward(text_hidden_states, coherence, text_attention_mask=None)` returns a `CoherenceConditionerOutput`
    (`encoder_hidden_states`, `encoder_attention_mask`) of length `1 + num_registers + text_length`. Padded text
    tokens (mask 0 / False, as transformers' `attention_mask`) are never attended to; the coherence and register
    tokens always are. Attention processors (`set_attn_processor`, SDPA, xformers) and
    `enable_gradient_checkpointing()` work as on any diffusers model.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["CoherenceConditionerLayer"]

    @register_to_config
    def __init__(
        self,
        text_dim: int = 768,
        dim: int = 256,
        cross_attention_dim: int = 768,
        num_registers: int = 16,
        num_layers: int = 2,
        num_heads: int = 4,
        mlp_ratio: int = 4,
        layer_scale_init: float = 0.1,
        frequency_dim: Optional[int] = None,
        num_bins: Optional[int] = None,
        bin_edges: Optional[Sequence[float]] = None,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"`dim` ({dim}) must be divisible by `num_heads` ({num_heads}).")
        self.gradient_checkpointing = False
        self.coherence_embedding = CoherenceEmbedding(
            dim=dim, frequency_dim=frequency_dim, num_bins=num_bins, bin_edges=bin_edges
        )
        self.register_to_config(frequency_dim=self.coherence_embedding.config.frequency_dim)
        self.registers = nn.Parameter(torch.zeros(num_registers, dim))
        nn.init.trunc_normal_(self.registers, std=0.02, a=-0.04, b=0.04)
        self.text_projection = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(
            [
                CoherenceConditionerLayer(dim, num_heads, mlp_ratio, layer_scale_init, norm_eps)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, eps=norm_eps)
        self.proj_out = nn.Linear(dim, cross_attention_dim)

    def fit_bins(self, coherences: CoherenceInput, num_bins: int = 8) -> "CoherenceConditioner":
        """Fit the coherence embedding's quantile bin edges on training coherences and record them in this model's
        config too (see `CoherenceEmbedding.fit_bins`). Returns `self`."""
        self.coherence_embedding.fit_bins(coherences, num_bins)
        embedding_config = self.coherence_embedding.config
        register_fitted_config(self, num_bins=embedding_config.num_bins, bin_edges=embedding_config.bin_edges)
        return self

    def forward(
        self,
        text_hidden_states: torch.Tensor,
        coherence: CoherenceInput,
        text_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[CoherenceConditionerOutput, tuple]:
        """
        Args:
            text_hidden_states (`torch.Tensor` of shape `(batch, text_length, text_dim)`): text encoder output.
            coherence (`float` or `torch.Tensor` of shape `(batch,)` / `(batch, 1)`): c in [0, 1]; a float or a
                batch of one applies to every sample.
            text_attention_mask (`torch.Tensor` of shape `(batch, text_length)`, *optional*): 1 / True = real token,
                0 / False = padding (transformers' `attention_mask`). None = no padding.
            return_dict (`bool`, defaults to `True`): return a `CoherenceConditionerOutput` rather than a tuple.
        """
        if text_hidden_states.ndim != 3:
            raise ValueError(
                "`text_hidden_states` must have shape (batch, text_length, text_dim), got "
                f"{tuple(text_hidden_states.shape)}."
            )
        batch, length, width = text_hidden_states.shape
        if width != self.config.text_dim:
            raise ValueError(
                f"The text encoder gives {width}-wide hidden states, this conditioner was built for "
                f"text_dim={self.config.text_dim}."
            )
        coherence = check_coherence(coherence)
        if coherence.shape[0] == 1 and batch != 1:
            coherence = coherence.expand(batch)
        if coherence.shape[0] != batch:
            raise ValueError(f"Got {coherence.shape[0]} coherence values for a batch of {batch} texts.")
        device = text_hidden_states.device
        if text_attention_mask is None:
            text_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        else:
            if tuple(text_attention_mask.shape) != (batch, length):
                raise ValueError(
                    f"`text_attention_mask` must have shape (batch, text_length) = {(batch, length)}, got "
                    f"{tuple(text_attention_mask.shape)}."
                )
            text_valid = text_attention_mask.to(device).bool()

        dtype = self.text_projection.weight.dtype  # the model's compute dtype; text from another dtype is cast
        coherence_token = self.coherence_embedding(coherence.to(device), dtype=dtype).unsqueeze(1)
        registers = self.registers.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        text = self.text_projection(text_hidden_states.to(dtype))
        hidden_states = torch.cat([coherence_token, registers, text], dim=1)

        always = torch.ones(batch, 1 + self.config.num_registers, dtype=torch.bool, device=device)
        valid = torch.cat([always, text_valid], dim=1)
        # An additive key bias (not a boolean mask) works with every diffusers attention processor; the dtype's
        # most negative value gives padded keys a softmax weight of exactly 0 without producing NaNs.
        attention_bias = torch.zeros(valid.shape, dtype=hidden_states.dtype, device=device)
        attention_bias = attention_bias.masked_fill(~valid, torch.finfo(hidden_states.dtype).min).unsqueeze(1)

        for layer in self.layers:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(layer, hidden_states, attention_bias)
            else:
                hidden_states = layer(hidden_states, attention_bias)

        encoder_hidden_states = self.proj_out(self.norm_out(hidden_states))
        encoder_attention_mask = valid.to(encoder_hidden_states.dtype)
        if not return_dict:
            return (encoder_hidden_states, encoder_attention_mask)
        return CoherenceConditionerOutput(
            encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask
        )
