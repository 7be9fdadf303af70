"""Train CLaTr (the text-trajectory embedding behind DIRECTOR's metrics) on an E.T. folder.

    accelerate launch training/train_clatr.py --et_root /data/et --output_dir clatr-et
    python training/train_clatr.py --synthetic_samples 3000 --output_dir clatr-synthetic   # offline, synthetic E.T.

Trajectories become standardised 9-d DIRECTOR features (`storydiff.trajectories`); captions (`caption_cam` by
default, as the reference) become token features of a frozen text encoder, computed once before training and
cached in the output folder (the offline all-MiniLM-L6-v2 by default; `--text_encoder openai/clip-vit-base-patch32`
for the paper's CLIP tokens). Training uses the `clatr_train` split; `clatr_val` gives text-to-trajectory
retrieval recall and the CLaTr-Score of the ground-truth pairs. The model is saved with `save_pretrained`
(safetensors) together with a model card.
"""

# ruff: noqa: E402 -- the flags are parsed before torch and diffusers are imported, so that --help answers at once
import argparse
import os
import sys
from typing import Optional, Sequence

from storydiff.training.arguments import (
    add_common_training_arguments,
    check_common_training_arguments,
    check_path_or_hub_id,
    parse_args_or_exit,
    training_argument_parser,
)

MINILM_ID = "all-MiniLM-L6-v2"
CAPTION_COLUMNS = ("caption_cam", "caption")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser("Train CLaTr on an E.T. folder (or a synthetic one).")
    add_common_training_arguments(parser)
    # The reference trains CLaTr with plain AdamW (lr 1e-4 in TEMOS, 1e-5 in the CLaTr config), no EMA, no schedule.
    parser.set_defaults(
        learning_rate=1e-4, adam_weight_decay=0.01, lr_scheduler="constant", lr_warmup_steps=0, use_ema=False
    )
    group = parser.add_argument_group("data")
    group.add_argument("--et_root", type=str, default=None, help="E.T. folder (with clatr_*_split.txt files).")
    group.add_argument(
        "--synthetic_samples",
        type=int,
        default=None,
        help="Write this many synthetic E.T. samples first (into --et_root, default output_dir/synthetic_et).",
    )
    group.add_argument("--synthetic_seed", type=int, default=0)
    group.add_argument("--synthetic_max_frames", type=int, default=120, help="Longest synthetic sample.")
    group.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training samples.")
    group.add_argument("--caption_column", type=str, default="caption_cam", choices=CAPTION_COLUMNS)
    group.add_argument(
        "--text_encoder",
        type=str,
        default=None,
        help="Hub id or folder of a transformers text encoder; default: the offline all-MiniLM-L6-v2.",
    )
    group.add_argument("--max_text_tokens", type=int, default=77)
    group = parser.add_argument_group("model")
    group.add_argument("--latent_dim", type=int, default=256)
    group.add_argument("--num_layers", type=int, default=6)
    group.add_argument("--num_heads", type=int, default=4)
    group.add_argument("--ff_size", type=int, default=1024)
    group.add_argument("--dropout", type=float, default=0.1)
    group.add_argument("--max_frames", type=int, default=300)
    group.add_argument("--validation_steps", type=int, default=500, help="Evaluate on clatr_val every N steps.")
    group.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    if args.et_root is None and args.synthetic_samples is None:
        parser.error("pass --et_root (an E.T. folder) or --synthetic_samples N (to write a synthetic one).")
    if args.synthetic_samples is not None and args.synthetic_samples < 10:
        raise ValueError(f"--synthetic_samples must be >= 10, got {args.synthetic_samples}.")
    if args.validation_steps < 1:
        raise ValueError(f"--validation_steps must be >= 1, got {args.validation_steps}.")
    if args.num_threads is not None and args.num_threads < 1:
        raise ValueError(f"--num_threads must be >= 1, got {args.num_threads}.")
    check_path_or_hub_id("--text_encoder", args.text_encoder)
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import time

import numpy as np
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.data import load_clatr_split
from storydiff.metrics import clatr_score
from storydiff.models.clatr import CLaTrModel
from storydiff.text_features import load_text_encoder
from storydiff.training.arguments import create_accelerator, end_training
from storydiff.training.caption_features import cached_caption_features, captions_fingerprint
from storydiff.training.checkpointing import (
    SeededEpochSampler,
    TrainingPosition,
    epoch_batches,
    find_checkpoint,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
)
from storydiff.training.ema import create_ema, ema_weights, register_ema_checkpointing
from storydiff.training.et_folder import prepare_et_root
from storydiff.training.hub import DEFAULT_IGNORE_PATTERNS, push_folder_to_hub
from storydiff.training.model_card import recent_loss_metric, training_command, write_model_card
from storydiff.training.optimization import create_optimizer_and_lr_scheduler, training_length
from storydiff.training.run_guards import (
    check_finite_loss,
    check_finite_weights,
    debug_nan_loss,
    resume_hint_on_interrupt,
)
from storydiff.trajectories import poses_to_features, standardize_camera_features


