"""Re-measure dynamic CFG on text: does the SD1.5 finding of "Analysis of Classifier-Free Guidance Weight
Schedulers" (Wang et al., TMLR 2024), that increasing guidance schedules (linear, cosine) improve the quality /
prompt-adherence trade-off over static CFG, hold for the shipped text-to-image model of the captioned digits world?

The paper sweeps the guidance scale of Stable Diffusion 1.5 and plots FID against CLIP score. Here the shipped
`digits-text-to-image` pipeline (a tiny Stable-Diffusion-shaped model) draws held-out test captions, and
`storydiff.evaluation.text_adherence` scores the canvases: caption adherence (digit, colour, position and size read
back from each canvas) against the Frechet distance to held-out real canvases in the digit classifier's feature
space. Every point uses the same captions and the same initial noise; DDIM, eta 0.

    python scripts/reproduce_dynamic_cfg_text.py --output_dir docs/results

writes `dynamic_cfg_text.md` (command, run time, table, verdict), `dynamic_cfg_text.png` (the trade-off plot),
`dynamic_cfg_text_samples.png` (a few prompts across schedules and scales), `dynamic_cfg_text.csv` and
`dynamic_cfg_text.json` (raw numbers). The comparison helpers and plot styles are those of the class-conditional
study, scripts/reproduce_dynamic_cfg_digits.py; its page is compared with when its JSON is in the output folder.
"""

import argparse
import csv
import importlib.util
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from storydiff import DynamicCFGStableDiffusionPipeline
from storydiff.atomic_files import atomic_save, atomic_write
from storydiff.checkpoints import checkpoint_path
from storydiff.data.digits import digits_world_arrays
from storydiff.evaluation import load_digit_classifier
from storydiff.evaluation.text_adherence import ATTRIBUTE_NAMES, _digit_features, caption_adherence
from storydiff.metrics import frechet_distance
from storydiff.training.sample_grids import labelled_grid, save_grid


