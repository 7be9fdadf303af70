"""Video LDM ("Align your Latents", Blattmann et al., CVPR 2023): temporal layers inserted into an image UNet.

`VideoLDMUNet.from_unet2d(unet)` turns any `UNet2DConditionModel` into a video denoiser the paper's way. The 2D
UNet's own blocks stay where they are and run every frame as an image; each `ResnetBlock2D` is wrapped with a
temporal 3D-convolution residual block and each `Transformer2DModel` with a temporal transformer (self-attention
over frames at every spatial position, cross-attention to the text), and each temporal output is mixed into the
spatial one by a learned factor alpha:

    out = spatial + (1 - alpha) * temporal_residual        (alpha = sigmoid(mix_factor), diffusers' AlphaBlender)

which is the paper's `alpha * z + (1 - alpha) * temporal(z)` with `temporal(z) = z + temporal_residual`, written so
that a zero residual gives back `spatial` bit for bit. The last layer of every temporal branch starts at zero, so
**at initialisation the video model equals the image model applied frame by frame, exactly**, whatever alpha is.

Joint image/video training (Video Diffusion Models) passes `image_only_indicator` = 1 for frames that are separate
images: their alpha is 1 (`AlphaBlender`'s `learned_with_images`), so they get exactly the spatial output and no
gradient reaches the temporal layers from them.

Only the temporal layers are new: `freeze_spatial()` leaves them trainable, `save_temporal_layers(folder)` /
`load_temporal_layers(folder)` store them alone (an adapter, like AnimateDiff's motion modules).

Why not diffusers' blocks (probed on diffusers 0.42): `UNetMotionModel.from_unet2d` drops the class embedding and
other config keys and is not an identity at init; SVD's `TransformerSpatioTemporalModel` hard-codes GroupNorm(32)
and adds its frame embedding outside the residual; `TemporalResnetBlock` hard-codes GroupNorm(32). Reused as they
are: `AlphaBlender` (alpha and the image-only rule) and `TemporalBasicTransformerBlock` (LayerNorm, any width).
"""

import contextlib
import functools
import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, TemporalBasicTransformerBlock
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import AlphaBlender, ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.utils import BaseOutput

TEMPORAL_WEIGHTS_NAME = "temporal_layers.safetensors"
TEMPORAL_CONFIG_NAME = "temporal_config.json"
# every parameter of the inserted layers has one of these module names in its path (see `temporal_parameters`)
TEMPORAL_MODULE_PREFIX = "temporal_"
MERGE_STRATEGIES = ("learned_with_images", "learned", "fixed")


@dataclass
class VideoLDMUNetOutput(BaseOutput):
    """`sample`: the prediction, shaped like the input `(batch, channels, frames, height, width)`."""

    sample: torch.Tensor


@dataclass(frozen=True)
class Frames:
    """How the flat `(batch * frames)` batch of one forward pass is made of videos."""

    num_frames: int
    image_only_indicator: torch.Tensor  # (batch, frames), 1 = a separate image, not a video frame
    text: torch.Tensor  # (batch, tokens, dim): the text, once per video


class FrameLayout(threading.local):
    """The `Frames` of the forward pass in progress, set by `VideoLDMUNet.forward` for the wrappers below (the 2D
    blocks call `resnet(x, temb)` and `attn(x, ...)`, so no argument can carry it). Thread-local, so that
    concurrent forward passes of one model never see each other's; with none set (`current` is None) the wrapped
    blocks are the plain image blocks. Each wrapper reads it once per call and passes it on explicitly, also into
    gradient checkpointing's recomputation."""

    current: Optional[Frames] = None
    disabled: bool = False  # `VideoLDMUNet.temporal_layers_disabled()`

    def __deepcopy__(self, memo):
        return FrameLayout()  # a copied model starts with no pass in progress

    def __reduce__(self):
        return (FrameLayout, ())


def _zero_(module: torch.nn.Module) -> None:
    for parameter in module.parameters():
        torch.nn.init.zeros_(parameter)


