"""Add a `coherence` column (how well each image's condition describes it, in [0, 1]) to a `datasets` dataset.

Image + caption, scored by a CLIP model (any transformers CLIP / MetaCLIP checkpoint, or storydiff's tiny digits
CLIP):

    python training/compute_coherence.py --train_data_dir my_images/ --caption_column text \\
        --scorer clip --clip_model openai/clip-vit-base-patch32 --output_dir my_images_scored

Image + class label, scored by a classifier's out-of-fold confidence in the given label:

    python training/compute_coherence.py --train_data_dir my_digits/ --label_column label \\
        --scorer classifier --output_dir my_digits_scored

The data come from an image folder (`--train_data_dir`, with a metadata.jsonl or one sub-folder per class), a folder
written by `save_to_disk` (also `--train_data_dir`) or a Hub dataset (`--dataset_name`). The result is the dataset
with the added column, written with `save_to_disk` to `--output_dir` in one atomic step, and `coherence_stats.json`
(the score distribution, `storydiff.coherence.coherence_summary`) beside it.

CLIP scores are written in chunk files (`<output_dir>.partial/chunk_00012.npy`) as they are computed: rerunning the
same command after a kill continues from the chunks and gives the identical result; chunks made with other
arguments are refused. The chunks hold raw cosines, so `--clip_low/--clip_high` (the affine rescale of
`storydiff.coherence.clip_coherence`) may change between runs. Classifier scores need every sample at once
(cross-validation) and are computed in one piece.
"""

# ruff: noqa: E402 -- the flags are parsed before torch is imported, so that --help answers at once
import argparse
import json
import math
import os
import sys

from storydiff.training.arguments import parse_args_or_exit, training_argument_parser

