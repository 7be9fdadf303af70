"""Reproduce, in miniature, the class-conditional finding of "Analysis of Classifier-Free Guidance Weight
Schedulers" (Wang et al., TMLR 2024): do increasing guidance schedules (linear, cosine) beat static CFG on the
quality / adherence trade-off?

The paper sweeps the guidance weight on CIFAR-10 and plots FID against Inception Score. Here the shipped
class-conditional digits pipeline is swept instead, and scored with the project's digit classifier: class accuracy
(adherence) against the Frechet distance in the classifier's feature space to the held-out test digits (quality and
diversity). Every point starts from the same initial noise; seeds are fixed.

    python scripts/reproduce_dynamic_cfg_digits.py --output_dir docs/results

writes `dynamic_cfg_digits.md` (table, command, conclusion), `dynamic_cfg_digits.png` (the plot) and
`dynamic_cfg_digits.csv` (raw numbers).
"""

import argparse
import csv
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from storydiff.checkpoints import digits_pipeline_path
from storydiff.custom_pipelines.class_conditional import ClassConditionalPipeline
from storydiff.evaluation import balanced_real_digits, classifier_features, load_digit_classifier, real_digit_images
from storydiff.metrics import frechet_distance
from storydiff.schedulers.guidance_schedule import GuidanceSchedule

SCHEDULES = ("static", "linear", "cosine", "invlinear", "sine", "v-shape", "lambda-shape", "clamp-linear")
INCREASING, DECREASING = ("linear", "cosine", "clamp-linear"), ("invlinear", "sine")
STYLES = {
    "static": ("black", "o", "-"),
    "linear": ("tab:red", "^", "-"),
    "cosine": ("tab:orange", "v", "-"),
    "clamp-linear": ("tab:brown", "P", "-"),
    "invlinear": ("tab:blue", "<", "--"),
    "sine": ("tab:cyan", ">", "--"),
    "v-shape": ("tab:green", "s", ":"),
    "lambda-shape": ("tab:purple", "D", ":"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="pipeline folder (default: the shipped digits pipeline)")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[1.25, 1.5, 2.0, 2.5, 3.0, 4.0])
    parser.add_argument("--clamp", type=float, default=1.0, help="floor c of clamp-linear, in w units")
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--samples_per_class", type=int, default=10)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples for the Frechet distance's spread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--num_threads", type=int, default=1, help="torch CPU threads; 1 is fastest for these tiny convolutions"
    )
    parser.add_argument("--output_dir", default="docs/results")
    parser.add_argument("--name", default="dynamic_cfg_digits", help="file name stem of the outputs")
    parser.add_argument(
        "--report_only", action="store_true", help="rewrite the page and plot from <output_dir>/<name>.json"
    )
    args = parser.parse_args(argv)
    for schedule in args.schedules:
        if schedule not in STYLES:
            parser.error(f"unknown schedule {schedule!r}; choose from {', '.join(STYLES)}")
    if min(args.guidance_scales) <= 1.0:
        parser.error("--guidance_scales must be > 1 (guidance_scale 1, no guidance, is always included)")
    return args


def make_schedule(kind: str, clamp: float) -> GuidanceSchedule:
    return GuidanceSchedule(kind, clamp=clamp) if kind.startswith("clamp-") else GuidanceSchedule(kind)


def bootstrap_std(features: np.ndarray, reference: np.ndarray, resamples: int, seed: int) -> float:
    """Spread of the Frechet distance when the generated set is resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [
        frechet_distance(features[rng.integers(0, len(features), len(features))], reference) for _ in range(resamples)
    ]
    return float(np.std(values))


def best_fd_at_accuracy(curve: list, target: float) -> float:
    """The lowest FD among a schedule's points that are at least `target` accurate (its trade-off frontier)."""
    return min(fd for accuracy, fd in curve if accuracy >= target - 1e-9)


def compare_at_equal_accuracy(curve: list, static_curve: list) -> dict:
    """A schedule's frontier minus static's, at every accuracy level both reach.

    Guidance that is too strong lowers accuracy again, so FD is not a function of accuracy and points cannot be
    interpolated; the frontier ("the best FD while being at least this accurate") is monotone and compares what
    each schedule can achieve. The levels are the accuracies the two schedules reach, up to the lower maximum.
    """
    reach = min(max(accuracy for accuracy, _ in curve), max(accuracy for accuracy, _ in static_curve))
    levels = sorted({accuracy for accuracy, _ in curve + static_curve if accuracy <= reach})
    differences = [best_fd_at_accuracy(curve, level) - best_fd_at_accuracy(static_curve, level) for level in levels]
    return {
        "num_levels": len(levels),
        "num_better": sum(difference < 0 for difference in differences),
        "num_worse": sum(difference > 0 for difference in differences),
        "mean_difference": float(np.mean(differences)),
        "min_difference": float(min(differences)),
        "max_difference": float(max(differences)),
        "max_accuracy": max(accuracy for accuracy, _ in curve),
    }


