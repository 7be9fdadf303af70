"""The paired-timing harness the benchmark scripts (`benchmarks/bench_controlnet.py`, `benchmarks/bench_video_ldm.py`)
share.

What it guarantees:
- Paired ratios: `compare` runs a configuration and its reference back to back, in random order, `args.repeats`
  times after `args.warmup` untimed calls of each, and reports the median (with its interquartile range) of the
  per-pair ratios of wall and process CPU seconds. Load from other jobs on a shared machine largely cancels out of
  the ratios, not out of the absolute times, which are reported too.
- Peak memory on CUDA only: `torch.cuda.max_memory_allocated` above what was allocated before the call, plus the
  bytes the configuration keeps resident (weights, optimizer state), so the other configuration's weights held at
  the same time do not count. On CPU it is None: the process's resident size is monotone and the allocator keeps
  freed memory, so no peak can be attributed to one call.
- A run that goes out of memory (`guarded`) records the error and frees the cache, so the other rows still run.
"""

import gc
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json), built with random weights
SD15_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_TEXT_TOKENS = 77


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_call(function: Callable, device: torch.device) -> tuple:
    """(wall seconds, process CPU seconds, bytes) of one call; bytes: on CUDA the most memory allocated during the call
    above what was allocated before it (activations, gradients, workspaces), else None."""
    synchronize(device)
    before = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    function()
    synchronize(device)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    extra = torch.cuda.max_memory_allocated(device) - before if before is not None else None
    return wall, cpu, extra


def summary(values: list) -> dict:
    """Median with its interquartile range."""
    if len(values) < 2:
        return {"median": values[0], "q1": values[0], "q3": values[0], "n": len(values)}
    q1, _, q3 = statistics.quantiles(values, n=4)
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "n": len(values)}


def load_average() -> Optional[list]:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weights(*models) -> int:
    """Bytes of the models' parameters and buffers."""
    return sum(tensor_bytes(m.parameters()) + tensor_bytes(m.buffers()) for m in models)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


class Run:
    """One configuration of a comparison: `setup` (untimed, before every timed call), the timed `call`, and
    `resident`, the bytes the configuration keeps allocated between calls (its weights, optimizer state), read after
    the warm-up."""

    def __init__(self, call: Callable, resident: Callable[[], int], setup: Optional[Callable] = None):
        self.call, self.resident, self.setup = call, resident, setup or (lambda: None)


def compare(runs: dict, args, rng: random.Random, device: torch.device) -> dict:
    """Time `runs` (name -> Run; the first is measured, the second is its reference) in pairs back to back, in random
    order, `args.repeats` times after `args.warmup` untimed calls each.

    Peak memory of a configuration = its resident bytes + the median most memory its call allocated above what was
    allocated before it (CUDA only), so that the other configuration's weights, held at the same time, do not count."""
    (name, run), (reference, reference_run) = runs.items()
    for one in (run, reference_run):
        for _ in range(args.warmup):
            one.setup()
            one.call()
    measured = {name: [], reference: []}
    ratios = []
    for _ in range(args.repeats):
        pair = {}
        for key in rng.sample([name, reference], 2):
            runs[key].setup()
            pair[key] = measured_call(runs[key].call, device)
            measured[key].append(pair[key])
        ratios.append(tuple(pair[name][i] / pair[reference][i] for i in (0, 1)))
    configurations = {}
    for key, values in measured.items():
        extra = [v[2] for v in values]
        configurations[key] = {
            "seconds": {"wall": summary([v[0] for v in values]), "cpu": summary([v[1] for v in values])},
            "peak_memory_bytes": None if extra[0] is None else runs[key].resident() + statistics.median(extra),
        }
    peaks = [configurations[key]["peak_memory_bytes"] for key in (name, reference)]
    return {
        "configurations": configurations,
        "time_ratio": {
            "of": name,
            "over": reference,
            "wall": summary([r[0] for r in ratios]),
            "cpu": summary([r[1] for r in ratios]),
        },
        "peak_memory_ratio": None if peaks[0] is None else peaks[0] / peaks[1],
    }


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guarded(measure: Callable, device: torch.device) -> dict:
    """`measure()`, or the error where the device ran out of memory (a one-shot run on a lent GPU goes on with the
    other rows)."""
    try:
        return measure()
    except torch.OutOfMemoryError as error:
        free_memory(device)
        return {"error": f"out of memory: {str(error).splitlines()[0]}"}


def quiet_libraries() -> None:
    """diffusers and transformers: errors only, no progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


def command_line(script: str, repository: Path, argv: Optional[list]) -> str:
    """The command that ran `script`: its path relative to the repository and its arguments (`argv`, else the
    process's)."""
    arguments = sys.argv[1:] if argv is None else argv
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script, repository), *arguments])


def machine(device: torch.device, **versions) -> dict:
    """The machine and library versions; `versions` (e.g. xformers) go after diffusers'."""
    import diffusers

    import storydiff

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "diffusers": diffusers.__version__,
        **versions,
        "storydiff": storydiff.__version__,
        "python": platform.python_version(),
    }


def run_settings(args, device: torch.device, **versions) -> dict:
    """The JSON's run settings, machine and load average at the start, in the benchmarks' key order; `versions` as in
    `machine`."""
    return {
        "device": args.device,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "peak_memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "machine": machine(device, **versions),
        "load_average_at_start": load_average(),
    }


def write_results(results: dict, output: Path, started: float) -> None:
    """Adds the load average at the end and the wall seconds since `started`, writes `results` as JSON to `output`."""
    results["load_average_at_end"] = load_average()
    results["wall_seconds"] = time.perf_counter() - started
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {output} in {results['wall_seconds']:.0f} s", file=sys.stderr)
