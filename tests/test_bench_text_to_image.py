"""benchmarks/bench_text_to_image.py runs on a tiny Stable Diffusion folder and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from tiny_stable_diffusion import tiny_sd_components

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_text_to_image.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_text_to_image", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_a_tiny_model_and_writes_its_json(tmp_path):
    model = tmp_path / "tiny-sd"
    StableDiffusionPipeline(
        **tiny_sd_components(tmp_path, sample_size=12), requires_safety_checker=False
    ).save_pretrained(model)
    output = tmp_path / "bench" / "text_to_image.json"
    steps = 4
    load_benchmark().main(["--model", str(model), "--output", str(output), "--steps", str(steps),
                           "--train-batch", "4", "--train-pairs", "1", "--generation-batches", "1", "3",
                           "--generation-repeats", "1", "--text-repeats", "1", "--cfg-repeats", "1",
                           "--overhead-pairs", "1"])  # fmt: skip

    results = json.loads(output.read_text())
    assert results["image_size"] == 24 and results["latent_shape"] == [4, 12, 12] and results["threads"] == 1
    training = results["training"]
    assert training["batch_size"] == 4
    trained, frozen = training["configurations"].values()
    assert (
        training["trainable_parameters"]["text encoder trained (from scratch, as shipped)"]
        > (training["trainable_parameters"]["text encoder frozen"])
    )
    for row in (trained, frozen):
        assert row["examples_per_second"] == pytest.approx(4 / row["step_seconds"]["wall"]["median"])
        assert set(row["parts_median_seconds"]) == {
            "data_seconds",
            "forward_backward_seconds",
            "optimizer_seconds",
            "ema_seconds",
        }

    generation = results["generation"]
    assert set(generation) == {"1", "3"}
    shares = generation["3"]["share_of_call_wall_time"]
    assert set(shares) == {"text_encoder", "unet", "vae_decode"} and 0 < sum(shares.values()) <= 1
    text = results["text_encoder"]
    assert text["batch 3, prompt + empty negative (CFG)"]["ms_per_prompt"] > 0

    dynamic = results["dynamic_cfg"]
    assert dynamic["static_equals_stock"] and dynamic["overhead"]["pairs"] == 1
    savings = dynamic["savings"]
    assert savings["static"]["zero_weight_steps"] == 0 and savings["static"]["time_over_static"] is None
    assert savings["interval (0.25, 0.75)"]["zero_weight_steps"] > 0
    for row in savings.values():  # the UNet really skips the unconditional half on every zero-weight step
        assert row["unet_samples_over_static"] == pytest.approx(row["expected_over_static"])
        assert row["expected_over_static"] == pytest.approx((2 * steps - row["zero_weight_steps"]) / (2 * steps))


def test_a_folder_without_a_pipeline_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="is not a pipeline folder"):
        load_benchmark().main(["--model", str(tmp_path), "--output", str(tmp_path / "out.json")])
