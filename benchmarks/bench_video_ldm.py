"""Cost of the Video LDM (`storydiff.VideoLDMUNet`, `storydiff.VideoLDMPipeline`) against what it is built from.

1. Denoiser step: one forward pass (no grad) of `VideoLDMUNet` on a batch of B videos of F frames against the stock
   `UNet2DConditionModel` it wraps, run on the flat batch of B * F frames (the image model applied frame by frame,
   a copy taken before the temporal layers were inserted): time ratio and, on CUDA, peak-memory ratio; F = 8 and 16.
2. Known frames: a `VideoLDMPipeline` call (DDIM, CFG, `output_type="latent"`) with the first and last frame given,
   `conditioning_mode="reconstruction_guidance"` (a forward with grad and a backward through the denoiser on every
   step) against `"replacement"` (a plain forward), same known latents, starting noise and seed.
3. Training step: forward, epsilon MSE loss, backward, gradient clipping and AdamW over the trainable parameters,
   with the spatial layers frozen (`freeze_spatial()`, as `training/train_video_ldm.py` trains) against every
   parameter trained: time ratio and, on CUDA, peak-memory ratio.
4. Attention (CUDA only, `--attention xformers sdpa`): the denoiser step of section 1 with
   `enable_xformers_memory_efficient_attention()` against diffusers' default SDPA processors (`AttnProcessor2_0`).
   Without an importable xformers the section records why instead of failing.

Models: by default the UNet of the shipped digits text-to-image model (`storydiff.checkpoints`, 4x8x8 latents, its
24-token 64-wide text); `--unet sd15` builds a UNet with Stable Diffusion 1.5's config and random weights in code (no
download; 77 tokens of 768-wide text) at `--latent-size`. Text embeddings and latents are random: their values do
not change the cost. The pipeline of section 2 takes them as `prompt_embeds` and `conditioning_latents`, so its text
encoder and VAE (the digits model's) never run.

Every comparison pairs a configuration with its reference back to back in random order, repeated, after untimed
warm-up calls, and reports the median of the paired ratios (as `bench_text_to_image.py` does): load from other jobs
on a shared machine largely cancels out of the ratios, not out of the absolute times. Peak memory is measured on
CUDA only (`torch.cuda.max_memory_allocated`); on CPU it is recorded as null: the process's resident size is
monotone and the allocator keeps freed memory, so it cannot attribute a peak to one call.

    OMP_NUM_THREADS=2 python benchmarks/bench_video_ldm.py       # writes docs/benchmarks/video_ldm_cpu.json
    python benchmarks/bench_video_ldm.py --device cuda --unet sd15 --latent-size 32 --dtype fp16 --batch-size 1 \
        --attention xformers sdpa --output docs/benchmarks/video_ldm_cuda.json
"""

import argparse
import copy
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from storydiff import VideoLDMPipeline, VideoLDMUNet
from storydiff.benchmarking import (
    DTYPES,
    SD15_TEXT_TOKENS,
    SD15_UNET_CONFIG,
    Run,
    command_line,
    compare,
    free_memory,
    guarded,
    optimizer_state_bytes,
    quiet_libraries,
    run_settings,
    weights,
    write_results,
)
from storydiff.checkpoints import text_to_image_pipeline_path

REPOSITORY = Path(__file__).resolve().parents[1]
SECTIONS = ("denoiser", "known_frames", "training", "attention")
STOCK = "stock UNet2DConditionModel, frame by frame"
VIDEO = "VideoLDMUNet"


class Inputs:
    """Random latents and text for B videos of F frames, in the models' dtype, on the device."""

    def __init__(self, setup, frames: int, generator: torch.Generator, dtype=None):
        dtype = dtype or setup.dtype
        b, (c, h, w) = setup.batch_size, setup.latent_shape

        def randn(*shape):
            return torch.randn(*shape, generator=generator).to(setup.device, dtype)

        self.videos = randn(b, c, frames, h, w)
        self.text = randn(b, setup.text_tokens, setup.text_dim)
        self.frames = self.videos.permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w)  # the flat batch, video-major
        self.frame_text = self.text.repeat_interleave(frames, dim=0)


# ------------------------------------------------------------------------------------------------ 1. denoiser step


