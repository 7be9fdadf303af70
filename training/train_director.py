"""Train DIRECTOR (text + character trajectory -> camera trajectory) on an E.T. folder.

    accelerate launch training/train_director.py --et_root /data/et --conditioning_type cross_attention \
        --text_encoder openai/clip-vit-base-patch32 --output_dir director-c            # the paper's setting
    python training/train_director.py --synthetic_samples 2000 --conditioning_type adaln --hidden_size 128 \
        --num_layers 4 --num_heads 4 --num_frames 120 --output_dir director-b-small     # offline, synthetic E.T.

Paper defaults: AdamW (lr 1e-4, betas 0.9/0.95, weight decay 0.1), 5k warmup steps + cosine decay, batch 64, EMA
0.9999, label dropout 0.1 (one shared drop and one per modality; a dropped condition is all zeros), EDM loss with
sigma ~ LogNormal(-1.2, 1.2). Unlike the reference loader, batches are shuffled (a seeded order that resumes exactly)
and the loss is averaged over valid frames only.

Samples are `standardize_camera_features(poses_to_features(poses)) * sigma_data` (the reference's EDM2
normalisation); characters are `encode_character(positions)`; captions (`caption` by default: camera and character,
as DIRECTOR) become text features of a frozen encoder, computed once and cached in the output folder
(`--text_features on_the_fly` encodes every batch instead). Every `--validation_steps` the EMA model is evaluated on
the test split: EDM loss, and for `--num_validation_samples` generated trajectories the tagger-based C-P/C-R/C-F1
against the ground-truth camera segments (plus FD_CLaTr, CLaTr-Score and P/R/D/C with `--clatr_model`).

The result is a `DirectorPipeline` folder (model with EMA weights, `EDMHeunScheduler`, and the text encoder unless
`--no-save_text_encoder`), a model card, and `train_metrics.json`.
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
CAPTION_COLUMNS = ("caption", "caption_cam")
CONDITIONING_TYPES = ("in_context", "adaln", "cross_attention")  # storydiff.models.director's (a test checks)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser("Train DIRECTOR on an E.T. folder (or a synthetic one).")
    add_common_training_arguments(parser)
    parser.set_defaults(
        learning_rate=1e-4,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_weight_decay=0.1,
        lr_scheduler="cosine",
        lr_warmup_steps=5000,
        train_batch_size=64,
        use_ema=True,
        ema_decay=0.9999,
        ema_power=2 / 3,  # ema_pytorch's warm-up (the reference's EMA)
    )
    group = parser.add_argument_group("data")
    group.add_argument("--et_root", type=str, default=None, help="E.T. folder (traj/, char/, caption/, splits).")
    group.add_argument(
        "--synthetic_samples",
        type=int,
        default=None,
        help="Write this many synthetic E.T. samples first (into --et_root, default output_dir/synthetic_et).",
    )
    group.add_argument("--synthetic_seed", type=int, default=0)
    group.add_argument("--synthetic_min_frames", type=int, default=30)
    group.add_argument("--subset", type=str, default="full", choices=["full", "mixed", "pure"])
    group.add_argument(
        "--dataset_label",
        type=str,
        default=None,
        help="Data name for the model card (default: E.T. or synthetic E.T.).",
    )
    group.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training samples.")
    group.add_argument("--caption_column", type=str, default="caption", choices=CAPTION_COLUMNS)
    group.add_argument(
        "--text_encoder",
        type=str,
        default=None,
        help="Hub id or folder of a transformers text encoder (openai/clip-vit-base-patch32 for the paper); "
        "default: the offline all-MiniLM-L6-v2.",
    )
    group.add_argument(
        "--text_features",
        type=str,
        default="precomputed",
        choices=["precomputed", "on_the_fly"],
        help="Encode captions once and cache them (default) or encode every batch.",
    )
    group.add_argument("--max_text_tokens", type=int, default=77)

    group = parser.add_argument_group("model")
    group.add_argument("--conditioning_type", type=str, default="cross_attention", choices=CONDITIONING_TYPES)
    group.add_argument("--num_frames", type=int, default=300, help="Longest trajectory the model takes.")
    group.add_argument("--hidden_size", type=int, default=512)
    group.add_argument("--num_layers", type=int, default=8)
    group.add_argument("--num_heads", type=int, default=16)
    group.add_argument("--num_registers", type=int, default=16)
    group.add_argument("--num_condition_layers", type=int, default=2)
    group.add_argument("--dropout", type=float, default=0.1)
    group.add_argument("--stochastic_depth", type=float, default=0.1)
    group.add_argument("--label_dropout", type=float, default=0.1, help="Shared and per-modality drop probability.")
    group.add_argument("--gradient_checkpointing", action="store_true")

    group = parser.add_argument_group("evaluation and output")
    group.add_argument("--validation_steps", type=int, default=1000, help="Evaluate on the test split every N steps.")
    group.add_argument("--num_validation_samples", type=int, default=32, help="Trajectories generated per evaluation.")
    group.add_argument("--num_inference_steps", type=int, default=10)
    group.add_argument("--guidance_scale", type=float, default=1.4)
    group.add_argument("--clatr_model", type=str, default=None, help="CLaTrModel folder for FD_CLaTr / CLaTr-Score.")
    group.add_argument(
        "--save_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Store the text encoder in the pipeline folder (off for small checkpoints that re-attach MiniLM).",
    )
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    if args.et_root is None and args.synthetic_samples is None:
        parser.error("pass --et_root (an E.T. folder) or --synthetic_samples N (to write a synthetic one).")
    if args.synthetic_samples is not None and args.synthetic_samples < 10:
        raise ValueError(f"--synthetic_samples must be >= 10, got {args.synthetic_samples}.")
    for name in ("validation_steps", "num_inference_steps", "num_frames"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if not 0.0 <= args.label_dropout < 1.0:
        raise ValueError(f"--label_dropout must be in [0, 1), got {args.label_dropout}.")
    check_path_or_hub_id("--text_encoder", args.text_encoder)
    if args.clatr_model is not None and not os.path.isdir(args.clatr_model):
        raise ValueError(
            f"--clatr_model {args.clatr_model!r} is not a folder (a CLaTrModel saved with save_pretrained)."
        )
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
from storydiff.custom_pipelines.director import DirectorPipeline
from storydiff.data import load_et
from storydiff.models.director import DirectorModel, drop_conditions, edm_loss
from storydiff.schedulers.scheduling_edm_heun import EDMHeunScheduler
from storydiff.text_features import TextFeatures, encode_text, load_text_encoder
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
from storydiff.trajectories import encode_character, poses_to_features, standardize_camera_features, tag_camera_motion

# ----------------------------------------------------------------------------------------------------------------
# data


class DirectorDataset(Dataset):
    """One E.T. split as model inputs: samples `(N, 9)`, characters `(N, 3)`, and either cached text features or
    the caption."""

    def __init__(self, split, sigma_data: float, num_frames: int, caption_column: str, text: Optional[dict] = None):
        self.samples, self.characters = [], []
        arrays = split.with_format("numpy")
        for poses, positions in zip(arrays["camera_poses"], arrays["character_positions"]):
            if len(poses) > num_frames:
                raise ValueError(f"A trajectory has {len(poses)} frames; the model takes at most {num_frames}.")
            features = standardize_camera_features(poses_to_features(np.asarray(poses, dtype=np.float32)))
            self.samples.append(features.float() * sigma_data)
            self.characters.append(encode_character(np.asarray(positions, dtype=np.float32)).float())
        self.captions = list(split[caption_column])
        self.text = text

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        item = {"index": index, "sample": self.samples[index], "character": self.characters[index]}
        if self.text is not None:
            item.update({f"text_{k}": v[index] for k, v in self.text.items()})
        else:
            item["caption"] = self.captions[index]
        return item


def collate(examples):
    """Pad to the longest trajectory of the batch; `frame_mask` marks real frames."""
    lengths = [len(example["sample"]) for example in examples]
    batch = len(examples)
    sample = torch.zeros(batch, max(lengths), examples[0]["sample"].shape[-1])
    character = torch.zeros(batch, max(lengths), 3)
    frame_mask = torch.zeros(batch, max(lengths), dtype=torch.bool)
    for row, example in enumerate(examples):
        sample[row, : lengths[row]] = example["sample"]
        character[row, : lengths[row]] = example["character"]
        frame_mask[row, : lengths[row]] = True
    out = {
        "index": torch.tensor([example["index"] for example in examples]),
        "sample": sample,
        "character": character,
        "frame_mask": frame_mask,
    }
    if "caption" in examples[0]:
        out["caption"] = [example["caption"] for example in examples]
    else:
        for key in ("text_pooled", "text_tokens", "text_mask"):
            out[key] = torch.stack([example[key] for example in examples])
    return out


def batch_text(batch, text_encoder, tokenizer, max_length: int, device) -> tuple:
    if "caption" in batch:  # on the fly
        features = encode_text(text_encoder, tokenizer, batch["caption"], max_length=max_length, device=device)
        return features.pooled, features.tokens, features.mask
    return batch["text_pooled"], batch["text_tokens"], batch["text_mask"]


# ----------------------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, scheduler, test_split, test_dataset, args, text_encoder=None, tokenizer=None, clatr=None) -> dict:
    """EDM loss on the test split (fixed noise), then generated-sample metrics on its first samples."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(1234)
    losses, weights = [], []
    for start in range(0, len(test_dataset), 64):
        batch = collate([test_dataset[i] for i in range(start, min(start + 64, len(test_dataset)))])
        pooled, tokens, mask = batch_text(batch, text_encoder, tokenizer, args.max_text_tokens, device)
        loss = edm_loss(
            model,
            batch["sample"].to(device),
            batch["frame_mask"].to(device),
            generator=generator,
            character_features=batch["character"].to(device),
            text_pooled=pooled.to(device),
            text_tokens=tokens.to(device),
            text_mask=mask.to(device),
        )
        losses.append(loss.item())
        weights.append(int(batch["frame_mask"].sum()))
    metrics = {"val_loss": float(np.average(losses, weights=weights)), "val_samples": len(test_dataset)}

    count = min(args.num_validation_samples, len(test_dataset))
    metrics["val_generated_samples"] = count
    if count > 0:
        pipeline = DirectorPipeline(model=model, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer)
        pipeline.set_progress_bar_config(disable=True)
        arrays = test_split.with_format("numpy")
        generated, predicted, target, features_real, features_fake, text_rows = [], [], [], [], [], []
        for i in range(count):
            item = test_dataset[i]
            if "caption" in item:
                text = encode_text(text_encoder, tokenizer, item["caption"], args.max_text_tokens, device=device)
            else:
                text = TextFeatures(item["text_pooled"][None], item["text_tokens"][None], item["text_mask"][None])
            out = pipeline(
                text_features=text,
                character_trajectory=np.asarray(arrays[i]["character_positions"], dtype=np.float32),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                generator=torch.Generator(device="cpu").manual_seed(i),
                output_type="pt",
            )
            poses = out.trajectories[0].cpu()
            generated.append(poses)
            if len(poses) >= 2:
                predicted.append(tag_camera_motion(poses))
                target.append(np.asarray(arrays[i]["camera_segments"]))
            features_fake.append(standardize_camera_features(poses_to_features(poses)).float())
            features_real.append(item["sample"] / model.config.sigma_data)
            text_rows.append(text)
        from storydiff.metrics import camera_tag_scores

        if predicted:
            tags = camera_tag_scores(np.concatenate(predicted), np.concatenate(target))
            metrics.update({f"val_camera_{k}": v for k, v in tags.items()})
        if clatr is not None:
            metrics.update(clatr_metrics(clatr, features_real, features_fake, text_rows, device))
    model.train(was_training)
    return metrics


