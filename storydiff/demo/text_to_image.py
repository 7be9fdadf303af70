"""Demo section: text-to-image with the shipped miniature Stable Diffusion, under three guidance schedules.

The shipped `digits-text-to-image` folder is a stock `StableDiffusionPipeline` checkpoint (VAE, CLIP text encoder,
UNet, trained by training/train_vae.py and training/train_text_to_image.py on the captioned digits world). It is loaded
here into storydiff's `DynamicCFGStableDiffusionPipeline` and sampled with the same captions and the same noise under
each schedule; `storydiff.evaluation.text_adherence` reads digit, colour, position and size back from every image.
"""

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from storydiff.demo import markdown_table, save_comparison_grid, write_csv, write_text

DEMO_CHECKPOINT = "digits-text-to-image"
DEMO_SCHEDULES = ("static", "linear", "cosine")
DEMO_GUIDANCE_SCALE = 4.0
DEMO_INFERENCE_STEPS = 20
DEMO_NUM_CAPTIONS = 60
DEMO_GRID_COLUMNS = 6
DEMO_SEED = 0
ATTRIBUTES = ("digit", "colour", "position", "size")


def text_to_image_demo(
    output_dir: Path,
    device: str = "cpu",
    checkpoint: Optional[Union[str, Path]] = None,
    schedules: Optional[Sequence[str]] = None,
    guidance_scale: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    num_captions: Optional[int] = None,
    seed: Optional[int] = None,
) -> list:
    """Held-out digits-world captions, one image each from the same noise per schedule, scored for caption adherence.

    Writes `text_to_image_grid.png` (rows: schedules, columns: the first captions) and `text_to_image_metrics.md` /
    `.csv` (per-attribute accuracy, overall adherence, exact-caption rate, canvas Frechet distance and denoiser work
    per schedule). Arguments left as None take the module's `DEMO_*` settings, read at call time.
    """
    schedules = DEMO_SCHEDULES if schedules is None else schedules
    guidance_scale = DEMO_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    num_inference_steps = DEMO_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
    num_captions = DEMO_NUM_CAPTIONS if num_captions is None else num_captions
    seed = DEMO_SEED if seed is None else seed
    from diffusers import DDIMScheduler

    from storydiff.checkpoints import checkpoint_path
    from storydiff.custom_pipelines.dynamic_cfg_stable_diffusion import DynamicCFGStableDiffusionPipeline
    from storydiff.data.digits import digits_world_arrays
    from storydiff.evaluation.text_adherence import canvas_frechet_distance, caption_adherence

    output_dir = Path(output_dir)
    checkpoint = Path(checkpoint if checkpoint is not None else checkpoint_path(DEMO_CHECKPOINT))
    pipe = DynamicCFGStableDiffusionPipeline.from_pretrained(checkpoint).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    _, captions, attributes = digits_world_arrays("test", num_samples=num_captions, seed=seed, resolution=resolution)

    # The same starting noise for every schedule, so rows differ only by the guidance schedule.
    latent_shape = (
        num_captions,
        pipe.unet.config.in_channels,
        pipe.unet.config.sample_size,
        pipe.unet.config.sample_size,
    )
    latents = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))

    grid_rows, table = {}, []
    for schedule in schedules:  # names, or GuidanceSchedule objects for kinds that need settings
        name = schedule if isinstance(schedule, str) else schedule.config.kind
        print(f"  {name}: {num_captions} captions, {num_inference_steps} DDIM steps, guidance_scale {guidance_scale}")
        pipe.set_progress_bar_config(desc=f"  {name}")
        output = pipe(
            list(captions),
            guidance_scale=guidance_scale,
            guidance_schedule=schedule,
            num_inference_steps=num_inference_steps,
            latents=latents.clone().to(device),
            output_type="np",
        )
        scores = caption_adherence(output.images, attributes)
        frechet = float(canvas_frechet_distance(output.images))
        unguided = int((pipe.guidance_scales <= 1.0).sum())  # steps that skip the unconditional pass
        work = (2 * num_inference_steps - unguided) / (2 * num_inference_steps)
        grid_rows[f"{name}\nadherence {scores['overall']:.2f}\nexact {scores['exact']:.2f}"] = output.images
        table.append([name, *(f"{scores[attribute]:.3f}" for attribute in ATTRIBUTES), f"{scores['overall']:.3f}",
                      f"{scores['exact']:.3f}", f"{frechet:.1f}", f"{work:.3f}"])  # fmt: skip

    grid_path = output_dir / "text_to_image_grid.png"
    save_comparison_grid(
        grid_path,
        {label: images[:DEMO_GRID_COLUMNS] for label, images in grid_rows.items()},
        captions[:DEMO_GRID_COLUMNS],
        f"Same captions and noise, guidance_scale {guidance_scale:g}, {num_inference_steps} DDIM steps",
        cell_inches=1.45,
    )
    header = ["schedule", *ATTRIBUTES, "caption adherence", "exact captions", "canvas Frechet distance",
              "denoiser work vs static"]  # fmt: skip
    markdown_path = output_dir / "text_to_image_metrics.md"
    write_text(
        markdown_path,
        f"# Text-to-image on the digits world\n\n{num_captions} held-out captions, one image each, guidance_scale "
        f"{guidance_scale:g}, {num_inference_steps} DDIM steps, seed {seed}, checkpoint `{checkpoint.name}` in the "
        "stock-format folder, sampled by `DynamicCFGStableDiffusionPipeline`. Attribute accuracies are read back "
        "by `storydiff.evaluation.text_adherence`; 'exact' counts images with every attribute right; the Frechet "
        "distance (lower is better) is in the digit classifier's feature space against held-out real canvases, "
        f"and at {num_captions} samples it is noisy: compare rows, not other sample counts.\n\n"
        + markdown_table(header, table),
    )
    csv_path = write_csv(output_dir / "text_to_image_metrics.csv", header, table)
    return [grid_path, markdown_path, csv_path]