def measure_denoiser(setup, args, rng) -> dict:
    results = {}
    generator = torch.Generator().manual_seed(args.seed)
    timestep = torch.tensor(500, device=setup.device)
    for frames in args.frames:
        x = Inputs(setup, frames, generator)
        runs = {
            VIDEO: Run(lambda x=x: setup.video(x.videos, timestep, x.text), lambda: setup.weights(setup.video)),
            STOCK: Run(lambda x=x: setup.stock(x.frames, timestep, x.frame_text), lambda: setup.weights(setup.stock)),
        }
        with torch.no_grad():
            # at initialisation the video model is the image model frame by frame: the same function, timed twice
            video_output = setup.video(x.videos, timestep, x.text).sample
            stock_output = setup.stock(x.frames, timestep, x.frame_text).sample
            stock_output = stock_output.reshape(args.batch_size, frames, *stock_output.shape[1:]).transpose(1, 2)
            difference = (video_output - stock_output).abs().max().item()
            del video_output, stock_output
            row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        results[str(frames)] = {
            "frames": frames,
            "batch_size": args.batch_size,
            "frames_in_flat_batch": args.batch_size * frames,
            "max_abs_difference_video_vs_stock": difference,
            **row,
        }
        del x, runs
        free_memory(setup.device)
    return {"timestep": 500, "frames": results}


# -------------------------------------------------------------------------------------------------- 2. known frames


def measure_known_frames(setup, args, rng) -> dict:
    pipe = VideoLDMPipeline(vae=setup.vae, text_encoder=setup.text_encoder, tokenizer=setup.tokenizer,
                            unet=setup.video, scheduler=setup.scheduler)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(args.seed)
    results = {}
    for frames in args.frames:
        x = Inputs(setup, frames, generator)
        known_indices = [0, frames - 1]  # interpolation: the first and last frame are given
        known = x.videos[:, :, known_indices].clone()
        negative = torch.randn(x.text.shape, generator=generator).to(setup.device, setup.dtype)

        def call(mode, x=x, known=known, negative=negative, frames=frames, known_indices=known_indices):
            pipe(prompt_embeds=x.text, negative_prompt_embeds=negative, num_frames=frames,
                 num_inference_steps=args.steps, guidance_scale=args.guidance_scale, latents=x.videos,
                 conditioning_latents=known, conditioning_frame_indices=known_indices, conditioning_mode=mode,
                 reconstruction_guidance_scale=args.reconstruction_guidance_scale, output_type="latent",
                 generator=torch.Generator(setup.device).manual_seed(args.seed))  # fmt: skip

        runs = {
            "reconstruction_guidance": Run(
                lambda: call("reconstruction_guidance"), lambda: setup.weights(setup.video)
            ),
            "replacement": Run(lambda: call("replacement"), lambda: setup.weights(setup.video)),
        }
        row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        for configuration in row.get("configurations", {}).values():
            configuration["seconds_per_step"] = configuration["seconds"]["wall"]["median"] / args.steps
        results[str(frames)] = {
            "frames": frames,
            "batch_size": args.batch_size,
            "known_frame_indices": known_indices,
            **row,
        }
        del x, known, negative, runs
        free_memory(setup.device)
    return {
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "reconstruction_guidance_scale": args.reconstruction_guidance_scale,
        "scheduler": type(setup.scheduler).__name__,
        "output_type": "latent",
        "frames": results,
    }


# ------------------------------------------------------------------------------------------------- 3. training step


def measure_training(setup, video_fp32, args, rng) -> dict:
    """Both configurations train one model (fp32 weights, autocast to --dtype as accelerate's mixed precision); each
    has its own AdamW over its trainable parameters, and its setup sets which parameters require gradients."""
    model = video_fp32.train()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    everything = list(model.parameters())
    temporal = list(model.temporal_parameters().values())
    optimizers = {"all": torch.optim.AdamW(everything, lr=1e-5), "temporal": torch.optim.AdamW(temporal, lr=1e-5)}
    autocast = torch.autocast(setup.device.type, dtype=setup.dtype, enabled=setup.dtype != torch.float32)
    generator = torch.Generator().manual_seed(args.seed)

    def train_step(x, target, timesteps, trainable, optimizer):
        with autocast:
            prediction = model(x.videos, timesteps, x.text).sample
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    frozen, trained = "spatial layers frozen (freeze_spatial)", "all parameters trained"
    results = {}
    for frames in args.frames:
        x = Inputs(setup, frames, generator, dtype=torch.float32)
        target = torch.randn(x.videos.shape, generator=generator).to(setup.device)
        timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator).to(setup.device)
        runs = {
            frozen: Run(
                lambda x=x, target=target, t=timesteps: train_step(x, target, t, temporal, optimizers["temporal"]),
                lambda: setup.weights(model) + optimizer_state_bytes(optimizers["temporal"]),
                setup=model.freeze_spatial,
            ),
            trained: Run(
                lambda x=x, target=target, t=timesteps: train_step(x, target, t, everything, optimizers["all"]),
                lambda: setup.weights(model) + optimizer_state_bytes(optimizers["all"]),
                setup=lambda: model.requires_grad_(True),
            ),
        }
        row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        model.zero_grad(set_to_none=True)  # after an out-of-memory error inside a step
        results[str(frames)] = {"frames": frames, "batch_size": args.batch_size, **row}
        del x, target, runs
        free_memory(setup.device)
    return {
        "optimizer": "AdamW (torch defaults, lr 1e-5), gradient clipping at norm 1",
        "weights": "fp32",
        "autocast": None if setup.dtype == torch.float32 else args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trainable_parameters": {
            frozen: sum(p.numel() for p in temporal),
            trained: sum(p.numel() for p in everything),
        },
        "frames": results,
    }


