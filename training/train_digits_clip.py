"""Train a tiny contrastive image-text model (a transformers `CLIPModel`) on the captioned digits world.

It is the offline stand-in for CLIP in coherence-aware diffusion: `storydiff.coherence.clip_coherence` scores
image-caption pairs with it exactly as it would with a real CLIP checkpoint, because it *is* a `CLIPModel` (a
`CLIPConfig` with a tiny text and vision tower) with a `CLIPProcessor` (a word-level CLIP tokenizer and a
`CLIPImageProcessor` sized for the canvases). The saved folder loads with `CLIPModel.from_pretrained(folder)` and
`CLIPProcessor.from_pretrained(folder)`.

    OMP_NUM_THREADS=1 python training/train_digits_clip.py --output_dir storydiff/checkpoints/digits-clip

Each epoch re-words every canvas' caption at random (templates, numerals or words, synonyms), so the text tower
learns what a caption states rather than one wording. After training, held-out figures (test-split glyphs, never
trained on) go into `train_metrics.json` and the model card: image-to-text top-1 retrieval accuracy within batches,
and the mean cosine for true, wrong and vague captions of `storydiff.data.noisy.noisy_digits_world`, which is what
makes the cosine useful as a coherence score.

Data order is a per-epoch permutation seeded by `seed` and the epoch, and a checkpoint is written after every epoch
(training/checkpointing.py, in `--work_dir/checkpoints`), so `--resume_from_checkpoint latest` continues after a
kill without losing or repeating data.
"""

# ruff: noqa: E402 -- the flags are parsed before torch is imported, so that --help answers at once
import argparse
import math
import os
import sys

