"""Re-measure the Video LDM claims in miniature: do temporal layers trained on top of a frozen image LDM ("Align
your Latents", Blattmann et al. 2023) turn it into a video model, and does reconstruction guidance (Video Diffusion
Models, Ho et al. 2022) keep block-autoregressive extensions coherent where replacing the known frames does not?

The shipped `digits-text-to-image` model with the shipped `digits-video-ldm` temporal layers (or any
`VideoLDMPipeline` folder, `--model`) draws held-out moving-digit captions ("a small red 3 moves quickly to the
left"); `storydiff.evaluation.video` tracks each digit's centre over the frames and reads its class, colour and size
per frame. Every comparison uses the same captions and the same initial noise (DDIM, eta 0).

1. **Temporal layers on vs off**: the video model against the image model applied frame by frame
   (`VideoLDMUNet.temporal_layers_disabled()`): motion-direction accuracy, identity consistency, per-frame caption
   adherence and Frechet distance.
2. **Extension** past the 8-frame window, windows of 8 with 2 known frames: plain replacement against
   reconstruction guidance at several `w_r`, and key frames + interpolation; direction over the whole video,
   identity consistency and the jump at the joints (how far the digit's step at a joint is from its median step).
3. **Joint image/video training** (`--joint_model` and `--video_only_model`, folders trained by
   `training/train_video_ldm.py` with `--spatial_lora_rank` and with / without `--image_fraction`), when given: the
   held-out metrics those runs measured at their end (`train_metrics.json`).

    python scripts/reproduce_video_ldm.py --output_dir docs/results

writes `video_ldm_digits.md` (command, run time, tables, verdict), `video_ldm_digits.png` (the figure),
`video_ldm_digits_samples.png` (frame strips) and `video_ldm_digits.json` (raw numbers).
"""

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from storydiff.atomic_files import atomic_save, atomic_write
from storydiff.data.moving_digits import moving_digits_arrays
from storydiff.evaluation.video import evaluate_videos, track_centres
from storydiff.training.sample_grids import labelled_grid, save_grid

METRICS = ("direction_accuracy", "identity_consistency", "adherence", "frame_frechet_distance")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="VideoLDMPipeline folder (default: the shipped layers)")
    parser.add_argument("--num_videos", type=int, default=200, help="held-out captions for comparisons 1 and 3")
    parser.add_argument("--num_extended", type=int, default=32, help="held-out captions for comparison 2")
    parser.add_argument("--extended_frames", type=int, default=20, help="frames of an extended video")
    parser.add_argument("--reconstruction_scales", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--joint_model", default=None, help="folder trained with --image_fraction")
    parser.add_argument("--video_only_model", default=None, help="the same run without --image_fraction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--output_dir", default="docs/results")
    parser.add_argument("--name", default="video_ldm_digits")
    parser.add_argument(
        "--rewrite_report",
        action="store_true",
        help="only rewrite the page and the figure from the saved JSON (and the joint runs' metrics)",
    )
    return parser.parse_args(argv)


def load_pipeline(folder, device):
    if folder is None:
        from storydiff.checkpoints import video_ldm_pipeline

        pipe = video_ldm_pipeline(device)
    else:
        from diffusers import DDIMScheduler

        from storydiff import VideoLDMPipeline

        pipe = VideoLDMPipeline.from_pretrained(folder).to(device)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, captions, latents, args, batch: int = 25) -> np.ndarray:
    videos = []
    for start in range(0, len(captions), batch):
        videos.append(pipe(list(captions[start : start + batch]), latents=latents[start : start + batch].clone(),
                           guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps).frames)  # fmt: skip
    return np.concatenate(videos)


def scores_of(videos, attributes) -> dict:
    scores = evaluate_videos(videos, attributes)
    return {name: float(scores[name]) for name in (*METRICS, "colour_consistency", "digit", "colour", "size")}


def joint_jump(videos: np.ndarray, joints: list) -> float:
    """Mean over videos and joints of |step at the joint - the video's median step| in pixels, where a step is the
    tracked centre's move from one frame to the next; NaN steps (no ink) are left out."""
    steps = np.diff(track_centres(videos), axis=1)  # (N, F-1, 2)
    median = np.nanmedian(steps, axis=1, keepdims=True)
    at_joints = steps[:, [joint - 1 for joint in joints]]
    return float(np.nanmean(np.linalg.norm(at_joints - median, axis=-1)))


