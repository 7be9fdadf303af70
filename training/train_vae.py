"""Train a small `AutoencoderKL` (the latent space of a miniature Stable Diffusion) on images.

    accelerate launch training/train_vae.py --dataset digits_world --resolution 32 --output_dir digits-vae
    python training/train_vae.py --train_data_dir my_images/ --resolution 64 --output_dir my-vae

Loss: mean squared reconstruction error plus `--kl_weight` times the KL divergence of the posterior to N(0, I), as
in the latent-diffusion autoencoders without their perceptual and adversarial terms (at 32x32 pixels an MSE-trained
autoencoder already reconstructs the digits world). After training, the latents' scaling factor (diffusers'
`vae.config.scaling_factor`, 0.18215 for SD) is measured as 1 / std of the training latents and saved in the
config, so diffusion models trained on `latents * scaling_factor` see unit variance. The saved folder is a stock
diffusers `AutoencoderKL` with a model card that reports the held-out reconstruction error.
"""

# ruff: noqa: E402 -- the flags are parsed before torch and diffusers are imported, so that --help answers at once
import argparse
import math
import os
import sys
from typing import Optional, Sequence

from storydiff.training.arguments import (
    add_common_training_arguments,
    check_common_training_arguments,
    int_list,
    parse_args_or_exit,
    training_argument_parser,
)
from storydiff.training.datasets_loading import add_image_data_arguments, check_one_data_source

DIGITS_WORLD = "digits_world"
BUILT_IN_DATASETS = (DIGITS_WORLD,)
EVALUATION_EXAMPLES = 256


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = training_argument_parser(__doc__.split("\n\n")[0])
    data = add_image_data_arguments(parser, BUILT_IN_DATASETS, "Image folder.", 32, "Training image size in pixels.")
    data.add_argument("--num_world_samples", type=int, default=4000, help="Canvases of the digits world.")

    model = parser.add_argument_group("model")
    model.add_argument("--block_out_channels", type=str, default="16,32,64", help="Channels per level.")
    model.add_argument("--latent_channels", type=int, default=4)
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--norm_num_groups", type=int, default=8)
    model.add_argument("--kl_weight", type=float, default=1e-4, help="Weight of the KL term.")

    add_common_training_arguments(parser)
    parser.set_defaults(learning_rate=1e-3, train_batch_size=64, use_ema=False, lr_warmup_steps=50)
    args = parser.parse_args(argv)
    check_common_training_arguments(args)
    check_one_data_source(args, BUILT_IN_DATASETS)
    if not math.isfinite(args.kl_weight) or args.kl_weight < 0:
        raise ValueError(f"--kl_weight must be a finite number >= 0, got {args.kl_weight}.")
    args.block_out_channels = int_list("--block_out_channels", args.block_out_channels, minimum=1)
    downsampling = 2 ** (len(args.block_out_channels) - 1)
    if args.resolution < 8 or args.resolution % downsampling:
        raise ValueError(f"--resolution {args.resolution} must be >= 8 and divisible by {downsampling}.")
    return args


if __name__ == "__main__":
    parse_args_or_exit(parse_args)  # --help and bad flags answer here, before the imports below take seconds

import json
import time

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from storydiff.atomic_files import save_folder_atomically
from storydiff.training.arguments import create_accelerator, end_training
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
from storydiff.training.hub import push_folder_to_hub
from storydiff.training.model_card import recent_loss_metric, training_command, write_model_card
from storydiff.training.optimization import create_optimizer_and_lr_scheduler, training_length
from storydiff.training.run_guards import (
    check_finite_loss,
    check_finite_weights,
    debug_nan_loss,
    resume_hint_on_interrupt,
)
from storydiff.training.text_image_data import ImageCaptionDataset, collate_image_captions, digits_world_training_data
from storydiff.training.text_to_image_components import new_vae


def load_training_data(args) -> tuple:
    """`(train dataset, held-out evaluation images (N, 3, H, W), dataset id)`."""
    if args.dataset == DIGITS_WORLD:
        from storydiff.data.digits import digits_world_arrays

        dataset = digits_world_training_data(args.resolution, args.num_world_samples, args.seed)
        held_out, _, _ = digits_world_arrays("test", num_samples=EVALUATION_EXAMPLES, seed=args.seed + 1,
                                             resolution=args.resolution)  # fmt: skip
        return dataset, torch.as_tensor(held_out), "storydiff-digits-world"
    from storydiff.training.datasets_loading import load_image_dataset_from_args

    hf_dataset = load_image_dataset_from_args(args)
    dataset_id = args.dataset_name
    dataset = ImageCaptionDataset(hf_dataset=hf_dataset, image_column=args.image_column, caption_column=None,
                                  resolution=args.resolution, random_flip=args.random_flip)  # fmt: skip
    # An image folder has no held-out split: the last examples stand in for one (they are trained on too).
    last = range(max(0, len(dataset) - EVALUATION_EXAMPLES), len(dataset))
    held_out = torch.stack([dataset[i]["pixel_values"] for i in last])
    return dataset, held_out, dataset_id


class VAEObjective(torch.nn.Module):
    """The VAE and its loss in one `forward`, so DDP / FSDP see the whole computation (they synchronise gradients
    only through the wrapped module's `forward`, not through `vae.encode` / `vae.decode` called from outside)."""

    def __init__(self, vae, kl_weight: float):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, pixels: torch.Tensor) -> tuple:
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(reconstruction.float(), pixels.float())
        kl = posterior.kl().mean() / pixels[0].numel()  # per pixel, on the same scale as the MSE
        return mse + self.kl_weight * kl, mse


