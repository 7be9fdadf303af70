"""Text-conditioned Recurrent Interface Network (RIN; Jabri, Fleet, Chen, ICML 2023): CAD's text-to-image backbone.

A RIN splits its tokens in two sets. The *interface* is the image, one token per patch (num_patches = (H / p) * (W / p)
of them); the *latents* are a small learned set (num_latents << num_patches). Each block

1. lets the latents cross-attend to the conditioning sequence `[time token, CoherenceConditioner output]`
   (coherence-aware diffusion's text path, padded text tokens masked out),
2. **reads**: the latents cross-attend to the interface,
3. **computes**: a few self-attention + MLP layers on the latents only,
4. **writes**: the interface cross-attends to the latents, then an MLP on the interface.

Almost all the depth is spent in step 3, whose cost grows with num_latents ** 2 instead of num_patches ** 2, and the
interface is touched only by the cheap read / write cross-attentions (linear in num_patches): that is why a RIN can
work on many small patches (even patch size 1 on a latent image) for the cost of a much smaller transformer.

Latent self-conditioning: the final latents of one denoising step are fed back, through a LayerNorm and a
zero-initialised Linear, into the initial latents of the next, so the network "warm-starts" from its previous
computation. In training the model is run once under `torch.no_grad()` to get an estimate of those latents (about
90 % of the steps; otherwise none, i.e. zeros) and the detached latents are given as `self_conditioning_latents` to
the step that is trained. At sampling time the pipeline keeps one set of latents per classifier-free guidance branch
(conditional and negative), because each branch computes different latents.

The official RIN is TensorFlow (google-research/pix2seq); this module follows the paper and CAD's description, not
lucidrains' PyTorch port, and is built from diffusers blocks (`Attention`, `FeedForward`, `Timesteps`,
`TimestepEmbedding`) so that attention processors, xformers, gradient checkpointing, layerwise casting and
`save_pretrained` / `from_pretrained` work as on any diffusers model.
"""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from .coherence import CoherenceConditionerLayer