# ------------------------------------------------------------------------------------------------------ 4. attention


def measure_attention(setup, args, rng) -> dict:
    if setup.device.type != "cuda":
        return {"skipped": "xformers runs on CUDA only; run with --device cuda"}
    try:
        import xformers
    except ImportError as error:
        return {"xformers": None, "skipped": f"xformers is not installed ({error}); pip install xformers"}
    video = setup.video
    try:
        video.enable_xformers_memory_efficient_attention()
    except Exception as error:  # diffusers test-calls xformers here: a build without kernels for this GPU fails
        video.disable_xformers_memory_efficient_attention()
        return {"xformers": xformers.__version__, "skipped": f"enable_xformers_memory_efficient_attention failed: {error}"}  # fmt: skip

    def processors():
        return sorted({type(p).__name__ for p in video.attn_processors.values()})

    xformers_processors = processors()
    video.disable_xformers_memory_efficient_attention()  # diffusers' default processors: AttnProcessor2_0 (SDPA)
    sdpa_processors = processors()
    generator = torch.Generator().manual_seed(args.seed)
    timestep = torch.tensor(500, device=setup.device)
    results = {}
    for frames in args.frames:
        x = Inputs(setup, frames, generator)
        runs = {
            "xformers": Run(
                lambda x=x: video(x.videos, timestep, x.text),
                lambda: setup.weights(video),
                setup=video.enable_xformers_memory_efficient_attention,
            ),
            "sdpa": Run(
                lambda x=x: video(x.videos, timestep, x.text),
                lambda: setup.weights(video),
                setup=video.disable_xformers_memory_efficient_attention,
            ),
        }
        try:
            with torch.no_grad():
                row = guarded(lambda runs=runs: compare(runs, args, rng, setup.device), setup.device)
        except Exception as error:  # e.g. an xformers kernel refusing the temporal attention's batch of sequences
            row = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        results[str(frames)] = {"frames": frames, "batch_size": args.batch_size, **row}
        del x, runs
        free_memory(setup.device)
    video.disable_xformers_memory_efficient_attention()
    return {
        "xformers": xformers.__version__,
        "processors": {"xformers": xformers_processors, "sdpa": sdpa_processors},
        "frames": results,
    }


# ------------------------------------------------------------------------------------------------------------ main


class Setup:
    """The models and shapes every section uses."""

    def __init__(self, args):
        self.device, self.dtype, self.batch_size = torch.device(args.device), DTYPES[args.dtype], args.batch_size
        folder = text_to_image_pipeline_path()
        # the pipeline's other components (section 2 passes embeddings and latents, so they never run)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        self.text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", local_files_only=True)
        self.vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", local_files_only=True)
        self.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        self.text_encoder.to(self.device, self.dtype)
        self.vae.to(self.device, self.dtype)
        if args.unet == "digits":
            unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
            self.text_tokens = self.tokenizer.model_max_length
            self.source = os.path.relpath(os.path.join(folder, "unet"), REPOSITORY)
        else:
            torch.manual_seed(args.seed)
            with torch.device(self.device):  # built and initialised on the device: much faster than on CPU
                unet = UNet2DConditionModel(sample_size=args.latent_size, **SD15_UNET_CONFIG)
            self.text_tokens = SD15_TEXT_TOKENS
            self.source = "UNet2DConditionModel with Stable Diffusion 1.5's config, random weights"
        unet = unet.to(self.device).eval()
        self.stock = copy.deepcopy(unet)  # from_unet2d wraps the blocks of `unet` in place
        settings = {"num_frames": min(args.frames), "max_frames": max(32, *args.frames)}
        if args.temporal_head_dim is not None:
            settings["temporal_attention_head_dim"] = args.temporal_head_dim
        elif args.unet == "sd15":
            settings["temporal_attention_head_dim"] = 64  # SD's 320..1280 channels in heads of 64, as SVD's
        with torch.device(self.device):
            self.video = VideoLDMUNet.from_unet2d(unet, **settings).eval()
        sample_size = unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        self.latent_shape = (unet.config.in_channels, height, width)
        self.text_dim = unet.config.cross_attention_dim

    def to_inference_dtype(self):
        for model in (self.stock, self.video):
            model.to(self.dtype)

    @staticmethod
    def weights(model: torch.nn.Module) -> int:
        return weights(model)


