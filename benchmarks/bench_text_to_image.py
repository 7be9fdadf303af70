"""Cost of the digits text-to-image model (storydiff/checkpoints/digits-text-to-image): training, sampling, text
encoding and dynamic CFG, on CPU by default.

1. Training step: one step as `training/train_text_to_image.py` takes it from scratch (VAE encode, caption dropout,
   tokenizing, `TextToImageDenoiser` forward + backward with the text encoder trained, gradient clipping, AdamW with
   the script's defaults, learning-rate step, EMA of the UNet), batch 64; steps per second and examples per second.
   Paired against the same step with the text encoder frozen (diffusers' example script's default) for its cost.
2. Generation: samples per second of a stock `StableDiffusionPipeline` call (DDIM, 20 steps, CFG, decoded images),
   batch 1 and 64, with the share of the call spent in the text encoder, the UNet and the VAE decoder.
3. Text encoding: `pipe.encode_prompt` per prompt (tokenizer + CLIP text encoder), with and without the empty
   negative prompt that CFG adds.
4. Dynamic CFG overhead: `DynamicCFGStableDiffusionPipeline` with the static schedule against the stock
   `StableDiffusionPipeline` on this model (identical latents, checked).
5. Zero-weight savings: schedules with `k` unguided steps out of `N`, against the `(2N - k) / (2N)` of UNet work
   they are expected to cost relative to static CFG.

Paired measurements (1, 4, 5) run a configuration and its reference back to back in random order, pairs shuffled in
every repeat, and report the median of the paired time ratios, as `bench_dynamic_cfg.py` does: load from other
processes on a shared machine largely cancels out of the ratios, not out of the absolute times.

    python benchmarks/bench_text_to_image.py                     # writes docs/benchmarks/text_to_image.json
    python benchmarks/bench_text_to_image.py --device cuda --dtype bf16 --output text_to_image_gpu.json
"""

import argparse
import copy
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, StableDiffusionPipeline

import storydiff
from storydiff import DynamicCFGStableDiffusionPipeline
from storydiff.benchmarking import DTYPES, load_average, quiet_libraries, summary, write_results
from storydiff.data.digits import digits_world_arrays
from storydiff.training.ema import create_ema
from storydiff.training.optimization import create_optimizer_and_lr_scheduler
from storydiff.training.train_text_to_image import TextToImageDenoiser
from storydiff.training.train_text_to_image import parse_args as training_arguments

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The dynamic-CFG benchmark's schedules, UNet batch-cost ratio and timing of the schedule machinery.
from bench_dynamic_cfg import added_work_seconds, schedules, unet_cost_ratio  # noqa: E402

