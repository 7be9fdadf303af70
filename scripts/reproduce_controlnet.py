"""Re-measure the ControlNet paper's claims in miniature (Zhang, Rao & Agrawala, ICCV 2023) on the shipped digits
text-to-image model: how the full ControlNet, ControlNet-lite, the mid-block-only connection and an unlocked decoder
compare with equal compute, whether training shows the "sudden convergence", and whether a jointly trained
multi-condition ControlNet beats the sum of separately trained ones.

Every run is `training/train_controlnet.py` with the same data (8000 digits-world canvases, conditions derived from
the canvas), batch 32, 2000 steps, learning rate 2e-4, no EMA, evaluated every 200 steps on 128 held-out canvases:

- `full_edges`, `lite_edges`, `mid_edges` (full, `--connect mid_block`), `unlocked_edges` (full, `--unlock
  decoder`): Canny edges (1 channel);
- `full_position`: the digit's box filled with its colour (3 channels); `joint_both`: one ControlNet on edges +
  mask (4 channels) with per-condition dropout (drop each 0.5, drop all 0.1, keep all 0.1).

Missing runs are trained first (sequentially, `--num_threads` each). Then every final model is measured on 256 other
held-out canvases (seed 1): edge IoU (Canny of the sample against the condition, 1-pixel tolerance) with the
held-out caption and with an empty prompt (where the condition must do all the work: the caption alone already
fixes a digit's place and size), caption adherence and the canvas Frechet distance. The multi-condition comparison
uses empty prompts and both conditions: the joint ControlNet against `MultiControlNetModel([full_edges,
full_position])`, whose residuals are summed (the paper's composition).

    python scripts/reproduce_controlnet.py --run_dir runs/controlnet --output_dir docs/results

writes `controlnet_digits.md` (commands, tables, verdict), `controlnet_digits.png` (curves and bars),
`controlnet_digits_samples.png` and `controlnet_digits.json`; `--rewrite_report` rewrites the page from the JSON.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from storydiff.atomic_files import atomic_save, atomic_write

REPOSITORY = Path(__file__).resolve().parents[1]
COMMON_FLAGS = (
    "--pretrained_model_name_or_path storydiff/checkpoints/digits-text-to-image --dataset digits_world "
    "--max_train_steps 2000 --train_batch_size 32 --learning_rate 2e-4 --no-use_ema --checkpointing_steps 500 "
    "--validation_steps 500 --evaluation_steps 200 --num_evaluation_images 128 --validation_inference_steps 20 "
    "--resume_from_checkpoint latest"
)
RUNS = {
    "full_edges": "--variant full --digits_conditions edges",
    "lite_edges": "--variant lite --digits_conditions edges",
    "mid_edges": "--variant full --connect mid_block --digits_conditions edges",
    "unlocked_edges": "--variant full --unlock decoder --digits_conditions edges",
    "full_position": "--variant full --digits_conditions position_colour",
    "joint_both": "--variant full --digits_conditions edges,position_colour",
}
EDGE_RUNS = {"full_edges": "full", "lite_edges": "lite", "mid_edges": "full, mid-block only", "unlocked_edges": "full, decoder unlocked"}  # fmt: skip
PAPER = "ADE20K segmentation: full IoU 0.35, FID 15.27; lite IoU 0.32, FID 17.92 (SD alone: FID 6.09 without the condition)"
# hand notes on the measured figures, written after reading them (kept when the report is rewritten)
TRAINED_NOW = []  # runs this invocation trained (the others existed already)
NOTES = """\
- **Scale.** 2000 steps of batch 32 at learning rate 2e-4 on 8000 canvases; the conditions are 32x32 edge maps of
  one digit. The paper trains at 512x512 for thousands of GPU hours; only the orderings can carry over.
