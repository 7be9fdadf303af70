"""Demo section: the shipped digits ControlNets (full and lite on Canny edges, and one on edges + a position/colour
mask) on the shipped digits text-to-image model.

Held-out canvases of the digits world give the conditions. Every model gets the same captions and the same noise:
the base model alone, the full and the lite ControlNet; then the same ControlNets with empty prompts, where the
condition must do all the work. Edge IoU (Canny edges of each sample against its condition, 1-pixel tolerance) and
caption adherence are measured back. The multi-condition ControlNet gets edges + mask with an empty prompt: the mask
alone states where the digit is and which colour it has. Last, a real photograph from scikit-image's samples is
turned into a Canny condition at the model's 32x32 and drawn in by the full ControlNet.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from storydiff.demo import markdown_table, save_comparison_grid, save_figure, write_csv, write_text

DEMO_GUIDANCE_SCALE = 4.0
DEMO_INFERENCE_STEPS = 12
DEMO_NUM_CONDITIONS = 16
DEMO_GRID_ROWS = 4
DEMO_SEED = 0
DEMO_PHOTO = "camera"  # skimage.data.camera(): the cameraman photograph, 512x512 grey, shipped with scikit-image
# Canny thresholds for the photograph at 32x32: its outline, not the texture of the grass and the coat
DEMO_PHOTO_CANNY_THRESHOLDS = (150, 300)
DEMO_PHOTO_PROMPT = "a large yellow 0 in the centre"


def controlnet_demo(
    output_dir: Path,
    device: str = "cpu",
    num_conditions: Optional[int] = None,
    num_inference_steps: Optional[int] = None,
    seed: Optional[int] = None,
) -> list:
    """Writes `controlnet_samples.png`, `controlnet_photo.png` and `controlnet_metrics.md` / `.csv`."""
    num_conditions = DEMO_NUM_CONDITIONS if num_conditions is None else num_conditions
    num_inference_steps = DEMO_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
    seed = DEMO_SEED if seed is None else seed
    from storydiff.checkpoints import (
        DIGITS_CONTROLNET_EDGES,
        DIGITS_CONTROLNET_EDGES_POSITION,
        DIGITS_CONTROLNET_LITE_EDGES,
        checkpoint_path,
        controlnet_pipeline,
    )
    from storydiff.evaluation.conditions import edge_iou
    from storydiff.evaluation.text_adherence import caption_adherence
    from storydiff.models.controlnet_variants import load_controlnet
    from storydiff.training.controlnet_data import digits_world_control_arrays

    output_dir = Path(output_dir)
    full = controlnet_pipeline(DIGITS_CONTROLNET_EDGES, device)
    pipes = {"full": full}  # the others share its base components: the base model is loaded once
    for name, checkpoint in (
        ("lite", DIGITS_CONTROLNET_LITE_EDGES),
        ("edges + mask", DIGITS_CONTROLNET_EDGES_POSITION),
    ):
        controlnet = load_controlnet(checkpoint_path(checkpoint)).to(device)
        pipes[name] = type(full)(**{**full.components, "controlnet": controlnet})
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    resolution = pipes["full"].unet.config.sample_size * pipes["full"].vae_scale_factor
    _, captions, attributes, conditions = digits_world_control_arrays(
        "test", num_conditions, seed, resolution, ["edges", "position_colour"]
    )
    conditions = torch.from_numpy(conditions)
    edges, both = conditions[:, :1], conditions
    latent_shape = (num_conditions, 4, resolution // 4, resolution // 4)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    settings = {"guidance_scale": DEMO_GUIDANCE_SCALE, "num_inference_steps": num_inference_steps, "output_type": "np"}

    def sample(name: str, prompts, condition, scale: float = 1.0) -> np.ndarray:
        return pipes[name](list(prompts), image=condition.to(device), latents=noise.clone().to(device),
                           controlnet_conditioning_scale=scale, **settings).images  # fmt: skip

    print(
        f"  {num_conditions} held-out edge maps, {num_inference_steps} DDIM steps: base, full, lite; with and without prompts"
    )
    empty = [""] * num_conditions
    samples = {
        "base model (no control)": sample("full", captions, edges, scale=0.0),  # a zero scale: exactly the base UNet
        "full ControlNet": sample("full", captions, edges),
        "lite ControlNet": sample("lite", captions, edges),
        "full, no prompt": sample("full", empty, edges),
        "lite, no prompt": sample("lite", empty, edges),
        "edges + mask, no prompt": sample("edges + mask", empty, both),
    }
    edge_maps = edges[:, 0].numpy()
    rows_table = []
    for name, images in samples.items():
        adherence = caption_adherence(images, attributes)
        rows_table.append([name, f"{edge_iou(images, edge_maps):.3f}", f"{adherence['digit']:.3f}",
                           f"{adherence['colour']:.3f}", f"{adherence['position']:.3f}"])  # fmt: skip

    grid_rows = {}
    for index in range(min(DEMO_GRID_ROWS, num_conditions)):
        edge_preview = np.repeat(edge_maps[index][:, :, None], 3, axis=2)
        mask_preview = conditions[index, 1:].permute(1, 2, 0).numpy()
        cells = [edge_preview, mask_preview] + [images[index] for images in samples.values()]
        grid_rows[captions[index]] = np.stack(cells)
    samples_path = output_dir / "controlnet_samples.png"
    save_comparison_grid(samples_path, grid_rows, ["edges", "mask", *samples],
                         f"Held-out conditions, same noise; guidance {DEMO_GUIDANCE_SCALE:g}, {num_inference_steps} DDIM steps",
                         cell_inches=0.9, title_wrap=12)  # fmt: skip

    photo_path = _photo_figure(
        output_dir / "controlnet_photo.png", pipes["full"], resolution, settings, noise[:1], device
    )

    header = ["model", "edge IoU", "digit", "colour", "position"]
    markdown_path = output_dir / "controlnet_metrics.md"
    write_text(
        markdown_path,
        f"# ControlNet on the digits world\n\n{num_conditions} held-out canvases give the conditions (Canny edges; for "
        "the multi-condition ControlNet also the digit's box filled with its colour); guidance_scale "
        f"{DEMO_GUIDANCE_SCALE:g}, {num_inference_steps} DDIM steps, the same noise for every row, seed {seed}. "
        "Edge IoU: Canny edges of the sample against the condition (1-pixel tolerance); digit / colour / position: "
        "caption adherence of the sample to the held-out caption, measured by storydiff.evaluation.text_adherence "
        "(also for the rows without a prompt: there only the condition can state them). The shipped ControlNets' "
        "own held-out figures and the full reproduction are in docs/results/controlnet_digits.md.\n\n"
        + markdown_table(header, rows_table),
    )
    csv_path = write_csv(output_dir / "controlnet_metrics.csv", header, rows_table)
    return [samples_path, photo_path, markdown_path, csv_path]


def _photo_figure(path: Path, pipe, resolution: int, settings: dict, noise: torch.Tensor, device: str) -> Path:
    """A scikit-image photograph, its Canny edges at the model's resolution, and the full ControlNet's drawing."""
    import matplotlib.pyplot as plt
    from skimage import data

    from storydiff.conditioning import canny_edges, prepare_condition

    photo = getattr(data, DEMO_PHOTO)()
    print(f"  a real photograph (skimage.data.{DEMO_PHOTO}(), {photo.shape[1]}x{photo.shape[0]}) as a Canny condition")
    small = prepare_condition(photo, resolution, resolution, resample="area")  # the image_to_tensor geometry
    edges = canny_edges(small.permute(1, 2, 0).numpy(), *DEMO_PHOTO_CANNY_THRESHOLDS, output_type="pt")[None]
    prompted = pipe([DEMO_PHOTO_PROMPT], image=edges.to(device), latents=noise.clone().to(device), **settings).images[
        0
    ]
    unprompted = pipe([""], image=edges.to(device), latents=noise.clone().to(device), **settings).images[0]
    small_image = small.permute(1, 2, 0).numpy()
    panels = [
        (photo, f"skimage.data.{DEMO_PHOTO}()"),
        (small_image[:, :, 0] if small_image.shape[2] == 1 else small_image, f"resized to {resolution}x{resolution}"),
        (edges[0, 0].numpy(), f"Canny edges {DEMO_PHOTO_CANNY_THRESHOLDS}\n(the condition)"),
        (prompted, f"full ControlNet:\n'{DEMO_PHOTO_PROMPT}'"),
        (unprompted, "full ControlNet,\nno prompt"),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for axis, (image, title) in zip(axes, panels):
        axis.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
        axis.set_title(title, fontsize=8)
        axis.axis("off")
    figure.suptitle("A real photograph through the digits ControlNet (out of its training domain)", fontsize=9)
    saved = save_figure(figure, path, dpi=120)
    plt.close(figure)
    return saved