DEFAULT_MODEL = REPOSITORY / "storydiff" / "checkpoints" / "digits-text-to-image"
STOCK = "stock StableDiffusionPipeline"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_call(function: Callable, device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds) of one call."""
    synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def paired_timings(runs: dict, pairs: list, repeats: int, rng: random.Random, device: torch.device) -> tuple:
    """Time every `(name, reference)` pair back to back in random order, pairs shuffled in every repeat.

    Returns `(times, ratios)`: name -> list of (wall, CPU) seconds, and pair -> list of (wall, CPU) ratios
    name / reference."""
    times = {name: [] for pair in pairs for name in pair}
    ratios = {pair: [] for pair in pairs}
    pairs = list(pairs)
    for _ in range(repeats):
        rng.shuffle(pairs)
        for pair in pairs:
            measured = {}
            for name in rng.sample(pair, 2):
                measured[name] = timed_call(runs[name], device)
                times[name].append(measured[name])
            name, reference = pair
            ratios[pair].append(tuple(measured[name][i] / measured[reference][i] for i in (0, 1)))
    return times, ratios


def wall_and_cpu(measurements: list) -> dict:
    return {"wall": summary([m[0] for m in measurements]), "cpu": summary([m[1] for m in measurements])}


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------ 1. training


class TrainingStep:
    """One optimizer update of `train_text_to_image.py` on a fixed batch, on private copies of the UNet and text
    encoder; calling it returns the seconds of its parts."""

    def __init__(self, components, settings, images, captions, train_text_encoder, device, dtype):
        self.vae, self.tokenizer = components["vae"], components["tokenizer"]
        self.noise_scheduler = components["scheduler"]  # DDIM: the same training betas and add_noise as DDPM
        self.settings, self.device = settings, device
        unet = copy.deepcopy(components["unet"]).to(device).train().requires_grad_(True)
        text_encoder = copy.deepcopy(components["text_encoder"]).to(device).train()
        text_encoder.requires_grad_(train_text_encoder)
        self.denoiser = TextToImageDenoiser(unet, text_encoder)
        self.trainable = [p for p in self.denoiser.parameters() if p.requires_grad]
        # the script's AdamW and learning-rate schedule, built from its default flags; one process
        self.optimizer, self.lr_scheduler = create_optimizer_and_lr_scheduler(
            self.trainable, settings, SimpleNamespace(num_processes=1), max_train_steps=10_000
        )
        self.ema = create_ema(unet, settings.ema_decay, settings.ema_power) if settings.use_ema else None
        self.images, self.captions = images.to(device), captions
        # mixed precision as accelerate's --mixed_precision: fp32 weights, autocast forward
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def __call__(self) -> dict:
        parts, start = {}, time.perf_counter()

        def lap(name):
            nonlocal start
            synchronize(self.device)
            parts[name] = time.perf_counter() - start
            start = time.perf_counter()

        with torch.no_grad():
            latents = self.vae.encode(self.images).latent_dist.sample() * self.vae.config.scaling_factor
        drop = torch.rand(len(self.captions)) < self.settings.proportion_empty_prompts
        captions = ["" if dropped else caption for caption, dropped in zip(self.captions, drop.tolist())]
        input_ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                                   truncation=True, return_tensors="pt").input_ids.to(self.device)  # fmt: skip
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=self.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        lap("data_seconds")
        with self.autocast:
            prediction = self.denoiser(noisy, timesteps, input_ids)
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        lap("forward_backward_seconds")
        torch.nn.utils.clip_grad_norm_(self.trainable, self.settings.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        lap("optimizer_seconds")
        if self.ema is not None:
            self.ema.step(self.denoiser.unet.parameters())
        lap("ema_seconds")
        return parts


def measure_training(pipe, model_path, args, device, dtype, rng) -> dict:
    settings = training_arguments(["--pretrained_model_name_or_path", str(model_path), "--dataset", "digits_world",
                                   "--output_dir", tempfile.gettempdir()])  # fmt: skip
    batch = args.train_batch
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images, captions, _ = digits_world_arrays("train", num_samples=batch, seed=args.seed, resolution=resolution)
    components = pipe.components
    steps = {
        "text encoder trained (from scratch, as shipped)": TrainingStep(
            components, settings, images, captions, True, device, dtype
        ),
        "text encoder frozen": TrainingStep(components, settings, images, captions, False, device, dtype),
    }
    parts = {name: [] for name in steps}

    def run(name):
        def one_step():
            parts[name].append(steps[name]())

        return one_step

    runs = {name: run(name) for name in steps}
    for one_step in runs.values():  # warm-up: first-call allocations, AdamW state
        one_step()
    for name in parts:
        parts[name].clear()
    trained, frozen = list(steps)
    load_before = load_average()
    times, ratios = paired_timings(runs, [(trained, frozen)], args.train_pairs, rng, device)
    results = {
        "batch_size": batch,
        "settings": {
            "optimizer": "AdamW",
            "learning_rate": settings.learning_rate,
            "lr_scheduler": settings.lr_scheduler,
            "max_grad_norm": settings.max_grad_norm,
            "use_ema": settings.use_ema,
            "proportion_empty_prompts": settings.proportion_empty_prompts,
            "mixed_precision": "no" if dtype == torch.float32 else args.dtype,
        },
        "trainable_parameters": {name: sum(p.numel() for p in step.trainable) for name, step in steps.items()},
        "configurations": {},
        "time_ratio_trained_over_frozen": {
            "wall": summary([r[0] for r in ratios[(trained, frozen)]]),
            "cpu": summary([r[1] for r in ratios[(trained, frozen)]]),
        },
        "load_average": {"before": load_before, "after": load_average()},
    }
    for name in steps:
        seconds = wall_and_cpu(times[name])
        results["configurations"][name] = {
            "step_seconds": seconds,
            "steps_per_second": 1 / seconds["wall"]["median"],
            "examples_per_second": batch / seconds["wall"]["median"],
            "examples_per_cpu_second": batch / seconds["cpu"]["median"],
            "parts_median_seconds": {part: statistics.median(p[part] for p in parts[name]) for part in parts[name][0]},
        }
    return results


# ---------------------------------------------------------------------------------------- 2. and 3. generation, text


class ModuleTimer:
    """Seconds spent in the text encoder's and UNet's forward and in the VAE's decode during pipeline calls."""

    def __init__(self, pipe, device):
        self.device, self.seconds, self._start, self._handles = device, {}, {}, []
        for name in ("text_encoder", "unet"):
            module = getattr(pipe, name)
            self._handles.append(module.register_forward_pre_hook(lambda m, a, name=name: self._begin(name)))
            self._handles.append(module.register_forward_hook(lambda m, a, o, name=name: self._end(name)))
        self._vae, self._decode = pipe.vae, pipe.vae.decode
        timer = self

        def timed_decode(*arguments, **keywords):
            timer._begin("vae_decode")
            output = timer._decode(*arguments, **keywords)
            timer._end("vae_decode")
            return output

        pipe.vae.decode = timed_decode  # an instance attribute: this pipeline's VAE only, until remove()

    def _begin(self, name):
        synchronize(self.device)
        self._start[name] = time.perf_counter()

    def _end(self, name):
        synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._start.pop(name)

    def take(self) -> dict:
        seconds, self.seconds = self.seconds, {}
        return seconds

    def remove(self):
        for handle in self._handles:
            handle.remove()
        del self._vae.decode