class TrajectoryCaptionDataset(Dataset):
    """Standardised trajectory features (N, 9) with precomputed caption token features, indexed for the log."""

    def __init__(self, features, text):
        self.features, self.text = features, text

    def __len__(self):
        return len(self.features)

    def __getitem__(self, index):
        return {
            "index": index,
            "features": self.features[index],
            "tokens": self.text["tokens"][index],
            "token_mask": self.text["mask"][index],
            "pooled": self.text["pooled"][index],
        }


class CLaTrObjective(torch.nn.Module):
    """Puts `CLaTrModel.compute_loss` behind `forward`, so that DDP (which hooks `forward`) syncs its gradients."""

    def __init__(self, model: CLaTrModel):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict:
        return self.model.compute_loss(
            batch["features"], batch["mask"], batch["tokens"], batch["token_mask"], batch["pooled"]
        )


def collate(examples):
    """Pad trajectories to the longest in the batch; the mask marks real frames."""
    lengths = [len(example["features"]) for example in examples]
    features = torch.zeros(len(examples), max(lengths), examples[0]["features"].shape[-1])
    mask = torch.zeros(len(examples), max(lengths), dtype=torch.bool)
    for row, example in enumerate(examples):
        features[row, : lengths[row]] = example["features"]
        mask[row, : lengths[row]] = True
    return {
        "index": torch.tensor([example["index"] for example in examples]),
        "features": features,
        "mask": mask,
        "tokens": torch.stack([example["tokens"] for example in examples]),
        "token_mask": torch.stack([example["token_mask"] for example in examples]),
        "pooled": torch.stack([example["pooled"] for example in examples]),
    }


def trajectory_features(dataset, max_frames: int) -> list:
    """Standardised DIRECTOR features of every `camera_poses` in a `load_et` dataset."""
    features = []
    for poses in dataset.with_format("numpy")["camera_poses"]:
        if len(poses) > max_frames:
            raise ValueError(f"A trajectory has {len(poses)} frames; --max_frames is {max_frames}.")
        features.append(standardize_camera_features(poses_to_features(np.asarray(poses, dtype=np.float32))).float())
    return features


