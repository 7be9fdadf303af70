"""benchmarks/bench_video_ldm.py runs on the shipped digits UNet with the smallest settings and writes its JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_video_ldm.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_video_ldm", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_the_digits_unet_and_writes_its_ratios(tmp_path):
    output = tmp_path / "bench" / "video_ldm.json"
    load_benchmark().main(["--frames", "3,4", "--repeats", "1", "--warmup", "0", "--batch-size", "1",
                           "--steps", "1", "--attention", "xformers,sdpa", "--output", str(output)])  # fmt: skip

    results = json.loads(output.read_text())
    assert results["command"].startswith("python benchmarks/bench_video_ldm.py --frames 3,4")
    assert results["unet"] == "digits" and results["latent_shape"] == [4, 8, 8] and results["frames"] == [3, 4]
    assert results["machine"]["torch"] and results["threads"] >= 1 and results["peak_memory"] is None
    parameters = results["parameters"]
    assert parameters["video_ldm_unet"] == parameters["unet2d"] + parameters["temporal_layers"]

    expected = {
        "denoiser": ("VideoLDMUNet", "stock UNet2DConditionModel, frame by frame"),
        "known_frames": ("reconstruction_guidance", "replacement"),
        "training": ("spatial layers frozen (freeze_spatial)", "all parameters trained"),
    }
    for section, (name, reference) in expected.items():
        rows = results[section]["frames"]
        assert set(rows) == {"3", "4"}
        for row in rows.values():
            ratio = row["time_ratio"]
            assert (ratio["of"], ratio["over"]) == (name, reference) and set(row["configurations"]) == {
                name,
                reference,
            }
            for kind in ("wall", "cpu"):
                assert math.isfinite(ratio[kind]["median"]) and ratio[kind]["median"] > 0 and ratio[kind]["n"] == 1
            assert row["peak_memory_ratio"] is None  # measured on CUDA only
    for row in results["denoiser"]["frames"].values():  # at initialisation the video model is the image model
        assert row["max_abs_difference_video_vs_stock"] == 0
    assert results["known_frames"]["frames"]["4"]["known_frame_indices"] == [0, 3]
    trainable = results["training"]["trainable_parameters"]
    assert trainable["spatial layers frozen (freeze_spatial)"] == parameters["temporal_layers"]
    assert trainable["all parameters trained"] == parameters["video_ldm_unet"]
    assert "CUDA only" in results["attention"]["skipped"]


@pytest.mark.parametrize("flags", [["--frames", "2"], ["--attention", "flash"]])
def test_bad_flags_are_refused(tmp_path, flags):
    with pytest.raises(SystemExit):
        load_benchmark().main([*flags, "--output", str(tmp_path / "out.json")])
