"""DIRECTOR in miniature: evaluate variants A, B and C on held-out synthetic E.T. samples with CLaTr metrics.

    python scripts/reproduce_director_synthetic.py --et_root /work/data/et_synthetic \
        --clatr storydiff/checkpoints/clatr-synthetic \
        --director A=path/to/director-a --director B=path/to/director-b --director C=path/to/director-c

For every test sample (`full_test`, and its `pure` / `mixed` parts) each variant generates one camera trajectory
from the sample's caption and character trajectory. The generated trajectories are compared with the ground truth:
FD_CLaTr and precision / recall / density / coverage (k = 3, standard orientation) between CLaTr embeddings of
generated and real test trajectories, the CLaTr-Score between generated trajectories and their camera captions, and
C-P / C-R / C-F1 between the tagger's reading of the generated trajectories and the ground-truth camera segments.
A "ground truth" row puts real trajectories in place of generated ones (training-split trajectories for the
distribution metrics): the floor / ceiling each metric can reach with this CLaTr and this test-set size.

Writes a markdown report (tables next to the paper's), a JSON file with every number, and the controllability
figure (one character trajectory, four prompts, each variant; the tagger's reading in each title). Text after the
`<!-- verdict -->` line of an existing report is kept, so a written discussion survives a re-run.
"""

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from storydiff.custom_pipelines.director import DirectorPipeline
from storydiff.data import load_et, read_split_ids
from storydiff.metrics import camera_tag_scores, clatr_score, frechet_distance, precision_recall_density_coverage
from storydiff.models.clatr import CLaTrModel
from storydiff.text_features import TextFeatures, encode_text, load_text_encoder
from storydiff.trajectories import (
    CAMERA_MOTION_NAMES,
    plot_trajectory,
    poses_to_features,
    segments_from_labels,
    standardize_camera_features,
    tag_camera_motion,
)

VERDICT_MARKER = "<!-- verdict -->"
MIN_SUBSET_SIZE = 5
CONTROL_PROMPTS = (
    "The camera trucks right while the character moves right.",
    "The camera trucks left while the character moves right.",
    "The camera booms top while the character moves right.",
    "The camera pushes in while the character moves right.",
)
PAPER_TABLE = """| subset | metric | MDM | A (in-context) | B (AdaLN) | C (cross-attention) |
|---|---|---|---|---|---|
| pure | FD_CLaTr (lower is better) | 6.10 | 5.16 | 6.61 | 4.57 |
| pure | CLaTr-Score (higher is better) | 21.26 | 21.88 | 23.10 | 21.49 |
| mixed | FD_CLaTr | 6.79 | 3.88 | 6.10 | 3.76 |
| mixed | CLaTr-Score | 18.32 | 20.76 | 20.78 | 21.95 |
| mixed | C-F1 | 0.34 | 0.42 | 0.39 | 0.48 |"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--et_root", required=True, help="Synthetic E.T. folder with {full,pure,mixed}_test splits.")
    parser.add_argument("--clatr", required=True, help="CLaTrModel folder trained on the same E.T. folder.")
    parser.add_argument("--director", action="append", default=[], help="NAME=PIPELINE_FOLDER, repeatable.")
    parser.add_argument("--max_test_samples", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=10)
    parser.add_argument("--guidance_scale", type=float, default=1.4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--report", default="docs/results/director_synthetic.md")
    parser.add_argument("--results_json", default="docs/results/director_synthetic.json")
    parser.add_argument("--figure", default="docs/results/director_controllability.png")
    parser.add_argument("--commands", default=None, help="A text file with the commands that trained the models.")
    args = parser.parse_args(argv)
    variants = {}
    for item in args.director:
        name, _, path = item.partition("=")
        if not path or not os.path.isdir(path):
            raise ValueError(f"--director expects NAME=FOLDER with an existing folder, got {item!r}.")
        variants[name] = path
    args.variants = variants
    return args


# ----------------------------------------------------------------------------------------------------------------
# features


def encode_captions(text_encoder, tokenizer, captions, batch_size=64) -> TextFeatures:
    return TextFeatures.cat(
        [
            encode_text(text_encoder, tokenizer, captions[i : i + batch_size])
            for i in range(0, len(captions), batch_size)
        ]
    )


@torch.no_grad()
def clatr_trajectory_embeddings(clatr: CLaTrModel, trajectories, batch_size=64) -> np.ndarray:
    """Mean CLaTr embeddings of a list of (N_i, 4, 4) pose arrays (padded per batch)."""
    features = [standardize_camera_features(poses_to_features(np.asarray(p, dtype=np.float32))) for p in trajectories]
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start : start + batch_size]
        longest = max(len(f) for f in chunk)
        padded = torch.zeros(len(chunk), longest, 9)
        mask = torch.zeros(len(chunk), longest, dtype=torch.bool)
        for row, f in enumerate(chunk):
            padded[row, : len(f)], mask[row, : len(f)] = f, True
        out.append(clatr.encode_trajectory(padded, mask).float().numpy())
    return np.concatenate(out)


@torch.no_grad()
def clatr_text_embeddings(clatr: CLaTrModel, text: TextFeatures, batch_size=64) -> np.ndarray:
    return np.concatenate(
        [
            clatr.encode_text(text.tokens[i : i + batch_size], text.mask[i : i + batch_size]).float().numpy()
            for i in range(0, len(text), batch_size)
        ]
    )


# ----------------------------------------------------------------------------------------------------------------
# generation


def generate(pipe: DirectorPipeline, text: TextFeatures, characters, args) -> list:
    """One trajectory per sample; samples of equal length share a batch (a batch has one length)."""
    by_length = defaultdict(list)
    for index, character in enumerate(characters):
        by_length[len(character)].append(index)
    trajectories = [None] * len(characters)
    for length, indices in sorted(by_length.items()):
        generator = torch.Generator().manual_seed(args.seed * 1000 + length)
        output = pipe(
            text_features=text[indices],
            character_trajectory=torch.from_numpy(np.stack([characters[i] for i in indices])).float(),
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=generator,
        )
        for row, index in enumerate(indices):
            trajectories[index] = output.trajectories[row]
    return trajectories


def tag_reading(poses) -> str:
    """The tagger's segments, e.g. 'trucking_right' or 'static > push_in'."""
    labels = tag_camera_motion(np.asarray(poses))
    return " > ".join(CAMERA_MOTION_NAMES[label] for _, _, label in segments_from_labels(labels))