def _mix(spatial: torch.Tensor, residual: torch.Tensor, blender: AlphaBlender, frames: Frames) -> torch.Tensor:
    """`spatial + (1 - alpha) * residual`, alpha per frame; 1 for image-only frames whatever the merge strategy
    (diffusers' AlphaBlender honours the indicator only for `learned_with_images`)."""
    image_only = frames.image_only_indicator.reshape(-1).bool()
    alpha = blender.get_alpha(frames.image_only_indicator, ndims=3).reshape(-1).to(spatial.dtype)
    alpha = torch.where(image_only, torch.ones_like(alpha), alpha.expand(image_only.shape[0]))
    return spatial + (1.0 - alpha.reshape(-1, *([1] * (spatial.ndim - 1)))) * residual


class _CheckpointedWrapper(torch.nn.Module):
    """Gradient checkpointing of a whole wrapper (spatial block + temporal layers), with the pass's `Frames` given
    as an argument: the recomputation during backward then uses this pass's frames, not whatever pass ran last.
    `VideoLDMUNet` switches the 2D blocks' own checkpointing of these wrappers off for that reason."""

    gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        frames = None if self.layout.disabled else self.layout.current
        run = functools.partial(self._run, frames=frames, **kwargs)
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(run, hidden_states, *args)
        return run(hidden_states, *args)


