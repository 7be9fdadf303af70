"""The coherence-aware side of training/train_controlnet.py (`--guidance coherence`): a ControlNet for a
coherence-aware text-to-image model (a `CoherenceAwarePipeline` folder saved by train_coherence_aware.py, with a UNet
denoiser).

The ControlNet reads the same context as the UNet: the frozen `CoherenceConditioner`'s output for the caption at
coherence 1. Instead of the stock recipe's empty captions (`--proportion_empty_prompts`), a dropped caption keeps
its text at coherence 0: the negative branch of coherence-aware CFG, which is how the model is then sampled, so the
ControlNet learns to read the condition when the caption is switched off in CA-CFG's sense. The training loop is
train_controlnet.py's, shared with the other bases.
"""

from typing import Optional

import torch


def is_coherence_aware_base(name_or_path: str, revision: Optional[str] = None) -> bool:
    """Whether the base is a `CoherenceAwarePipeline` folder (model_index.json names it)."""
    from diffusers import DiffusionPipeline

    class_name = DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else class_name
    return str(class_name).endswith("CoherenceAwarePipeline")


class ControlledCoherenceUNet(torch.nn.Module):
    """ControlNet + UNet in one `forward` (one module for DDP / FSDP, as `ControlledUNet`); the context is the
    conditioner's `(encoder_hidden_states, encoder_attention_mask)`. diffusers' ControlNet takes no attention mask:
    it reads the whole context, the UNet honours the mask."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, noisy_latents, timesteps, context, conditions):
        encoder_hidden_states, encoder_attention_mask = context
        down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states, conditions, return_dict=False)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip


def load_coherence_aware_base(args):
    """The base `CoherenceAwarePipeline`, checked: its denoiser must be a UNet (a ControlNet adds to skip
    connections, which a TextRIN does not have)."""
    from diffusers import UNet2DConditionModel

    from storydiff.custom_pipelines.coherence_aware import CoherenceAwarePipeline

    base = CoherenceAwarePipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    if not isinstance(base.denoiser, UNet2DConditionModel):
        raise ValueError(
            f"{args.pretrained_model_name_or_path} denoises with a {type(base.denoiser).__name__}; a ControlNet needs a "
            "UNet2DConditionModel denoiser (train the coherence-aware model with --denoiser unet)."
        )
    for module in (base.vae, base.text_encoder, base.conditioner):
        module.requires_grad_(False)
    return base


def coherence_aware_pipeline(base, unet, controlnet):
    """The base pipeline with the (trained) UNet and the ControlNet: what validation samples and what is saved."""
    from diffusers import DDIMScheduler

    components = {**base.components, "denoiser": unet, "controlnet": controlnet}
    components["scheduler"] = DDIMScheduler.from_config(base.scheduler.config)
    return type(base)(**components)


def coherence_aware_card(args, model, dataset_id, conditions: str, channels: int) -> dict:
    """Model card fields for a ControlNet of a coherence-aware model."""
    return dict(
        title=f"{args.variant.capitalize()} ControlNet ({args.connect}) for a coherence-aware model on "
        f"{dataset_id or 'an image folder'}",
        description=(
            f"A {args.variant} ControlNet (`storydiff.{type(model.controlnet).__name__}`, connection `{args.connect}`) "
            f"for the coherence-aware model `{args.pretrained_model_name_or_path}`, trained by storydiff's "
            f"`training/train_controlnet.py --guidance coherence` on {conditions}. The ControlNet reads the "
            "conditioner's coherence-aware context; dropped captions (probability "
            f"{args.proportion_empty_prompts}) kept their text at coherence 0, the negative of coherence-aware CFG. "
            "The folder is a whole `CoherenceAwarePipeline` with the ControlNet in `controlnet/`: coherence and "
            "control are separate knobs."
        ),
        tags=["controlnet", "coherence-aware-diffusion", f"controlnet-{args.variant}"],
        usage="import torch\nfrom storydiff import CoherenceAwarePipeline\n\n"
        'pipe = CoherenceAwarePipeline.from_pretrained("path/to/this/folder")\n'
        f"condition = torch.zeros(1, {channels}, {args.resolution}, {args.resolution})  # (batch, channels, height, width) in [0, 1]\n"
        'image = pipe("a large red 3 in the centre", coherence=1.0, control_image=condition, num_inference_steps=20).images[0]',
    )