def measure_generation(pipe, prompts, args, device) -> dict:
    results = {}
    for batch in args.generation_batches:

        def generate(batch=batch):
            pipe(prompts[:batch], num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                 output_type="np", generator=torch.Generator().manual_seed(args.seed))  # fmt: skip

        generate()  # warm-up
        timer = ModuleTimer(pipe, device)
        load_before = load_average()
        calls, parts = [], []
        repeats = args.generation_repeats if batch == 1 else max(1, args.generation_repeats // 4)
        for _ in range(repeats):
            timer.take()
            calls.append(timed_call(generate, device))
            parts.append(timer.take())
        timer.remove()
        seconds = wall_and_cpu(calls)
        shares = {name: statistics.median(p[name] / c[0] for p, c in zip(parts, calls)) for name in parts[0]}
        results[str(batch)] = {
            "batch_size": batch,
            "call_seconds": seconds,
            "samples_per_second": batch / seconds["wall"]["median"],
            "samples_per_cpu_second": batch / seconds["cpu"]["median"],
            "share_of_call_wall_time": shares,
            "load_average": {"before": load_before, "after": load_average()},
        }
    return results


def measure_text_encoding(pipe, prompts, args, device) -> dict:
    results = {}
    for batch in args.generation_batches:
        for with_negative in (False, True):

            def encode(batch=batch, with_negative=with_negative):
                pipe.encode_prompt(prompts[:batch], device, 1, with_negative)

            encode()  # warm-up
            seconds = wall_and_cpu([timed_call(encode, device) for _ in range(args.text_repeats)])
            key = f"batch {batch}, " + ("prompt + empty negative (CFG)" if with_negative else "prompt only")
            results[key] = {
                "batch_size": batch,
                "cfg_negative_prompt": with_negative,
                "call_seconds": seconds,
                "ms_per_prompt": 1000 * seconds["wall"]["median"] / batch,
                "cpu_ms_per_prompt": 1000 * seconds["cpu"]["median"] / batch,
            }
    return results


# ---------------------------------------------------------------------------------------------- 4. and 5. dynamic CFG


def measure_dynamic_cfg(stock, args, device, rng) -> dict:
    dynamic = DynamicCFGStableDiffusionPipeline(**stock.components)
    dynamic.set_progress_bar_config(disable=True)
    prompt = "a small red 7 in the top left corner"
    steps = args.steps

    def call(pipe, schedule):
        extra = {} if schedule is None else {"guidance_schedule": schedule}
        return pipe(prompt, num_inference_steps=steps, guidance_scale=args.guidance_scale, output_type="latent",
                    generator=torch.Generator().manual_seed(args.seed), **extra).images  # fmt: skip

    configurations = {STOCK: (stock, None)}
    configurations.update({name: (dynamic, schedule) for name, schedule in schedules(steps).items()})

    # untimed warm-up of each configuration: checks static == stock and counts the UNet's samples
    unet_samples, zero_weight_steps, sizes = {}, {}, []
    hook = stock.unet.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))
    reference = call(stock, None)
    for name, (pipe, schedule) in configurations.items():
        sizes.clear()
        latents = call(pipe, schedule)
        unet_samples[name] = sum(sizes)
        if name == "static" and not torch.equal(latents, reference):
            raise AssertionError("static DynamicCFGStableDiffusionPipeline differs from the stock pipeline")
        if pipe is dynamic:
            zero_weight_steps[name] = int((dynamic.guidance_scales == 1).sum())
    hook.remove()

    runs = {
        name: (lambda pipe=pipe, schedule=schedule: call(pipe, schedule))
        for name, (pipe, schedule) in configurations.items()
    }
    schedule_pairs = [(name, "static") for name in configurations if name not in ("static", STOCK)]
    pairs = [("static", STOCK)] * args.overhead_pairs + schedule_pairs
    load_before = load_average()
    times, ratios = paired_timings(runs, pairs, args.cfg_repeats, rng, device)
    load_after = load_average()
    unet_cost = None
    if device.type == "cpu" and stock.unet.dtype == torch.float32:  # the helper times CPU float32 inputs
        unet_cost = unet_cost_ratio(stock.unet, stock.unet.config.sample_size,
                                    stock.text_encoder.config.hidden_size, 10 * args.cfg_repeats, rng)  # fmt: skip
    added_work = added_work_seconds(dynamic, steps, args.guidance_scale)

    def ratio_summary(pair):
        return {"wall": summary([r[0] for r in ratios[pair]]), "cpu": summary([r[1] for r in ratios[pair]])}

    stock_times = wall_and_cpu(times[STOCK])
    savings = {}
    for name in schedules(steps):
        k = zero_weight_steps[name]
        row = {
            "zero_weight_steps": k,
            "unet_samples_over_static": unet_samples[name] / unet_samples["static"],
            "expected_over_static": (2 * steps - k) / (2 * steps),
            "expected_with_measured_unet_cost": None if unet_cost is None else (steps - k + k * unet_cost) / steps,
            "call_seconds": wall_and_cpu(times[name]),
            "time_over_static": None if name == "static" else ratio_summary((name, "static")),
        }
        savings[name] = row
    return {
        "steps": steps,
        "guidance_scale": args.guidance_scale,
        "batch_size": 1,
        "output_type": "latent",
        "static_equals_stock": True,
        "overhead": {
            "stock_call_seconds": stock_times,
            "static_call_seconds": wall_and_cpu(times["static"]),
            "static_over_stock": ratio_summary(("static", STOCK)),
            "pairs": args.overhead_pairs * args.cfg_repeats,
            "added_work_seconds_per_call": added_work,
            "added_work_share_of_stock_cpu_time": added_work / stock_times["cpu"]["median"],
        },
        "unet_cost_batch1_over_batch2": unet_cost,
        "savings": savings,
        "load_average": {"before": load_before, "after": load_after},
    }