# ----------------------------------------------------------------------------------------------------------------
# metrics


def distribution_metrics(generated_emb, real_emb) -> dict:
    prdc = precision_recall_density_coverage(real_emb, generated_emb, k=3)
    return {
        "FD_CLaTr": frechet_distance(generated_emb, real_emb),
        "P": prdc["precision"],
        "R": prdc["recall"],
        "D": prdc["density"],
        "C": prdc["coverage"],
    }


def semantic_metrics(generated_emb, text_emb, generated, segments) -> dict:
    tags = camera_tag_scores([tag_camera_motion(np.asarray(p)) for p in generated], list(segments))
    return {
        "CLaTr-Score": clatr_score(generated_emb, text_emb),
        "C-P": tags["precision"],
        "C-R": tags["recall"],
        "C-F1": tags["f1"],
        "samples": len(generated),
    }


def distribution_and_semantic_metrics(generated_emb, real_emb, text_emb, generated, segments):
    return {
        **distribution_metrics(generated_emb, real_emb),
        **semantic_metrics(generated_emb, text_emb, generated, segments),
    }


def bootstrap_intervals(generated_emb, real_emb, text_emb, predicted, segments, seed, num_resamples=200) -> dict:
    """95% percentile intervals of FD_CLaTr, CLaTr-Score and C-F1 over test samples resampled with replacement
    (the variation due to which test captions were drawn; the generation noise and the training run are fixed)."""
    rng = np.random.default_rng(seed)
    draws = {"FD_CLaTr": [], "CLaTr-Score": [], "C-F1": []}
    for _ in range(num_resamples):
        pick = rng.integers(0, len(generated_emb), len(generated_emb))
        draws["FD_CLaTr"].append(frechet_distance(generated_emb[pick], real_emb[pick]))
        draws["CLaTr-Score"].append(clatr_score(generated_emb[pick], text_emb[pick]))
        draws["C-F1"].append(camera_tag_scores([predicted[i] for i in pick], [segments[i] for i in pick])["f1"])
    return {name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for name, v in draws.items()}


COLUMNS = ("FD_CLaTr", "CLaTr-Score", "P", "R", "D", "C", "C-P", "C-R", "C-F1", "samples")