@torch.no_grad()
def reconstruction_metrics(vae, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Mean squared error and PSNR (images in [-1, 1], so the peak-to-peak range is 2) of mean-latent reconstructions."""
    device = next(vae.parameters()).device
    errors = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        reconstruction = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
        errors.append(((reconstruction - batch) ** 2).flatten(1).mean(1).cpu())
    mse = torch.cat(errors).mean().item()
    return {"heldout_reconstruction_mse": mse, "heldout_psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12))}


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior samples of `images`: diffusion then trains on unit-variance latents."""
    device = next(vae.parameters()).device
    latents = vae.encode(images.to(device)).latent_dist.sample(torch.Generator(device).manual_seed(0))
    return float(1.0 / latents.float().std())


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Train; returns the output folder. Ctrl-C exits with status 130 and one line on how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    with resume_hint_on_interrupt(args.output_dir):
        return train(args, argv)


def train(args: argparse.Namespace, argv: Sequence[str]) -> str:
    accelerator = create_accelerator(args, project_name="train_vae")
    set_seed(args.seed)

    dataset, held_out, dataset_id = load_training_data(args)
    sampler = SeededEpochSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(dataset, batch_size=args.train_batch_size, sampler=sampler, collate_fn=collate_image_captions,
                            num_workers=args.dataloader_num_workers, generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    vae = new_vae(args.block_out_channels, args.latent_channels, args.layers_per_block, args.norm_num_groups,
                  seed=args.seed)  # fmt: skip
    objective = VAEObjective(vae, args.kl_weight)
    updates_per_epoch, max_train_steps, num_epochs = training_length(args, len(dataloader), accelerator)
    optimizer, lr_scheduler = create_optimizer_and_lr_scheduler(vae.parameters(), args, accelerator, max_train_steps)
    settings = resume_settings(args, accelerator, dataset={"name": dataset_id or args.train_data_dir,
                               "num_examples": len(dataset)}, model_config={**vae.config, "kl_weight": args.kl_weight})  # fmt: skip
    objective, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        objective, optimizer, dataloader, lr_scheduler
    )
    ema = create_ema(vae, args.ema_decay, args.ema_power) if args.use_ema else None
    register_ema_checkpointing(accelerator, ema)

    position = TrainingPosition()
    checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        position = load_checkpoint(accelerator, checkpoint, settings, args.allow_resume_with_changed_settings)

    example_log = open(args.debug_example_log, "a") if args.debug_example_log and accelerator.is_main_process else None
    progress = tqdm(total=max_train_steps, initial=position.global_step, desc="VAE training steps",
                    disable=not accelerator.is_local_main_process)  # fmt: skip
    for epoch, batches in epoch_batches(dataloader, position, num_epochs):
        if position.global_step >= max_train_steps:
            break
        objective.train()
        for batch in batches:
            position.batches_in_epoch += 1
            if example_log is not None:
                example_log.write(
                    json.dumps({"step": position.global_step, "indices": batch["index"].tolist()}) + "\n"
                )
                example_log.flush()
            with accelerator.accumulate(objective):
                loss, mse = objective(batch["pixel_values"])
                loss = debug_nan_loss(loss, args, position.global_step)
                step_loss = check_finite_loss(accelerator, loss, position.global_step)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(objective.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.step(accelerator.unwrap_model(objective).vae.parameters())
            position.global_step += 1
            position.record_loss(step_loss)
            accelerator.log({"loss": step_loss, "reconstruction_mse": mse.item()}, step=position.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)
            if position.global_step % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, args.output_dir, position, args.checkpoints_total_limit, settings)
            if args.debug_step_sleep:
                time.sleep(args.debug_step_sleep)  # tests kill the run at a known step
            if position.global_step >= max_train_steps:
                break
    progress.close()
    if example_log is not None:
        example_log.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(objective).vae.eval()
        with ema_weights(ema, model):
            train_images = torch.stack([dataset[i]["pixel_values"] for i in range(min(len(dataset), 512))])
            model.register_to_config(scaling_factor=latent_scaling_factor(model, train_images))
            metrics = {
                "train_steps": position.global_step,
                **recent_loss_metric(position.recent_losses),
                **reconstruction_metrics(model, held_out),
                "latent_scaling_factor": model.config.scaling_factor,
                "train_wall_time_s": round(position.total_wall_time_s(), 1),
                "parameters": sum(p.numel() for p in model.parameters()),
            }

            def write(folder: str) -> None:
                model.save_pretrained(folder, safe_serialization=True)
                with open(os.path.join(folder, "train_metrics.json"), "w") as file:
                    json.dump(metrics, file, indent=2)
                write_model_card(
                    folder,
                    title=f"AutoencoderKL for {dataset_id or 'an image folder'} ({args.resolution}x{args.resolution})",
                    description=(
                        "A small `AutoencoderKL` trained by storydiff's `training/train_vae.py` (MSE + "
                        f"{args.kl_weight} KL). Latents are {args.latent_channels} x {args.resolution // 2 ** (len(args.block_out_channels) - 1)}"
                        f"^2; `scaling_factor` is measured on the training images. Reconstruction error is measured "
                        "on held-out images."
                    ),
                    tags=["autoencoder", "vae", "latent-diffusion"],
                    command=training_command(argv, script=os.path.abspath(__file__)),
                    metrics=metrics,
                    usage='from diffusers import AutoencoderKL\n\nvae = AutoencoderKL.from_pretrained("path/to/this/folder")',
                )

            check_finite_weights(model)
            save_folder_atomically(args.output_dir, write)
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
            accelerator.print(f"Pushed to {push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token)}")
        accelerator.print(f"Saved the VAE in {args.output_dir}: held-out PSNR {metrics['heldout_psnr_db']:.2f} dB")
    end_training(accelerator)
    return args.output_dir


if __name__ == "__main__":
    main()
