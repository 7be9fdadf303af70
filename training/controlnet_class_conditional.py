"""The class-conditional side of training/train_controlnet.py: a ControlNet for a pixel-space class-conditional
`UNet2DModel` (a `ClassConditionalPipeline` such as the shipped digits-class-conditional model), trained on
scikit-learn's digits with the Canny edges of each glyph as the condition.

The model (`ControlledClassUNet`), the data (`WithConditions`, `glyph_edges`), the base model's loading and checks,
sampling with and without the class, the evaluation (edge IoU, class accuracy), the validation grid and the model
card. The training loop is train_controlnet.py's, shared with Stable-Diffusion-shaped bases.
"""

import copy
from typing import Optional

import numpy as np
import torch

from storydiff.training.sample_grids import labelled_grid


def is_class_conditional_base(name_or_path: str, revision: Optional[str] = None) -> bool:
    """Whether the base is a class-conditional pipeline: `ClassConditionalPipeline` in model_index.json, or a
    `UNet2DModel` as its unet."""
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else class_name
    unet = index.get("unet") or [None, None]
    return str(class_name).endswith("ClassConditionalPipeline") or unet[-1] == "UNet2DModel"


class ControlledClassUNet(torch.nn.Module):
    """ControlNet + class-conditional UNet2DModel in one `forward` (one module for DDP / FSDP, as `ControlledUNet`).
    `UNet2DModel.forward` takes no residuals, so the UNet runs through `unet2d_forward_with_residuals`."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet

    def forward(self, noisy, timesteps, class_labels, conditions):
        from storydiff.models.controlnet_variants import unet2d_forward_with_residuals

        down, mid = self.controlnet(noisy, timesteps, None, conditions, class_labels=class_labels, return_dict=False)
        return unet2d_forward_with_residuals(self.unet, noisy, timesteps, class_labels, down, mid).sample


class WithConditions(torch.utils.data.Dataset):
    """A dataset's items with `"conditions"` added (one (C, H, W) tensor per item)."""

    def __init__(self, dataset, conditions: torch.Tensor):
        self.dataset, self.conditions = dataset, conditions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], "conditions": self.conditions[index]}


def glyph_edges(images: torch.Tensor) -> torch.Tensor:
    """Canny edges (N, 1, H, W) in {0, 1} of (N, 1, H, W) images in [-1, 1], made on the [0, 1] image."""
    from storydiff.conditioning import canny_edges

    return torch.stack(canny_edges(list(((images[:, 0] + 1) / 2).clamp(0, 1).numpy()), output_type="pt"))


def load_class_conditional_base(args):
    """The base `ClassConditionalPipeline`, checked: a pixel-space UNet2DModel at --resolution."""
    from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline

    base = ClassConditionalPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision)
    if base.unet is None or base.vae is not None:
        raise ValueError(
            f"{args.pretrained_model_name_or_path} is a ClassConditionalPipeline with "
            f"{'a DiT transformer' if base.unet is None else 'a VAE'}; ControlNet training supports pixel-space "
            "class-conditional UNet2DModel bases (a unet and no vae), such as storydiff/checkpoints/digits-class-conditional."
        )
    size = base.unet.config.sample_size
    if args.resolution != size:
        raise ValueError(
            f"--resolution {args.resolution} does not match the base model's image size {size} (it works in pixel "
            f"space): pass --resolution {size}."
        )
    return base


def class_pipeline(base, unet, controlnet):
    """The base's `ClassConditionalPipeline` with the (trained) UNet and ControlNet and a DDIM scheduler."""
    from diffusers import DDIMScheduler

    return type(base)(scheduler=DDIMScheduler.from_config(base.scheduler.config), unet=unet, controlnet=controlnet,
                      num_classes=base.config.num_classes, id2label=base.config.id2label)  # fmt: skip


