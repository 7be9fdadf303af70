"""scripts/reproduce_coherence_aware.py: both parts end to end with a few training steps and a few images per point
(data, coherence scores, every mode's training, the sweeps, the pages), a rerun that trains nothing, and the rules of
its verdict on made-up numbers. The trainings and measurements themselves are tested in their own files."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_coherence_aware.py"
TINY_TRAINING = (
    "--checkpointing_steps 2 --validation_inference_steps 1 --validation_coherences 0,1 --conditioner_dim 16 "
    "--conditioner_layers 1 --conditioner_heads 2 --num_registers 2 --rin_interface_dim 8 --rin_latent_dim 16 "
    "--rin_num_latents 4 --rin_blocks 1 --rin_compute_layers 1 --rin_heads 2 --block_out_channels 8,16 "
    "--norm_num_groups 4"
)


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_coherence_aware", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


script = load_script()


def tiny_argv(run_dir: Path, output_dir: Path) -> list:
    return [
        "--part", "both", "--run_dir", str(run_dir), "--output_dir", str(output_dir), "--jobs", "1",
        "--max_class_samples", "200", "--num_world_samples", "64", "--class_steps", "2", "--text_steps", "2",
        "--training_flags", TINY_TRAINING, "--class_guidance_scales", "1", "2", "--text_guidance_scales", "1", "2",
        "--coherences", "0", "1", "--class_sweep_scale", "2", "--text_sweep_scale", "2", "--samples_per_class", "2",
        "--num_captions", "4", "--num_inference_steps", "2", "--bootstrap", "3",
    ]  # fmt: skip


def test_both_parts_end_to_end_and_a_rerun_trains_nothing(tmp_path):
    run_dir, output_dir = tmp_path / "runs", tmp_path / "results"
    written = script.main(tiny_argv(run_dir, output_dir))
    for part, stem, runs in (("class", "coherence_aware_digits", script.MODES),
                             ("text", "coherence_aware_text", script.TEXT_RUNS)):  # fmt: skip
        for suffix in (".md", ".png", ".json", "_samples.png"):
            assert (output_dir / f"{stem}{suffix}").is_file(), stem + suffix
        data = json.loads((output_dir / f"{stem}.json").read_text())
        assert set(data["training"]) == set(runs) and data["trained_now"] == list(runs)
        assert {row["mode"] for row in data["rows"]} == set(runs)
        assert all(data["training"][run]["train_steps"] == 2 for run in runs)
        assert data["training"]["filter"]["kept_examples"] < data["training"]["cad"]["kept_examples"]
        assert [sweep["guidance_scale"] for sweep in data["sweeps"]] == [1.0, 2.0]
        assert len(data["verdict"]) == 3 and set(data["comparisons"]) == {"baseline", "filter", "weight"}
        assert data["verdict"][0].startswith("- **(a)") and data["verdict"][-1].startswith("- **(b)")
        assert data["verdicts"]["cad_beats_baseline_and_filter"] in ("held", "not held", "not measurable",
                                                                      "partly held")  # fmt: skip
        assert "true" in data["coherence_by_truth"] and "wrong" in data["coherence_by_truth"]
        page = (output_dir / f"{stem}.md").read_text()
        assert "## Verdict" in page and "compute_coherence.py" in page and "--mode cad" in page
        assert written[part]["verdict"] == data["verdict"]
    text = json.loads((output_dir / "coherence_aware_text.json").read_text())
    assert {row["negative"] for row in text["negatives"]} == {"empty", "random"}
    assert "vague" in text["coherence_by_truth"]

    # every run has its train_metrics.json: a rerun only rewrites the pages (here from the JSON)
    rerun = script.prepare_and_train(script.parse_args(tiny_argv(run_dir, output_dir)))
    assert rerun["class"]["trained_now"] == [] and rerun["text"]["trained_now"] == []
    script.main(["--part", "class", "--output_dir", str(output_dir), "--report_only"])
    assert "## Verdict" in (output_dir / "coherence_aware_digits.md").read_text()


def sweep(values, errors=0.01) -> list:
    return [{"coherence": c, "adherence": v, "adherence_se": errors} for c, v in zip((0, 0.5, 1), values)]


def test_coherence_effect_is_judged_against_two_standard_errors():
    held = script.coherence_effect(sweep([0.3, 0.5, 0.7]), "adherence")
    assert held["verdict"] == "held" and held["monotone"] and held["difference"] == pytest.approx(0.4)
    assert script.coherence_effect(sweep([0.7, 0.5, 0.3]), "adherence")["verdict"] == "not held"
    # 0.02 apart with standard errors 0.01: two standard errors of the difference are 0.028
    flat = script.coherence_effect(sweep([0.50, 0.55, 0.52]), "adherence")
    assert flat["verdict"] == "not measurable" and not flat["monotone"]


def curve(points, se=0.01, std=1.0) -> list:
    return [{"guidance_scale": 1 + i, "class_accuracy": a, "class_accuracy_se": se, "frechet_distance": fd,
             "frechet_std": std} for i, (a, fd) in enumerate(points)]  # fmt: skip


def test_tradeoff_comparison_held_not_held_not_measurable_and_mixed():
    other = curve([(0.5, 10.0), (0.6, 12.0), (0.7, 15.0)])
    better = script.tradeoff_comparison(curve([(0.6, 8.0), (0.7, 9.0), (0.8, 11.0)]), other, "class_accuracy")
    assert better["verdict"] == "held" and better["fd_difference"] < 0 and better["adherence_difference"] > 0
    worse = script.tradeoff_comparison(other, curve([(0.6, 8.0), (0.7, 9.0), (0.8, 11.0)]), "class_accuracy")
    assert worse["verdict"] == "not held"
    close = script.tradeoff_comparison(curve([(0.51, 10.2), (0.6, 11.9), (0.7, 15.1)]), other, "class_accuracy")
    assert close["verdict"] == "not measurable"
    # large spreads swallow the same gap that was a clear win above
    noisy = script.tradeoff_comparison(curve([(0.6, 8.0), (0.7, 9.0), (0.8, 11.0)], se=0.2, std=10.0),
                                       curve([(0.5, 10.0), (0.6, 12.0), (0.7, 15.0)], se=0.2, std=10.0),
                                       "class_accuracy")  # fmt: skip
    assert noisy["verdict"] == "not measurable"
    # lower FD at equal accuracy but lower accuracy at equal FD: mixed
    mixed = script.tradeoff_comparison(curve([(0.5, 2.0), (0.6, 14.0)]), curve([(0.5, 12.0), (0.7, 13.0)]),
                                       "class_accuracy")  # fmt: skip
    assert mixed["verdict"] == "mixed"


def test_overall_tradeoff_needs_both_baseline_and_filter():
    def outcome(baseline, filtered):
        return script.overall_tradeoff({"baseline": {"verdict": baseline}, "filter": {"verdict": filtered},
                                        "weight": {"verdict": "not held"}})  # fmt: skip

    assert outcome("held", "held") == "held"
    assert outcome("held", "not held") == "not held"
    assert outcome("held", "not measurable") == "partly held"
    assert outcome("not measurable", "not measurable") == "not measurable"
    assert script.judge(float("nan"), 1.0) == "within noise"