from storydiff.training.arguments import end_training, parse_args_or_exit, training_argument_parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__)
    parser.add_argument("--output_dir", default="storydiff/checkpoints/digits-clip", help="final model folder")
    parser.add_argument("--work_dir", default="runs/digits-clip", help="checkpoints and tensorboard logs")
    parser.add_argument("--resolution", type=int, default=32, help="canvas side (the digits text-to-image model's)")
    parser.add_argument("--num_world_samples", type=int, default=8000, help="training canvases")
    parser.add_argument("--num_eval_samples", type=int, default=600, help="held-out canvases for the figures")
    parser.add_argument("--hidden_size", type=int, default=32, help="width of both towers")
    parser.add_argument("--num_layers", type=int, default=2, help="transformer layers per tower")
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=4)
    parser.add_argument("--projection_dim", type=int, default=32, help="width of the shared embedding")
    parser.add_argument("--tokenizer_max_length", type=int, default=24)
    parser.add_argument("--num_epochs", type=int, default=16)
    # Named like the shared flag inside, so that the shared resume checks read it.
    parser.add_argument("--batch_size", dest="train_batch_size", type=int, default=128)
    parser.add_argument("--eval_batch_size", type=int, default=64, help="retrieval candidates per image")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    parser.add_argument(
        "--allow_resume_with_changed_settings",
        action="store_true",
        help="resume even if batch size, seed, data or model differ from the checkpoint's (with a warning)",
    )
    parser.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch_num_threads", type=int, default=None, help="CPU threads (1 is best on a busy CPU)")
    parser.add_argument("--debug_nan_loss_at_step", type=int, default=None, help=argparse.SUPPRESS)  # for tests
    parser.add_argument("--debug_step_sleep", type=float, default=0.0, help=argparse.SUPPRESS)  # kill tests
    parser.set_defaults(gradient_accumulation_steps=1)
    args = parser.parse_args(argv)
    for name in ("num_epochs", "train_batch_size", "checkpoints_total_limit", "num_world_samples", "num_layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('train_', '')} must be >= 1, got {getattr(args, name)}")
    for name in ("num_eval_samples", "eval_batch_size"):
        if getattr(args, name) < 2:
            parser.error(f"--{name} must be >= 2 (retrieval needs candidates), got {getattr(args, name)}")
    if args.resolution % args.patch_size:
        parser.error(f"--resolution {args.resolution} must be divisible by --patch_size {args.patch_size}")
    if args.hidden_size % args.num_heads:
        parser.error(f"--hidden_size {args.hidden_size} must be divisible by --num_heads {args.num_heads}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        parser.error(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    if args.torch_num_threads is not None and args.torch_num_threads < 1:
        parser.error(f"--torch_num_threads must be >= 1, got {args.torch_num_threads}")
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from storydiff.atomic_files import atomic_write, save_folder_atomically
from storydiff.coherence import clip_cosine
from storydiff.data.digits import caption_for, digits_world_arrays
from storydiff.data.noisy import VAGUE_CAPTIONS, noisy_digits_world
from storydiff.training.checkpointing import (
    TrainingPosition,
    find_checkpoint,
    load_checkpoint,
    resume_settings,
    save_checkpoint,
)
from storydiff.training.model_card import training_command, write_model_card
from storydiff.training.run_guards import (
    check_finite_loss,
    check_finite_weights,
    check_output_dir_writable,
    debug_nan_loss,
    resume_hint_on_interrupt,
)
from storydiff.training.text_to_image_components import caption_words, word_level_clip_tokenizer

# Wrong and vague captions in the held-out noisy world that measures the score (the rest stay true).
EVAL_FRACTION_WRONG = EVAL_FRACTION_VAGUE = 1 / 3


def new_processor(captions, args):
    """A `CLIPProcessor`: a word-level CLIP tokenizer over the words of `captions` (and of the vague captions, so
    the noisy data tokenize word by word too) and a `CLIPImageProcessor` that turns a canvas of `args.resolution`
    pixels into exactly the [-1, 1] pixel values the world's arrays hold (mean 0.5, std 0.5; resize and crop are
    the identity at that size)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    with tempfile.TemporaryDirectory() as folder:  # the processor saves the tokenizer with the model
        tokenizer = word_level_clip_tokenizer(
            caption_words([*captions, *VAGUE_CAPTIONS]), folder, args.tokenizer_max_length
        )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": args.resolution},
        crop_size={"height": args.resolution, "width": args.resolution},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def new_clip_model(tokenizer, args):
    """A randomly initialised tiny `CLIPModel` for `tokenizer` and canvases of `args.resolution` pixels."""
    from transformers import CLIPConfig, CLIPModel

    tower = {
        "hidden_size": args.hidden_size,
        "intermediate_size": 4 * args.hidden_size,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
    }
    text_config = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {**tower, "image_size": args.resolution, "patch_size": args.patch_size, "num_channels": 3}
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=args.projection_dim)
    torch.manual_seed(args.seed)
    return CLIPModel(config)


def epoch_captions(attributes, seed: int, epoch: int) -> list:
    """Every canvas' caption, worded at random for this epoch (the same for a resumed run)."""
    rng = np.random.default_rng([seed, epoch])
    return [caption_for(attributes_list, rng) for attributes_list in attributes]


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images, attributes, batch_size: int, seed: int) -> float:
    """Image -> text top-1 accuracy within batches of `batch_size` held-out canvases: the best-scoring caption must
    state the image's attributes (a caption of another canvas with the same attributes counts as right)."""
    model.eval()
    captions = epoch_captions(attributes, seed, epoch=0)
    correct = 0
    for start in range(0, len(captions), batch_size):
        stop = min(start + batch_size, len(captions))
        if stop - start < 2:
            break
        tokens = tokenizer(captions[start:stop], padding=True, truncation=True, return_tensors="pt")
        output = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=images[start:stop]
        )
        best = output.logits_per_image.argmax(dim=1).tolist()
        correct += sum(attributes[start + chosen] == attributes[start + row] for row, chosen in enumerate(best))
        evaluated = stop
    model.train()
    return correct / evaluated


def coherence_figures(model, processor, args) -> dict:
    """Mean cosine of true, wrong and vague captions on held-out noisy canvases, and how well the cosine ranks true
    captions above wrong / vague ones (AUROC)."""
    from sklearn.metrics import roc_auc_score

    world = noisy_digits_world(
        args.num_eval_samples, args.resolution, EVAL_FRACTION_WRONG, EVAL_FRACTION_VAGUE, seed=args.seed, split="test"
    )
    cosines = clip_cosine(world["image"], world["text"], model, processor, device="cpu").numpy()
    corruption = np.array(world["corruption"])
    figures = {f"cosine_mean_{kind}": float(cosines[corruption == kind].mean()) for kind in ("none", "wrong", "vague")}
    figures = {name.replace("_none", "_true"): value for name, value in figures.items()}
    for kind in ("wrong", "vague"):
        chosen = (corruption == "none") | (corruption == kind)
        figures[f"auroc_true_vs_{kind}"] = float(roc_auc_score(corruption[chosen] == "none", cosines[chosen]))
    figures["cosine_q10"], figures["cosine_q90"] = (float(value) for value in np.quantile(cosines, [0.1, 0.9]))
    return figures