def _load_class_conditional_study():
    """scripts/ is not a package: load the sibling class-conditional study by its path to reuse its helpers."""
    path = Path(__file__).resolve().parent / "reproduce_dynamic_cfg_digits.py"
    spec = importlib.util.spec_from_file_location("reproduce_dynamic_cfg_digits", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class_study = _load_class_conditional_study()
STYLES, INCREASING, DECREASING = class_study.STYLES, class_study.INCREASING, class_study.DECREASING
SCHEDULES = ("static", "linear", "cosine", "invlinear", "clamp-linear")
PAPER_KINDS = ("linear", "cosine")  # the rising schedules the paper recommends for SD1.5
SHIPPED_MODEL = "digits-text-to-image"
# Held-out real canvases the Frechet distance compares with: canvas_frechet_distance's defaults.
REFERENCE_SPLIT, REFERENCE_COUNT, REFERENCE_SEED = "test", 500, 0
ADHERENCE_COLUMNS = ("overall", "exact", *ATTRIBUTE_NAMES)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"pipeline folder (default: the shipped {SHIPPED_MODEL})")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0, 6.0, 8.0])
    parser.add_argument("--clamp", type=float, default=1.0, help="floor c of clamp-linear, in w units")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--num_samples", type=int, default=150, help="held-out test captions per point")
    parser.add_argument("--max_digits", type=int, default=1, help="digits per canvas of the captions and reference")
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for the Frechet distance's spread")
    parser.add_argument("--grid_prompts", type=int, default=2, help="captions shown in the sample grid (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the captions, the initial noise, resampling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output_dir", default="docs/results")
    parser.add_argument("--name", default="dynamic_cfg_text", help="file name stem of the outputs")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the page, plot and CSV from <output_dir>/<name>.json"
    )
    args = parser.parse_args(argv)
    for schedule in args.schedules:
        if schedule not in STYLES:
            parser.error(f"unknown schedule {schedule!r}; choose from {', '.join(STYLES)}")
    if "static" not in args.schedules:
        parser.error("--schedules must include static: every other schedule is compared with it")
    if min(args.guidance_scales) <= 1.0:
        parser.error("--guidance_scales must be > 1 (guidance_scale 1, no guidance, is always included)")
    for flag in ("num_inference_steps", "num_samples", "max_digits", "bootstrap"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.grid_prompts <= args.num_samples:
        parser.error(f"--grid_prompts must be between 0 and --num_samples ({args.num_samples})")
    return args


def adherence_with_errors(images: np.ndarray, attributes: list, classifier) -> dict:
    """`caption_adherence` of the set, plus the standard error of `overall` and `exact` from per-canvas scores
    (canvases are independent draws, so the error of their mean is std / sqrt(n))."""
    scores = caption_adherence(images, attributes, classifier=classifier)
    per_canvas = [
        caption_adherence(images[i : i + 1], attributes[i : i + 1], classifier=classifier) for i in range(len(images))
    ]
    result = {name: float(scores[name]) for name in ADHERENCE_COLUMNS}
    result["count"] = float(scores["count"])
    for name in ("overall", "exact"):
        values = np.array([score[name] for score in per_canvas])
        result[f"{name}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return result


def canvas_features(images: np.ndarray, classifier) -> np.ndarray:
    """The features `canvas_frechet_distance` compares (one row per located digit), kept so that the generated set
    can be resampled without measuring it again."""
    return _digit_features(np.asarray(images, dtype=np.float32), classifier)


def reference_features(resolution: int, max_digits: int, classifier) -> np.ndarray:
    """Features of the held-out real canvases that `canvas_frechet_distance` compares with by default."""
    canvases, _, _ = digits_world_arrays(REFERENCE_SPLIT, REFERENCE_COUNT, REFERENCE_SEED, resolution, max_digits)
    return canvas_features(((canvases + 1.0) / 2.0).permute(0, 2, 3, 1).numpy(), classifier)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python scripts/reproduce_dynamic_cfg_text.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    output_dir = Path(args.output_dir)
    if args.report_only:
        results = json.loads((output_dir / f"{args.name}.json").read_text())
        write_outputs(results, output_dir)
        return results
    run_start = time.perf_counter()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    model = Path(args.model or checkpoint_path(SHIPPED_MODEL))

    pipe = DynamicCFGStableDiffusionPipeline.from_pretrained(model).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digit_classifier(device=args.device)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    _, captions, attributes = digits_world_arrays("test", args.num_samples, args.seed, resolution, args.max_digits)
    unet = pipe.unet.config
    latents = torch.randn(
        (len(captions), unet.in_channels, unet.sample_size, unet.sample_size),
        generator=torch.Generator().manual_seed(args.seed),
    )
    reference = reference_features(resolution, args.max_digits, classifier)
    grid_images = {}

    def evaluate(kind: str, guidance_scale: float) -> dict:
        start = time.perf_counter()
        output = pipe(
            prompt=captions,
            guidance_scale=guidance_scale,
            guidance_schedule=class_study.make_schedule(kind, args.clamp),
            num_inference_steps=args.num_inference_steps,
            latents=latents.clone(),
            output_type="np",
        )
        seconds = time.perf_counter() - start
        grid_images[(kind, guidance_scale)] = output.images[: args.grid_prompts]
        features = canvas_features(output.images, classifier)
        unguided = int((pipe.guidance_scales <= 1.0).sum()) if guidance_scale > 1.0 else args.num_inference_steps
        return {
            "schedule": kind,
            "guidance_scale": guidance_scale,
            **adherence_with_errors(output.images, attributes, classifier),
            "frechet_distance": frechet_distance(features, reference),
            "frechet_std": class_study.bootstrap_std(features, reference, args.bootstrap, args.seed),
            "denoiser_work": (2 * args.num_inference_steps - unguided) / (2 * args.num_inference_steps),
            "seconds": seconds,
        }

    points = [(kind, scale) for scale in args.guidance_scales for kind in args.schedules]
    progress = tqdm(total=len(points) + 1, desc="dynamic CFG on text")
    baseline = evaluate("static", 1.0)  # no guidance: every schedule has w_i = 0 here
    baseline["schedule"] = "none (g = 1)"
    progress.update(1)
    rows = []
    for kind, scale in points:
        rows.append(evaluate(kind, scale))
        progress.set_postfix(schedule=kind, g=scale, adherence=f"{rows[-1]['overall']:.3f}")
        progress.update(1)
    progress.close()

    # The scale of both measures at this sample count: as many real train-split canvases, with their own captions.
    real, real_captions, real_attributes = digits_world_arrays(
        "train", args.num_samples, args.seed, resolution, args.max_digits
    )
    real = ((real + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    real_features = canvas_features(real, classifier)
    real_canvases = {
        **adherence_with_errors(real, real_attributes, classifier),
        "frechet_distance": frechet_distance(real_features, reference),
        "frechet_std": class_study.bootstrap_std(real_features, reference, args.bootstrap, args.seed),
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    if args.grid_prompts:
        save_grid(sample_grid(grid_images, captions, args), output_dir / f"{args.name}_samples.png")
    results = {
        "command": command.strip(),
        "model": model.name,
        "model_description": class_study.describe_checkpoint(model),
        "resolution": resolution,
        "settings": {key: value for key, value in vars(args).items() if key != "report_only"},
        "samples_per_point": len(captions),
        "baseline": baseline,
        "rows": rows,
        "real_canvases": real_canvases,
        "run_seconds": time.perf_counter() - run_start,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    with atomic_write(output_dir / f"{args.name}.json") as handle:
        handle.write(json.dumps(results, indent=1))
    write_outputs(results, output_dir)
    return results


def sample_grid(grid_images: dict, captions: list, args) -> np.ndarray:
    """One block per caption, side by side: rows are schedules, columns guidance scales (g = 1, no guidance,
    first), every cell from the same initial noise; each block is titled with its caption."""
    scales = [1.0, *args.guidance_scales]
    blocks = []
    for index in range(args.grid_prompts):
        images = [
            grid_images[("static", 1.0) if scale == 1.0 else (kind, scale)][index]
            for kind in args.schedules
            for scale in scales
        ]
        columns = [f"g={scale:g}" for scale in scales]
        blocks.append(labelled_grid(images, list(args.schedules), columns, title=f'"{captions[index]}"', min_cell=64))
    height = max(block.shape[0] for block in blocks)
    padded = [np.pad(b, ((0, height - b.shape[0]), (0, 16), (0, 0)), constant_values=255) for b in blocks]
    return np.concatenate(padded, axis=1)


# ---------------------------------------------------------------------------------------------------- the report


def curve(rows: list, baseline: dict, kind: str, adherence: str = "overall") -> list:
    """(adherence, FD) of a schedule's points, g = 1 (shared by all schedules) included."""
    points = [(r[adherence], r["frechet_distance"]) for r in rows if r["schedule"] == kind]
    return points + [(baseline[adherence], baseline["frechet_distance"])]


def compare_at_equal_fd(points: list, static_points: list) -> dict:
    """A schedule's best adherence within an FD budget minus static's, at every FD level both reach: the
    class-conditional study's frontier with the axes swapped (both negated, so that "at least this accurate"
    becomes "at most this FD" and "lowest FD" becomes "highest adherence"). Positive: more adherent at equal FD."""
    swapped = class_study.compare_at_equal_accuracy(
        [(-fd, -adherence) for adherence, fd in points], [(-fd, -adherence) for adherence, fd in static_points]
    )
    return {
        "num_levels": swapped["num_levels"],
        "num_better": swapped["num_better"],  # lower -adherence: higher adherence
        "num_worse": swapped["num_worse"],
        "mean_difference": -swapped["mean_difference"],
    }


def compare_at_same_scale(rows: list, kind: str) -> dict:
    """Mean differences to static at the same g (same mean weight, same cost), over the swept g."""
    static = {row["guidance_scale"]: row for row in rows if row["schedule"] == "static"}
    pairs = [(row, static[row["guidance_scale"]]) for row in rows if row["schedule"] == kind]
    return {
        name: float(np.mean([row[name] - other[name] for row, other in pairs]))
        for name in ("overall", "exact", "frechet_distance")
    }


def class_conditional_summary(output_dir: Path) -> dict:
    """The same comparisons on the class-conditional study's numbers, if its JSON is in the output folder."""
    path = output_dir / "dynamic_cfg_digits.json"
    if not path.is_file():
        return {}
    study = json.loads(path.read_text())
    rows, baseline = study["rows"], study["baseline"]
    kinds = [kind for kind in PAPER_KINDS if any(row["schedule"] == kind for row in rows)]
    if not kinds or not any(row["schedule"] == "static" for row in rows):
        return {}
    curves = {
        kind: class_study.compare_at_equal_accuracy(
            curve(rows, baseline, kind, "class_accuracy"), curve(rows, baseline, "static", "class_accuracy")
        )
        for kind in kinds
    }
    same_scale = [class_study.compare_at_equal_guidance(rows, kind) for kind in kinds]
    return {
        "kinds": kinds,
        "equal_accuracy_fd": float(np.mean([curves[kind]["mean_difference"] for kind in kinds])),
        "same_g_accuracy": float(np.mean([item["accuracy_difference"] for item in same_scale])),
        "same_g_fd": float(np.mean([item["fd_difference"] for item in same_scale])),
        "fd_noise": float(np.median([row["frechet_std"] for row in rows])),
    }


def plot(path: Path, results: dict, schedules: list) -> None:
    """FD against caption adherence, one line per schedule from g = 1 upwards, every point labelled with its g;
    left: overall adherence (mean of the four attributes), right: exact (every attribute right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline, rows, real = results["baseline"], results["rows"], results["real_canvases"]
    figure, axes = plt.subplots(1, 2, figsize=(13, 5.4))
    for axis, adherence, name in zip(axes, ("overall", "exact"), ("overall caption adherence", "exact captions")):
        for kind in schedules:
            colour, marker, line = STYLES[kind]
            points = [(baseline[adherence], baseline["frechet_distance"], 1.0)]
            points += [
                (r[adherence], r["frechet_distance"], r["guidance_scale"]) for r in rows if r["schedule"] == kind
            ]
            axis.plot([p[0] for p in points], [p[1] for p in points], color=colour, marker=marker, ls=line, label=kind)
            for x, y, scale in points[1:]:
                axis.annotate(
                    f"{scale:g}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7, color=colour
                )
        axis.annotate("g=1", (baseline[adherence], baseline["frechet_distance"]), textcoords="offset points",
                      xytext=(4, -10), fontsize=7)  # fmt: skip
        axis.axhline(real["frechet_distance"], color="grey", lw=0.8, ls=":")
        axis.axvline(real[adherence], color="grey", lw=0.8, ls=":")
        axis.annotate("real canvases", (real[adherence], real["frechet_distance"]), textcoords="offset points",
                      xytext=(-70, 5), fontsize=7, color="grey")  # fmt: skip
        axis.set_xlabel(f"{name} (higher: follows the caption better)")
        axis.set_ylabel("canvas Frechet distance to held-out real canvases (lower: better)")
        axis.set_yscale("log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=8, title="schedule (labels: g)", title_fontsize=8)
    settings = results["settings"]
    figure.suptitle(
        f"Dynamic CFG on the captioned digits world: {results['model']}, {results['samples_per_point']} held-out "
        f"captions per point, {settings['num_inference_steps']} DDIM steps, same noise; dotted: real canvases",
        fontsize=10,
    )
    figure.tight_layout()
    atomic_save(path, lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


def write_outputs(results: dict, output_dir: Path) -> None:
    """The plot, the CSV and the markdown page, from the measured numbers alone."""
    args = argparse.Namespace(**results["settings"])
    png_path = output_dir / f"{args.name}.png"
    plot(png_path, results, args.schedules)
    csv_path = output_dir / f"{args.name}.csv"
    fields = list(results["baseline"])
    with atomic_write(csv_path) as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows([results["baseline"], *results["rows"]])
    markdown_path = output_dir / f"{args.name}.md"
    with atomic_write(markdown_path) as handle:
        handle.write(report(args, results, class_conditional_summary(output_dir)))
    print(f"wrote {markdown_path}, {png_path}, {csv_path}")


def report(args, results: dict, class_conditional: dict) -> str:
    baseline, rows, real = results["baseline"], results["rows"], results["real_canvases"]
    count = results["samples_per_point"]
    scales = ", ".join(f"{g:g}" for g in args.guidance_scales)
    minutes, seconds = divmod(results["run_seconds"], 60)
    lines = [
        "# Dynamic CFG on text: the captioned digits world",
        "",
        "On Stable Diffusion 1.5 the paper (Wang et al., *Analysis of Classifier-Free Guidance Weight Schedulers*,",
        "TMLR 2024) finds that monotonically increasing guidance schedules (linear, cosine) give a better FID / CLIP",
        "score trade-off than static CFG. This page repeats that sweep in miniature on text: the shipped",
        "Stable-Diffusion-shaped model of the captioned digits world, its prompts the held-out test captions. It is",
        "generated by the script below (numbers are measured, not edited); the class-conditional counterpart is",
        "[Dynamic CFG on digits](dynamic_cfg_digits.md).",
        "",
        "## Setup",
        "",
        f"- Model: `{results['model']}`{results['model_description']}, {results['resolution']}x"
        f"{results['resolution']} canvases, `DynamicCFGStableDiffusionPipeline` with DDIM, {args.num_inference_steps} "
        "steps, eta 0.",
        f'- Prompts: {count} captions of the held-out test split (`digits_world_arrays("test", {count}, '
        f"seed={args.seed})`, up to {args.max_digits} digit(s) per canvas), the same captions and the same initial "
        f"noise (seed {args.seed}) at every point.",
        f"- Guidance scales g (diffusers convention, g = 1 + w): {scales}, plus g = 1 (no guidance, shared by every "
        "schedule). The area-normalised schedules have the same mean weight as static at each g; clamp-linear "
        f"floors linear at c = {args.clamp:g}.",
        "- Caption adherence (`storydiff.evaluation.text_adherence.caption_adherence`): digit, colour, position and "
        "size read back from each canvas; `overall` is their mean, `exact` the fraction of canvases with every "
        "attribute right. The +- is the standard error over canvases.",
        "- Frechet distance (FD, `canvas_frechet_distance`): digit-classifier features of the located digits against "
        f"{REFERENCE_COUNT} held-out real canvases. The +- is the standard deviation over {args.bootstrap} bootstrap "
        "resamples of the generated set.",
        f"- Reference: {count} real train-split canvases with their own captions score overall adherence "
        f"{real['overall']:.3f}, exact {real['exact']:.3f} (the measurer's ceiling) and FD "
        f"{real['frechet_distance']:.2f} +- {real['frechet_std']:.2f} (the floor of FD at this sample count).",
        f"- Run time: {int(minutes)} min {seconds:.0f} s for the whole run on a {results['cpu_count']}-core CPU "
        f"({results['torch_threads']} torch threads, device `{args.device}`).",
        "",
        "Command:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"![FD against caption adherence per schedule, every point labelled with its g]({args.name}.png)",
        "",
        "## Results",
        "",
        "| schedule | g | overall | exact | digit | colour | position | size | FD | denoiser work | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ordered = sorted(rows, key=lambda r: (args.schedules.index(r["schedule"]), r["guidance_scale"]))
    for row in [baseline, *ordered]:
        lines.append(
            f"| {row['schedule']} | {row['guidance_scale']:g} | {row['overall']:.3f} +- {row['overall_se']:.3f} | "
            f"{row['exact']:.3f} +- {row['exact_se']:.3f} | "
            + " | ".join(f"{row[name]:.3f}" for name in ATTRIBUTE_NAMES)
            + f" | {row['frechet_distance']:.1f} +- {row['frechet_std']:.1f} | {row['denoiser_work']:.3f} | "
            f"{row['seconds']:.1f} |"
        )

    comparisons = {}
    for kind in args.schedules:
        if kind == "static":
            continue
        comparisons[kind] = {
            "equal_adherence": class_study.compare_at_equal_accuracy(
                curve(rows, baseline, kind), curve(rows, baseline, "static")
            ),
            "equal_fd": compare_at_equal_fd(curve(rows, baseline, kind), curve(rows, baseline, "static")),
            "same_scale": compare_at_same_scale(rows, kind),
        }
    lines += [
        "",
        "## Comparison with static",
        "",
        "Too much guidance can lower adherence again, so each schedule is summarised by its trade-off frontier, as",
        "in the class-conditional study: the lowest FD among its points (g = 1 included) with at least a given",
        "overall adherence, compared with static's at every adherence level both reach (negative: the schedule",
        "reaches that adherence with a lower FD); and the other way round, the highest adherence within a given FD",
        "(positive: more adherent at that FD). The last three columns compare with static at the same g (same mean",
        "weight, same cost), averaged over the swept g.",
        "",
        "| schedule | highest overall | equal adherence: FD difference (lower / higher at levels) "
        "| equal FD: adherence difference (higher / lower at levels) | same g: overall | same g: exact "
        "| same g: FD |",
        "|---|---|---|---|---|---|---|",
    ]
    static_highest = max(adherence for adherence, _ in curve(rows, baseline, "static"))
    lines.append(f"| static | {static_highest:.3f} | - | - | - | - | - |")
    for kind, comparison in comparisons.items():
        adherence, fd, same = comparison["equal_adherence"], comparison["equal_fd"], comparison["same_scale"]
        lines.append(
            f"| {kind} | {adherence['max_accuracy']:.3f} | {adherence['mean_difference']:+.1f} "
            f"({adherence['num_better']} / {adherence['num_worse']} of {adherence['num_levels']}) | "
            f"{fd['mean_difference']:+.3f} ({fd['num_better']} / {fd['num_worse']} of {fd['num_levels']}) | "
            f"{same['overall']:+.3f} | {same['exact']:+.3f} | {same['frechet_distance']:+.1f} |"
        )
    if args.grid_prompts:
        lines += [
            "",
            "## Samples",
            "",
            f"The first {args.grid_prompts} prompts of the sweep, every schedule and scale from the same noise:",
            "",
            f"![the first prompts across schedules (rows) and guidance scales (columns)]({args.name}_samples.png)",
        ]
    lines += ["", "## Verdict", "", *verdict(args, results, comparisons, class_conditional), ""]
    return "\n".join(lines)


def verdict(args, results: dict, comparisons: dict, class_conditional: dict) -> list:
    """Plain statements read off the comparison table, with the sampling noise as the yardstick."""
    rows, baseline = results["rows"], results["baseline"]
    fd_noise = float(np.median([row["frechet_std"] for row in rows]))
    adherence_noise = float(np.median([row["overall_se"] for row in rows]))
    static_rows = [row for row in rows if row["schedule"] == "static"]
    best_static = max(static_rows, key=lambda row: row["overall"])
    statements = [
        f"Yardsticks: one FD value varies by about {fd_noise:.1f} (median bootstrap spread) and one overall "
        f"adherence by about {adherence_noise:.3f} (median standard error); smaller differences are not meaningful "
        f"at {results['samples_per_point']} captions per point. Without guidance the model reaches overall "
        f"{baseline['overall']:.3f} at FD {baseline['frechet_distance']:.1f}; static CFG peaks at overall "
        f"{best_static['overall']:.3f} (g = {best_static['guidance_scale']:g}, FD {best_static['frechet_distance']:.1f}).",
        "",
    ]

    def size(value: float, noise: float, better_if_negative: bool) -> str:
        if abs(value) < noise:
            return "within the noise"
        return "better" if (value < 0) == better_if_negative else "worse"

    for kind, comparison in comparisons.items():
        adherence, fd, same = comparison["equal_adherence"], comparison["equal_fd"], comparison["same_scale"]
        statements.append(
            f"- {kind}: at equal adherence {adherence['mean_difference']:+.1f} FD "
            f"({size(adherence['mean_difference'], fd_noise, True)}); at equal FD {fd['mean_difference']:+.3f} "
            f"overall adherence ({size(fd['mean_difference'], adherence_noise, False)}); at the same g "
            f"{same['overall']:+.3f} overall, {same['exact']:+.3f} exact and {same['frechet_distance']:+.1f} FD; "
            f"highest overall {adherence['max_accuracy']:.3f} (static {max(r['overall'] for r in static_rows):.3f})."
        )

    kinds = [kind for kind in PAPER_KINDS if kind in comparisons]
    if kinds:
        names = " and ".join(kinds)
        equal_adherence = float(np.mean([comparisons[k]["equal_adherence"]["mean_difference"] for k in kinds]))
        equal_fd = float(np.mean([comparisons[k]["equal_fd"]["mean_difference"] for k in kinds]))
        same_overall = float(np.mean([comparisons[k]["same_scale"]["overall"] for k in kinds]))
        same_fd = float(np.mean([comparisons[k]["same_scale"]["frechet_distance"] for k in kinds]))
        trade_off_better = equal_adherence < -fd_noise or equal_fd > adherence_noise
        trade_off_worse = equal_adherence > fd_noise or equal_fd < -adherence_noise
        if trade_off_better and not trade_off_worse:
            answer = f"yes: {names} improve the trade-off, as the paper reports for SD1.5"
        elif trade_off_worse and not trade_off_better:
            answer = f"no: {names} have a worse trade-off than static, the opposite of the paper's SD1.5 finding"
        else:
            answer = f"not measurably: {names} and static lie on the same frontier within the sampling noise"
        statements += [
            "",
            f"**Do rising schedules improve the trade-off, as on SD1.5?** At equal adherence, {answer} ({names} "
            f"average {equal_adherence:+.1f} FD at equal overall adherence and {equal_fd:+.3f} overall adherence at "
            f"equal FD). At the same g (same mean weight, same cost) they average {same_overall:+.3f} overall "
            f"adherence and {same_fd:+.1f} FD against static.",
        ]
        decreasing = [kind for kind in DECREASING if kind in comparisons]
        if decreasing:
            loss_overall = float(np.mean([comparisons[k]["same_scale"]["overall"] for k in decreasing]))
            loss_fd = float(np.mean([comparisons[k]["same_scale"]["frechet_distance"] for k in decreasing]))
            statements.append(
                f"The decreasing {' and '.join(decreasing)} average {loss_overall:+.3f} overall adherence and "
                f"{loss_fd:+.1f} FD against static at the same g."
            )
        if class_conditional:
            cc = class_conditional
            statements += [
                "",
                f"**Against the class-conditional study** ([Dynamic CFG on digits](dynamic_cfg_digits.md), FD noise "
                f"{cc['fd_noise']:.1f} there): {' and '.join(cc['kinds'])} averaged {cc['equal_accuracy_fd']:+.2f} FD "
                f"at equal class accuracy and, at the same g, {cc['same_g_accuracy']:+.3f} class accuracy and "
                f"{cc['same_g_fd']:+.1f} FD against static. Here, on text: {equal_adherence:+.1f} FD at equal "
                f"adherence; {same_overall:+.3f} adherence and {same_fd:+.1f} FD at the same g.",
            ]
    return statements


if __name__ == "__main__":
    main()