def clatr_metrics(clatr, features_real, features_fake, text_rows, device) -> dict:
    from storydiff.metrics import clatr_score, frechet_distance, precision_recall_density_coverage

    def embed(features):
        lengths = [len(f) for f in features]
        padded = torch.zeros(len(features), max(lengths), 9)
        mask = torch.zeros(len(features), max(lengths), dtype=torch.bool)
        for row, f in enumerate(features):
            padded[row, : lengths[row]], mask[row, : lengths[row]] = f, True
        return clatr.encode_trajectory(padded.to(device), mask.to(device)).float().cpu().numpy()

    real, fake = embed(features_real), embed(features_fake)
    metrics = {}
    if len(real) > 3:
        metrics["val_fd_clatr"] = frechet_distance(real, fake)
        metrics.update({f"val_{k}": v for k, v in precision_recall_density_coverage(real, fake, k=3).items()})
    if text_rows and text_rows[0].tokens.shape[-1] == clatr.config.text_embed_dim:
        tokens = torch.cat([t.tokens for t in text_rows]).to(device)
        mask = torch.cat([t.mask for t in text_rows]).to(device)
        metrics["val_clatr_score"] = clatr_score(fake, clatr.encode_text(tokens, mask).float().cpu().numpy())
    return metrics


# ----------------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder holding the saved pipeline. Ctrl-C exits with status 130 and one line on
    how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_director")
    set_seed(args.seed)

    et_root = prepare_et_root(args, accelerator, num_frames=(args.synthetic_min_frames, args.num_frames))
    train_split = load_et(et_root, "train", args.subset, max_samples=args.max_train_samples)
    test_split = load_et(et_root, "test", args.subset)
    text_encoder_id = args.text_encoder or MINILM_ID
    encoder_cache = {}

    def load_encoder():
        if "encoder" not in encoder_cache:
            encoder_cache["encoder"] = load_text_encoder(args.text_encoder)
        return encoder_cache["encoder"]

    captions = {"train": list(train_split[args.caption_column]), "test": list(test_split[args.caption_column])}
    text = {"train": None, "test": None}
    if args.text_features == "precomputed":
        cache = {s: os.path.join(args.output_dir, f"text_features_{s}.safetensors") for s in ("train", "test")}
        if accelerator.is_main_process:
            for split in ("train", "test"):
                cached_caption_features(cache[split], captions[split], load_encoder, args.max_text_tokens)
        accelerator.wait_for_everyone()
        text = {s: {k: v for k, v in load_file(cache[s]).items() if k != "fingerprint"} for s in ("train", "test")}
        text_embed_dim = text["train"]["pooled"].shape[-1]
    else:
        text_encoder, _ = load_encoder()
        text_encoder.to(accelerator.device)
        text_embed_dim = text_encoder.config.hidden_size

    model = DirectorModel(
        conditioning_type=args.conditioning_type,
        num_frames=args.num_frames,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        text_embed_dim=text_embed_dim,
        max_text_length=args.max_text_tokens,
        num_registers=args.num_registers,
        num_condition_layers=args.num_condition_layers,
        dropout=args.dropout,
        stochastic_depth=args.stochastic_depth,
    )
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    sigma_data = model.config.sigma_data
    train_dataset = DirectorDataset(train_split, sigma_data, args.num_frames, args.caption_column, text["train"])
    test_dataset = DirectorDataset(test_split, sigma_data, args.num_frames, args.caption_column, text["test"])

    sampler = SeededEpochSampler(len(train_dataset), seed=args.seed)  # the reference loader does not shuffle
    dataloader = DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # keeps the global RNG (noise, dropout) resumable
    )
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(model.parameters(), args, accelerator, max_train_steps)
    settings = resume_settings(
        args,
        accelerator,
        dataset={
            "subset": args.subset,
            "num_examples": len(train_dataset),
            "captions": captions_fingerprint(captions["train"]),
            "caption_column": args.caption_column,
        },
        model_config={**model.config, "label_dropout": args.label_dropout, "text_encoder": text_encoder_id},
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    ema = create_ema(unwrapped, args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)
    scheduler = EDMHeunScheduler(sigma_data=sigma_data)
    clatr = None
    if args.clatr_model is not None:
        from storydiff.models.clatr import CLaTrModel

        clatr = CLaTrModel.from_pretrained(args.clatr_model).eval().to(accelerator.device)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from yet; starting a new run.")

    encoder, tokenizer = load_encoder() if args.text_features == "on_the_fly" else (None, None)
    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="Training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    validation = {}
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        model.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                entry = {"step": position.global_step, "epoch": epoch, "indices": batch["index"].tolist()}
                example_log.write(json.dumps(entry) + "\n")
                example_log.flush()
            pooled, tokens, mask = batch_text(batch, encoder, tokenizer, args.max_text_tokens, accelerator.device)
            character, pooled, tokens, mask = drop_conditions(
                batch["character"], pooled, tokens, mask, probability=args.label_dropout
            )
            with accelerator.accumulate(model):
                loss = edm_loss(
                    model,
                    batch["sample"],
                    batch["frame_mask"],
                    sigma_data=sigma_data,
                    character_features=character,
                    text_pooled=pooled,
                    text_tokens=tokens,
                    text_mask=mask,
                )
                loss = debug_nan_loss(loss, args, position.global_step)
                step_loss = check_finite_loss(accelerator, loss, position.global_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(unwrapped.parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0]}
            accelerator.log(logs, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}", epoch=epoch)

            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if position.global_step % args.validation_steps == 0 and accelerator.is_main_process:
                with ema_weights(ema, unwrapped):
                    validation = evaluate(
                        unwrapped, scheduler, test_split, test_dataset, args, encoder, tokenizer, clatr
                    )
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
        with ema_weights(ema, unwrapped):
            validation = evaluate(unwrapped, scheduler, test_split, test_dataset, args, encoder, tokenizer, clatr)
            if args.save_text_encoder:
                encoder, tokenizer = load_encoder()
            pipeline = DirectorPipeline(
                model=unwrapped.eval(),
                scheduler=scheduler,
                text_encoder=encoder if args.save_text_encoder else None,
                tokenizer=tokenizer if args.save_text_encoder else None,
            )
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                **validation,
                "train_wall_time_s": round(position.total_wall_time_s(), 1),
                "train_examples": len(train_dataset),
                "parameters": sum(p.numel() for p in unwrapped.parameters()),
            }

            def write_outputs(folder: str) -> None:
                # One atomic swap: a kill or a full disk leaves the previous pipeline or this one, never a mix;
                # checkpoints, logs and the caption-feature caches already there are kept.
                pipeline.save_pretrained(folder, safe_serialization=True)
                with open(os.path.join(folder, "train_metrics.json"), "w") as file:
                    json.dump(metrics, file, indent=2)
                write_card(folder, args, argv, metrics, text_encoder_id)

            accelerator.log(validation, step=position.global_step)
            check_finite_weights(unwrapped)
            save_folder_atomically(args.output_dir, write_outputs)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            ignore = (*DEFAULT_IGNORE_PATTERNS, "text_features_*.safetensors", "synthetic_et/**")
            url = push_folder_to_hub(
                args.output_dir, repo_id, token=args.hub_token, private=args.hub_private, ignore_patterns=ignore
            )
            accelerator.print(f"Pushed to {url}")
        accelerator.print(f"Saved a DirectorPipeline in {args.output_dir}: {validation}")
    end_training(accelerator)
    return args.output_dir


