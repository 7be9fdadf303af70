"""Demo section: text-to-video with the shipped Video LDM temporal layers on the shipped digits text-to-image model.

The same held-out moving-digit captions and the same noise go through the video model and through the image model
applied frame by frame (`VideoLDMUNet.temporal_layers_disabled()`, exactly the image model); `storydiff.evaluation.
video` tracks each digit's centre over the frames (motion direction) and reads its class on every frame (identity
consistency). One video is then extended past the model's 8-frame window, block by block, with reconstruction
guidance and with plain replacement of the known frames.
"""

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from storydiff.demo import markdown_table, save_comparison_grid, write_csv, write_text

DEMO_GUIDANCE_SCALE = 4.0
DEMO_INFERENCE_STEPS = 12
DEMO_NUM_CAPTIONS = 8
DEMO_STRIP_VIDEOS = 3
DEMO_EXTENDED_FRAMES = 14
DEMO_SEED = 0
METRICS = ("direction_accuracy", "identity_consistency", "adherence")


def video_ldm_demo(
    output_dir: Path,
    device: str = "cpu",
    num_captions: Optional[int] = None,
    num_inference_steps: Optional[int] = None,
    seed: Optional[int] = None,
) -> list:
    """Writes `video_ldm_strips.png` (frames of video vs per-frame rows), `video_ldm.gif` (the first video and its
    per-frame twin side by side), `video_ldm_extension.png` and `video_ldm_metrics.md` / `.csv`."""
    num_captions = DEMO_NUM_CAPTIONS if num_captions is None else num_captions
    num_inference_steps = DEMO_INFERENCE_STEPS if num_inference_steps is None else num_inference_steps
    seed = DEMO_SEED if seed is None else seed
    from storydiff.checkpoints import video_ldm_pipeline
    from storydiff.data.moving_digits import moving_digits_arrays
    from storydiff.evaluation.video import evaluate_videos

    output_dir = Path(output_dir)
    pipe = video_ldm_pipeline(device)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe.unet.config.num_frames
    resolution = pipe.unet.unet.config.sample_size * pipe.vae_scale_factor
    _, captions, attributes = moving_digits_arrays("test", num_captions, seed, frames, resolution)
    settings = {"guidance_scale": DEMO_GUIDANCE_SCALE, "num_inference_steps": num_inference_steps}

    # the same noise for both rows, so they differ only by the temporal layers
    latents = torch.randn((num_captions, pipe.unet.unet.config.in_channels, frames, *(2 * [resolution // pipe.vae_scale_factor])),
                          generator=torch.Generator().manual_seed(seed))  # fmt: skip
    print(
        f"  {num_captions} held-out captions, {frames} frames, {num_inference_steps} DDIM steps, video and per frame"
    )
    video = pipe(list(captions), latents=latents.clone().to(device), **settings).frames
    with pipe.unet.temporal_layers_disabled():
        per_frame = pipe(list(captions), latents=latents.clone().to(device), **settings).frames
    scores = {"Video LDM": evaluate_videos(video, attributes), "image model per frame": evaluate_videos(per_frame, attributes)}  # fmt: skip

    print(f"  extension to {DEMO_EXTENDED_FRAMES} frames: reconstruction guidance vs replacement")
    extended = {}
    for mode in ("reconstruction_guidance", "replacement"):
        extended[mode] = pipe.generate_long_video(captions[0], DEMO_EXTENDED_FRAMES, method="extend", overlap=2,
                                                  generator=torch.Generator().manual_seed(seed),
                                                  conditioning_mode=mode, **settings)  # fmt: skip
    extension_scores = {mode: evaluate_videos(videos, attributes[:1]) for mode, videos in extended.items()}

    rows = {}
    for index in range(DEMO_STRIP_VIDEOS):
        rows[f"{captions[index]}\nVideo LDM"] = video[index]
        rows[f"{captions[index]}\nper frame"] = per_frame[index]
    strips_path = output_dir / "video_ldm_strips.png"
    save_comparison_grid(strips_path, rows, [f"frame {i}" for i in range(frames)],
                         f"Same captions and noise; guidance {DEMO_GUIDANCE_SCALE:g}, {num_inference_steps} DDIM steps",
                         cell_inches=0.8, title_wrap=10)  # fmt: skip
    extension_path = output_dir / "video_ldm_extension.png"
    save_comparison_grid(
        extension_path,
        {mode.replace("_", " "): videos[0] for mode, videos in extended.items()},
        [f"{i}" + (" (window 2)" if i == frames else "") for i in range(DEMO_EXTENDED_FRAMES)],
        f"'{captions[0]}' extended to {DEMO_EXTENDED_FRAMES} frames (windows of {frames}, 2 frames known)",
        cell_inches=0.6,
        title_wrap=8,
    )
    gif_path = _side_by_side_gif(output_dir / "video_ldm.gif", video[0], per_frame[0])

    header = ["model", *[name.replace("_", " ") for name in METRICS], "frame Frechet distance"]
    table = [[name, *(f"{result[metric]:.3f}" for metric in METRICS), f"{result['frame_frechet_distance']:.1f}"]
             for name, result in scores.items()]  # fmt: skip
    extension_table = [[mode.replace("_", " "), f"{result['direction_accuracy']:.0f}",
                        f"{result['identity_consistency']:.3f}", f"{result['colour_consistency']:.3f}"]
                       for mode, result in extension_scores.items()]  # fmt: skip
    markdown_path = output_dir / "video_ldm_metrics.md"
    write_text(
        markdown_path,
        f"# Video LDM on moving digits\n\n{num_captions} held-out moving-digit captions, {frames} frames each, "
        f"guidance_scale {DEMO_GUIDANCE_SCALE:g}, {num_inference_steps} DDIM steps, seed {seed}: the shipped "
        "temporal layers (`digits-video-ldm`) on the shipped `digits-text-to-image` model, against the same image "
        "model applied frame by frame from the same noise. Direction: the digit's tracked centre moves the stated "
        "way; identity: the fraction of frames showing the video's most frequent digit class; adherence: digit, "
        "colour and size right per frame. The Frechet distance (per frame, against static canvases) is noisy at "
        "this count: compare rows.\n\n"
        + markdown_table(header, table)
        + f"\n## Extension past the window\n\n'{captions[0]}' extended to {DEMO_EXTENDED_FRAMES} frames, 2 known "
        "frames per new window:\n\n"
        + markdown_table(
            ["known frames by", "direction right", "identity consistency", "colour consistency"], extension_table
        ),  # fmt: skip
    )
    csv_path = write_csv(output_dir / "video_ldm_metrics.csv", header, table)
    return [strips_path, gif_path, extension_path, markdown_path, csv_path]


def _side_by_side_gif(path: Path, left: np.ndarray, right: np.ndarray) -> Path:
    """A GIF of two videos `(F, H, W, 3)` in [0, 1] side by side, upscaled 3x (nearest), written atomically."""
    from diffusers.utils import export_to_gif
    from PIL import Image

    from storydiff.atomic_files import atomic_save

    gap = np.ones((left.shape[1], 2, 3), dtype=left.dtype)
    frames = []
    for a, b in zip(left, right):
        pixels = (np.concatenate([a, gap, b], axis=1).clip(0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(pixels)
        frames.append(image.resize((image.width * 3, image.height * 3), Image.NEAREST))
    return Path(atomic_save(path, lambda temporary: export_to_gif(frames, str(temporary), fps=4)))