def markdown_table(results: dict, subset: str) -> str:
    if any(subset not in by_subset for by_subset in results.values()):
        return f"(no {subset} test samples)"
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, by_subset in results.items():
        row = by_subset[subset]
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interval_table(intervals: dict, subset: str) -> str:
    names = ("FD_CLaTr", "CLaTr-Score", "C-F1")
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, by_subset in intervals.items():
        if subset in by_subset:
            cells = [f"{low:.3f} - {high:.3f}" for low, high in (by_subset[subset][n] for n in names)]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def controllability_figure(pipes: dict, text_encoder, tokenizer, character: np.ndarray, path: str, args) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readings = {}
    text = encode_text(text_encoder, tokenizer, list(CONTROL_PROMPTS))
    figure = plt.figure(figsize=(4.2 * len(CONTROL_PROMPTS), 4.4 * len(pipes)))
    for row, (name, pipe) in enumerate(pipes.items()):
        output = pipe(
            text_features=text,
            character_trajectory=torch.from_numpy(character).float(),
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            generator=torch.Generator().manual_seed(args.seed),
        )
        readings[name] = []
        for column, prompt in enumerate(CONTROL_PROMPTS):
            poses = output.trajectories[column]
            reading = tag_reading(poses)
            readings[name].append({"prompt": prompt, "tagger": reading})
            ax = figure.add_subplot(
                len(pipes), len(CONTROL_PROMPTS), row * len(CONTROL_PROMPTS) + column + 1, projection="3d"
            )
            plot_trajectory(poses, character=character, ax=ax, title=f"{name}: {prompt}\ntagger: {reading}")
            ax.title.set_fontsize(8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return readings


def pick_control_character(test) -> tuple[str, np.ndarray]:
    """The longest held-out character that walks right for the whole sample (character class 9 on every frame)."""
    arrays = test.with_format("numpy")
    candidates = [row for row in range(len(test)) if np.all(arrays[row]["character_segments"] == 9)]
    if not candidates:
        raise ValueError("No test sample whose character walks right throughout; use a larger test split.")
    row = max(candidates, key=lambda r: len(arrays[r]["character_positions"]))
    return test[row]["id"], np.asarray(arrays[row]["character_positions"], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    started = time.time()
    test = load_et(args.et_root, "test", "full", max_samples=args.max_test_samples)
    test_ids = list(test["id"])
    subset_rows = {"full": list(range(len(test_ids)))}
    for subset in ("pure", "mixed"):
        members = set(read_split_ids(args.et_root, f"{subset}_test"))
        rows = [row for row, sample_id in enumerate(test_ids) if sample_id in members]
        if len(rows) >= MIN_SUBSET_SIZE:
            subset_rows[subset] = rows
        else:  # k-NN metrics and covariances need a handful of samples
            print(f"Skipping the {subset} subset: {len(rows)} test samples (< {MIN_SUBSET_SIZE}).")
    arrays = test.with_format("numpy")
    real = [np.asarray(arrays[row]["camera_poses"]) for row in range(len(test))]
    characters = [np.asarray(arrays[row]["character_positions"], dtype=np.float32) for row in range(len(test))]
    segments = [np.asarray(arrays[row]["camera_segments"]) for row in range(len(test))]

    text_encoder, tokenizer = load_text_encoder()
    clatr = CLaTrModel.from_pretrained(args.clatr).eval()
    director_text = encode_captions(text_encoder, tokenizer, list(test["caption"]))
    clatr_text = clatr_text_embeddings(clatr, encode_captions(text_encoder, tokenizer, list(test["caption_cam"])))
    real_emb = clatr_trajectory_embeddings(clatr, real)

    # Ground truth in place of generated samples: training trajectories of the same subset (as many as the test
    # subset) for the distribution metrics, the test trajectories themselves for the CLaTr-Score and the tags.
    results, mismatched = {"ground truth": {}}, {}
    for subset, rows in subset_rows.items():
        reference = load_et(args.et_root, "train", subset, max_samples=len(rows))
        reference_emb = clatr_trajectory_embeddings(clatr, list(reference.with_format("numpy")["camera_poses"]))
        results["ground truth"][subset] = {
            **distribution_metrics(reference_emb, real_emb[rows]),
            **semantic_metrics(real_emb[rows], clatr_text[rows], [real[r] for r in rows], [segments[r] for r in rows]),
        }
        # What the CLaTr-Score gives for unrelated text: real trajectories paired with shuffled captions.
        shuffled = np.random.default_rng(args.seed).permutation(rows)
        mismatched[subset] = clatr_score(real_emb[rows], clatr_text[shuffled])

    # A trivial baseline: the camera stays at the ground truth's first pose (what the metrics give for "no motion").
    static = [np.repeat(poses[:1], len(poses), axis=0) for poses in real]
    static_emb = clatr_trajectory_embeddings(clatr, static)
    results["static camera (baseline)"] = {
        subset: distribution_and_semantic_metrics(
            static_emb[rows], real_emb[rows], clatr_text[rows], [static[r] for r in rows], [segments[r] for r in rows]
        )
        for subset, rows in subset_rows.items()
    }

    pipes, timings, intervals = {}, {}, {}
    for name, path in args.variants.items():
        pipe = DirectorPipeline.from_pretrained(path, text_encoder=text_encoder, tokenizer=tokenizer)
        pipe.set_progress_bar_config(disable=True)
        pipes[name] = pipe
        tic = time.time()
        generated = generate(pipe, director_text, characters, args)
        timings[name] = round(time.time() - tic, 1)
        generated_emb = clatr_trajectory_embeddings(clatr, generated)
        predicted = [tag_camera_motion(np.asarray(poses)) for poses in generated]
        intervals[name] = {
            subset: bootstrap_intervals(
                generated_emb[rows], real_emb[rows], clatr_text[rows], [predicted[r] for r in rows],
                [segments[r] for r in rows], args.seed,
            )
            for subset, rows in subset_rows.items()
        }  # fmt: skip
        results[name] = {
            subset: distribution_and_semantic_metrics(
                generated_emb[rows], real_emb[rows], clatr_text[rows], [generated[r] for r in rows],
                [segments[r] for r in rows],
            )
            for subset, rows in subset_rows.items()
        }  # fmt: skip
        print(name, json.dumps(results[name]["mixed"]), flush=True)

    control_id, control_character = pick_control_character(test)
    readings = controllability_figure(pipes, text_encoder, tokenizer, control_character, args.figure, args)

    summary = {
        "results": results,
        "clatr_score_real_trajectories_shuffled_captions": mismatched,
        "bootstrap_95_intervals": intervals,
        "controllability": {"character_sample": control_id, "readings": readings},
        "generation_seconds": timings,
        "subset_sizes": {subset: len(rows) for subset, rows in subset_rows.items()},
        "max_test_frames": max(len(poses) for poses in real),
        "clatr": args.clatr,
        "variants": args.variants,
        "seed": args.seed,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "wall_time_s": round(time.time() - started, 1),
    }
    os.makedirs(os.path.dirname(args.results_json) or ".", exist_ok=True)
    with open(args.results_json, "w") as file:
        json.dump(summary, file, indent=2)
    write_report(args, summary)
    print(f"Wrote {args.report}, {args.results_json} and {args.figure} in {summary['wall_time_s']} s")
    return summary


def write_report(args, summary):
    verdict = ""
    if os.path.isfile(args.report):
        with open(args.report) as file:
            previous = file.read()
        if VERDICT_MARKER in previous:
            verdict = previous.split(VERDICT_MARKER, 1)[1]
    results = summary["results"]
    commands = open(args.commands).read().strip() if args.commands else ""
    reading_rows = "\n".join(
        f"| {name} | " + " | ".join(entry["tagger"] for entry in entries) + " |"
        for name, entries in summary["controllability"]["readings"].items()
    )
    sizes = summary["subset_sizes"]
    report = f"""# DIRECTOR in miniature: variants A, B, C on synthetic E.T.

Generated by `scripts/reproduce_director_synthetic.py` (numbers below are measured, one generated trajectory per
held-out test caption + character trajectory, seed {summary["seed"]}, {summary["num_inference_steps"]} Heun steps,
guidance {summary["guidance_scale"]}). Test samples: {sizes["full"]} (pure {sizes["pure"]}, mixed {sizes["mixed"]}).
"Ground truth" puts real trajectories in place of generated ones: for FD and P/R/D/C, training trajectories of the
same subset against the test trajectories (the noise floor at this sample size); for the CLaTr-Score and the C-metrics, the
test trajectories themselves. "Static camera" is a trivial baseline: a camera that holds the ground truth's first
pose.

FD_CLaTr: lower is better. CLaTr-Score, P, R, D, C, C-P, C-R, C-F1: higher is better. P/R/D/C use the standard
orientation (real = test trajectories, fake = generated), k = 3. For scale, the CLaTr-Score of real test
trajectories paired with shuffled (unrelated) captions is {", ".join(f"{k} {v:.2f}" for k, v in summary["clatr_score_real_trajectories_shuffled_captions"].items())}.

## Measured: mixed test samples (several camera segments)

{markdown_table(results, "mixed")}

95% bootstrap intervals over the mixed test samples (200 resamples; generation noise and training run fixed):

{interval_table(summary["bootstrap_95_intervals"], "mixed")}

## Measured: pure test samples (one camera segment)

{markdown_table(results, "pure")}

## Measured: all test samples

{markdown_table(results, "full")}

## The paper's table (E.T., real data, CLIP text, 300 frames)

{PAPER_TABLE}

The absolute numbers are not comparable: a different data set (synthetic, template captions, at most
{summary["max_test_frames"]} frames), a different and much smaller CLaTr (MiniLM text tokens), tiny
DIRECTOR models trained for minutes on a CPU. Only the ranking of the variants can be compared.

## Controllability

![controllability](director_controllability.png)

One held-out character trajectory (sample `{summary["controllability"]["character_sample"]}`, the character walks
right) with four prompts; the title of each panel gives the tagger's reading of the generated trajectory.

| variant | {" | ".join(CONTROL_PROMPTS)} |
|---|---|---|---|---|
{reading_rows}

## Commands

```bash
{commands}
```

Generation time per variant (s, CPU, all {sizes["full"]} test samples): {summary["generation_seconds"]}.

{VERDICT_MARKER}{verdict}"""
    os.makedirs(os.path.dirname(args.report) or ".", exist_ok=True)
    with open(args.report, "w") as file:
        file.write(report)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
