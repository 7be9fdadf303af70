"""The dynamic classifier-free guidance section of `storydiff demo`: the shipped class-conditional digits model
samples every class from the same noise under several guidance schedules; a grid and a scored table compare them.
"""

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from storydiff.demo import markdown_table, save_comparison_grid, write_csv, write_text

DEMO_SCHEDULES = ("static", "linear", "cosine")
DEMO_GUIDANCE_SCALE = 3.0
DEMO_INFERENCE_STEPS = 20
DEMO_SAMPLES_PER_CLASS = 10
DEMO_SEED = 0


def dynamic_cfg_demo(
    output_dir: Path,
    device: str = "cpu",
    checkpoint: Optional[Union[str, Path]] = None,
    schedules: Optional[Sequence[str]] = None,
    guidance_scale: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    samples_per_class: Optional[int] = None,
    seed: Optional[int] = None,
) -> list:
    """Digits of every class from the same initial noise with several guidance schedules, side by side and scored.

    Writes `dynamic_cfg_grid.png` (rows: schedules, columns: classes, the first sample of each class) and
    `dynamic_cfg_metrics.md` / `.csv` (class accuracy and digit Frechet distance over all samples of each schedule,
    against the held-out test digits, plus the denoiser work relative to static CFG). Arguments left as None take
    the module's `DEMO_*` settings, read at call time.
    """
    schedules = DEMO_SCHEDULES if schedules is None else schedules
    guidance_scale = DEMO_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    num_inference_steps = DEMO_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
    samples_per_class = DEMO_SAMPLES_PER_CLASS if samples_per_class is None else samples_per_class
    seed = DEMO_SEED if seed is None else seed
    from diffusers import DDIMScheduler

    from storydiff.checkpoints import digits_pipeline_path
    from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline
    from storydiff.evaluation import balanced_real_digits, evaluate_digit_samples, load_digit_classifier

    output_dir = Path(output_dir)
    checkpoint = Path(checkpoint if checkpoint is not None else digits_pipeline_path())
    pipe = ClassConditionalPipeline.from_pretrained(checkpoint).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    num_classes = pipe.config.num_classes
    classifier = load_digit_classifier(device=device)

    # The same starting noise for every schedule, so rows differ only by the guidance schedule.
    unet_config = pipe.unet.config
    latents = torch.randn(
        (num_classes * samples_per_class, unet_config.in_channels, unet_config.sample_size, unet_config.sample_size),
        generator=torch.Generator().manual_seed(seed),
    )
    labels = np.repeat(np.arange(num_classes), samples_per_class)

    first_of_each_class, table = {}, []
    for schedule in schedules:
        print(f"  {schedule}: {len(labels)} digits, {num_inference_steps} DDIM steps, guidance_scale {guidance_scale}")
        pipe.set_progress_bar_config(desc=f"  {schedule}")
        output = pipe(
            class_labels=list(range(num_classes)),
            num_images_per_class=samples_per_class,
            guidance_scale=guidance_scale,
            guidance_schedule=schedule,
            num_inference_steps=num_inference_steps,
            latents=latents.clone(),
            output_type="np",
        )
        scores = evaluate_digit_samples(output.images, labels, classifier=classifier)
        unguided_steps = sum(scale <= 1.0 for scale in output.guidance_scales)
        relative_cost = (2 * num_inference_steps - unguided_steps) / (2 * num_inference_steps)
        row_label = f"{schedule}\nacc {scores['class_accuracy']:.2f}\nFD {scores['frechet_distance']:.1f}"
        first_of_each_class[row_label] = output.images[::samples_per_class]
        table.append(
            [schedule, f"{scores['class_accuracy']:.3f}", f"{scores['frechet_distance']:.2f}", f"{relative_cost:.3f}"]
        )

    # Reference: as many real train digits, class-balanced like the samples. The classifier learned them, so their
    # accuracy is optimistic; their Frechet distance to the test split shows the scale of the metric at this count.
    real_images, real_labels = balanced_real_digits("train", samples_per_class, classifier.config.sample_size, seed)
    real_scores = evaluate_digit_samples(real_images, real_labels, classifier=classifier)
    table.append(
        [
            "real train digits (reference)",
            f"{real_scores['class_accuracy']:.3f}",
            f"{real_scores['frechet_distance']:.2f}",
            "-",
        ]
    )

    header = ["schedule", "class accuracy", "digit Frechet distance", "denoiser work vs static"]
    grid_path = output_dir / "dynamic_cfg_grid.png"
    save_comparison_grid(
        grid_path,
        first_of_each_class,
        [f"class {c}" for c in range(num_classes)],
        f"Same noise, guidance_scale {guidance_scale}, {num_inference_steps} DDIM steps",
    )
    markdown_path = output_dir / "dynamic_cfg_metrics.md"
    write_text(
        markdown_path,
        f"# Dynamic CFG on digits\n\n{samples_per_class} samples per class ({len(labels)} per schedule), "
        f"guidance_scale {guidance_scale} (w = {guidance_scale - 1:g}), {num_inference_steps} DDIM steps, seed {seed}, "
        f"checkpoint `{checkpoint.name}`. Class accuracy by the project's digit classifier; Frechet distance in its "
        "feature space against the held-out test digits (lower is better; compare only at equal sample counts).\n\n"
        + markdown_table(header, table),
    )
    csv_path = write_csv(output_dir / "dynamic_cfg_metrics.csv", header, table)
    print("\n" + markdown_table(header, table))
    return [grid_path, markdown_path, csv_path]