def write_card(folder, args, argv, metrics, text_encoder_id):
    variant = {"in_context": "A (in-context)", "adaln": "B (AdaLN)", "cross_attention": "C (cross-attention)"}
    data = args.dataset_label or ("synthetic E.T." if args.synthetic_samples else "E.T.")
    if args.save_text_encoder:
        load = 'pipe = DirectorPipeline.from_pretrained("path/to/this/folder")'
    else:
        load = (
            "text_encoder, tokenizer = load_text_encoder("
            + (f'"{args.text_encoder}"' if args.text_encoder else "")
            + ")\n"
            'pipe = DirectorPipeline.from_pretrained("path/to/this/folder", text_encoder=text_encoder, '
            "tokenizer=tokenizer)"
        )
    write_model_card(
        folder,
        title=f"DIRECTOR {variant[args.conditioning_type]}, {args.hidden_size}-d x {args.num_layers}, on {data}",
        description=(
            "A storydiff `DirectorPipeline`: DIRECTOR (Courant et al., ECCV 2024) generates camera trajectories "
            f"(camera-to-world poses, up to {args.num_frames} frames at 25 fps) from a caption and the character's "
            f"trajectory. Conditioning variant {variant[args.conditioning_type]}; text features from "
            f"`{text_encoder_id}` (`storydiff.text_features.encode_text`, column `{args.caption_column}`)"
            + ("" if args.save_text_encoder else "; the text encoder is not stored here, attach it when loading")
            + ". Trained by storydiff's `training/train_director.py`; validation figures are on the "
            f"`{args.subset}_test` split ({metrics.get('val_samples')} samples for the loss, "
            f"{metrics.get('val_generated_samples')} generated trajectories for the tagger-based C-P/C-R/C-F1)."
        ),
        tags=["director", "camera-trajectory", "text-to-trajectory", "edm"],
        command=training_command(argv, script=os.path.abspath(__file__)),
        metrics={k: v for k, v in metrics.items() if v is not None},
        usage=(
            "from storydiff import DirectorPipeline\nfrom storydiff.text_features import load_text_encoder\n\n"
            f"{load}\n"
            'out = pipe("The camera trucks right.", num_frames=100)\n'
            "out.trajectories  # (1, 100, 4, 4) camera-to-world poses"
        ),
    )


if __name__ == "__main__":
    main()