SCORERS = ("clip", "classifier")
ARGUMENTS_FILE = "arguments.json"
PARTIAL_SUFFIX = ".partial"
STATS_FILE = "coherence_stats.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_data_dir", default=None, help="image folder (datasets 'imagefolder') or a save_to_disk folder"
    )
    data.add_argument("--dataset_name", default=None, help="Hub dataset id (its 'train' split)")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--image_column", default="image")
    data.add_argument("--caption_column", default=None, help="captions, for --scorer clip")
    data.add_argument("--label_column", default=None, help="class labels, for --scorer classifier")
    data.add_argument(
        "--max_samples", dest="max_train_samples", type=int, default=None, help="score only the first N rows"
    )

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--scorer", required=True, choices=SCORERS)
    scoring.add_argument("--clip_model", default=None, help="CLIP folder or Hub id (e.g. storydiff's digits-clip)")
    scoring.add_argument(
        "--clip_low", type=float, default=None, help="cosine mapped to coherence 0 (with --clip_high)"
    )
    scoring.add_argument(
        "--clip_high", type=float, default=None, help="cosine mapped to coherence 1 (with --clip_low)"
    )
    scoring.add_argument("--batch_size", type=int, default=64, help="CLIP pairs per forward pass")
    scoring.add_argument("--chunk_size", type=int, default=1024, help="rows per resumable chunk file")
    scoring.add_argument("--device", default=None, help="CLIP device (default: cuda when available, else cpu)")
    scoring.add_argument("--num_folds", type=int, default=5, help="classifier cross-validation folds")
    scoring.add_argument("--feature_resolution", type=int, default=16, help="classifier: images resized to this")
    scoring.add_argument("--seed", type=int, default=0, help="classifier: fold shuffling")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", required=True, help="where the scored dataset is saved (save_to_disk)")
    output.add_argument("--coherence_column", default="coherence")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    output.add_argument("--debug_stop_after_chunks", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    args = parser.parse_args(argv)

    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("give exactly one data source: --train_data_dir or --dataset_name")
    if args.scorer == "clip":
        if args.caption_column is None or args.clip_model is None:
            parser.error("--scorer clip needs --caption_column and --clip_model")
        if args.label_column is not None:
            parser.error("--label_column is for --scorer classifier; --scorer clip reads --caption_column")
    else:
        if args.label_column is None:
            parser.error("--scorer classifier needs --label_column")
        if args.caption_column is not None or args.clip_model is not None:
            parser.error(
                "--caption_column and --clip_model are for --scorer clip; the classifier reads --label_column"
            )
    if (args.clip_low is None) != (args.clip_high is None):
        parser.error("give both --clip_low and --clip_high, or neither")
    if args.clip_low is not None:
        if args.scorer != "clip":
            parser.error("--clip_low/--clip_high rescale CLIP cosines: they need --scorer clip")
        if not (math.isfinite(args.clip_low) and math.isfinite(args.clip_high)):
            parser.error("--clip_low and --clip_high must be finite")
        if not -1.0 <= args.clip_low < args.clip_high <= 1.0:
            parser.error(f"need -1 <= --clip_low < --clip_high <= 1, got {args.clip_low} and {args.clip_high}")
    for name in ("batch_size", "chunk_size", "feature_resolution"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_folds < 2:
        parser.error(f"--num_folds must be >= 2, got {args.num_folds}")
    if args.max_train_samples is not None and args.max_train_samples < 1:
        parser.error(f"--max_samples must be >= 1, got {args.max_train_samples}")
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from storydiff.atomic_files import atomic_write, save_folder_atomically
from storydiff.coherence import classifier_coherence, clip_cosine, coherence_summary, rescale_cosine
from storydiff.training.datasets_loading import load_image_dataset_from_args
from storydiff.training.text_image_data import image_to_tensor


class ChunksMismatchError(ValueError):
    """The partial results on disk were computed with other arguments than this run's."""


def check_output_dir(args) -> None:
    output_dir = os.path.abspath(args.output_dir)
    if args.train_data_dir is not None and output_dir == os.path.abspath(args.train_data_dir):
        raise ValueError(
            "--output_dir must differ from --train_data_dir: the input is read while the output is saved."
        )
    if os.path.exists(output_dir) and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir!r} already exists; pass --overwrite to replace it.")


def load_clip(name_or_path: str):
    """A CLIP-like model (image and text towers with `get_image_features` / `get_text_features`) and its processor.
    Raises a ValueError naming what was found when the checkpoint is not one."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(f"--clip_model {name_or_path!r} is not a loadable transformers checkpoint: {error}") from None
    not_clip = ValueError(
        f"--clip_model {name_or_path!r} is not a CLIP model: its config is a {type(config).__name__} (model_type "
        f"{config.model_type!r}), without image and text towers whose embeddings can be compared. Pass a CLIP or "
        "MetaCLIP checkpoint, such as openai/clip-vit-base-patch32 or storydiff's digits CLIP "
        "(storydiff.checkpoints.digits_clip_path())."
    )
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise not_clip
    model = AutoModel.from_pretrained(name_or_path)
    if not all(hasattr(model, method) for method in ("get_image_features", "get_text_features")):
        raise not_clip
    return model, AutoProcessor.from_pretrained(name_or_path)


def run_arguments(args, dataset) -> dict:
    """What the partial results depend on: a rerun must match these to reuse them."""
    source = {
        "train_data_dir": os.path.abspath(args.train_data_dir) if args.train_data_dir else None,
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "num_rows": len(dataset),
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "image_column": args.image_column,
    }
    if args.scorer == "clip":
        model = args.clip_model if not os.path.isdir(args.clip_model) else os.path.abspath(args.clip_model)
        scoring = {"caption_column": args.caption_column, "clip_model": model, "chunk_size": args.chunk_size}
    else:
        scoring = {
            "label_column": args.label_column,
            "num_folds": args.num_folds,
            "feature_resolution": args.feature_resolution,
            "seed": args.seed,
        }
    return {"scorer": args.scorer, **source, **scoring}


def open_partial_folder(folder: Path, arguments: dict) -> None:
    """Create the partial-results folder with its arguments, or check that an existing one has the same."""
    saved_path = folder / ARGUMENTS_FILE
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        changed = sorted(name for name in {*saved, *arguments} if saved.get(name) != arguments.get(name))
        if changed:
            details = "; ".join(f"{name}: {saved.get(name)!r} then, {arguments.get(name)!r} now" for name in changed)
            raise ChunksMismatchError(
                f"{folder} holds partial scores computed with other arguments ({details}). Rerun with the original "
                f"arguments to continue, or delete {folder} to start over."
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(saved_path) as file:
        json.dump(arguments, file, indent=1)


def save_array(path: Path, values: np.ndarray) -> None:
    with atomic_write(path, "wb") as file:  # a chunk file is complete or absent, never half written
        np.save(file, values)


def clip_cosines(args, dataset, folder: Path):
    """Raw CLIP cosines of every row, chunk by chunk; None when `--debug_stop_after_chunks` stopped the run."""
    model, processor = load_clip(args.clip_model)
    num_chunks = math.ceil(len(dataset) / args.chunk_size)
    paths = [folder / f"chunk_{index:05d}.npy" for index in range(num_chunks)]
    done = sum(
        min(args.chunk_size, len(dataset) - index * args.chunk_size) for index, p in enumerate(paths) if p.is_file()
    )
    if done:
        print(f"Continuing from {folder}: {done} of {len(dataset)} rows already scored.")
    computed = 0
    with tqdm(total=len(dataset), initial=done, desc="coherence (CLIP)", unit="image") as progress:
        for index, path in enumerate(paths):
            if path.is_file():
                continue
            if args.debug_stop_after_chunks is not None and computed >= args.debug_stop_after_chunks:
                return None
            rows = dataset.select(range(index * args.chunk_size, min((index + 1) * args.chunk_size, len(dataset))))
            captions = [caption if isinstance(caption, str) else "" for caption in rows[args.caption_column]]
            cosines = clip_cosine(
                rows[args.image_column], captions, model, processor, args.batch_size, args.device, show_progress=False
            )
            save_array(path, cosines.numpy().astype(np.float32))
            computed += 1
            progress.update(len(rows))
    return np.concatenate([np.load(path) for path in paths])


def classifier_scores(args, dataset, folder: Path) -> np.ndarray:
    """Out-of-fold classifier confidence in each row's label (one piece: every fold needs all the others)."""
    path = folder / "classifier_scores.npy"
    if path.is_file():
        print(f"Reusing the classifier scores in {path}.")
        return np.load(path)
    features = torch.stack(
        [
            image_to_tensor(image, args.feature_resolution).flatten()
            for image in tqdm(dataset[args.image_column], desc="features", unit="image")
        ]
    )
    labels = np.asarray(dataset[args.label_column])
    print(f"Cross-validating a classifier on {len(labels)} images ({args.num_folds} folds) ...")
    scores = classifier_coherence(features, labels, num_folds=args.num_folds, seed=args.seed)
    save_array(path, scores)
    return scores


def main(argv=None):
    """Score and save; returns the coherence values (None when a debug flag stopped the run early)."""
    args = parse_args(None if argv is None else [str(argument) for argument in argv])
    check_output_dir(args)
    other = (
        {"--caption_column": args.caption_column} if args.scorer == "clip" else {"--label_column": args.label_column}
    )
    dataset = load_image_dataset_from_args(args, other_columns=other)
    if args.coherence_column in dataset.column_names:
        raise ValueError(
            f"The dataset already has a {args.coherence_column!r} column; name the new one with --coherence_column, "
            f"or drop the old one first (`dataset.remove_columns({args.coherence_column!r})`)."
        )
    partial = Path(os.path.abspath(args.output_dir) + PARTIAL_SUFFIX)
    arguments = run_arguments(args, dataset)
    open_partial_folder(partial, arguments)
    try:
        if args.scorer == "clip":
            raw = clip_cosines(args, dataset, partial)
            if raw is None:
                print(f"Stopped early (debug); rerun the same command to continue from {partial}.")
                return None
            coherence = rescale_cosine(torch.from_numpy(raw), args.clip_low, args.clip_high).numpy()
        else:
            raw = None
            coherence = classifier_scores(args, dataset, partial)
    except KeyboardInterrupt:
        print(f"\nInterrupted. Rerun the same command to continue from the chunks in {partial}.", file=sys.stderr)
        raise SystemExit(130) from None

    coherence = coherence.astype(np.float32)
    stats = {"coherence": coherence_summary(coherence), "scorer": args.scorer, "arguments": arguments}
    if raw is not None:
        levels = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)
        stats["clip_cosine"] = {
            "mean": float(raw.mean()),
            **{f"q{round(level * 100)}": float(np.quantile(raw, level)) for level in levels},
        }
        stats["clip_low"], stats["clip_high"] = args.clip_low, args.clip_high
    scored = dataset.add_column(args.coherence_column, coherence.tolist())

    def write(folder: str) -> None:
        scored.save_to_disk(folder)
        with atomic_write(os.path.join(folder, STATS_FILE)) as file:
            json.dump(stats, file, indent=1)

    save_folder_atomically(args.output_dir, write)
    shutil.rmtree(partial, ignore_errors=True)
    summary = stats["coherence"]
    print(
        f"coherence of {summary['count']} rows: mean {summary['mean']:.3f}, std {summary['std']:.3f}, quantiles "
        f"10/50/90 % {summary['q10']:.3f} / {summary['q50']:.3f} / {summary['q90']:.3f}; saved to {args.output_dir} "
        f"(statistics in {STATS_FILE})"
    )
    return coherence


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