def headline(section: str, value: dict) -> str:
    """The section's main figures in one line (the JSON file has them all)."""
    rows = value.get("frames")
    if rows is None:
        return value.get("skipped", "")
    parts = []
    for frames, row in rows.items():
        if "error" in row:
            parts.append(f"{frames} frames: {row['error']}")
            continue
        ratio, memory = row["time_ratio"], row["peak_memory_ratio"]
        text = f"{frames} frames: {ratio['of']} / {ratio['over']} time {ratio['wall']['median']:.3f}"
        parts.append(text + ("" if memory is None else f", peak memory {memory:.3f}"))
    return "; ".join(parts)


def frame_counts(values: list) -> list:
    """`--frames 8 16` or `--frames 8,16`."""
    counts = [int(part) for value in values for part in str(value).split(",") if part]
    if not counts or min(counts) < 3:
        raise SystemExit(f"--frames needs frame counts of at least 3 (the first and last are given), got {values}.")
    return counts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="digits", choices=["digits", "sd15"], help="shipped digits UNet or SD 1.5")
    parser.add_argument("--latent-size", "--latent_size", type=int, default=64, help="latent side of --unet sd15")
    parser.add_argument("--temporal-head-dim", "--temporal_head_dim", type=int, default=None,
                        help="channels per temporal attention head (default: VideoLDMUNet's 8; 64 for sd15)")  # fmt: skip
    parser.add_argument("--frames", nargs="+", default=["8", "16"], help="frame counts F, e.g. 8 16 or 8,16")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=2, help="videos B per step")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="inference weights; training autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--repeats", type=int, default=21, help="timed pairs per comparison")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each configuration first")
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps of the known-frames pipeline calls")
    parser.add_argument("--guidance-scale", "--guidance_scale", type=float, default=4.0)
    parser.add_argument("--reconstruction-guidance-scale", "--reconstruction_guidance_scale", type=float, default=2.0)
    parser.add_argument("--gradient-checkpointing", "--gradient_checkpointing", action="store_true",
                        help="training section: VideoLDMUNet.enable_gradient_checkpointing()")  # fmt: skip
    parser.add_argument("--attention", nargs="+", default=["sdpa"],
                        help="with xformers (e.g. --attention xformers sdpa, or xformers,sdpa): section 4 on CUDA")  # fmt: skip
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default: docs/benchmarks/video_ldm_<device type>.json")
    args = parser.parse_args(argv)
    args.frames = frame_counts(args.frames)
    args.attention = [part for value in args.attention for part in value.split(",") if part]
    if set(args.attention) - {"sdpa", "xformers"}:
        raise SystemExit(f"--attention takes sdpa and xformers, got {args.attention}.")
    if args.repeats < 1 or args.warmup < 0 or args.batch_size < 1 or args.steps < 1:
        raise SystemExit("--repeats, --batch-size and --steps must be positive, --warmup at least 0.")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    started = time.perf_counter()
    rng = random.Random(args.seed)
    setup = Setup(args)
    device = setup.device
    output = Path(args.output or REPOSITORY / "docs" / "benchmarks" / f"video_ldm_{device.type}.json")
    command = command_line(__file__, REPOSITORY, argv)
    xformers_version = None
    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        pass
    temporal = sum(p.numel() for p in setup.video.temporal_parameters().values())
    results = {
        "command": command,
        "unet": args.unet,
        "unet_source": setup.source,
        "latent_shape": list(setup.latent_shape),
        "text_shape": [setup.text_tokens, setup.text_dim],
        "parameters": {
            "unet2d": sum(p.numel() for p in setup.stock.parameters()),
            "video_ldm_unet": sum(p.numel() for p in setup.video.parameters()),
            "temporal_layers": temporal,
        },
        "temporal_settings": {
            key: value for key, value in setup.video.config.items() if key != "unet_config" and not key.startswith("_")
        },
        "batch_size": args.batch_size,
        "frames": args.frames,
        **run_settings(args, device, xformers=xformers_version),
    }

    def report(section, value):
        results[section] = value
        print(f"{section}: {headline(section, value)}", flush=True)

    setup.to_inference_dtype()
    if "training" in args.sections:  # on an fp32 copy: training keeps fp32 weights and autocasts to --dtype
        video_fp32 = copy.deepcopy(setup.video).to(torch.float32)
        report("training", measure_training(setup, video_fp32, args, rng))
        del video_fp32
        free_memory(device)
    if "denoiser" in args.sections:
        report("denoiser", measure_denoiser(setup, args, rng))
    if "known_frames" in args.sections:
        report("known_frames", measure_known_frames(setup, args, rng))
    if "attention" in args.sections and "xformers" in args.attention:
        report("attention", measure_attention(setup, args, rng))
    write_results(results, output, started)
    return results


if __name__ == "__main__":
    main()