def main(argv=None) -> dict:
    """Train; returns the metrics. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = [str(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir, checkpoint_dir=os.path.join(args.work_dir, "checkpoints")):
        return train(args, argv)


def train(args: argparse.Namespace, argv) -> dict:
    check_output_dir_writable(args.output_dir)
    check_output_dir_writable(args.work_dir, flag="--work_dir")
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    work_dir, output_dir = Path(args.work_dir), Path(args.output_dir)
    checkpoint_dir = str(work_dir / "checkpoints")
    accelerator = Accelerator(
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / "logs")),
    )
    set_seed(args.seed)
    train_images, _, train_attributes = digits_world_arrays(
        "train", args.num_world_samples, args.seed, args.resolution
    )
    test_images, _, test_attributes = digits_world_arrays("test", args.num_eval_samples, args.seed, args.resolution)
    # the vocabulary covers every wording: captions of a few epochs' worth of random templates and synonyms
    vocabulary_captions = [caption for epoch in range(3) for caption in epoch_captions(train_attributes, 0, epoch)]
    processor = new_processor(vocabulary_captions, args)
    tokenizer = processor.tokenizer

    model = new_clip_model(tokenizer, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_attributes) / args.train_batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.num_epochs * steps_per_epoch
    )
    settings = resume_settings(
        args,
        accelerator,
        dataset={"name": "storydiff-digits-world", "resolution": args.resolution, "num_examples": len(train_images)},
        model_config={**model.config.to_dict(), "num_epochs": args.num_epochs},
    )
    # Every process trains on the whole batch (CLIP's contrastive loss takes its negatives from the batch, and the
    # model is tiny), so the learning-rate schedule must advance once per step: accelerate's prepared scheduler would
    # step once per process. It is registered for the checkpoints instead, so a resume restores it all the same.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("digits-clip", config={k: str(v) for k, v in vars(args).items()})

    position = TrainingPosition()
    checkpoint = find_checkpoint(checkpoint_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)
        accelerator.print(f"Resumed from {checkpoint} after epoch {position.epoch}.")
    elif args.resume_from_checkpoint is not None:
        accelerator.print("No checkpoint to resume from; starting from scratch.")

    progress = tqdm(
        range(position.epoch * steps_per_epoch, args.num_epochs * steps_per_epoch),
        desc="digits CLIP",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(position.epoch, args.num_epochs):
        tokens = tokenizer(
            epoch_captions(train_attributes, args.seed, epoch),
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for batch_indices in order.split(args.train_batch_size):
            output = model(
                input_ids=tokens.input_ids[batch_indices].to(accelerator.device),
                attention_mask=tokens.attention_mask[batch_indices].to(accelerator.device),
                pixel_values=train_images[batch_indices].to(accelerator.device),
                return_loss=True,  # CLIP's symmetric cross-entropy over the batch's image-text similarities
            )
            loss = debug_nan_loss(output.loss, args, position.global_step)
            step_loss = check_finite_loss(accelerator, loss, position.global_step)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.global_step += 1
            position.record_loss(step_loss)
            progress.update(1)
            progress.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}")
            accelerator.log({"train/loss": step_loss}, step=position.global_step - 1)
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)

        unwrapped = accelerator.unwrap_model(model)
        accuracy = retrieval_accuracy(
            unwrapped, tokenizer, test_images, test_attributes, args.eval_batch_size, args.seed
        )
        accelerator.log({"test/retrieval_top1": accuracy}, step=(epoch + 1) * steps_per_epoch)
        position.epoch = epoch + 1
        save_checkpoint(accelerator, checkpoint_dir, position, args.checkpoints_total_limit, settings)
    progress.close()

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(model).eval()
    metrics = {
        "retrieval_top1": retrieval_accuracy(
            model, tokenizer, test_images, test_attributes, args.eval_batch_size, args.seed
        ),
        "retrieval_batch_size": args.eval_batch_size,
        **coherence_figures(model, processor, args),
        "num_eval_samples": args.num_eval_samples,
        "epochs": args.num_epochs,
        "train_steps": position.global_step,
        "train_wall_time_s": round(position.total_wall_time_s(), 1),
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
    }
    if accelerator.is_main_process:
        command = training_command(argv, script=os.path.abspath(__file__))

        def write_outputs(folder: str) -> None:  # one atomic swap: the old model or the new one, never a mix
            model.save_pretrained(folder)  # safetensors
            processor.save_pretrained(folder)
            with atomic_write(os.path.join(folder, "train_metrics.json")) as file:
                json.dump(metrics, file, indent=1)
            write_card(folder, args, metrics, command)

        check_finite_weights(model)
        save_folder_atomically(output_dir, write_outputs)
        accelerator.print(
            f"retrieval top-1 {metrics['retrieval_top1']:.3f}; mean cosine true {metrics['cosine_mean_true']:.3f}, "
            f"wrong {metrics['cosine_mean_wrong']:.3f}, vague {metrics['cosine_mean_vague']:.3f}; saved to {output_dir}"
        )
    end_training(accelerator)
    return metrics


def write_card(folder: str, args, metrics: dict, command: str) -> None:
    description = f"""
