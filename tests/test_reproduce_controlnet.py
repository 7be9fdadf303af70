"""scripts/reproduce_controlnet.py: the rules its verdict applies (noise-aware comparisons, the sudden-convergence
test) and the report it rewrites from its JSON. The trainings and measurements themselves are
training/train_controlnet.py's and storydiff.evaluation's, tested in their own files."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "reproduce_controlnet.py"


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_controlnet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scores(edge_iou: float, error: float = 0.01, fd: float = 50.0) -> dict:
    return {"edge_iou": edge_iou, "edge_iou_standard_error": error, "adherence_overall": 0.8, "adherence_digit": 0.5,
            "adherence_colour": 0.9, "adherence_position": 0.9, "adherence_size": 0.9, "frechet_distance": fd}  # fmt: skip


def history(values) -> list:
    return [
        {"step": 200 * (i + 1), "edge_iou_no_prompt": v, "canvas_frechet_distance": 50.0} for i, v in enumerate(values)
    ]


def synthetic_data(script, full_iou=0.8, lite_iou=0.6, full_curve=(0.08, 0.09, 0.6, 0.7)) -> dict:
    run = {"controlnet_parameters": 1000, "trainable_parameters": 1000, "train_wall_time_s": 10.0}
    results = {
        "base": {"prompted": scores(0.7)},
        "real": {"own_edges": 1.0, "other_canvas_edges": 0.09},
        "full_edges": {**run, "prompted": scores(0.85), "no_prompt": scores(full_iou, fd=40)},
        "lite_edges": {**run, "prompted": scores(0.8), "no_prompt": scores(lite_iou, fd=45)},
        "mid_edges": {**run, "prompted": scores(0.8), "no_prompt": scores(0.5)},
        "unlocked_edges": {**run, "prompted": scores(0.8), "no_prompt": scores(0.805)},
    }
    results["full_edges"]["prompted"]["frechet_distance"] = 40.0
    results["lite_edges"]["prompted"]["frechet_distance"] = 45.0
    multi = {name: scores(0.5) for name in ["joint (one ControlNet, 4 channels)", "sum of separately trained (edges + mask)",
                                            "edges only (full_edges)", "mask only (full_position)"]}  # fmt: skip
    curves = {name: history(full_curve if name == "full_edges" else (0.08, 0.2, 0.35, 0.5)) for name in script.RUNS}
    convergence = {name: script.sudden_convergence(curves[name]) for name in script.EDGE_RUNS}
    return {"results": results, "multi": multi, "curves": curves, "convergence": convergence}


def test_comparisons_respect_the_noise():
    script = load_script()
    assert script.compare(scores(0.8), scores(0.7)) == "higher than"
    assert script.compare(scores(0.7), scores(0.8)) == "lower than"
    assert script.compare(scores(0.8, 0.05), scores(0.75, 0.05)) == "within noise of"


def test_sudden_convergence_finds_the_jump():
    script = load_script()
    sudden = script.sudden_convergence(history([0.08, 0.09, 0.6, 0.7]))
    assert (sudden["jump_from_step"], sudden["jump_to_step"]) == (400, 600)
    assert abs(sudden["share_of_total_gain"] - 0.51 / 0.62) < 1e-9
    gradual = script.sudden_convergence(history([0.1, 0.25, 0.4, 0.55]))
    assert gradual["share_of_total_gain"] < 0.4


def test_verdict_follows_the_measurements():
    script = load_script()
    data = synthetic_data(script)
    lines = script.verdict(data["results"], data["multi"], data["convergence"])
    assert "**held**" in lines[0]  # full above lite beyond the noise, and a lower FD
    assert "not held" in lines[1]  # the other runs rose gradually
    assert "lower than all connections" in lines[2] and "within noise of locked" in lines[3]
    tied = synthetic_data(script, full_iou=0.61, lite_iou=0.6)
    assert "not measurable" in script.verdict(tied["results"], tied["multi"], tied["convergence"])[0]
    reversed_ = synthetic_data(script, full_iou=0.4, lite_iou=0.6)
    assert "**not held**" in script.verdict(reversed_["results"], reversed_["multi"], reversed_["convergence"])[0]


def test_the_report_is_rewritten_from_the_json(tmp_path):
    script = load_script()
    data = synthetic_data(script)
    data.update({"command": "python scripts/reproduce_controlnet.py", "commands": {"full_edges": "python train"},
                 "elapsed_s": 60.0, "num_examples": 256, "seed": 1, "guidance_scale": 4.0, "num_inference_steps": 20,
                 "verdict": ["stale"]})  # fmt: skip
    (tmp_path / "controlnet_digits.json").write_text(json.dumps(data))
    script.main(["--output_dir", str(tmp_path), "--rewrite_report"])
    page = (tmp_path / "controlnet_digits.md").read_text()
    assert "stale" not in page and "**held**" in page and "python train" in page
    assert "| base model, no ControlNet |" in page and "| 600 |" in page and "joint (one ControlNet" in page
