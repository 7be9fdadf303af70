"""scripts/reproduce_director_synthetic.py end to end with tiny random models on a tiny synthetic E.T. folder."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from storydiff import CLaTrModel, DirectorModel, DirectorPipeline, EDMHeunScheduler
from storydiff.data import make_synthetic_et

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "reproduce_director_synthetic.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_director_synthetic", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reproduction_script_writes_report_json_and_figure(tmp_path):
    root = tmp_path / "et"
    make_synthetic_et(root, num_samples=40, seed=3, num_frames=(30, 80), test_fraction=0.5, pure_probability=0.2)
    torch.manual_seed(0)
    CLaTrModel(
        text_embed_dim=384, latent_dim=16, num_layers=1, num_heads=2, ff_size=32, max_frames=80
    ).save_pretrained(tmp_path / "clatr")
    model = DirectorModel(
        conditioning_type="cross_attention", num_frames=80, hidden_size=16, num_layers=1, num_heads=2,
        num_registers=2, text_embed_dim=384,
    )  # fmt: skip
    DirectorPipeline(model=model, scheduler=EDMHeunScheduler()).save_pretrained(tmp_path / "director-c")
    report = tmp_path / "report.md"
    report.write_text("old\n<!-- verdict -->\nA written discussion.\n")
    script = _load_script()
    summary = script.main(
        [
            "--et_root", str(root), "--clatr", str(tmp_path / "clatr"), "--director", f"C={tmp_path / 'director-c'}",
            "--num_inference_steps", "2", "--report", str(report), "--results_json", str(tmp_path / "r.json"),
            "--figure", str(tmp_path / "figure.png"),
        ]
    )  # fmt: skip
    results = summary["results"]
    assert set(results) == {"ground truth", "static camera (baseline)", "C"}
    for subset, size in summary["subset_sizes"].items():
        row = results["C"][subset]
        assert row["samples"] == size and np.isfinite(row["FD_CLaTr"]) and 0 <= row["C-F1"] <= 1
    # Real segments are the tagger's own output, so ground truth scores 1 on the tag metrics.
    assert results["ground truth"]["full"]["C-F1"] == pytest.approx(1.0)
    assert len(summary["controllability"]["readings"]["C"]) == 4
    assert os.path.getsize(tmp_path / "figure.png") > 10_000
    text = report.read_text()
    assert "| C |" in text and text.rstrip().endswith("A written discussion.")
    assert json.loads((tmp_path / "r.json").read_text())["results"]["C"]["full"]["samples"] == 20