@torch.no_grad()
def evaluate(model: CLaTrModel, features: list, text: dict, batch_size: int = 64) -> dict:
    """Text-to-trajectory retrieval recall (R@1, R@5) and the CLaTr-Score of the ground-truth pairs."""
    was_training = model.training
    model.eval()
    trajectory_embeddings, text_embeddings = [], []
    device = next(model.parameters()).device
    for start in range(0, len(features), batch_size):
        batch = collate(
            [{"index": i, "features": features[i], "tokens": text["tokens"][i], "token_mask": text["mask"][i],
              "pooled": text["pooled"][i]} for i in range(start, min(start + batch_size, len(features)))]
        )  # fmt: skip
        trajectory_embeddings.append(model.encode_trajectory(batch["features"].to(device), batch["mask"].to(device)))
        text_embeddings.append(model.encode_text(batch["tokens"].to(device), batch["token_mask"].to(device)))
    model.train(was_training)
    trajectory = torch.cat(trajectory_embeddings).float().cpu()
    caption = torch.cat(text_embeddings).float().cpu()
    similarity = torch.nn.functional.normalize(caption, dim=-1) @ torch.nn.functional.normalize(trajectory, dim=-1).T
    rank = (similarity > similarity.diag()[:, None]).sum(1)  # 0 = the paired trajectory is the best match
    return {
        "val_text_to_trajectory_R@1": float((rank < 1).float().mean()),
        "val_text_to_trajectory_R@5": float((rank < 5).float().mean()),
        "val_clatr_score_ground_truth": clatr_score(trajectory, caption),
        "val_samples": len(features),
    }


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder holding the saved model. Ctrl-C exits with status 130 and one line on how
    to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    accelerator = create_accelerator(args, project_name="train_clatr")
    set_seed(args.seed)

    et_root = prepare_et_root(args, accelerator, num_frames=(30, args.synthetic_max_frames))
    train_split = load_clatr_split(et_root, "train", max_samples=args.max_train_samples)
    val_split = load_clatr_split(et_root, "val")
    text_encoder_id = args.text_encoder or MINILM_ID

    def load_encoder():
        return load_text_encoder(args.text_encoder)

    # Text features are computed by the main process and cached, then read by every process.
    cache = {split: os.path.join(args.output_dir, f"text_features_{split}.safetensors") for split in ("train", "val")}
    if accelerator.is_main_process:
        for split, dataset in (("train", train_split), ("val", val_split)):
            cached_caption_features(
                cache[split], list(dataset[args.caption_column]), load_encoder, args.max_text_tokens
            )
    accelerator.wait_for_everyone()
    train_text = {k: v for k, v in load_file(cache["train"]).items() if k != "fingerprint"}
    val_text = {k: v for k, v in load_file(cache["val"]).items() if k != "fingerprint"}
    train_features = trajectory_features(train_split, args.max_frames)
    val_features = trajectory_features(val_split, args.max_frames)

    dataset = TrajectoryCaptionDataset(train_features, train_text)
    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        # A dataloader without its own generator draws its base seed from the global RNG whenever an iterator
        # starts, which would shift the VAE noise and dropout of a resumed run against an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    model = CLaTrModel(
        text_embed_dim=train_text["tokens"].shape[-1],
        latent_dim=args.latent_dim,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        ff_size=args.ff_size,
        dropout=args.dropout,
        max_frames=args.max_frames,
        text_encoder_id=text_encoder_id,
    )
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(model.parameters(), args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset={
            "num_examples": len(dataset),
            "captions": captions_fingerprint(list(train_split[args.caption_column])),
            "caption_column": args.caption_column,
        },
        model_config=model.config,
    )
    objective, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        CLaTrObjective(model), optimizer, dataloader, lr_scheduler
    )
    ema = create_ema(model, args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="Training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    validation = {}
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        objective.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                entry = {"step": position.global_step, "epoch": epoch, "indices": batch["index"].tolist()}
                example_log.write(json.dumps(entry) + "\n")
                example_log.flush()
            with accelerator.accumulate(objective):
                terms = objective(batch)
                terms["loss"] = debug_nan_loss(terms["loss"], args, position.global_step)
                check_finite_loss(accelerator, terms["loss"], position.global_step)
                accelerator.backward(terms["loss"])
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(model.parameters())
            position.global_step += 1
            logs = {name: accelerator.gather(value.detach()).mean().item() for name, value in terms.items()}
            logs["lr"] = lr_scheduler.get_last_lr()[0]
            position.record_loss(logs["loss"])
            accelerator.log(logs, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                with ema_weights(ema, model):
                    validation = evaluate(model, val_features, val_text)
                accelerator.log(validation, step=position.global_step)
                accelerator.print(f"step {position.global_step}: {validation}")
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)
            if position.global_step >= max_train_steps:
                break
    progress.close()
    if example_log is not None:
        example_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(objective).model
        with ema_weights(ema, unwrapped):
            validation = evaluate(unwrapped, val_features, val_text)
            accelerator.log(validation, step=position.global_step)
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                **validation,
                "train_wall_time_s": round(position.total_wall_time_s(), 1),
                "train_examples": len(dataset),
                "parameters": sum(p.numel() for p in unwrapped.parameters()),
            }

            def write_outputs(folder: str) -> None:
                # One atomic swap: a kill or a full disk leaves the previous model or this one, never a mix;
                # checkpoints, logs and the caption-feature caches already there are kept.
                unwrapped.save_pretrained(folder, safe_serialization=True)
                with open(os.path.join(folder, "train_metrics.json"), "w") as file:
                    json.dump(metrics, file, indent=2)
                write_card(folder, args, argv, metrics, text_encoder_id)

            check_finite_weights(unwrapped)
            save_folder_atomically(args.output_dir, write_outputs)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            # The cached caption features and a generated synthetic data set are training inputs, not the model.
            ignore = (*DEFAULT_IGNORE_PATTERNS, "text_features_*.safetensors", "synthetic_et/**")
            url = push_folder_to_hub(
                args.output_dir, repo_id, token=args.hub_token, private=args.hub_private, ignore_patterns=ignore
            )
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved CLaTr and its model card in {args.output_dir}: {validation}")
    end_training(accelerator)
    return args.output_dir


def write_card(folder, args, argv, metrics, text_encoder_id) -> None:
    write_model_card(
        folder,
        title=f"CLaTr ({args.latent_dim}-d, {args.num_layers} layers) on {'synthetic ' if args.synthetic_samples else ''}E.T.",
        description=(
            "A storydiff `CLaTrModel`: the contrastive language-trajectory embedding (TEMOS/TMR-style VAE "
            "encoders for camera trajectories and caption tokens, a trajectory decoder) that DIRECTOR's metrics "
            f"use (FD_CLaTr, CLaTr-Score, P/R/D/C). Caption tokens come from `{text_encoder_id}` "
            f"(`storydiff.text_features.encode_text`, column `{args.caption_column}`); trajectories are "
            "standardised DIRECTOR features (`storydiff.trajectories`). Trained by storydiff's "
            "`training/train_clatr.py` on the `clatr_train` split; the validation figures below are on "
            "`clatr_val`."
        ),
        tags=["clatr", "camera-trajectory", "text-trajectory-retrieval", "director"],
        command=training_command(argv, script=os.path.abspath(__file__)),
        metrics={k: v for k, v in metrics.items() if v is not None},
        usage=(
            "from storydiff import CLaTrModel\nfrom storydiff.text_features import encode_text, "
            "load_text_encoder\nfrom storydiff.trajectories import poses_to_features, "
            "standardize_camera_features\n\n"
            'clatr = CLaTrModel.from_pretrained("path/to/this/folder").eval()\n'
            "text_encoder, tokenizer = load_text_encoder(None)  # the model's text_encoder_id\n"
            'text = encode_text(text_encoder, tokenizer, ["The camera trucks right."])\n'
            "text_embedding = clatr.encode_text(text.tokens, text.mask)\n"
            "trajectory_embedding = clatr.encode_trajectory(standardize_camera_features("
            "poses_to_features(poses))[None])"
        ),
    )


if __name__ == "__main__":
    main()