def generate_classes(pipeline, labels, conditions, guidance_scale, num_inference_steps, seed) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] of the given classes with their conditions, in batches, with a fixed seed."""
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, len(labels), 64):
        images.append(pipeline(class_labels=[int(label) for label in labels[start : start + 64]],
                               control_image=conditions[start : start + 64].to(pipeline.device, pipeline.unet.dtype),
                               guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                               generator=torch.Generator().manual_seed(seed + start), output_type="np").images)  # fmt: skip
    return np.concatenate(images)


@torch.no_grad()
def generate_null_class(pipeline, conditions, num_inference_steps, seed) -> np.ndarray:
    """Images (N, H, W, C) in [0, 1] with the null class: the condition alone steers (the pipeline cannot be asked
    for the null class, so this is its sampling loop without guidance)."""
    scheduler = copy.deepcopy(pipeline.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    model = ControlledClassUNet(pipeline.controlnet, pipeline.unet)
    conditions = conditions.to(pipeline.device, pipeline.unet.dtype)
    generator = torch.Generator().manual_seed(seed)
    shape = (len(conditions), pipeline.unet.config.in_channels, *conditions.shape[-2:])
    latents = torch.randn(shape, generator=generator).to(conditions) * scheduler.init_noise_sigma
    null = torch.full((len(conditions),), pipeline.null_class_label, device=latents.device)
    for t in scheduler.timesteps:
        timesteps = torch.full((len(latents),), int(t), device=latents.device)
        noise = model(scheduler.scale_model_input(latents, t), timesteps, null, conditions)
        latents = scheduler.step(noise, t, latents).prev_sample
    return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()


def as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def evaluate_class_controlnet(pipeline, examples, guidance_scale, num_inference_steps, seed) -> dict:
    """Edge IoU with the class (and CFG), edge IoU with the null class (the condition alone) and class accuracy of
    the digit classifier, on held-out glyphs and their edges."""
    from storydiff.evaluation.conditions import edge_iou
    from storydiff.evaluation.digits import class_accuracy

    labels, conditions = examples
    images = generate_classes(pipeline, labels, conditions, guidance_scale, num_inference_steps, seed)
    unclassed = generate_null_class(pipeline, conditions, num_inference_steps, seed)
    edges = conditions[:, 0].numpy()
    return {
        "edge_iou": round(edge_iou(as_rgb(images), edges), 4),
        "edge_iou_null_class": round(edge_iou(as_rgb(unclassed), edges), 4),
        "class_accuracy": round(class_accuracy(images, np.asarray(labels)), 4),
    }


def class_validation_grid(pipeline, args, examples, step: int) -> np.ndarray:
    """Rows: held-out glyph edges and their class; columns: the condition, then samples with different seeds."""
    labels, conditions = examples
    repeated = [label for label in labels for _ in range(args.num_validation_images)]
    samples = generate_classes(pipeline, repeated, conditions.repeat_interleave(args.num_validation_images, 0),
                               args.validation_guidance_scale, args.validation_inference_steps, args.seed)  # fmt: skip
    cells = []
    previews = as_rgb(conditions.permute(0, 2, 3, 1).clamp(0, 1).numpy())  # one edge channel, shown as grey
    for row, preview in enumerate(previews):
        cells.append(preview)
        cells.extend(as_rgb(samples[row * args.num_validation_images : (row + 1) * args.num_validation_images]))
    return labelled_grid(np.stack(cells), rows=[f"class {label}" for label in labels],
                         columns=["condition"] + [f"sample {i + 1}" for i in range(args.num_validation_images)],
                         title=f"step {step}, guidance {args.validation_guidance_scale:g}", min_cell=96)  # fmt: skip


def class_card(args, model, base) -> dict:
    """Model card fields for a ControlNet of a class-conditional model."""
    return dict(
        title=f"{args.variant.capitalize()} ControlNet ({args.connect}) on digit edges, class-conditional",
        description=(
            f"A {args.variant} ControlNet (`storydiff.{type(model.controlnet).__name__}`, connection `{args.connect}`, "
            f"UNet {'locked' if args.unlock == 'none' else 'unlocked: ' + args.unlock}) for the class-conditional "
            f"pixel-space model `{args.pretrained_model_name_or_path}` ({base.config.num_classes} classes and a null "
            "class), trained by storydiff's `training/train_controlnet.py` on scikit-learn's digits with the Canny "
            f"edges of each glyph as the condition; class labels dropped to the null class with probability "
            f"{args.proportion_empty_prompts}. The folder is a `ClassConditionalPipeline` with the ControlNet in "
            "`controlnet/`. Edge IoU (3x3 tolerance) with the class and with the null class (the condition alone), "
            "and the digit classifier's class accuracy, are measured on held-out glyphs."
        ),
        tags=["controlnet", "class-conditional", f"controlnet-{args.variant}"],
        usage="import torch\nfrom storydiff import ClassConditionalPipeline\n\n"
        'pipe = ClassConditionalPipeline.from_pretrained("path/to/this/folder")\n'
        f"edges = torch.zeros(1, 1, {args.resolution}, {args.resolution})  # (batch, 1, height, width) in [0, 1]\n"
        "images = pipe(class_labels=[3], control_image=edges, guidance_scale=3.0, num_inference_steps=25).images",
    )