# ------------------------------------------------------------------------------------------------------------ main


def headline(section: str, value: dict) -> str:
    """The section's main figures in one line (the JSON file has them all)."""
    if section == "training":
        rows = value["configurations"].items()
        ratio = value["time_ratio_trained_over_frozen"]["wall"]["median"]
        return "; ".join(f"{name}: {row['examples_per_second']:.0f} examples/s" for name, row in rows) + (
            f"; trained / frozen step time {ratio:.3f}"
        )
    if section == "generation":
        return "; ".join(
            f"batch {batch}: {row['samples_per_second']:.2f} samples/s, text encoder "
            f"{100 * row['share_of_call_wall_time']['text_encoder']:.2f} % of the call"
            for batch, row in value.items()
        )
    if section == "text_encoder":
        return "; ".join(f"{name}: {row['ms_per_prompt']:.2f} ms/prompt" for name, row in value.items())
    ratios = {name: row["time_over_static"] for name, row in value["savings"].items() if row["time_over_static"]}
    return f"static / stock {value['overhead']['static_over_stock']['wall']['median']:.3f}; " + "; ".join(
        f"{name}: {ratio['wall']['median']:.3f} (expected {value['savings'][name]['expected_over_static']:.3f})"
        for name, ratio in ratios.items()
    )


