"""benchmarks/bench_coherence_aware.py runs at its --quick sizes and writes its JSON: every comparison present, with
finite positive ratios (not their values: timings are the benchmark's business, not a test's)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_coherence_aware.py"
QUICK = ["--quick", "--threads", "1"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_coherence_aware", BENCHMARK)
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


def test_quick_benchmark_writes_every_comparison(tmp_path, restore_threads):
    benchmark = load_benchmark()
    output = tmp_path / "bench" / "coherence_aware.json"
    benchmark.main([*QUICK, "--output", str(output)])

    results = json.loads(output.read_text())
    assert results["command"].startswith("python benchmarks/bench_coherence_aware.py --quick")
    assert results["quick"] and results["repeats"] == 1 and results["warmup"] == 0 and results["threads"] == 1
    assert results["machine"]["transformers"] and results["peak_memory"] is None

    # 1. CA-CFG against the stock pipeline: both feed the UNet the same images, the conditioner lengthens the context
    ca_cfg = results["ca_cfg"]
    assert set(ca_cfg) == {"digits", "sd15"}
    assert set(ca_cfg["digits"]["variants"]) == {benchmark.CA_EMPTY, benchmark.CA_SAME}
    assert set(ca_cfg["sd15"]["variants"]) == {benchmark.CA_EMPTY}
    for name, section in ca_cfg.items():
        registers = section["conditioner"]["num_registers"]
        text_tokens = section["text_shape"][0]
        assert section["stock_context_tokens"] == [text_tokens] and text_tokens == (24 if name == "digits" else 77)
        assert section["stock_unet_images"] == 2 * section["steps"] * section["batch_size"] == 4
        for variant, row in section["variants"].items():
            assert_ratio(row, variant, benchmark.STOCK)
            assert row["unet_images"] == section["stock_unet_images"]
            # the pipeline drops the positions that are padding in every prompt: at most all the text tokens
            assert all(1 + registers < tokens <= 1 + registers + text_tokens for tokens in row["context_tokens"])
    assert ca_cfg["sd15"]["conditioner"]["dim"] == 256 and ca_cfg["sd15"]["text_shape"] == [77, 768]

    # 2. the conditioner against one UNet step, and the UNet step on the conditioner's context against the stock one
    for section in results["conditioner"].values():
        rows = section["comparisons"]
        assert_ratio(rows[benchmark.CONDITIONER], benchmark.CONDITIONER, benchmark.UNET_STEP)
        assert_ratio(rows[benchmark.UNET_STEP], benchmark.UNET_STEP, benchmark.UNET_STEP_STOCK)
        per_step = rows[benchmark.CONDITIONER]["per_step_equivalent"]
        assert per_step["wall"] == rows[benchmark.CONDITIONER]["time_ratio"]["wall"]["median"] / section["steps"]
    assert set(results["conditioner"]) == {"digits", "sd15"}

    # 3. TextRIN against the digits UNet, of about its size
    text_rin = results["text_rin"]
    parameters = text_rin["parameters"]
    rin, unet = parameters[benchmark.RIN_DENOISER], parameters[benchmark.UNET_DENOISER]
    assert unet == 1_077_572 and abs(rin - unet) / unet < 0.1
    assert_ratio(text_rin["sampling"], benchmark.RIN_DENOISER, benchmark.UNET_DENOISER)
    assert_ratio(text_rin["training_step"], benchmark.RIN_DENOISER, benchmark.UNET_DENOISER)
    for row in text_rin["sampling"]["configurations"].values():
        assert math.isfinite(row["samples_per_second"]) and row["samples_per_second"] > 0

    # 4. scoring throughput
    scoring = results["scoring"]
    assert len(scoring["clip_cosine"]) == 2
    for row in scoring["clip_cosine"].values():
        assert_ratio(row, "clip_cosine", "model forward alone (preprocessed inputs)")
        assert math.isfinite(row["images_per_second"]) and row["images_per_second"] > 0
    classifier = scoring["classifier_coherence"]
    assert classifier["samples"] == 500 and classifier["num_folds"] == 5
    assert math.isfinite(classifier["seconds"]["wall"]["median"]) and classifier["seconds"]["wall"]["median"] > 0


@pytest.mark.parametrize(
    "flags",
    [["--steps", "1"], ["--guidance-scale", "1"], ["--repeats", "0"], ["--vit-batch-size", "100"]],
)
def test_bad_flags_are_refused(tmp_path, restore_threads, flags):
    with pytest.raises(SystemExit):
        load_benchmark().main([*flags, "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