def compare_at_equal_guidance(rows: list, kind: str) -> dict:
    """Mean accuracy and FD differences to static at the same guidance scale (same mean weight, same cost)."""
    static = {row["guidance_scale"]: row for row in rows if row["schedule"] == "static"}
    pairs = [(row, static[row["guidance_scale"]]) for row in rows if row["schedule"] == kind]
    pairs = [(row, other) for row, other in pairs if other is not None]
    return {
        "accuracy_difference": float(
            np.mean([row["class_accuracy"] - other["class_accuracy"] for row, other in pairs])
        ),
        "fd_difference": float(np.mean([row["frechet_distance"] - other["frechet_distance"] for row, other in pairs])),
    }


def plot(path: Path, rows: list, baseline: dict, schedules: list, title: str) -> None:
    """FD against class accuracy, one line per schedule from g = 1 upwards: the whole sweep on the left, and on the
    right a close-up of the accurate region, where the schedules' trade-offs are compared."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for kind in schedules:
        points = [(baseline["class_accuracy"], baseline["frechet_distance"], 1.0)]
        points += [
            (r["class_accuracy"], r["frechet_distance"], r["guidance_scale"]) for r in rows if r["schedule"] == kind
        ]
        curves[kind] = points
    low = baseline["class_accuracy"] - 0.03
    close = [fd for points in curves.values() for accuracy, fd, _ in points if accuracy >= low]

    figure, axes = plt.subplots(1, 2, figsize=(12.5, 5.2))
    for axis, zoom in zip(axes, (False, True)):
        for kind, points in curves.items():
            colour, marker, line = STYLES[kind]
            axis.plot(
                [p[0] for p in points], [p[1] for p in points], color=colour, marker=marker, linestyle=line, label=kind
            )
            if kind == "static":
                for accuracy, distance, scale in points:
                    if not zoom or accuracy >= low:
                        axis.annotate(
                            f"g={scale:g}", (accuracy, distance), textcoords="offset points", xytext=(4, 4), fontsize=7
                        )
        axis.scatter(
            [baseline["class_accuracy"]], [baseline["frechet_distance"]], s=90, facecolors="none", edgecolors="black"
        )
        axis.set_xlabel("class accuracy of generated digits (higher: more adherent)")
        axis.set_ylabel("digit Frechet distance to test split (lower: better)")
        axis.grid(alpha=0.3)
        if zoom:
            axis.set_xlim(low, 1.005)
            axis.set_ylim(0, 1.08 * max(close))
            axis.set_title(f"close-up: accuracy >= {low:.2f}", fontsize=10)
        else:
            axis.set_title(title, fontsize=10)
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python scripts/reproduce_dynamic_cfg_digits.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    output_dir = Path(args.output_dir)
    if args.report_only:
        results = json.loads((output_dir / f"{args.name}.json").read_text())
        write_outputs(results, output_dir)
        return results
    torch.set_num_threads(args.num_threads)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(args.checkpoint or digits_pipeline_path())

    pipe = ClassConditionalPipeline.from_pretrained(checkpoint).to(args.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digit_classifier(device=args.device)
    num_classes = pipe.config.num_classes
    labels = np.repeat(np.arange(num_classes), args.samples_per_class)
    unet = pipe.unet.config
    latents = torch.randn(
        (len(labels), unet.in_channels, unet.sample_size, unet.sample_size),
        generator=torch.Generator().manual_seed(args.seed),
    )
    test_features = classifier_features(real_digit_images("test", classifier.config.sample_size), classifier)

    def evaluate(kind: str, guidance_scale: float) -> dict:
        start = time.perf_counter()
        output = pipe(
            class_labels=list(range(num_classes)),
            num_images_per_class=args.samples_per_class,
            guidance_scale=guidance_scale,
            guidance_schedule=make_schedule(kind, args.clamp),
            num_inference_steps=args.num_inference_steps,
            latents=latents.clone(),
            output_type="np",
        )
        seconds = time.perf_counter() - start
        features = classifier_features(output.images, classifier)
        with torch.no_grad():
            inputs = torch.from_numpy(features).float().to(classifier.device)
            predictions = classifier.head(inputs).argmax(1).cpu().numpy()
        unguided = sum(scale <= 1.0 for scale in output.guidance_scales)
        return {
            "schedule": kind,
            "guidance_scale": guidance_scale,
            "class_accuracy": float((predictions == labels).mean()),
            "frechet_distance": frechet_distance(features, test_features),
            "frechet_std": bootstrap_std(features, test_features, args.bootstrap, args.seed),
            "denoiser_work": (2 * args.num_inference_steps - unguided) / (2 * args.num_inference_steps),
            "seconds": seconds,
        }

    points = [(kind, scale) for scale in args.guidance_scales for kind in args.schedules]
    progress = tqdm(total=len(points) + 1, desc="dynamic CFG sweep")
    baseline = evaluate("static", 1.0)  # no guidance: every schedule has w_i = 0 here
    baseline["schedule"] = "none (g = 1)"
    progress.update(1)
    rows = []
    for kind, scale in points:
        rows.append(evaluate(kind, scale))
        progress.set_postfix(schedule=kind, g=scale, acc=f"{rows[-1]['class_accuracy']:.2f}")
        progress.update(1)
    progress.close()

    # Reference: real train digits, as many as each point generates and class-balanced like them.
    real_images, _ = balanced_real_digits("train", args.samples_per_class, classifier.config.sample_size, args.seed)
    real_features = classifier_features(real_images, classifier)
    reference = {
        "frechet_distance": frechet_distance(real_features, test_features),
        "frechet_std": bootstrap_std(real_features, test_features, args.bootstrap, args.seed),
    }

    results = {
        "command": command.strip(),
        "checkpoint": checkpoint.name,
        "checkpoint_description": describe_checkpoint(checkpoint),
        "settings": {key: value for key, value in vars(args).items() if key != "report_only"},
        "samples_per_point": len(labels),
        "baseline": baseline,
        "rows": rows,
        "reference": reference,
    }
    (output_dir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    write_outputs(results, output_dir)
    return results


def write_outputs(results: dict, output_dir: Path) -> None:
    """The plot, the CSV and the markdown page, from the measured numbers alone."""
    args = argparse.Namespace(**results["settings"])
    baseline, rows, reference = results["baseline"], results["rows"], results["reference"]
    png_path = output_dir / f"{args.name}.png"
    title = (
        f"{results['samples_per_point']} digits per point, {args.num_inference_steps} DDIM steps, same noise; "
        f"real train digits: FD {reference['frechet_distance']:.2f}"
    )
    plot(png_path, rows, baseline, args.schedules, title)
    csv_path = output_dir / f"{args.name}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(baseline))
        writer.writeheader()
        writer.writerows([baseline, *rows])
    markdown_path = output_dir / f"{args.name}.md"
    markdown_path.write_text(report(args, results))
    print(f"wrote {markdown_path}, {png_path}, {csv_path}")


def describe_checkpoint(checkpoint: Path) -> str:
    """The training length recorded next to a pipeline saved by training/train_class_conditional.py, if any."""
    metrics_file = checkpoint / "train_metrics.json"
    if not metrics_file.is_file():
        return ""
    metrics = json.loads(metrics_file.read_text())
    steps = metrics.get("train_steps")
    return f" ({steps} training steps, see its model card)" if steps is not None else ""


def report(args, results: dict) -> str:
    command, baseline, rows = results["command"], results["baseline"], results["rows"]
    reference, count = results["reference"], results["samples_per_point"]
    curves = {
        kind: [(r["class_accuracy"], r["frechet_distance"]) for r in rows if r["schedule"] == kind]
        + [(baseline["class_accuracy"], baseline["frechet_distance"])]
        for kind in args.schedules
    }
    noise = float(np.median([r["frechet_std"] for r in rows]))
    lines = [
        "# Dynamic CFG on digits: a miniature reproduction",
        "",
        "The paper (Wang et al., *Analysis of Classifier-Free Guidance Weight Schedulers*, TMLR 2024) finds on",
        "class-conditional CIFAR-10 that monotonically increasing guidance schedules (linear, cosine) give a better",
        "quality / adherence trade-off than static CFG, decreasing ones (invlinear, sine) a worse one, and V / Lambda",
        "shapes little difference. This page repeats the experiment in miniature with the shipped class-conditional",
        "digits pipeline; it is generated by the script below (numbers are measured, not edited).",
        "",
        "## Setup",
        "",
        f"- Model: `{results['checkpoint']}`{results['checkpoint_description']}, DDIM with {args.num_inference_steps} steps, "
        "eta 0.",
        f"- {args.samples_per_class} samples per class, {count} per point, all points from the same initial noise "
        f"(seed {args.seed}).",
        f"- Guidance scales g (diffusers convention, g = 1 + w): {', '.join(f'{g:g}' for g in args.guidance_scales)}, "
        "plus g = 1 (no guidance, shared by every schedule). The area-normalised schedules have the same mean weight "
        f"as static at each g; clamp-linear uses c = {args.clamp:g}.",
        "- Class accuracy: the project's digit classifier (`storydiff.evaluation`) on the generated digits.",
        "- Frechet distance (FD): Gaussians fitted to the classifier's penultimate features of the generated digits "
        "and of the 360 held-out test digits. The +- is the standard deviation over "
        f"{args.bootstrap} bootstrap resamples of the generated set.",
        f"- Reference: {count} real train digits score FD {reference['frechet_distance']:.2f} +- "
        f"{reference['frechet_std']:.2f} against the test split (class-balanced like each point: the scale of FD at "
        "this sample count).",
        "",
        "Command:",
        "",
        "```bash",
        command.strip(),
        "```",
        "",
        f"![FD against class accuracy per schedule]({args.name}.png)",
        "",
        "## Results",
        "",
        "| schedule | g | class accuracy | FD | denoiser work vs static | seconds |",
        "|---|---|---|---|---|---|",
        f"| {baseline['schedule']} | 1 | {baseline['class_accuracy']:.3f} | {baseline['frechet_distance']:.2f} +- "
        f"{baseline['frechet_std']:.2f} | 0.500 | {baseline['seconds']:.1f} |",
    ]
    for row in sorted(rows, key=lambda r: (args.schedules.index(r["schedule"]), r["guidance_scale"])):
        lines.append(
            f"| {row['schedule']} | {row['guidance_scale']:g} | {row['class_accuracy']:.3f} | "
            f"{row['frechet_distance']:.2f} +- {row['frechet_std']:.2f} | {row['denoiser_work']:.3f} | "
            f"{row['seconds']:.1f} |"
        )

    lines += [
        "",
        "## Comparison with static at equal class accuracy",
        "",
        "Too much guidance lowers class accuracy again, so each schedule is summarised by its trade-off frontier:",
        "the lowest FD among its points (g = 1 included) that are at least a given accuracy. The frontiers of a",
        "schedule and of static are compared at every accuracy level both reach; a negative difference means the",
        "schedule reaches that accuracy with a lower FD.",
        "",
        "The last two columns compare each schedule with static at the same guidance scale g, that is at the same",
        "mean guidance weight and the same cost, averaged over the swept g.",
        "",
        "| schedule | highest accuracy | levels compared | levels with lower FD than static | levels with higher FD "
        "| mean FD difference | best FD (its accuracy) | same g: accuracy difference | same g: FD difference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    comparisons = {}
    for kind in args.schedules:
        best = min(curves[kind], key=lambda point: point[1])
        highest = max(accuracy for accuracy, _ in curves[kind])
        if kind == "static":
            lines.append(f"| static | {highest:.3f} | - | - | - | - | {best[1]:.2f} ({best[0]:.3f}) | - | - |")
            continue
        comparison = compare_at_equal_accuracy(curves[kind], curves["static"])
        comparison.update(compare_at_equal_guidance(rows, kind))
        comparisons[kind] = comparison
        lines.append(
            f"| {kind} | {highest:.3f} | {comparison['num_levels']} | {comparison['num_better']} | "
            f"{comparison['num_worse']} | {comparison['mean_difference']:+.2f} | {best[1]:.2f} ({best[0]:.3f}) | "
            f"{comparison['accuracy_difference']:+.3f} | {comparison['fd_difference']:+.2f} |"
        )

    lines += ["", "## Conclusion", "", *conclusion(comparisons, noise, curves), ""]
    return "\n".join(lines)


def conclusion(comparisons: dict, noise: float, curves: dict) -> list:
    """Plain statements read off the comparison table, with the sampling noise as the yardstick."""
    static_reach = max(accuracy for accuracy, _ in curves["static"])

    def verdict(kind: str) -> str:
        comparison = comparisons[kind]
        difference = comparison["mean_difference"]
        size = "within the sampling noise" if abs(difference) < noise else ("lower" if difference < 0 else "higher")
        return (
            f"{kind} {difference:+.2f} FD at equal accuracy ({size}; lower at {comparison['num_better']} and higher "
            f"at {comparison['num_worse']} of {comparison['num_levels']} levels), highest accuracy "
            f"{comparison['max_accuracy']:.3f}"
        )

    statements = [
        f"Static CFG reaches a class accuracy of at most {static_reach:.3f}. The typical bootstrap spread of one FD "
        f"value is {noise:.2f}; FD differences smaller than that are not meaningful at this sample count.",
        "",
    ]
    for group, kinds in (("Increasing schedules", INCREASING), ("Decreasing schedules", DECREASING)):
        present = [kind for kind in kinds if kind in comparisons]
        if present:
            statements.append(f"- {group}: " + "; ".join(verdict(kind) for kind in present) + ".")
    others = [kind for kind in comparisons if kind not in INCREASING + DECREASING]
    if others:
        statements.append("- Other shapes: " + "; ".join(verdict(kind) for kind in others) + ".")

    paper_kinds = [kind for kind in ("linear", "cosine") if kind in comparisons]
    if paper_kinds:
        names = " and ".join(paper_kinds)
        gain = float(np.mean([comparisons[kind]["mean_difference"] for kind in paper_kinds]))
        better = sum(comparisons[kind]["num_better"] for kind in paper_kinds)
        worse = sum(comparisons[kind]["num_worse"] for kind in paper_kinds)
        levels = sum(comparisons[kind]["num_levels"] for kind in paper_kinds)
        if gain < -noise:
            answer = f"At equal class accuracy, yes: {names} reach it with a lower FD ({gain:+.2f} on average), as"
            answer += " the paper reports for CIFAR-10."
        elif gain > noise:
            answer = f"At equal class accuracy, no: {names} have a higher FD than static ({gain:+.2f} on average), the"
            answer += " opposite of the paper's finding."
        else:
            lowest = min(comparisons[kind]["min_difference"] for kind in paper_kinds)
            highest = max(comparisons[kind]["max_difference"] for kind in paper_kinds)
            answer = (
                f"At equal class accuracy, not measurably: {names} average {gain:+.2f} FD against static (from "
                f"{lowest:+.2f} to {highest:+.2f} at single accuracy levels; lower at {better}, higher at {worse} of "
                f"{levels}), well inside the sampling noise."
            )
        same_accuracy = float(np.mean([comparisons[kind]["accuracy_difference"] for kind in paper_kinds]))
        same_fd = float(np.mean([comparisons[kind]["fd_difference"] for kind in paper_kinds]))
        answer += (
            f" At the same guidance scale (same mean weight, same cost) {names} average {same_accuracy:+.3f} class "
            f"accuracy and {same_fd:+.2f} FD against static"
        )
        decreasing_kinds = [kind for kind in DECREASING if kind in comparisons]
        if decreasing_kinds:
            loss_accuracy = float(np.mean([comparisons[kind]["accuracy_difference"] for kind in decreasing_kinds]))
            loss_fd = float(np.mean([comparisons[kind]["fd_difference"] for kind in decreasing_kinds]))
            answer += f"; the decreasing schedules {loss_accuracy:+.3f} and {loss_fd:+.2f}"
        if same_fd < -noise and same_accuracy > 0:
            answer += (
                ". So at equal mean weight and cost the rising schedules tolerate much larger guidance scales: static"
                " CFG overshoots as g grows, in line with the paper's reading that static CFG overshoots early and that"
                " removing guidance from the first, noisiest steps helps"
            )
        if decreasing_kinds and loss_fd > noise and loss_accuracy < 0:
            answer += "; falling schedules are worse than static, as in the paper"
        statements += ["", f"**Did increasing schedules beat static?** {answer}."]
    best_kind = min(curves, key=lambda kind: min(point[1] for point in curves[kind]))
    best = min(curves[best_kind], key=lambda point: point[1])
    statements.append(
        f"The lowest FD of the whole sweep is {best[1]:.2f} ({best_kind}, class accuracy {best[0]:.3f})."
    )
    return statements


if __name__ == "__main__":
    main()