@dataclass
class TextRINOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, out_channels, height, width)`):
            The model's prediction (epsilon, v, ...: whatever it was trained to predict).
        latents (`torch.Tensor` of shape `(batch, num_latents, latent_dim)`):
            The final latents; give them back as `self_conditioning_latents` at the next denoising step.
    """

    sample: torch.Tensor
    latents: torch.Tensor


class CrossAttentionLayer(nn.Module):
    """Pre-norm cross-attention with a residual: x + Attn(LN(x), LN(context)), then optionally x + FF(LN(x)).
    Both sides are normalised because queries and keys come from token sets of different widths and scales."""

    def __init__(
        self, dim: int, context_dim: int, num_heads: int, mlp_ratio: int, norm_eps: float, feed_forward: bool
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.context_norm = nn.LayerNorm(context_dim, eps=norm_eps)
        self.attn = Attention(
            query_dim=dim,
            cross_attention_dim=context_dim,
            heads=num_heads,
            dim_head=dim // num_heads,
            bias=True,
            out_bias=True,
        )
        if feed_forward:
            self.ff_norm = nn.LayerNorm(dim, eps=norm_eps)
            self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu", bias=True)
        else:
            self.ff_norm = self.ff = None

    def forward(
        self, hidden_states: torch.Tensor, context: torch.Tensor, attention_bias: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(
            self.norm(hidden_states),
            encoder_hidden_states=self.context_norm(context),
            attention_mask=attention_bias,
        )
        if self.ff is not None:
            hidden_states = hidden_states + self.ff(self.ff_norm(hidden_states))
        return hidden_states


class TextRINBlock(nn.Module):
    """One RIN block: condition (latents <- [time token, text]), read (latents <- interface), compute (latent
    self-attention), write (interface <- latents, + MLP)."""

    def __init__(
        self,
        interface_dim: int,
        latent_dim: int,
        cross_attention_dim: int,
        compute_layers: int,
        num_heads: int,
        mlp_ratio: int,
        norm_eps: float,
    ):
        super().__init__()
        self.condition = CrossAttentionLayer(
            latent_dim, cross_attention_dim, num_heads, mlp_ratio, norm_eps, feed_forward=False
        )
        self.read = CrossAttentionLayer(latent_dim, interface_dim, num_heads, mlp_ratio, norm_eps, feed_forward=False)
        # The compute layers are plain pre-norm transformer layers: the conditioner's layer with LayerScale 1
        # (a learned per-channel gain that starts as the plain residual RIN uses).
        self.compute = nn.ModuleList(
            [
                CoherenceConditionerLayer(latent_dim, num_heads, mlp_ratio, layer_scale_init=1.0, norm_eps=norm_eps)
                for _ in range(compute_layers)
            ]
        )
        self.write = CrossAttentionLayer(interface_dim, latent_dim, num_heads, mlp_ratio, norm_eps, feed_forward=True)

    def forward(
        self,
        interface: torch.Tensor,
        latents: torch.Tensor,
        conditioning: torch.Tensor,
        conditioning_bias: torch.Tensor,
    ) -> tuple:
        latents = self.condition(latents, conditioning, conditioning_bias)
        latents = self.read(latents, interface)
        for layer in self.compute:
            latents = layer(latents, None)
        interface = self.write(interface, latents)
        return interface, latents


class TextRINModel(ModelMixin, ConfigMixin, AttentionMixin):
    r"""A text-conditioned Recurrent Interface Network denoiser (see the module docstring).

    Args:
        sample_size (`int`, defaults to 8): height and width of the input, in pixels (or VAE latent pixels).
        in_channels (`int`, defaults to 4): channels of the input sample.
        out_channels (`int`, *optional*): channels of the prediction; `in_channels` when None.
        patch_size (`int`, defaults to 1): side of the square patches that become interface tokens.
        interface_dim (`int`, defaults to 128): width of the interface (patch) tokens.
        latent_dim (`int`, defaults to 256): width of the latents.
        num_latents (`int`, defaults to 32): number of latents.
        num_blocks (`int`, defaults to 3): read / compute / write blocks.
        compute_layers (`int`, defaults to 2): latent self-attention layers per block.
        num_heads (`int`, defaults to 4): attention heads everywhere (must divide `interface_dim` and `latent_dim`).
        cross_attention_dim (`int`, defaults to 256): width of `encoder_hidden_states`, i.e. the
            `CoherenceConditioner`'s `cross_attention_dim`.
        mlp_ratio (`int`, defaults to 4): hidden width of every MLP, as a multiple of its input width.
        self_conditioning (`bool`, defaults to `True`): build the latent self-conditioning input.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["TextRINBlock"]
    _skip_layerwise_casting_patterns = ["patch_embed", "norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 4,
        out_channels: Optional[int] = None,
        patch_size: int = 1,
        interface_dim: int = 128,
        latent_dim: int = 256,
        num_latents: int = 32,
        num_blocks: int = 3,
        compute_layers: int = 2,
        num_heads: int = 4,
        cross_attention_dim: int = 256,
        mlp_ratio: int = 4,
        self_conditioning: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` ({sample_size}) must be divisible by `patch_size` ({patch_size}).")
        for name, width in (("interface_dim", interface_dim), ("latent_dim", latent_dim)):
            if width % num_heads:
                raise ValueError(f"`{name}` ({width}) must be divisible by `num_heads` ({num_heads}).")
        out_channels = out_channels or in_channels
        self.register_to_config(out_channels=out_channels)
        self.gradient_checkpointing = False
        num_patches = (sample_size // patch_size) ** 2

        self.patch_embed = nn.Conv2d(in_channels, interface_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, interface_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.latents = nn.Parameter(torch.zeros(num_latents, latent_dim))
        nn.init.trunc_normal_(self.latents, std=0.02)

        self.time_proj = Timesteps(latent_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(latent_dim, latent_dim)
        self.time_token = nn.Linear(latent_dim, cross_attention_dim)

        if self_conditioning:
            self.self_conditioning_norm = nn.LayerNorm(latent_dim, eps=norm_eps)
            self.self_conditioning_proj = nn.Linear(latent_dim, latent_dim)
            # Zero: an untrained model (and one given zeros) ignores self-conditioning, so it can be learned gradually.
            nn.init.zeros_(self.self_conditioning_proj.weight)
            nn.init.zeros_(self.self_conditioning_proj.bias)

        self.blocks = nn.ModuleList(
            [
                TextRINBlock(
                    interface_dim, latent_dim, cross_attention_dim, compute_layers, num_heads, mlp_ratio, norm_eps
                )
                for _ in range(num_blocks)
            ]
        )
        self.norm_out = nn.LayerNorm(interface_dim, eps=norm_eps)
        self.proj_out = nn.Linear(interface_dim, patch_size * patch_size * out_channels)
        # Zero-initialised output (as DiT / ADM): a new model predicts exactly 0, the mean of an epsilon or v target,
        # so training starts at the target's variance instead of adding random output noise, and every residual
        # block starts from a well-behaved identity-like path.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _check_inputs(
        self,
        sample: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor],
        self_conditioning_latents: Optional[torch.Tensor],
    ) -> None:
        config = self.config
        if sample.ndim != 4 or sample.shape[1] != config.in_channels:
            raise ValueError(
                f"`sample` must have shape (batch, in_channels={config.in_channels}, height, width), got "
                f"{tuple(sample.shape)}."
            )
        batch, _, height, width = sample.shape
        if height % config.patch_size or width % config.patch_size:
            raise ValueError(
                f"The sample's height and width ({height}, {width}) must be divisible by patch_size="
                f"{config.patch_size}."
            )
        if (height, width) != (config.sample_size, config.sample_size):
            raise ValueError(
                f"This TextRINModel was built for {config.sample_size}x{config.sample_size} samples (its learned "
                f"positional embedding has one vector per patch of that grid), got {height}x{width}."
            )
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"`encoder_hidden_states` must have shape (batch={batch}, length, cross_attention_dim), got "
                f"{tuple(encoder_hidden_states.shape)}."
            )
        if encoder_hidden_states.shape[2] != config.cross_attention_dim:
            raise ValueError(
                f"`encoder_hidden_states` are {encoder_hidden_states.shape[2]} wide, but this TextRINModel has "
                f"cross_attention_dim={config.cross_attention_dim}: the CoherenceConditioner's cross_attention_dim "
                "must equal this model's cross_attention_dim."
            )
        length = encoder_hidden_states.shape[1]
        if encoder_attention_mask is not None and tuple(encoder_attention_mask.shape) != (batch, length):
            raise ValueError(
                f"`encoder_attention_mask` must have shape (batch, length) = {(batch, length)} like "
                f"`encoder_hidden_states`, got {tuple(encoder_attention_mask.shape)}."
            )
        if self_conditioning_latents is not None:
            if not config.self_conditioning:
                raise ValueError(
                    "`self_conditioning_latents` were given, but this TextRINModel was built with "
                    "self_conditioning=False: pass None (or build the model with self_conditioning=True)."
                )
            expected = (batch, config.num_latents, config.latent_dim)
            if tuple(self_conditioning_latents.shape) != expected:
                raise ValueError(
                    f"`self_conditioning_latents` must have shape (batch, num_latents, latent_dim) = {expected} (the "
                    f"`latents` of a previous call), got {tuple(self_conditioning_latents.shape)}."
                )

    def _timestep_batch(self, timestep: Union[torch.Tensor, float, int], batch: int, device) -> torch.Tensor:
        """Timesteps as a `(batch,)` tensor: a number, 0-d or 1-element tensor applies to the whole batch."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=device)
        timestep = timestep.to(device).reshape(-1)
        if timestep.shape[0] == 1:
            timestep = timestep.expand(batch)
        if timestep.shape[0] != batch:
            raise ValueError(
                f"`timestep` must be a number, a 0-d tensor or a tensor of shape (batch,) = ({batch},), got "
                f"{timestep.shape[0]} values."
            )
        return timestep

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        self_conditioning_latents: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[TextRINOutput, tuple]:
        """
        Args:
            sample (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`): the noisy input.
            timestep (`torch.Tensor`, `float` or `int`): diffusers discrete timesteps (0 .. 999), one for the batch
                or one per sample.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, length, cross_attention_dim)`): the conditioning
                sequence (a `CoherenceConditioner`'s `encoder_hidden_states`).
            encoder_attention_mask (`torch.Tensor` of shape `(batch, length)`, *optional*): 1 = attend, 0 = padding
                (the conditioner's `encoder_attention_mask`). None = attend to every token.
            self_conditioning_latents (`torch.Tensor` of shape `(batch, num_latents, latent_dim)`, *optional*): the
                `latents` of the previous estimate, detached. None = no self-conditioning (zeros).
            return_dict (`bool`, defaults to `True`): return a `TextRINOutput` rather than a `(sample, latents)` tuple.
        """
        self._check_inputs(sample, encoder_hidden_states, encoder_attention_mask, self_conditioning_latents)
        batch, _, height, width = sample.shape
        device = sample.device
        # A bare parameter keeps the model's compute dtype even when layerwise casting stores the layers in float8.
        dtype = self.latents.dtype
        patch = self.config.patch_size

        time_features = self.time_proj(self._timestep_batch(timestep, batch, device)).to(dtype)
        time_embedding = self.time_embedding(time_features)  # (batch, latent_dim)

        # The conditioning sequence with the time token in front; the time token is always attended to, so no row of
        # the attention is ever fully masked.
        time_token = self.time_token(time_embedding).unsqueeze(1)
        conditioning = torch.cat([time_token, encoder_hidden_states.to(dtype)], dim=1)
        valid = torch.ones(conditioning.shape[:2], dtype=torch.bool, device=device)
        if encoder_attention_mask is not None:
            valid[:, 1:] = encoder_attention_mask.to(device).bool()
        # An additive key bias works with every diffusers attention processor; the dtype's most negative value gives
        # padded keys a softmax weight of exactly 0 without NaNs (as in CoherenceConditioner).
        conditioning_bias = torch.zeros(valid.shape, dtype=dtype, device=device)
        conditioning_bias = conditioning_bias.masked_fill(~valid, torch.finfo(dtype).min).unsqueeze(1)

        interface = self.patch_embed(sample.to(dtype)).flatten(2).transpose(1, 2) + self.pos_embed.to(dtype)
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1) + time_embedding.unsqueeze(1)
        if self.config.self_conditioning:
            # None = zeros through the same path, exactly what training feeds on its steps without self-conditioning
            # (after training, Linear(LayerNorm(0)) is a learned constant, not 0).
            if self_conditioning_latents is None:
                self_conditioning_latents = torch.zeros_like(latents)
            previous = self.self_conditioning_norm(self_conditioning_latents.to(device=device, dtype=dtype))
            latents = latents + self.self_conditioning_proj(previous)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                interface, latents = self._gradient_checkpointing_func(
                    block, interface, latents, conditioning, conditioning_bias
                )
            else:
                interface, latents = block(interface, latents, conditioning, conditioning_bias)

        patches = self.proj_out(self.norm_out(interface))  # (batch, num_patches, patch * patch * out_channels)
        rows, columns, channels = height // patch, width // patch, self.config.out_channels
        output = patches.reshape(batch, rows, columns, patch, patch, channels)
        output = output.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)

        if not return_dict:
            return (output, latents)
        return TextRINOutput(sample=output, latents=latents)
