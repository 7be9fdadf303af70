"""scripts/reproduce_dynamic_cfg_text.py end to end on a tiny text-to-image model trained in the test, and the pieces
its verdict rests on (the Frechet features, the equal-FD frontier)."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storydiff.data.digits import digits_world_arrays
from storydiff.evaluation import load_digit_classifier
from storydiff.evaluation.text_adherence import canvas_frechet_distance
from storydiff.metrics import frechet_distance
from storydiff.training.text_to_image_components import new_vae
from storydiff.training.train_text_to_image import main as train_text_to_image


def load_script():
    script = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_dynamic_cfg_text.py"
    spec = importlib.util.spec_from_file_location("reproduce_dynamic_cfg_text", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t2i")
    new_vae((4, 8), latent_channels=4, norm_num_groups=4).save_pretrained(root / "vae")
    train_text_to_image(["--dataset", "digits_world", "--vae", str(root / "vae"), "--resolution", "24",
                         "--num_world_samples", "8", "--unet_block_out_channels", "8,16", "--unet_norm_num_groups", "4",
                         "--unet_attention_head_dim", "4", "--text_encoder_hidden_size", "16",
                         "--text_encoder_layers", "1", "--train_batch_size", "4", "--max_train_steps", "1",
                         "--validation_prompts", "--evaluation_guidance_scales", "", "--report_to", "none",
                         "--output_dir", str(root / "model")])  # fmt: skip
    return root / "model"


def test_sweep_writes_its_page_plot_grid_table_and_numbers(tiny_model, tmp_path):
    script = load_script()
    arguments = ["--model", str(tiny_model), "--schedules", "static", "linear", "--guidance_scales", "2", "4",
                 "--num_samples", "6", "--num_inference_steps", "3", "--bootstrap", "3", "--grid_prompts", "2",
                 "--output_dir", str(tmp_path)]  # fmt: skip
    results = script.main(arguments)

    assert [(row["schedule"], row["guidance_scale"]) for row in results["rows"]] == [
        ("static", 2.0),
        ("linear", 2.0),
        ("static", 4.0),
        ("linear", 4.0),
    ]
    # Linear starts at w_0 = 0: its first of 3 steps skips the unconditional pass; no guidance runs half the work.
    assert [row["denoiser_work"] for row in results["rows"]] == pytest.approx([1, 5 / 6, 1, 5 / 6])
    assert results["baseline"]["denoiser_work"] == 0.5
    for row in [results["baseline"], *results["rows"]]:
        for name in ("overall", "exact", "digit", "colour", "position", "size"):
            assert 0.0 <= row[name] <= 1.0
        assert np.isfinite(row["frechet_distance"]) and row["frechet_std"] >= 0
    for kind, named in results["paired_intervals"].items():
        assert kind in ("linear", "linear and cosine")
        for low, high in named.values():
            assert low <= high
    # the measurer reads real canvases of the world back (its ceiling), whatever the model
    assert results["real_canvases"]["overall"] > 0.8

    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [f"dynamic_cfg_text{suffix}" for suffix in (".csv", ".json", ".md", ".png", "_samples.png")]
    table = list(csv.DictReader(open(tmp_path / "dynamic_cfg_text.csv")))
    assert [row["schedule"] for row in table] == ["none (g = 1)", "static", "linear", "static", "linear"]
    page = (tmp_path / "dynamic_cfg_text.md").read_text()
    assert "python scripts/reproduce_dynamic_cfg_text.py --model" in page and "Run time:" in page
    assert "| linear | 4 |" in page and "**Do rising schedules improve the trade-off" in page
    # the sample grid: two captions side by side, each 2 schedules x 3 scales of 64-pixel cells below its labels
    width, height = Image.open(tmp_path / "dynamic_cfg_text_samples.png").size
    assert width > 2 * 3 * 64 and height > 2 * 64

    # --report_only rebuilds the page from the JSON alone
    saved = json.loads((tmp_path / "dynamic_cfg_text.json").read_text())
    (tmp_path / "dynamic_cfg_text.md").unlink()
    script.main(["--output_dir", str(tmp_path), "--report_only"])
    assert (tmp_path / "dynamic_cfg_text.md").read_text() == page
    assert saved["settings"]["num_samples"] == 6


def test_frechet_features_match_canvas_frechet_distance():
    script = load_script()
    classifier = load_digit_classifier()
    canvases, _, _ = digits_world_arrays("train", 40, seed=3, resolution=32)
    canvases = ((canvases + 1.0) / 2.0).permute(0, 2, 3, 1).numpy()
    features = script.canvas_features(canvases, classifier)
    ours = frechet_distance(features, script.reference_features(32, 1, classifier))
    assert ours == pytest.approx(canvas_frechet_distance(canvases, classifier=classifier), rel=1e-6)


def test_equal_fd_frontier_rewards_more_adherence_within_the_same_fd():
    script = load_script()
    static = [(0.5, 10.0), (0.6, 20.0), (0.7, 40.0)]
    better = [(0.5, 10.0), (0.65, 20.0), (0.75, 40.0)]  # more adherent at every FD static reaches
    comparison = script.compare_at_equal_fd(better, static)
    assert comparison["mean_difference"] > 0 and comparison["num_better"] > 0 and comparison["num_worse"] == 0
    assert script.compare_at_equal_fd(static, better)["mean_difference"] < 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--schedules", "linear", "cosine"], "must include static"),
        (["--schedules", "static", "wobbly"], "unknown schedule"),
        (["--guidance_scales", "1", "2"], "must be > 1"),
        (["--num_samples", "0"], "--num_samples must be >= 1"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(arguments, message, capsys):
    with pytest.raises(SystemExit):
        load_script().parse_args(arguments)
    assert message in capsys.readouterr().err


def test_paired_bootstrap_resamples_the_same_captions_for_every_point():
    script = load_script()
    rng = np.random.default_rng(0)

    def canvases(shift: float) -> dict:
        return {
            "overall": rng.uniform(0, 1, 30).round(2),
            "exact": rng.integers(0, 2, 30).astype(float),
            "num_digits": np.ones(30),
            "features": [rng.normal(shift, 1.0, (1, 4)) for _ in range(30)],
        }

    static = canvases(0.0)
    measured = {("static", 2.0): static, ("linear", 2.0): static, ("cosine", 2.0): canvases(3.0)}
    intervals = script.paired_bootstrap(
        measured, canvases(0.0), ["static", "linear", "cosine"], rng.normal(0, 1, (50, 4)), 20, 0
    )
    # linear drew exactly static's canvases: paired resamples leave no difference at all
    for name in ("same_g_overall", "same_g_exact", "same_g_fd"):
        assert intervals["linear"][name] == [0.0, 0.0]
    # cosine's features are far off the reference: it is worse than static at the same g in every resample
    assert intervals["cosine"]["same_g_fd"][0] > 0
    assert set(intervals) == {"linear", "cosine", "linear and cosine"}
