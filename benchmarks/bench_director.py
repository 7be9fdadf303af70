"""DIRECTOR sampling cost: trajectories per second and how a denoiser evaluation grows with sequence length.

    python benchmarks/bench_director.py --output benchmarks/results/director_cpu.json
    python benchmarks/bench_director.py --device cuda --dtype bf16 --output director_gpu.json

Measured per variant (A in-context, B AdaLN, C cross-attention) and model size (the paper's 512 x 8 layers x 16 heads
at 300 frames, and storydiff's small 128 x 4 x 4 at 120 frames):

* throughput: a full `DirectorPipeline` call (10 Heun steps = 19 denoiser evaluations, CFG 1.4 so every evaluation
  runs the conditional and the null batch together) with precomputed text features, for batch 1 and batch 64.
  A run whose estimated time exceeds `--max_seconds_per_run` is measured as one denoiser evaluation of the same
  CFG batch instead (one run after a warm-up), and its throughput is extrapolated as `batch / (19 x that time)`
  (reported as such).
* length scaling: one denoiser evaluation of a CFG batch (2 x `--length_batch`) at each of `--lengths` frames.

Text encoding is excluded (one pass of the text encoder per prompt, shared by all steps). Each figure is the median of
`--repeats` runs after one warm-up run.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from storydiff import DirectorModel, DirectorPipeline, EDMHeunScheduler
from storydiff.text_features import TextFeatures

SIZES = {
    "paper": dict(hidden_size=512, num_layers=8, num_heads=16, num_registers=16, num_frames=300, text_embed_dim=512),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, num_registers=8, num_frames=120, text_embed_dim=384),
}
VARIANTS = {"A": "in_context", "B": "adaln", "C": "cross_attention"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device, repeats: int) -> float:
    function()  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_text(batch, size, device):
    g = torch.Generator().manual_seed(0)
    width = size["text_embed_dim"]
    mask = torch.zeros(batch, 77, dtype=torch.bool)
    mask[:, :20] = True
    return TextFeatures(
        torch.randn(batch, width, generator=g), torch.randn(batch, 77, width, generator=g) * mask[..., None], mask
    ).to(device)


def build(variant, size, device, dtype):
    torch.manual_seed(0)
    model = DirectorModel(conditioning_type=VARIANTS[variant], **size).eval().to(device)
    if dtype != torch.float32:
        model.to(dtype)
    pipe = DirectorPipeline(model=model, scheduler=EDMHeunScheduler())
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


@torch.no_grad()
def one_evaluation(model, batch, frames, size, device, dtype):
    text = make_text(batch, size, device)
    sample = torch.randn(batch, frames, 9, device=device, dtype=dtype)
    character = torch.randn(batch, frames, 3, device=device, dtype=dtype)

    def run():
        model(sample, 1.0, character, text.pooled.to(dtype), text.tokens.to(dtype), text.mask)

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--sizes", nargs="+", default=["small", "paper"], choices=sorted(SIZES))
    parser.add_argument("--variants", nargs="+", default=["A", "B", "C"], choices=sorted(VARIANTS))
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--lengths", nargs="*", type=int, default=[50, 100, 200, 300], help="none: skip")
    parser.add_argument("--length_batch", type=int, default=1, help="trajectories per length-scaling evaluation")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max_seconds_per_run", type=float, default=240.0)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    steps, evaluations = 10, 19
    results = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "throughput": [],
        "length_scaling": [],
    }

    for size_name in args.sizes:
        size = SIZES[size_name]
        for variant in args.variants:
            model, pipe = build(variant, size, device, dtype)
            for batch in args.batch_sizes:
                frames = size["num_frames"]
                evaluation = one_evaluation(model, 2 * batch, frames, size, device, dtype)
                evaluation()  # warm-up
                start = time.perf_counter()
                evaluation()
                synchronize(device)
                eval_seconds = time.perf_counter() - start
                text = make_text(batch, size, device)

                def sample(pipe=pipe, text=text, frames=frames):
                    pipe(text_features=text, num_frames=frames, num_inference_steps=steps, guidance_scale=1.4,
                         generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip

                if eval_seconds * evaluations * (args.repeats + 1) <= args.max_seconds_per_run:
                    seconds = timed(sample, device, args.repeats)
                    method = "measured: full pipeline call"
                else:  # minutes per run: the calibration run above is the measurement
                    seconds = eval_seconds * evaluations
                    method = "extrapolated: 19 x one measured denoiser evaluation (single run)"
                row = dict(size=size_name, variant=variant, batch=batch, frames=frames, seconds=seconds,
                           trajectories_per_second=batch / seconds, method=method,
                           parameters=sum(p.numel() for p in model.parameters()))  # fmt: skip
                results["throughput"].append(row)
                print(json.dumps(row), flush=True)
            if size_name == "paper":
                for frames in args.lengths:
                    evaluation = one_evaluation(model, 2 * args.length_batch, frames, size, device, dtype)
                    seconds = timed(evaluation, device, args.repeats)
                    row = dict(size=size_name, variant=variant, frames=frames, batch=2 * args.length_batch,
                               milliseconds_per_evaluation=1000 * seconds)  # fmt: skip
                    results["length_scaling"].append(row)
                    print(json.dumps(row), flush=True)
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