- **Full vs lite.** Fidelity follows the paper: the full copy's edge IoU is higher than lite's, without and with the
  caption. Quality does not: lite's final Frechet distance is lower. The Frechet distance of 128 samples moves by up
  to 14 between evaluations of one run (the second panel), more than any gap between the variants, so the
  quality ordering is not measurable at this sample count; the paper's FID gap (15.27 vs 17.92) is not reproduced
  here in either direction.
- **Sudden convergence** shows in every run: the no-prompt edge IoU sits at the base model's 0.08 and then jumps by
  0.4 to 0.56 within one 200-step interval, after which it creeps up. The paper sees it after 3-7k steps at 1e-5 on
  SD; at 2e-4 on a 1 M-parameter UNet it comes after a few hundred. Lite and the mid-block-only connection converge
  later than the full copy.
- **Mid-block-only** trains (0.79) but converges later and ends lower than all connections, with a worse Frechet
  distance: in miniature it costs fidelity and, as `benchmarks/bench_controlnet.py` measures, saves no compute
  (the whole copy still runs).
- **Unlocking the decoder** (twice the trained parameters, a 1.26x training step) gives the best fidelity and the
  lowest Frechet distance of the four, as the paper's large-scale mode suggests.
- **Composition.** Adding the residuals of two separately trained ControlNets (edges, mask) works without any
  weighting, as the paper says: the sum follows the edges better than the edges ControlNet alone and adds some of
  the mask's colour. The jointly trained 4-channel ControlNet (one run with per-condition dropout, half the compute of
  the two separate runs together) is worse on every measure at 2000 steps.
- **Colour from a mask is learned weakly by every model**: with an empty prompt the mask-only ControlNet gets the
  colour right for 30% of canvases (chance is 1/6) but the position for 95%. In half of the training examples the
  caption states the colour, and a colour has to be pushed through the UNet's skip features; 2000 steps were not
  enough for it.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", default="runs/controlnet", help="one folder per run (trained when missing)")
    parser.add_argument("--num_examples", type=int, default=256, help="held-out canvases for the final comparison")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--output_dir", default="docs/results")
    parser.add_argument("--name", default="controlnet_digits")
    parser.add_argument("--training_flags", default="", help="appended to every training command (tests: tiny runs)")
    parser.add_argument("--rewrite_report", action="store_true", help="rewrite the page from the saved JSON only")
    return parser.parse_args(argv)


def train_missing_runs(run_dir: Path, num_threads: int, extra_flags: str = "") -> dict:
    """Train every run without a final `train_metrics.json`; returns the command of each run."""
    commands = {}
    for name, flags in RUNS.items():
        output = run_dir / name
        command = f"python training/train_controlnet.py {COMMON_FLAGS} {flags} --torch_num_threads {num_threads} --output_dir {output}"
        command += f" {extra_flags}" if extra_flags else ""
        commands[name] = command
        if (output / "train_metrics.json").is_file():  # an existing run: the command its card says made it
            card = (output / "README.md").read_text()
            commands[name] = card.split("```bash\n", 1)[1].split("\n```", 1)[0] if "```bash\n" in card else command
            continue
        TRAINED_NOW.append(name)
        print(f"training {name}: {command}", flush=True)
        subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPOSITORY, check=True)
    return commands


def load_pipeline(folders):
    from storydiff import DynamicCFGStableDiffusionControlNetPipeline
    from storydiff.models.controlnet_variants import load_controlnet

    pipe = DynamicCFGStableDiffusionControlNetPipeline.from_pretrained(folders[0])
    if len(folders) > 1:  # the base model of the first, the ControlNets of all: summed residuals
        models = [load_controlnet(folder, subfolder="controlnet") for folder in folders]
        pipe = DynamicCFGStableDiffusionControlNetPipeline(**{**pipe.components, "controlnet": models})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measure(pipe, captions, conditions, attributes, args, channels=None, **call_kwargs) -> tuple:
    from storydiff.evaluation.conditions import edge_iou
    from storydiff.evaluation.text_adherence import canvas_frechet_distance, caption_adherence
    from storydiff.training.train_controlnet import generate

    images = generate(pipe, captions, conditions, args.guidance_scale, args.num_inference_steps, args.seed, channels,
                      **call_kwargs)  # fmt: skip
    adherence = caption_adherence(images, attributes)
    per_image = edge_iou(images, conditions[:, 0].numpy(), per_image=True)
    return {
        "edge_iou": float(per_image.mean()),
        "edge_iou_standard_error": float(per_image.std(ddof=1) / np.sqrt(len(per_image))),
        **{f"adherence_{name}": adherence[name] for name in ("overall", "digit", "colour", "position", "size")},
        "frechet_distance": float(canvas_frechet_distance(images)),
    }, images