class TemporalConvBlock(torch.nn.Module):
    """A residual 3D-convolution block over time only (kernel `(k, 1, 1)`): the Video LDM temporal resnet.

    Returns the residual (zero at initialisation: its last convolution starts at zero). Unlike diffusers'
    `TemporalResnetBlock` the GroupNorm takes the wrapped 2D resnet's group count, so any width the UNet has
    works. The timestep embedding enters as in a 2D resnet.
    """

    def __init__(self, channels: int, temb_channels: Optional[int], num_groups: int, eps: float, kernel_size: int):
        super().__init__()
        padding = (kernel_size // 2, 0, 0)
        self.norm1 = torch.nn.GroupNorm(num_groups, channels, eps=eps)
        self.conv1 = torch.nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=padding)
        self.time_emb_proj = torch.nn.Linear(temb_channels, channels) if temb_channels else None
        self.norm2 = torch.nn.GroupNorm(num_groups, channels, eps=eps)
        self.conv2 = torch.nn.Conv3d(channels, channels, (kernel_size, 1, 1), padding=padding)
        _zero_(self.conv2)

    def forward(self, video: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        # video: (batch, channels, frames, height, width); temb: (batch, frames, temb_channels)
        hidden = self.conv1(F.silu(self.norm1(video)))
        if self.time_emb_proj is not None and temb is not None:
            hidden = hidden + self.time_emb_proj(F.silu(temb)).permute(0, 2, 1)[..., None, None]
        return self.conv2(F.silu(self.norm2(hidden)))


class SpatioTemporalResnet(_CheckpointedWrapper):
    """A 2D UNet's own `ResnetBlock2D` (`spatial`) followed by a temporal conv block mixed in by alpha."""

    def __init__(
        self, spatial: ResnetBlock2D, layout: FrameLayout, kernel_size: int, merge_strategy: str, alpha: float
    ):
        super().__init__()
        self.spatial = spatial
        self.layout = layout
        temb_channels = spatial.time_emb_proj.in_features if spatial.time_emb_proj is not None else None
        self.temporal_conv = TemporalConvBlock(
            spatial.out_channels, temb_channels, spatial.norm2.num_groups, spatial.norm2.eps, kernel_size
        )
        self.temporal_blender = AlphaBlender(alpha, merge_strategy)

    def _run(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None, *args, frames=None, **kwargs):
        hidden = self.spatial(input_tensor, temb, *args, **kwargs)
        if frames is None:
            return hidden
        batch_frames, channels, height, width = hidden.shape
        # contiguous: torch's CPU GroupNorm takes a permuted 5-D tensor for channels-last and its backward kernel
        # for that layout crashed (segfault, torch 2.13 CPU) in training
        video = hidden.reshape(-1, frames.num_frames, channels, height, width).permute(0, 2, 1, 3, 4).contiguous()
        video_temb = temb.reshape(-1, frames.num_frames, temb.shape[-1]) if temb is not None else None
        residual = self.temporal_conv(video, video_temb).permute(0, 2, 1, 3, 4).reshape(hidden.shape)
        return _mix(hidden, residual, self.temporal_blender, frames)


class SpatioTemporalTransformer(_CheckpointedWrapper):
    """A 2D UNet's own `Transformer2DModel` (`spatial`) followed by a temporal transformer over frames at each
    spatial position (diffusers' `TemporalBasicTransformerBlock`: self-attention over time, cross-attention to the
    video's text, feed-forward), with a sinusoidal frame-position embedding, mixed in by alpha."""

    def __init__(
        self,
        spatial: Transformer2DModel,
        layout: FrameLayout,
        attention_head_dim: int,
        cross_attention: bool,
        merge_strategy: str,
        alpha: float,
    ):
        super().__init__()
        self.spatial = spatial
        self.layout = layout
        channels = spatial.config.in_channels  # a multiple of attention_head_dim (_check_convertible)
        text_dim = spatial.config.cross_attention_dim if cross_attention else None
        self.temporal_transformer = TemporalBasicTransformerBlock(
            channels, channels, channels // attention_head_dim, attention_head_dim, cross_attention_dim=text_dim
        )
        # every branch that adds to the block's residual stream starts at zero: the block is then the identity
        blocks = self.temporal_transformer
        for last in [blocks.ff_in.net[-1], blocks.attn1.to_out[0], blocks.ff.net[-1]]:
            _zero_(last)
        if blocks.attn2 is not None:
            _zero_(blocks.attn2.to_out[0])
        self.temporal_position_embedding = TimestepEmbedding(channels, channels * 4, out_dim=channels)
        self.temporal_blender = AlphaBlender(alpha, merge_strategy)

    def _run(self, hidden_states: torch.Tensor, *args, frames=None, return_dict: bool = True, **kwargs):
        hidden = self.spatial(hidden_states, *args, return_dict=False, **kwargs)[0]
        if frames is not None:
            hidden = self._add_temporal(hidden, frames)
        return Transformer2DModelOutput(sample=hidden) if return_dict else (hidden,)

    def _add_temporal(self, hidden: torch.Tensor, layout: Frames) -> torch.Tensor:
        frames = layout.num_frames
        batch_frames, channels, height, width = hidden.shape
        tokens = hidden.permute(0, 2, 3, 1).reshape(batch_frames, height * width, channels)
        positions = torch.arange(frames, device=hidden.device).repeat(batch_frames // frames)
        position = get_timestep_embedding(positions, channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        tokens_in = tokens + self.temporal_position_embedding(position.to(tokens.dtype))[:, None, :]
        text = None
        if self.temporal_transformer.attn2 is not None:
            # one text per video, for each of its height * width temporal sequences
            text = layout.text.repeat_interleave(height * width, dim=0)
        tokens_out = self.temporal_transformer(tokens_in, frames, encoder_hidden_states=text)
        residual = (tokens_out - tokens_in).reshape(batch_frames, height, width, channels).permute(0, 3, 1, 2)
        return _mix(hidden, residual, self.temporal_blender, layout)


class VideoLDMUNet(ModelMixin, ConfigMixin, AttentionMixin, PeftAdapterMixin):
    """A `UNet2DConditionModel` with Video LDM temporal layers; denoises `(batch, channels, frames, height, width)`.

    Build one from a trained image UNet with `VideoLDMUNet.from_unet2d(unet)`; load a saved one with
    `VideoLDMUNet.from_pretrained(folder)`.

    Args:
        unet_config (`dict`): The config of the wrapped `UNet2DConditionModel`.
        num_frames (`int`): The clip length the model is trained for (a default for pipelines).
        max_frames (`int`): The most frames a forward pass accepts.
        temporal_attention_head_dim (`int`): Channels per head of the temporal attention.
        temporal_cross_attention (`bool`): Whether the temporal transformers also attend to the text.
        temporal_conv_kernel_size (`int`): Frames each temporal convolution sees (odd).
        merge_strategy (`str`): `AlphaBlender`'s: `learned_with_images` (learned alpha, 1 for image-only frames),
            `learned` or `fixed`.
        mix_factor (`float`): The initial mix factor (alpha = sigmoid(mix_factor) for the learned strategies).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm", "temporal_blender"]
    _no_split_modules = ["SpatioTemporalResnet", "SpatioTemporalTransformer"]

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        num_frames: int = 8,
        max_frames: int = 32,
        temporal_attention_head_dim: int = 8,
        temporal_cross_attention: bool = True,
        temporal_conv_kernel_size: int = 3,
        merge_strategy: str = "learned_with_images",
        mix_factor: float = 0.5,
    ):
        super().__init__()
        _check_temporal_settings(num_frames, max_frames, temporal_conv_kernel_size, merge_strategy)
        config = {key: value for key, value in dict(unet_config).items() if not key.startswith("_")}
        self.unet = UNet2DConditionModel.from_config(config)
        self.layout = FrameLayout()
        _insert_temporal_layers(self.unet, self.layout, self.config)

    @classmethod
    def from_unet2d(
        cls, unet: UNet2DConditionModel, temporal_layers: Optional[str] = None, **temporal_settings
    ) -> "VideoLDMUNet":
        """Wrap `unet`'s own blocks in place (its weights, class embedding, added conditions and attention
        processors stay as they are) and add temporal layers.

        The given `unet` keeps working as an image model: called directly, its wrapped blocks skip the temporal
        layers. `temporal_layers`: a folder written by `save_temporal_layers` (or a Hub repository holding one) to
        load them from, built with the settings saved there. Other keyword arguments are this class's temporal
        settings (`num_frames`, `max_frames`, ...).
        """
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(
                f"VideoLDMUNet.from_unet2d needs a diffusers UNet2DConditionModel, got {type(unet).__name__}. "
                "Other denoisers (UNet2DModel, transformers) have no spatial transformer blocks to add temporal "
                "attention after."
            )
        if any(isinstance(module, (SpatioTemporalResnet, SpatioTemporalTransformer)) for module in unet.modules()):
            raise ValueError("This UNet already has temporal layers (it belongs to a VideoLDMUNet).")
        if temporal_layers is not None:  # build with the settings the layers were saved with, unless overridden
            with open(_resolve_file(temporal_layers, TEMPORAL_CONFIG_NAME, {})) as file:
                saved = json.load(file)
            temporal_settings = {**{k: saved[k] for k in _default_settings() if k in saved}, **temporal_settings}
        model = cls.__new__(cls)
        ModelMixin.__init__(model)
        unet_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
        model.register_to_config(unet_config=unet_config, **{**_default_settings(), **temporal_settings})
        settings = model.config
        _check_temporal_settings(
            settings.num_frames, settings.max_frames, settings.temporal_conv_kernel_size, settings.merge_strategy
        )
        model.unet = unet
        model.layout = FrameLayout()
        _insert_temporal_layers(unet, model.layout, settings)
        model.to(unet.device)
        if unet.dtype != torch.float32:
            model.to(dtype=unet.dtype)
        if temporal_layers is not None:
            model.load_temporal_layers(temporal_layers)
        return model

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None) -> None:
        # The wrappers checkpoint themselves, with their pass's frames as an argument; the 2D blocks' own
        # checkpointing (down/mid/up blocks, which call the wrappers) stays off so that nothing recomputes a wrapper
        # with another pass's frames. The spatial transformers still checkpoint their inner blocks.
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func or torch.utils.checkpoint.checkpoint)
        for module in self.unet.modules():
            if hasattr(module, "gradient_checkpointing") and hasattr(module, "resnets"):
                module.gradient_checkpointing = False

    # ------------------------------------------------------------------------------------------- temporal layers

    def temporal_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters of the inserted temporal layers, by name."""
        return {
            name: parameter
            for name, parameter in self.named_parameters()
            if any(part.startswith(TEMPORAL_MODULE_PREFIX) for part in name.split("."))
        }

    def temporal_modules(self) -> torch.nn.ModuleList:
        """The inserted temporal layers as one module list (e.g. for an EMA of them alone)."""
        return torch.nn.ModuleList(
            module
            for name, module in self.named_modules()
            if name.rpartition(".")[2].startswith(TEMPORAL_MODULE_PREFIX)
        )

    @contextlib.contextmanager
    def temporal_layers_disabled(self):
        """Within this context every frame is treated as image-only, so the model is exactly the image model applied
        frame by frame (the baseline to measure the temporal layers against, with the same noise)."""
        previous, self.layout.disabled = self.layout.disabled, True  # this thread only
        try:
            yield self
        finally:
            self.layout.disabled = previous

    def freeze_spatial(self) -> None:
        """Train only the temporal layers: the image model's parameters stop requiring gradients."""
        temporal = set(self.temporal_parameters())
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in temporal)

    def _temporal_settings(self) -> dict:
        return {key: self.config[key] for key in _default_settings()}

    def save_temporal_layers(self, folder: Union[str, os.PathLike]) -> None:
        """Write only the temporal layers (`temporal_layers.safetensors`) and their settings
        (`temporal_config.json`) to `folder`."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        weights = {
            name: parameter.detach().contiguous().cpu() for name, parameter in self.temporal_parameters().items()
        }
        save_file(weights, os.path.join(folder, TEMPORAL_WEIGHTS_NAME), metadata={"format": "pt"})
        settings = {
            **self._temporal_settings(),
            "base_unet_block_out_channels": list(self.unet.config.block_out_channels),
        }
        with open(os.path.join(folder, TEMPORAL_CONFIG_NAME), "w") as file:
            json.dump(settings, file, indent=2)

    def load_temporal_layers(self, folder_or_repo: Union[str, os.PathLike], **hub_kwargs) -> None:
        """Load temporal layers written by `save_temporal_layers` from a folder or a Hub repository (with
        `subfolder=` and the other `hf_hub_download` arguments)."""
        from safetensors.torch import load_file

        weights_path = _resolve_file(folder_or_repo, TEMPORAL_WEIGHTS_NAME, hub_kwargs)
        with open(_resolve_file(folder_or_repo, TEMPORAL_CONFIG_NAME, hub_kwargs)) as file:
            saved = json.load(file)
        ours = self._temporal_settings()
        structural = ("temporal_attention_head_dim", "temporal_cross_attention", "temporal_conv_kernel_size", "merge_strategy")  # fmt: skip
        different = {key: (saved.get(key), ours[key]) for key in structural if saved.get(key) != ours[key]}
        if different:
            raise ValueError(
                f"The temporal layers in {folder_or_repo} were made with other settings (saved, this model): "
                f"{different}. Build the model with the saved settings: VideoLDMUNet.from_unet2d(unet, **settings)."
            )
        weights = load_file(weights_path)
        expected = self.temporal_parameters()
        missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"The temporal layers in {folder_or_repo} do not fit this UNet (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, {len(missing)} and {len(unexpected)} in all): were they trained on another "
                "base model?"
            )
        with torch.no_grad():
            for name, parameter in expected.items():
                if weights[name].shape != parameter.shape:
                    raise ValueError(
                        f"Temporal weight {name} has shape {tuple(weights[name].shape)} in {folder_or_repo}, this "
                        f"model needs {tuple(parameter.shape)}: the base UNets differ."
                    )
                parameter.copy_(weights[name])

    # ------------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: torch.Tensor,
        class_labels: Optional[torch.Tensor] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        image_only_indicator: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[VideoLDMUNetOutput, tuple]:
        """Denoise videos.

        Args:
            sample: `(batch, channels, frames, height, width)` noisy latents.
            timestep: One for all, one per video `(batch,)` or one per frame `(batch, frames)`.
            encoder_hidden_states: `(batch, tokens, dim)`, the text once per video.
            class_labels, timestep_cond, added_cond_kwargs: As for the 2D UNet, one row per video.
            attention_mask, encoder_attention_mask: As for the 2D UNet, one row per video.
            image_only_indicator: `(batch, frames)`, 1 where a "frame" is a separate image (joint image/video
                training): those frames get exactly the 2D UNet's output.
        """
        batch, channels, frames, height, width = self._check_sample(sample)
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"`encoder_hidden_states` must be (batch={batch}, tokens, dim), the text once per video, got shape "
                f"{tuple(encoder_hidden_states.shape)}."
            )
        indicator = self._image_only_indicator(image_only_indicator, batch, frames, sample.device)

        def per_frame(value):  # one row per video -> one row per frame, the flat batch's order
            return value.repeat_interleave(frames, dim=0) if value is not None else None

        flat_timestep = _per_frame_timesteps(timestep, batch, frames, sample.device)
        added = {key: per_frame(value) for key, value in added_cond_kwargs.items()} if added_cond_kwargs else None
        flat = sample.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, height, width)
        self.layout.current = Frames(frames, indicator, encoder_hidden_states)
        try:
            output = self.unet(
                flat,
                flat_timestep,
                per_frame(encoder_hidden_states),
                class_labels=per_frame(class_labels),
                timestep_cond=per_frame(timestep_cond),
                attention_mask=per_frame(attention_mask),
                cross_attention_kwargs=cross_attention_kwargs,
                added_cond_kwargs=added,
                encoder_attention_mask=per_frame(encoder_attention_mask),
                return_dict=False,
            )[0]
        finally:
            self.layout.current = None  # the wrapped 2D UNet called on its own is the image model again
        output = output.reshape(batch, frames, -1, height, width).permute(0, 2, 1, 3, 4)
        return VideoLDMUNetOutput(sample=output) if return_dict else (output,)

    def _check_sample(self, sample: torch.Tensor) -> tuple:
        if sample.ndim != 5:
            raise ValueError(
                f"`sample` must be (batch, channels, frames, height, width), got shape {tuple(sample.shape)}; for "
                "single images use frames = 1 or the 2D UNet."
            )
        batch, channels, frames, height, width = sample.shape
        if channels != self.unet.config.in_channels:
            raise ValueError(f"`sample` has {channels} channels, the UNet takes {self.unet.config.in_channels}.")
        if frames > self.config.max_frames:
            raise ValueError(
                f"Got {frames} frames but this model takes at most max_frames={self.config.max_frames}; generate "
                "longer videos by extension or key frames and interpolation (VideoLDMPipeline)."
            )
        return batch, channels, frames, height, width

    @staticmethod
    def _image_only_indicator(indicator, batch: int, frames: int, device) -> torch.Tensor:
        if indicator is None:
            return torch.zeros(batch, frames, device=device)
        indicator = torch.as_tensor(indicator, device=device)
        if indicator.shape != (batch, frames):
            raise ValueError(
                f"`image_only_indicator` must be (batch={batch}, frames={frames}), 1 for image frames, got shape "
                f"{tuple(indicator.shape)}."
            )
        return indicator.to(torch.float32)


def _default_settings() -> dict:
    return {
        "num_frames": 8,
        "max_frames": 32,
        "temporal_attention_head_dim": 8,
        "temporal_cross_attention": True,
        "temporal_conv_kernel_size": 3,
        "merge_strategy": "learned_with_images",
        "mix_factor": 0.5,
    }


def _check_temporal_settings(num_frames, max_frames, kernel_size, merge_strategy) -> None:
    for name, value in (("num_frames", num_frames), ("max_frames", max_frames)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if num_frames > max_frames:
        raise ValueError(f"`num_frames` ({num_frames}) cannot exceed `max_frames` ({max_frames}).")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"`temporal_conv_kernel_size` must be a positive odd int, got {kernel_size!r}.")
    if merge_strategy not in MERGE_STRATEGIES:
        raise ValueError(f"Unknown `merge_strategy` {merge_strategy!r}; choose one of {MERGE_STRATEGIES}.")


def _check_convertible(unet: UNet2DConditionModel, settings) -> list:
    """Every block of `unet` that gets temporal layers, checked before any is wrapped (so that a refused conversion
    leaves the UNet as it was)."""
    if settings.temporal_cross_attention and unet.config.encoder_hid_dim_type is not None:
        raise ValueError(
            "This UNet projects its text (`encoder_hid_dim_type` is set), so the temporal cross-attention would see "
            "another width than its spatial one; build with temporal_cross_attention=False."
        )
    blocks = [block for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] if block is not None]
    for block in blocks:
        for resnet in getattr(block, "resnets", []):
            if type(resnet) is not ResnetBlock2D:
                raise ValueError(
                    f"Cannot add a temporal block after a {type(resnet).__name__} in {type(block).__name__}: "
                    "VideoLDMUNet converts UNets made of ResnetBlock2D and Transformer2DModel blocks (the Stable "
                    "Diffusion family)."
                )
        for attention in getattr(block, "attentions", []):
            if type(attention) is not Transformer2DModel:
                raise ValueError(
                    f"Cannot add temporal attention after a {type(attention).__name__} in {type(block).__name__}: "
                    "only Transformer2DModel spatial blocks are supported."
                )
            if attention.config.in_channels % settings.temporal_attention_head_dim:
                raise ValueError(
                    f"The temporal attention splits {attention.config.in_channels} channels into heads of "
                    f"`temporal_attention_head_dim`={settings.temporal_attention_head_dim}, which does not divide "
                    "them; pick a divisor of every block width."
                )
    return blocks


def _insert_temporal_layers(unet: UNet2DConditionModel, layout: FrameLayout, settings) -> None:
    """Wrap every resnet and spatial transformer of `unet` in place."""
    for block in _check_convertible(unet, settings):
        for index, resnet in enumerate(getattr(block, "resnets", [])):
            block.resnets[index] = SpatioTemporalResnet(
                resnet, layout, settings.temporal_conv_kernel_size, settings.merge_strategy, settings.mix_factor
            )
        for index, attention in enumerate(getattr(block, "attentions", [])):
            block.attentions[index] = SpatioTemporalTransformer(
                attention,
                layout,
                settings.temporal_attention_head_dim,
                settings.temporal_cross_attention,
                settings.merge_strategy,
                settings.mix_factor,
            )


def _per_frame_timesteps(timestep, batch: int, frames: int, device) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 0:
        return timestep.expand(batch * frames)
    if timestep.shape == (batch,):
        return timestep.repeat_interleave(frames)
    if timestep.shape == (batch, frames):
        return timestep.reshape(-1)
    raise ValueError(
        f"`timestep` must be a scalar, (batch={batch},) or (batch={batch}, frames={frames}), got shape "
        f"{tuple(timestep.shape)}."
    )


def _resolve_file(folder_or_repo, filename: str, hub_kwargs: dict) -> str:
    folder_or_repo = str(folder_or_repo)
    if os.path.isdir(folder_or_repo):
        path = os.path.join(folder_or_repo, hub_kwargs.get("subfolder") or "", filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: write temporal layers with VideoLDMUNet.save_temporal_layers."
            )
        return path
    looks_like_path = (
        folder_or_repo.startswith(("/", ".", "~")) or folder_or_repo.count("/") > 1 or "\\" in folder_or_repo
    )
    if looks_like_path:
        raise FileNotFoundError(f"No temporal-layers folder at {folder_or_repo} (nor is it a Hub repository id).")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(folder_or_repo, filename, **hub_kwargs)


__all__ = [
    "SpatioTemporalResnet",
    "SpatioTemporalTransformer",
    "TemporalConvBlock",
    "VideoLDMUNet",
    "VideoLDMUNetOutput",
]