A tiny contrastive image-text model: a transformers `CLIPModel` (text and vision towers of width
{args.hidden_size}, {args.num_layers} layers each, {args.patch_size}x{args.patch_size} patches, a
{args.projection_dim}-d shared embedding; {metrics["num_parameters"]:,} parameters) with a word-level CLIP tokenizer
and a `CLIPImageProcessor` for {args.resolution}x{args.resolution} canvases, trained by storydiff's
`training/train_digits_clip.py` on {args.num_world_samples} canvases of the captioned digits world
(`storydiff.data.digits`, one digit per canvas, captions re-worded at random every epoch).

It is the offline stand-in for CLIP in coherence-aware diffusion: `storydiff.coherence.clip_coherence` and
`training/compute_coherence.py --scorer clip --clip_model <this folder>` score image-caption pairs with it through
the same code path as a real CLIP checkpoint.

Held-out figures (test-split glyphs, never trained on): image-to-text top-1 retrieval among
{args.eval_batch_size} captions, and the cosine of {args.num_eval_samples} canvases of
`storydiff.data.noisy.noisy_digits_world(split="test")` whose captions are one third true, one third wrong (the
caption of a canvas with another digit in another colour) and one third vague ("a digit", "a number on a canvas",
...). True captions score a mean cosine of {metrics["cosine_mean_true"]:.3f}, wrong ones
{metrics["cosine_mean_wrong"]:.3f} and vague ones {metrics["cosine_mean_vague"]:.3f}, so the authors' coherence
max(cos, 0) already spreads over [0, 1] here (a large CLIP's matching pairs sit near 0.3 instead). For a model whose
cosines crowd into a narrow range, `clip_coherence(..., low=, high=)` (`--clip_low/--clip_high` of
compute_coherence.py) maps [low, high], say the 10th to 90th percentile of the cosines, onto [0, 1].
"""
    usage = """
from transformers import CLIPModel, CLIPProcessor
from storydiff.checkpoints import digits_clip_path
from storydiff.coherence import clip_coherence

model = CLIPModel.from_pretrained(digits_clip_path())
processor = CLIPProcessor.from_pretrained(digits_clip_path())
coherence = clip_coherence(images, captions, model, processor)  # (N,) in [0, 1]
"""
    write_model_card(
        folder,
        title=f"Digits CLIP: a tiny contrastive image-text model of the captioned digits world ({args.resolution}x"
        f"{args.resolution})",
        description=description,
        tags=["clip", "zero-shot-image-classification", "coherence"],
        command=f"OMP_NUM_THREADS=1 {command}",
        metrics=metrics,
        datasets=["storydiff-digits-world"],
        usage=usage,
    )


if __name__ == "__main__":
    main()