def final_comparison(run_dir: Path, args) -> tuple:
    """Edge runs with captions and with empty prompts; the multi-condition runs with empty prompts."""
    from storydiff.training.controlnet_data import digits_world_control_arrays

    real_images, captions, attributes, both = digits_world_control_arrays("test", args.num_examples, args.seed, 32,
                                                                ["edges", "position_colour"])  # fmt: skip
    both = torch.from_numpy(both)
    edges, empty = both[:, :1], [""] * len(captions)
    results, samples = {}, {}
    # the measure's range on real canvases: against their own edges, and against another canvas's
    from storydiff.evaluation.conditions import edge_iou

    real = ((real_images.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)
    results["real"] = {"own_edges": edge_iou(real, edges[:, 0].numpy()),
                       "other_canvas_edges": edge_iou(real, edges[:, 0].numpy()[::-1].copy())}  # fmt: skip
    for name in EDGE_RUNS:
        pipe = load_pipeline([run_dir / name])
        prompted, samples[name] = measure(pipe, captions, edges, attributes, args)
        unprompted, samples[f"{name}_no_prompt"] = measure(pipe, empty, edges, attributes, args)
        metrics = json.loads((run_dir / name / "train_metrics.json").read_text())
        results[name] = {"prompted": prompted, "no_prompt": unprompted, "controlnet_parameters": metrics["controlnet_parameters"],
                         "trainable_parameters": metrics["trainable_parameters"], "train_wall_time_s": metrics["train_wall_time_s"]}  # fmt: skip
        print(f"{name}: edge IoU {prompted['edge_iou']:.3f} / no prompt {unprompted['edge_iou']:.3f}", flush=True)
        if name == "full_edges":  # the base model alone: the same pipeline with the ControlNet's scale at 0
            base, _ = measure(pipe, captions, edges, attributes, args, controlnet_conditioning_scale=0.0)
            results["base"] = {"prompted": base}
    multi = {}
    for name, folders, condition, channels in [
        ("joint (one ControlNet, 4 channels)", ["joint_both"], both, None),
        ("sum of separately trained (edges + mask)", ["full_edges", "full_position"], both, [1, 3]),
        ("edges only (full_edges)", ["full_edges"], edges, None),
        ("mask only (full_position)", ["full_position"], both[:, 1:], None),
    ]:
        pipe = load_pipeline([run_dir / folder for folder in folders])
        multi[name], samples[name] = measure(pipe, empty, condition, attributes, args, channels)
        if name == "mask only (full_position)":  # its condition has no edges channel: measure edges against the edges
            from storydiff.evaluation.conditions import edge_iou

            multi[name]["edge_iou"] = edge_iou(samples[name], edges[:, 0].numpy())
        print(f"{name}: {multi[name]}", flush=True)
    return results, multi, samples, (captions, both)


def histories(run_dir: Path) -> dict:
    """Each run's evaluations by step (the final folder's JSON, or the log the run appends to as it goes)."""
    from storydiff.training.train_controlnet import read_history

    curves = {}
    for name in RUNS:
        saved = run_dir / name / "evaluation_history.json"
        curves[name] = (
            json.loads(saved.read_text())
            if saved.is_file()
            else read_history(str(run_dir / name / "evaluation_history.jsonl"))
        )
    return curves


def sudden_convergence(history: list) -> dict:
    """Where the no-prompt edge IoU rose most between two evaluations, and which share of the whole rise that was."""
    steps = [record["step"] for record in history]
    values = [record["edge_iou_no_prompt"] for record in history]
    gains = np.diff(values)
    jump = int(np.argmax(gains))
    total = values[-1] - values[0]
    return {"jump_from_step": steps[jump], "jump_to_step": steps[jump + 1], "jump": float(gains[jump]),
            "share_of_total_gain": float(gains[jump] / total) if total > 0 else 0.0,
            "first": values[0], "last": values[-1]}  # fmt: skip


def figure(results: dict, multi: dict, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for name, label in EDGE_RUNS.items():
        steps = [r["step"] for r in curves[name]]
        axes[0].plot(steps, [r["edge_iou_no_prompt"] for r in curves[name]], marker="o", label=label)
        axes[1].plot(steps, [r["canvas_frechet_distance"] for r in curves[name]], marker="o", label=label)
    axes[0].set(title="Condition fidelity over training\n(128 held-out edge maps, empty prompt)", xlabel="training step",
                ylabel="edge IoU (Canny of sample vs condition)")  # fmt: skip
    axes[1].set(title="Quality over training\n(128 held-out captions + edges)", xlabel="training step",
                ylabel="canvas Frechet distance (lower is better)")  # fmt: skip
    for axis in axes[:2]:
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    names = ["base"] + list(EDGE_RUNS)
    labels = ["base (no control)"] + list(EDGE_RUNS.values())
    x = np.arange(len(names))
    prompted = [results[n]["prompted"]["edge_iou"] for n in names]
    unprompted = [results[n]["no_prompt"]["edge_iou"] if "no_prompt" in results[n] else np.nan for n in names]
    axes[2].bar(x - 0.2, prompted, 0.4, label="with the caption")
    axes[2].bar(x + 0.2, unprompted, 0.4, label="empty prompt")
    axes[2].set_xticks(x, [label.replace(", ", ",\n") for label in labels], fontsize=7)
    axes[2].set(title=f"Final edge IoU ({len(x)} models, 256 held-out)", ylabel="edge IoU")
    axes[2].legend(fontsize=8)
    multi_names = list(multi)
    x = np.arange(len(multi_names))
    for offset, key, label in [(-0.3, "edge_iou", "edge IoU"), (-0.1, "adherence_colour", "colour right"),
                               (0.1, "adherence_position", "position right"), (0.3, "adherence_digit", "digit right")]:  # fmt: skip
        axes[3].bar(x + offset, [multi[n][key] for n in multi_names], 0.2, label=label)
    short = {"joint (one ControlNet, 4 channels)": "joint\n(4 channels)", "sum of separately trained (edges + mask)":
             "sum of two\nControlNets", "edges only (full_edges)": "edges\nonly", "mask only (full_position)": "mask\nonly"}  # fmt: skip
    axes[3].set_xticks(x, [short.get(name, name) for name in multi_names], fontsize=7)
    axes[3].set(title="Two conditions, empty prompt:\njoint ControlNet vs summed ControlNets", ylabel="fraction / IoU")
    axes[3].legend(fontsize=7)
    fig.tight_layout()
    atomic_save(path, lambda temporary: fig.savefig(temporary, dpi=110, format="png"))
    plt.close(fig)


def samples_figure(samples: dict, examples, path: Path, rows: int = 6) -> None:
    from storydiff.training.sample_grids import labelled_grid, save_grid

    captions, both = examples
    columns = {"edges": np.repeat(both[:rows, :1].permute(0, 2, 3, 1).numpy(), 3, axis=3),
               "mask": both[:rows, 1:].permute(0, 2, 3, 1).numpy()}  # fmt: skip
    short = {"full_edges": "full", "lite_edges": "lite", "mid_edges": "mid only", "unlocked_edges": "unlocked"}
    for name, label in short.items():
        columns[label] = samples[name][:rows]
        columns[f"{label} *"] = samples[f"{name}_no_prompt"][:rows]
    columns["joint *"] = samples["joint (one ControlNet, 4 channels)"][:rows]
    columns["sum *"] = samples["sum of separately trained (edges + mask)"][:rows]
    cells = np.stack([columns[name][row] for row in range(rows) for name in columns])
    grid = labelled_grid(cells, rows=list(captions[:rows]), columns=list(columns),
                         title="Held-out conditions and captions, same seed (* = empty prompt; joint and sum get edges + mask)",
                         min_cell=88)  # fmt: skip
    save_grid(grid, str(path))


def fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def compare(a: dict, b: dict) -> str:
    """'higher than' / 'lower than' when the edge IoUs differ by more than two standard errors of the difference, else
    'within noise of'."""
    difference = a["edge_iou"] - b["edge_iou"]
    noise = 2 * np.hypot(a["edge_iou_standard_error"], b["edge_iou_standard_error"])
    return "within noise of" if abs(difference) <= noise else ("higher than" if difference > 0 else "lower than")


def verdict(results: dict, multi: dict, convergence: dict) -> list:
    full, lite = results["full_edges"], results["lite_edges"]
    lines = []
    fidelity = compare(full["no_prompt"], lite["no_prompt"])
    quality = full["prompted"]["frechet_distance"] < lite["prompted"]["frechet_distance"]
    outcome = {"higher than": "held" if quality else "held on fidelity only",
               "within noise of": "not measurable: the edge IoUs are within two standard errors",
               "lower than": "not held"}[fidelity]  # fmt: skip
    lines.append(f"- **Full beats lite on fidelity and quality** (paper: {PAPER}): **{outcome}**: "
                 f"edge IoU without prompt {fmt(full['no_prompt']['edge_iou'])} vs {fmt(lite['no_prompt']['edge_iou'])}, "
                 f"with the caption {fmt(full['prompted']['edge_iou'])} vs {fmt(lite['prompted']['edge_iou'])}; Frechet "
                 f"distance {fmt(full['prompted']['frechet_distance'])} vs {fmt(lite['prompted']['frechet_distance'])} "
                 f"({full['controlnet_parameters']:,} vs {lite['controlnet_parameters']:,} parameters).")  # fmt: skip
    sudden = {name: c for name, c in convergence.items() if name in EDGE_RUNS}
    held = all(c["share_of_total_gain"] >= 0.4 and c["last"] - c["first"] >= 0.1 for c in sudden.values())
    detail = "; ".join(f"{EDGE_RUNS[n]}: +{c['jump']:.2f} between steps {c['jump_from_step']} and {c['jump_to_step']} "
                       f"({100 * c['share_of_total_gain']:.0f}% of the rise {c['first']:.2f} -> {c['last']:.2f})"
                       for n, c in sudden.items())  # fmt: skip
    lines.append(f"- **Sudden convergence** (one evaluation interval brings at least 40% of the whole rise of the "
                 f"no-prompt edge IoU, a rise of at least 0.1): **{'held' if held else 'not held'}**: {detail}.")  # fmt: skip
    mid = results["mid_edges"]
    lines.append(f"- **Mid-block-only connection** (the paper's small-scale mode; no-prompt fidelity "
                 f"{compare(mid['no_prompt'], full['no_prompt'])} all connections): edge IoU without prompt "
                 f"{fmt(mid['no_prompt']['edge_iou'])} vs {fmt(full['no_prompt']['edge_iou'])} for all connections, "
                 f"Frechet distance {fmt(mid['prompted']['frechet_distance'])} vs {fmt(full['prompted']['frechet_distance'])}.")  # fmt: skip
    unlocked = results["unlocked_edges"]
    lines.append(f"- **Unlocked decoder** (the paper's large-scale mode; no-prompt fidelity "
                 f"{compare(unlocked['no_prompt'], full['no_prompt'])} locked): edge IoU without prompt "
                 f"{fmt(unlocked['no_prompt']['edge_iou'])} vs {fmt(full['no_prompt']['edge_iou'])} locked, Frechet "
                 f"distance {fmt(unlocked['prompted']['frechet_distance'])} vs {fmt(full['prompted']['frechet_distance'])}, "
                 f"{unlocked['trainable_parameters']:,} vs {full['trainable_parameters']:,} trained parameters.")  # fmt: skip
    joint, summed = multi["joint (one ControlNet, 4 channels)"], multi["sum of separately trained (edges + mask)"]
    better = [
        k for k in ("edge_iou", "adherence_colour", "adherence_position", "adherence_digit") if joint[k] > summed[k]
    ]
    lines.append(f"- **Composition: summing separately trained ControlNets needs no extra weighting** (paper; the sum's "
                 f"edge IoU is {compare(summed, multi['edges only (full_edges)'])} the edges ControlNet alone's, the "
                 f"joint one's {compare(joint, summed)} the sum's): the sum "
                 f"reaches edge IoU {fmt(summed['edge_iou'])}, colour {fmt(summed['adherence_colour'])}, position "
                 f"{fmt(summed['adherence_position'])}; the jointly trained one {fmt(joint['edge_iou'])}, "
                 f"{fmt(joint['adherence_colour'])}, {fmt(joint['adherence_position'])} (joint better on "
                 f"{', '.join(better) or 'none'} of edge IoU, colour, position, digit).")  # fmt: skip
    return lines


def table(results: dict) -> str:
    header = "| model | params | trained | edge IoU (caption) | edge IoU (no prompt) | adherence | digit | FD | train s |\n|---|---|---|---|---|---|---|---|---|\n"
    rows = []
    for name, label in [("base", "base model, no ControlNet")] + list(EDGE_RUNS.items()):
        r = results[name]
        p, n = r["prompted"], r.get("no_prompt", {})
        rows.append(f"| {label} | {r.get('controlnet_parameters', 0):,} | {r.get('trainable_parameters', 0):,} | "
                    f"{fmt(p['edge_iou'])} | {fmt(n.get('edge_iou', '-'))} | {fmt(p['adherence_overall'])} | "
                    f"{fmt(p['adherence_digit'])} | {p['frechet_distance']:.1f} | {r.get('train_wall_time_s', '-')} |")  # fmt: skip
    return header + "\n".join(rows) + "\n"


def multi_table(multi: dict) -> str:
    header = "| conditions (empty prompt) | edge IoU | colour | position | size | digit | FD |\n|---|---|---|---|---|---|---|\n"
    return header + "\n".join(
        f"| {name} | {fmt(m['edge_iou'])} | {fmt(m['adherence_colour'])} | {fmt(m['adherence_position'])} | "
        f"{fmt(m['adherence_size'])} | {fmt(m['adherence_digit'])} | {m['frechet_distance']:.1f} |"
        for name, m in multi.items()
    ) + "\n"  # fmt: skip


def curve_table(curves: dict) -> str:
    steps = [r["step"] for r in curves["full_edges"]]
    header = "| step | " + " | ".join(EDGE_RUNS.values()) + " |\n|---|" + "---|" * len(EDGE_RUNS) + "\n"
    rows = []
    for index, step in enumerate(steps):
        cells = [
            f"{curves[n][index]['edge_iou_no_prompt']:.3f} / {curves[n][index]['canvas_frechet_distance']:.0f}"
            for n in EDGE_RUNS
        ]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    return header + "\n".join(rows) + "\n"


def write_report(output_dir: Path, name: str, data: dict) -> None:
    text = (
        "# ControlNet variants in miniature (digits world)\n\n"
        "Zhang, Rao & Agrawala (ICCV 2023) compare the full ControlNet (a trainable copy of the encoder) with "
        "ControlNet-lite (light layers instead), train small models with only the middle block connected, unlock "
        "the base model at scale, report a *sudden convergence* during training and compose conditions by adding "
        "ControlNets. This page re-measures those points on storydiff's miniature: the shipped 32x32 "
        "`digits-text-to-image` model and conditions derived from digits-world canvases.\n\n"
        f"Made by `{data['command']}` in {data['elapsed_s'] / 60:.1f} min on a 2-core CPU "
        + (
            f"(including the training of {', '.join(data['trained_now'])}). "
            if data.get("trained_now")
            else "(the evaluation only: the runs existed; their training times are in the table). "
        )
        + "Training runs (each from the shipped base model, equal compute; each run's folder holds its model card, "
        "samples and evaluation history):\n\n"
        + "".join(f"- `{run}`: `{cmd}`\n" for run, cmd in data["commands"].items())
        + "\n![curves and final bars](controlnet_digits.png)\n\n"
        "## Verdict\n\n"
        + "\n".join(data["verdict"])
        + "\n\n"
        + (f"## Notes\n\n{NOTES}\n\n" if NOTES else "")
        + f"## Final comparison ({data['num_examples']} held-out canvases, guidance {data['guidance_scale']:g}, "
        f"{data['num_inference_steps']} DDIM steps, seed {data['seed']})\n\n"
        "Edge IoU: Canny edges of each sample against its condition edge map, both dilated by one pixel; adherence: "
        "caption adherence (digit, colour, position, size) measured by `storydiff.evaluation.text_adherence`; FD: "
        "Frechet distance of digit-classifier features against real held-out canvases. The real held-out canvases "
        f"score edge IoU {data['results']['real']['own_edges']:.3f} against their own edges and "
        f"{data['results']['real']['other_canvas_edges']:.3f} against another canvas's.\n\n"
        + table(data["results"])
        + "\n## Over training (no-prompt edge IoU / Frechet distance, 128 held-out canvases, seed 0)\n\n"
        + curve_table(data["curves"])
        + "\n## Two conditions\n\nEmpty prompts, so the colour and the position can only come from the mask and the "
        "glyph's shape only from the edges:\n\n"
        + multi_table(data["multi"])
        + "\n![samples](controlnet_digits_samples.png)\n"
    )
    with atomic_write(output_dir / f"{name}.md") as file:
        file.write(text)


def main(argv=None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    json_path = output_dir / f"{args.name}.json"
    if args.rewrite_report:
        data = json.loads(json_path.read_text())
        data["verdict"] = verdict(data["results"], data["multi"], data["convergence"])  # the rules as they are now
        write_report(output_dir, args.name, data)
        return data
    torch.set_num_threads(args.num_threads)
    start = time.time()
    run_dir = Path(args.run_dir)
    commands = train_missing_runs(run_dir.absolute(), args.num_threads, args.training_flags)
    curves = histories(run_dir)
    results, multi, samples, examples = final_comparison(run_dir.absolute(), args)
    convergence = {name: sudden_convergence(history) for name, history in curves.items() if name in EDGE_RUNS}
    data = {
        "command": "python scripts/reproduce_controlnet.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "commands": commands, "trained_now": TRAINED_NOW, "elapsed_s": time.time() - start, "num_examples": args.num_examples, "seed": args.seed,
        "guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps,
        "results": results, "multi": multi, "curves": curves, "convergence": convergence,
        "verdict": verdict(results, multi, convergence),
    }  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(json_path) as file:
        json.dump(data, file, indent=1)
    figure(results, multi, curves, output_dir / f"{args.name}.png")
    samples_figure(samples, examples, output_dir / f"{args.name}_samples.png")
    write_report(output_dir, args.name, data)
    print("\n".join(data["verdict"]))
    return data


if __name__ == "__main__":
    main()