def load_pipeline(model_path, device) -> StableDiffusionPipeline:
    if not (Path(model_path) / "model_index.json").is_file():
        raise SystemExit(f"--model {model_path} is not a pipeline folder (no model_index.json); train it first or "
                         "pass a StableDiffusionPipeline folder.")  # fmt: skip
    pipe = StableDiffusionPipeline.from_pretrained(model_path, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="a StableDiffusionPipeline folder")
    parser.add_argument("--output", default=str(REPOSITORY / "docs" / "benchmarks" / "text_to_image.json"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="sampling weights; training autocast")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps N")
    parser.add_argument("--guidance-scale", type=float, default=4.0)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--train-pairs", type=int, default=10, help="trained/frozen text encoder step pairs")
    parser.add_argument("--generation-batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--generation-repeats", type=int, default=16, help="calls at batch 1 (a quarter at larger)")
    parser.add_argument("--text-repeats", type=int, default=20)
    parser.add_argument("--cfg-repeats", type=int, default=21, help="repeats of the dynamic-CFG pairs")
    parser.add_argument("--overhead-pairs", type=int, default=4, help="stock/static pairs per repeat")
    parser.add_argument("--sections", nargs="+", default=["training", "generation", "text_encoder", "dynamic_cfg"],
                        choices=["training", "generation", "text_encoder", "dynamic_cfg"])  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    quiet_libraries()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rng = random.Random(args.seed)
    started = time.perf_counter()
    pipe = load_pipeline(args.model, device)
    latent_size = pipe.unet.config.sample_size
    _, prompts, _ = digits_world_arrays("test", num_samples=max(args.generation_batches), seed=args.seed,
                                        resolution=latent_size * pipe.vae_scale_factor)  # fmt: skip
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, REPOSITORY), *(argv or sys.argv[1:])]
    )
    results = {
        "command": command,
        "model": os.path.relpath(os.path.abspath(args.model), REPOSITORY),
        "model_parameters": {name: parameter_count(getattr(pipe, name)) for name in ("unet", "text_encoder", "vae")},
        "image_size": latent_size * pipe.vae_scale_factor,
        "latent_shape": [pipe.unet.config.in_channels, latent_size, latent_size],
        "tokens_per_prompt": pipe.tokenizer.model_max_length,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "storydiff": storydiff.__version__,
        },
        "load_average_at_start": load_average(),
    }

    def report(section, value):
        results[section] = value
        print(f"{section}: {headline(section, value)}", flush=True)

    if "training" in args.sections:  # fp32 weights (autocast for --dtype), as accelerate's mixed precision
        report("training", measure_training(pipe, args.model, args, device, dtype, rng))
    pipe.to(dtype=dtype)
    if "generation" in args.sections:
        report("generation", measure_generation(pipe, prompts, args, device))
    if "text_encoder" in args.sections:
        report("text_encoder", measure_text_encoding(pipe, prompts, args, device))
    if "dynamic_cfg" in args.sections:
        report("dynamic_cfg", measure_dynamic_cfg(pipe, args, device, rng))
    write_results(results, Path(args.output), started)
    return results


if __name__ == "__main__":
    main()
