"""benchmarks/bench_controlnet.py runs on the shipped digits UNet with the smallest settings and writes its JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_controlnet.py"
SMALLEST = ["--repeats", "1", "--warmup", "0", "--batch-size", "1", "--steps", "2", "--threads", "1"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_controlnet", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def assert_ratio(row, name, reference):
    ratio = row["time_ratio"]
    assert (ratio["of"], ratio["over"]) == (name, reference) and set(row["configurations"]) == {name, reference}
    for kind in ("wall", "cpu"):
        assert math.isfinite(ratio[kind]["median"]) and ratio[kind]["median"] > 0 and ratio[kind]["n"] == 1
    assert row["peak_memory_ratio"] is None  # measured on CUDA only


def test_benchmark_runs_on_the_digits_unet_and_writes_its_ratios(tmp_path, restore_threads):
    benchmark = load_benchmark()
    output = tmp_path / "bench" / "controlnet.json"
    benchmark.main([*SMALLEST, "--output", str(output)])

    results = json.loads(output.read_text())
    assert results["command"].startswith("python benchmarks/bench_controlnet.py --repeats 1")
    assert results["unet"] == "digits" and results["latent_shape"] == [4, 8, 8] and results["image_size"] == [32, 32]
    assert results["vae_stride"] == 4 and results["conditioning_embedding_out_channels"] == [16, 32, 96]
    assert results["machine"]["torch"] and results["threads"] == 1 and results["peak_memory"] is None

    # parameter counts: the lite and light controls are smaller, the mid-block-only variant is the full network
    parameters = results["parameters"]
    variants = parameters["variants"]
    full, lite, mid = (variants[name]["parameters"] for name in (benchmark.FULL, benchmark.LITE, benchmark.MID))
    assert 0 < lite < full and mid == full
    for row in variants.values():
        assert row["parameters"] > 0 and 0 < row["relative_to_unet"] < 1
    assert variants[benchmark.FULL]["relative_to_unet"] == full / parameters["unet"]
    xs = parameters["controlnet_xs"]
    assert variants[benchmark.XS]["parameters"] < variants[benchmark.TWIN_FULL]["parameters"]
    assert xs["block_out_channels"] == [8, 16] and xs["size_ratio"] == 0.25  # nearest the lite's count
    assert xs["base_unet_parameters"] < xs["fused_model_parameters"] and "2 layers per block" in xs["base_unet_note"]
    assert parameters["t2i_adapter"]["channels"] == [32, 64] and "unused" in parameters["t2i_adapter"]["note"]

    denoiser = results["denoiser"]["variants"]
    expected = {name: benchmark.UNET for name in (benchmark.FULL, benchmark.LITE, benchmark.MID, benchmark.T2I,
                                                  benchmark.T2I_EVERY_STEP)}  # fmt: skip
    expected[benchmark.XS] = benchmark.TWIN_UNET
    assert set(denoiser) == set(expected)
    for name, reference in expected.items():
        assert_ratio(denoiser[name], name, reference)
    for name in (benchmark.FULL, benchmark.LITE, benchmark.MID):  # zero-initialised: the UNet's output unchanged
        assert denoiser[name]["max_abs_difference_vs_reference_at_initialisation"] == 0

    training = results["training"]
    trainable = training["trainable_parameters"]
    assert trainable[benchmark.FULL] == full and trainable[benchmark.LITE] == lite
    assert trainable[benchmark.MID] < full  # its down zero convolutions get no gradient
    decoder = trainable[f"{benchmark.FULL}, unlocked decoder"] - full
    assert decoder > 0 and trainable[f"{benchmark.LITE}, unlocked decoder"] == lite + decoder
    assert trainable[benchmark.XS] == variants[benchmark.XS]["parameters"]
    for name, row in training["variants"].items():
        assert_ratio(row, name, benchmark.TWIN_FULL if name == benchmark.XS else benchmark.FULL)
    assert benchmark.FULL not in training["variants"]  # the reference

    dynamic = results["dynamic_cfg"]
    assert dynamic["steps"] == 2 and dynamic["images_evaluated_static"] == {"unet": 4, "controlnet": 4}
    assert set(dynamic["schedules"]) == {"linear", "interval [0.5, 1]"}
    for name, row in dynamic["schedules"].items():
        assert_ratio(row, name, "static")
        assert row["guidance_scales"][0] == 1 and row["zero_weight_steps"] == 1
        assert row["expected_evaluation_ratio"] == (2 * 2 - 1) / (2 * 2)
        # the ControlNet skips the unconditional half too
        assert row["evaluation_ratio_counted"] == {"unet": 0.75, "controlnet": 0.75}


@pytest.mark.parametrize(
    "flags",
    [
        ["--steps", "1"],
        ["--guidance-scale", "1"],
        ["--xs-size-ratio", "0"],
        ["--conditioning-embedding-out-channels", "16", "32", "96", "256"],
    ],
)
def test_bad_flags_are_refused(tmp_path, restore_threads, flags):
    with pytest.raises(SystemExit):
        load_benchmark().main([*SMALLEST, *flags, "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
