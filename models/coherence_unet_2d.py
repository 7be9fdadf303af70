"""Class-conditional coherence-aware diffusion (CAD): a class-conditional `UNet2DModel` that also takes a coherence.

Each training triple (image, class label y, coherence c in [0, 1]) conditions the UNet on y *and* on how well y
describes the image (for instance a classifier's out-of-fold confidence in the given label). The class vector that
a class-conditional `UNet2DModel` adds to its time embedding becomes

    label_embedding(y) + CoherenceEmbedding(c)

with the coherence embedding as wide as the time embedding. Everything else is the stock `UNet2DModel`.

This is storydiff's own design: the CAD authors (Dufour et al., CVPR 2024) never released their class-conditional
code (the configs their README cites are not in their repository, and its class-conditional RIN has no coherence
input).
"""

from typing import Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import AttentionMixin

# diffusers' pipeline loader looks for a component's base class (ModelMixin) in the component's own module
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401
from diffusers.models.unets.unet_2d import UNet2DModel, UNet2DOutput
from torch import nn

from storydiff.models.coherence import CoherenceEmbedding, CoherenceInput, check_coherence, register_fitted_config


class CoherenceAwareUNet2DModel(UNet2DModel, AttentionMixin):
    r"""A class-conditional [`UNet2DModel`] conditioned on a coherence c in [0, 1] as well as on a class label.

    Takes every [`UNet2DModel`] argument, with the same defaults and meanings, except that the UNet must be
    class-conditional through a label table: `num_class_embeds = num_classes + 1` (the last index is the null class
    used for classifier-free guidance) and `class_embed_type=None`. Two more arguments:

    Args:
        coherence_num_bins (`int`, *optional*):
            Quantise c into this many bins before embedding it (None = no binning; the paper uses 8).
        coherence_bin_edges (`list` of `float`, *optional*):
            The `coherence_num_bins - 1` interior bin edges (see [`CoherenceEmbedding`]); `fit_bins` fits quantile
            edges on training coherences and records them here, so `save_pretrained` / `from_pretrained` keep them.

    The class vector `label_embedding(class_labels) + coherence_embedding(coherence)` is added to the time embedding,
    where a plain class-conditional UNet adds `class_embedding(class_labels)`. The weights of the label table are
    `label_embedding.weight` (a plain UNet's `class_embedding.weight`; `from_unet` maps one onto the other).
    Gradient checkpointing, attention backends and layerwise casting work as on [`UNet2DModel`]; `attn_processors` /
    `set_attn_processor` (diffusers' `AttentionMixin`, which `UNet2DModel` itself lacks) work too.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: Optional[Union[int, Tuple[int, int]]] = None,
        in_channels: int = 3,
        out_channels: int = 3,
        center_input_sample: bool = False,
        time_embedding_type: str = "positional",
        time_embedding_dim: Optional[int] = None,
        freq_shift: int = 0,
        flip_sin_to_cos: bool = True,
        down_block_types: Tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        mid_block_type: Optional[str] = "UNetMidBlock2D",
        up_block_types: Tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels: Tuple[int, ...] = (224, 448, 672, 896),
        layers_per_block: int = 2,
        mid_block_scale_factor: float = 1,
        downsample_padding: int = 1,
        downsample_type: str = "conv",
        upsample_type: str = "conv",
        dropout: float = 0.0,
        act_fn: str = "silu",
        attention_head_dim: Optional[int] = 8,
        norm_num_groups: int = 32,
        attn_norm_num_groups: Optional[int] = None,
        norm_eps: float = 1e-5,
        resnet_time_scale_shift: str = "default",
        add_attention: bool = True,
        class_embed_type: Optional[str] = None,
        num_class_embeds: Optional[int] = None,
        num_train_timesteps: Optional[int] = None,
        coherence_num_bins: Optional[int] = None,
        coherence_bin_edges: Optional[Sequence[float]] = None,
    ):
        if class_embed_type is not None:
            raise ValueError(
                f"CoherenceAwareUNet2DModel conditions on class labels through a label table: `class_embed_type` must "
                f"be None (got {class_embed_type!r}), with `num_class_embeds = num_classes + 1`."
            )
        if isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or num_class_embeds < 2:
            raise ValueError(
                "CoherenceAwareUNet2DModel is class-conditional: `num_class_embeds` must be num_classes + 1 (>= 2, the "
                f"last index is the null class used for guidance), got {num_class_embeds!r}."
            )
        # The parent adds whatever vector it is given as `class_labels` to the time embedding ("identity"); the label
        # table and the coherence embedding that make that vector live here, so UNet2DModel.forward is reused as is.
        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            freq_shift=freq_shift,
            flip_sin_to_cos=flip_sin_to_cos,
            down_block_types=down_block_types,
            mid_block_type=mid_block_type,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            mid_block_scale_factor=mid_block_scale_factor,
            downsample_padding=downsample_padding,
            downsample_type=downsample_type,
            upsample_type=upsample_type,
            dropout=dropout,
            act_fn=act_fn,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            attn_norm_num_groups=attn_norm_num_groups,
            norm_eps=norm_eps,
            resnet_time_scale_shift=resnet_time_scale_shift,
            add_attention=add_attention,
            class_embed_type="identity",
            num_class_embeds=None,
            num_train_timesteps=num_train_timesteps,
        )
        # The parent's decorated __init__ recorded its own arguments; the config describes this model instead.
        self.register_to_config(class_embed_type=None, num_class_embeds=num_class_embeds)
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.label_embedding = nn.Embedding(num_class_embeds, time_embed_dim)
        self.coherence_embedding = CoherenceEmbedding(
            dim=time_embed_dim, num_bins=coherence_num_bins, bin_edges=coherence_bin_edges
        )
        # uniform default edges are filled in by the embedding: keep the config equal to what the model uses
        self.register_to_config(coherence_bin_edges=self.coherence_embedding.config.bin_edges)

    @classmethod
    def from_unet(cls, unet: UNet2DModel, coherence_num_bins: Optional[int] = None) -> "CoherenceAwareUNet2DModel":
        """A coherence-aware copy of a class-conditional `UNet2DModel`, to fine-tune with coherence.

        Every weight is copied (the class table included, as `label_embedding`); the new coherence embedding starts
        at exactly zero (last MLP layer and coherence position zeroed), so at initialisation the copy's output is
        bit-identical to `unet`'s for every coherence. The copy has `unet`'s dtype and device.
        """
        if type(unet) is not UNet2DModel:
            raise TypeError(f"`unet` must be a class-conditional UNet2DModel, got {type(unet).__name__}.")
        if unet.config.class_embed_type is not None or unet.config.num_class_embeds is None:
            raise ValueError(
                "`unet` is not class-conditional through a label table: it needs `num_class_embeds = num_classes + 1` "
                f"and `class_embed_type=None` (it has num_class_embeds={unet.config.num_class_embeds}, "
                f"class_embed_type={unet.config.class_embed_type!r})."
            )
        config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        model = cls(**config, coherence_num_bins=coherence_num_bins)
        state = dict(unet.state_dict())
        state["label_embedding.weight"] = state.pop("class_embedding.weight")
        missing, unexpected = model.load_state_dict(state, strict=False)
        new = {name for name in missing if not name.startswith("coherence_embedding.")}
        if new or unexpected:
            raise RuntimeError(
                f"Weights did not map onto the coherence-aware UNet: missing {new}, unexpected {unexpected}."
            )
        with torch.no_grad():
            model.coherence_embedding.mlp[-1].weight.zero_()
            model.coherence_embedding.mlp[-1].bias.zero_()
            model.coherence_embedding.position.zero_()
        model.to(unet.device)
        return model if unet.dtype == model.dtype else model.to(unet.dtype)

    def fit_bins(self, coherences: CoherenceInput, num_bins: int = 8) -> "CoherenceAwareUNet2DModel":
        """Fit quantile bin edges on training coherences (see `CoherenceEmbedding.fit_bins`) and record them in this
        model's config as `coherence_num_bins` / `coherence_bin_edges`. Returns `self`."""
        self.coherence_embedding.fit_bins(coherences, num_bins)
        embedding_config = self.coherence_embedding.config
        register_fitted_config(
            self, coherence_num_bins=embedding_config.num_bins, coherence_bin_edges=embedding_config.bin_edges
        )
        return self

    def _label_tensor(self, class_labels, batch: int, device: torch.device) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.ndim > 1:
            raise ValueError(
                f"`class_labels` must be an int or a 1-D integer tensor, got dtype {labels.dtype} and shape "
                f"{tuple(labels.shape)}."
            )
        labels = labels.reshape(-1).long()
        if labels.shape[0] == 1:
            labels = labels.expand(batch)
        if labels.shape[0] != batch:
            raise ValueError(f"Got {labels.shape[0]} class labels for a batch of {batch} samples.")
        table_size = self.config.num_class_embeds
        if ((labels < 0) | (labels >= table_size)).any():
            raise ValueError(
                f"Class labels must lie in 0..{table_size - 1} (index {table_size - 1} is the null class), got "
                f"{labels.tolist()}."
            )
        return labels

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        class_labels: Optional[Union[int, torch.Tensor]] = None,
        coherence: Optional[CoherenceInput] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DOutput, tuple]:
        r"""
        Args:
            sample (`torch.Tensor` of shape `(batch, channels, height, width)`): the noisy input.
            timestep (`torch.Tensor`, `float` or `int`): the denoising timestep(s).
            class_labels (`int` or `torch.Tensor` of shape `(batch,)`): class indices, `num_class_embeds - 1` being
                the null class. Required.
            coherence (`float` or `torch.Tensor` of shape `(batch,)` / `(batch, 1)`): c in [0, 1]; a single value
                applies to every sample. Required.
            return_dict (`bool`, defaults to `True`): return a [`UNet2DOutput`] rather than a tuple.
        """
        if class_labels is None or coherence is None:
            missing = " and ".join(
                name for name, value in (("class_labels", class_labels), ("coherence", coherence)) if value is None
            )
            raise ValueError(
                f"CoherenceAwareUNet2DModel needs `class_labels` and `coherence` (a float or a (batch,) tensor in "
                f"[0, 1]); {missing} missing. For the unconditional prediction use the null class "
                f"{self.config.num_class_embeds - 1} (and coherence 0 for a model trained with condition dropout)."
            )
        batch, device = sample.shape[0], sample.device
        labels = self._label_tensor(class_labels, batch, device)
        coherence = check_coherence(coherence)
        if coherence.shape[0] == 1:
            coherence = coherence.expand(batch)
        if coherence.shape[0] != batch:
            raise ValueError(f"Got {coherence.shape[0]} coherence values for a batch of {batch} samples.")
        class_vector = self.label_embedding(labels).to(self.dtype) + self.coherence_embedding(
            coherence.to(device), dtype=self.dtype
        )
        return super().forward(sample, timestep, class_labels=class_vector, return_dict=return_dict)