def joint_pixel_ratio(videos: np.ndarray, joints: list) -> float:
    """Mean absolute pixel change between the two frames at each joint over that between neighbouring frames
    elsewhere: 1 is a seamless joint, more is a visible cut."""
    steps = np.abs(np.diff(videos, axis=1)).mean(axis=(2, 3, 4))  # (N, F-1)
    at_joints = [joint - 1 for joint in joints]
    inside = [i for i in range(steps.shape[1]) if i not in at_joints]
    return float(steps[:, at_joints].mean() / steps[:, inside].mean())


def temporal_comparison(pipe, args, with_baseline: bool = True) -> tuple:
    frames = pipe.unet.config.num_frames
    resolution = pipe.unet.unet.config.sample_size * pipe.vae_scale_factor
    _, captions, attributes = moving_digits_arrays("test", args.num_videos, args.seed, frames, resolution)
    size = resolution // pipe.vae_scale_factor
    latents = torch.randn((len(captions), pipe.unet.unet.config.in_channels, frames, size, size),
                          generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    results, samples = {}, {}
    for label, disabled in (("video", False), ("image per frame", True))[: 2 if with_baseline else 1]:
        with pipe.unet.temporal_layers_disabled() if disabled else contextlib.nullcontext():
            videos = generate(pipe, captions, latents, args)
        results[label] = scores_of(videos, attributes)
        samples[label] = videos[:3]
        print(f"  {label}: {results[label]}")
    return results, samples, captions[:3]


def extension_comparison(pipe, args) -> tuple:
    frames = pipe.unet.config.num_frames
    resolution = pipe.unet.unet.config.sample_size * pipe.vae_scale_factor
    # frames beyond the generator's window: the captions' attributes come from a moving-digits video of the window
    _, captions, attributes = moving_digits_arrays("test", args.num_extended, args.seed + 1, frames, resolution)
    overlap = 2
    joints = list(range(frames, args.extended_frames, frames - overlap))  # first new frame of each later window
    key_joints = list(range(frames - 1, args.extended_frames, frames - 1))  # the key frames after the first
    methods = [("replacement", "extend", {"conditioning_mode": "replacement"}, joints)]
    methods += [(f"reconstruction guidance w_r={scale:g}", "extend", {"conditioning_mode": "reconstruction_guidance",
                 "reconstruction_guidance_scale": scale}, joints) for scale in args.reconstruction_scales]  # fmt: skip
    methods.append(("key frames + interpolation (w_r=2)", "key_frames", {}, key_joints))
    results, samples = {}, {}
    for label, method, options, method_joints in methods:
        # all captions in one batch, the same generator seed for every method
        videos = pipe.generate_long_video(list(captions), args.extended_frames, method=method, overlap=overlap,
                                          generator=torch.Generator().manual_seed(args.seed),
                                          guidance_scale=args.guidance_scale,
                                          num_inference_steps=args.num_inference_steps, **options)  # fmt: skip
        results[label] = {**scores_of(videos, attributes), "joint_jump_px": joint_jump(videos, method_joints),
                          "joint_pixel_ratio": joint_pixel_ratio(videos, method_joints)}  # fmt: skip
        samples[label] = videos[:1]
        print(f"  {label}: {results[label]}")
    return results, samples, captions[0], joints


def joint_training_comparison(args) -> dict:
    """The held-out metrics `training/train_video_ldm.py` measured at the end of each run (the same
    `evaluate_videos` on held-out captions, guidance 4, 25 DDIM steps), read from the runs' `train_metrics.json`."""
    results = {}
    for label, folder in (("video only", args.video_only_model), ("joint image/video", args.joint_model)):
        if folder is None:
            return {}
        with open(Path(folder) / "train_metrics.json") as file:
            recorded = json.load(file)
        results[label] = {name: recorded[f"video_{name}"] for name in METRICS}
        # the adapted image model alone (temporal layers off): what joint training is meant to preserve
        for name in ("adherence", "frame_frechet_distance"):
            results[label][f"image_model_{name}"] = recorded[f"image_per_frame_{name}"]
        print(f"  {label}: {results[label]}")
    return results


def figure(temporal: dict, extension: dict, joint: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Temporal layers on vs off (8 frames)", temporal, ("direction_accuracy", "identity_consistency", "adherence"))]  # fmt: skip
    panels.append(("Extension to longer videos", extension, ("direction_accuracy", "identity_consistency")))
    if joint:
        panels.append(("Joint image/video vs video-only training", joint, ("direction_accuracy", "identity_consistency", "adherence")))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.2 * (len(panels) + 1), 4.2))
    for axis, (title, results, metrics) in zip(axes, panels):
        width = 0.8 / len(results)
        for offset, (label, values) in enumerate(results.items()):
            positions = np.arange(len(metrics)) + offset * width
            bars = axis.bar(positions, [values[m] for m in metrics], width, label=label)
            axis.bar_label(bars, fmt="%.2f", fontsize=7)
        axis.set_xticks(np.arange(len(metrics)) + width * (len(results) - 1) / 2)
        axis.set_xticklabels([m.replace("_", "\n") for m in metrics], fontsize=8)
        axis.set_ylim(0, 1.1)
        axis.axhline(0.25, color="gray", linestyle=":", linewidth=1)  # direction right by chance (1 of 4)
        axis.set_ylabel("fraction (higher is better)")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7, loc="lower right")
    axes[0].text(0.35, 0.27, "direction by chance", fontsize=7, color="gray", transform=axes[0].get_yaxis_transform())
    axis = axes[-1]
    labels = list(extension)
    axis.bar(range(len(labels)), [extension[label]["joint_pixel_ratio"] for label in labels], color="tab:gray")
    axis.axhline(1.0, color="gray", linestyle=":", linewidth=1)  # a seamless joint
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(
        [
            label.replace("reconstruction guidance ", "recon.\n").replace(
                "key frames + interpolation ", "key frames\n"
            )
            for label in labels
        ],
        fontsize=8,
    )
    axis.set_ylabel("pixel change at a joint / between other frames")
    axis.set_title("Extension: how visible the joints are (1 = seamless)", fontsize=9)
    fig.suptitle("Video LDM in miniature: temporal layers on the shipped digits text-to-image model", fontsize=11)
    fig.tight_layout()
    atomic_save(path, lambda temporary: fig.savefig(temporary, dpi=110))
    plt.close(fig)


def table(results: dict, metrics) -> str:
    lines = ["| | " + " | ".join(m.replace("_", " ") for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, values in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{values[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def verdict(temporal: dict, extension: dict, joint: dict) -> str:
    """One line per claim, stating from the measurements whether it held."""
    video, image = temporal["video"], temporal["image per frame"]
    lines = []
    moved = video["direction_accuracy"] >= 0.25 + 0.15 and video["direction_accuracy"] > image["direction_accuracy"]
    lines.append(
        f"- **Temporal layers make the image model a text-controlled video model**: "
        f"{'held' if moved else 'not held'}. Direction accuracy {video['direction_accuracy']:.2f} with the temporal "
        f"layers, {image['direction_accuracy']:.2f} frame by frame; a digit moving in a random one of the four "
        "directions scores 0.25."
    )
    steadier = video["identity_consistency"] > image["identity_consistency"]
    lines.append(
        f"- **Temporal layers keep the digit's identity across frames**: {'held' if steadier else 'not held'}. "
        f"Identity consistency {video['identity_consistency']:.3f} against {image['identity_consistency']:.3f} for "
        f"independent frames; per-frame adherence {video['adherence']:.3f} against {image['adherence']:.3f} and frame "
        f"Frechet distance {video['frame_frechet_distance']:.1f} against {image['frame_frechet_distance']:.1f}."
    )
    guided = {label: values for label, values in extension.items() if label.startswith("reconstruction")}
    # the scale whose joints look most like the other frame changes (below 1 a window copies its known frames)
    best_label = min(guided, key=lambda label: abs(guided[label]["joint_pixel_ratio"] - 1.0))
    best, plain = guided[best_label], extension["replacement"]
    smoother = abs(best["joint_pixel_ratio"] - 1.0) < abs(plain["joint_pixel_ratio"] - 1.0)
    lines.append(
        f"- **Reconstruction guidance makes joints less visible than replacement**: {'held' if smoother else 'not held'}"
        f" at the scale closest to a seamless joint ({best_label}: joint pixel ratio {best['joint_pixel_ratio']:.2f} against "
        f"{plain['joint_pixel_ratio']:.2f}, identity consistency {best['identity_consistency']:.3f} against "
        f"{plain['identity_consistency']:.3f}); every scale is in the table."
    )
    if joint:
        only, mixed = joint["video only"], joint["joint image/video"]
        better = (
            mixed["frame_frechet_distance"] < only["frame_frechet_distance"]
            and mixed["adherence"] >= only["adherence"]
        )
        lines.append(
            f"- **Joint image/video training keeps frames better than video-only training**: "
            f"{'held' if better else 'not held'} (frame Frechet distance {mixed['frame_frechet_distance']:.1f} against "
            f"{only['frame_frechet_distance']:.1f}, adherence {mixed['adherence']:.3f} against {only['adherence']:.3f}; "
            f"the adapted image model alone: adherence {mixed['image_model_adherence']:.3f} against "
            f"{only['image_model_adherence']:.3f})."
        )
    return "\n".join(lines)


def write_report(output_dir: Path, args, results: dict, command: str, elapsed: float) -> None:
    temporal, extension, joint, joints = (
        results[key] for key in ("temporal", "extension", "joint_training", "joints")
    )
    text = [f"# Video LDM in miniature\n\nCommand: `{command}` ({elapsed / 60:.1f} min on {args.device}).\n",
            f"![figure]({args.name}.png)\n\n![samples]({args.name}_samples.png)\n",
            f"## 1. Temporal layers on vs off\n\n{args.num_videos} held-out captions, 8 frames, guidance "
            f"{args.guidance_scale:g}, {args.num_inference_steps} DDIM steps, the same noise for both rows.\n",
            table(temporal, (*METRICS, "colour_consistency")),
            f"\n## 2. Extension to {args.extended_frames} frames\n\n{args.num_extended} held-out captions; windows "
            f"of 8 with the last 2 frames known; joints at frames {joints}. Joint jump: how far the digit's step at a "
            "joint is from its median step, in pixels. Joint pixel ratio: the mean pixel change between the two frames "
            "at a joint over that between other neighbouring frames; 1 is a seamless joint, above 1 a visible cut, "
            "below 1 a window that barely moves on from its known frames.\n",
            table(extension, ("direction_accuracy", "identity_consistency", "colour_consistency", "adherence", "joint_jump_px",
                              "joint_pixel_ratio"))]  # fmt: skip
    if joint:
        text += [
            "\n## 3. Joint image/video training vs video only\n\nThe held-out metrics each run measured at its end "
            "(`train_metrics.json`: 100 held-out captions, guidance 4, 25 DDIM steps).\n",
            table(joint, (*METRICS, "image_model_adherence", "image_model_frame_frechet_distance")),
        ]
    text.append("\n## Verdict (computed from the numbers above)\n\n" + verdict(temporal, extension, joint) + "\n")
    with atomic_write(output_dir / f"{args.name}.md") as file:
        file.write("\n".join(text))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.rewrite_report:
        saved = json.loads((output_dir / f"{args.name}.json").read_text())
        joint = joint_training_comparison(args) or saved["joint_training"]
        figure(saved["temporal"], saved["extension"], joint, output_dir / f"{args.name}.png")
        saved["joint_training"] = joint
        with atomic_write(output_dir / f"{args.name}.json") as file:
            json.dump(saved, file, indent=2)
        write_report(output_dir, args, saved, saved["settings"].get("command", ""), saved["run_time_s"])
        return saved
    pipe = load_pipeline(args.model, args.device)
    print("1. temporal layers on vs off")
    temporal, temporal_samples, sample_captions = temporal_comparison(pipe, args)
    print("2. extension")
    extension, extension_samples, extension_caption, joints = extension_comparison(pipe, args)
    print("3. joint image/video training")
    joint = joint_training_comparison(args)
    elapsed = time.perf_counter() - start

    figure(temporal, extension, joint, output_dir / f"{args.name}.png")
    rows = {f"{caption} ({label})": temporal_samples[label][i] for i, caption in enumerate(sample_captions)
            for label in temporal_samples}  # fmt: skip
    rows.update({f"{extension_caption} ({label})": videos[0][: 2 * pipe.unet.config.num_frames]
                 for label, videos in extension_samples.items()})  # fmt: skip
    longest = max(len(video) for video in rows.values())
    padded = [np.concatenate([v, np.ones((longest - len(v), *v.shape[1:]))]) if len(v) < longest else v for v in rows.values()]  # fmt: skip
    grid = labelled_grid(np.concatenate(padded), rows=list(rows), columns=[f"frame {i}" for i in range(longest)],
                         title="Same captions and noise; white: no frame", min_cell=48)  # fmt: skip
    save_grid(grid, output_dir / f"{args.name}_samples.png")

    results = {"temporal": temporal, "extension": extension, "joint_training": joint, "joints": joints,
               "settings": {k: v for k, v in vars(args).items()}, "run_time_s": round(elapsed, 1)}  # fmt: skip
    command = "python " + shlex.join(["scripts/reproduce_video_ldm.py", *(sys.argv[1:] if argv is None else argv)])
    results["settings"]["command"] = command
    with atomic_write(output_dir / f"{args.name}.json") as file:
        json.dump(results, file, indent=2)
    write_report(output_dir, args, results, command, elapsed)
    return results


if __name__ == "__main__":
    main()
