"""`storydiff demo` end to end on the shipped checkpoints (fewer samples and steps than the real run), in a view of a
plain `pip install storydiff` (tests/plain_install.py): the demo needs no extra."""

import csv
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from plain_install import run_in_plain_install

import storydiff.demo as demo
from storydiff.demo.director import DEMO_PROMPTS

RUN_SHORT_DEMO = """
import sys
import storydiff.demo.dynamic_cfg as dynamic_cfg
from storydiff.cli import main

dynamic_cfg.DEMO_SAMPLES_PER_CLASS = 2
dynamic_cfg.DEMO_INFERENCE_STEPS = 4
import storydiff.demo.video_ldm as video_ldm

video_ldm.DEMO_NUM_CAPTIONS = 4
video_ldm.DEMO_INFERENCE_STEPS = 3
import storydiff.demo.controlnet as controlnet

controlnet.DEMO_NUM_CONDITIONS = 4
controlnet.DEMO_INFERENCE_STEPS = 3
import storydiff.demo.coherence_aware as coherence_aware

coherence_aware.DEMO_NUM_CAPTIONS = 4
coherence_aware.DEMO_INFERENCE_STEPS = 3
sys.exit(main(["demo", "--output-dir", sys.argv[1]]))
"""


def test_demo_command_writes_the_grid_and_the_metrics_table_from_a_plain_install(tmp_path):
    output_dir = tmp_path / "outputs"
    result = run_in_plain_install(RUN_SHORT_DEMO, tmp_path, str(output_dir))
    assert result.returncode == 0, result.stderr[-4000:]

    grid = output_dir / "dynamic_cfg_grid.png"
    with PIL.Image.open(grid) as image:
        assert image.width > 600 and image.height > 200  # 3 rows x 10 columns of digits, labelled
        assert np.asarray(image.convert("L")).std() > 10  # not blank

    with (output_dir / "dynamic_cfg_metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["schedule"] for row in rows] == ["static", "linear", "cosine", "real train digits (reference)"]
    for row in rows:
        assert 0.0 <= float(row["class accuracy"]) <= 1.0
        assert np.isfinite(float(row["digit Frechet distance"])) and float(row["digit Frechet distance"]) >= 0
    # Linear and cosine start at w_0 = 0: one of 4 steps skips the null-class pass, 7 of 8 half-batches run.
    work = {row["schedule"]: row["denoiser work vs static"] for row in rows}
    assert (work["static"], work["linear"], work["cosine"]) == ("1.000", "0.875", "0.875")

    markdown = (output_dir / "dynamic_cfg_metrics.md").read_text()
    for schedule in ("| static |", "| linear |", "| cosine |", "| real train digits (reference) |"):
        assert schedule in markdown
    # the DIRECTOR section ran too (it needs the offline text encoder, which only [test] used to install)
    assert (output_dir / "director_trajectories.png").stat().st_size > 0
    tagger_table = (output_dir / "director_tagger.md").read_text()
    assert all(f"| {prompt} |" in tagger_table for prompt in DEMO_PROMPTS)
    # the Video LDM section: frame strips, a GIF, the extension figure and its table
    with PIL.Image.open(output_dir / "video_ldm.gif") as gif:
        assert gif.n_frames == 8
    video_table = (output_dir / "video_ldm_metrics.md").read_text()
    assert "| Video LDM |" in video_table and "| image model per frame |" in video_table
    assert "| reconstruction guidance |" in video_table and (output_dir / "video_ldm_extension.png").is_file()
    # the ControlNet section: samples, the photograph through Canny, the table with and without prompts
    controlnet_table = (output_dir / "controlnet_metrics.md").read_text()
    for row in ("| base model (no control) |", "| full ControlNet |", "| lite ControlNet |", "| full, no prompt |",
                "| edges + mask, no prompt |"):  # fmt: skip
        assert row in controlnet_table
    with PIL.Image.open(output_dir / "controlnet_photo.png") as photo:
        assert photo.width > 600 and np.asarray(photo.convert("L")).std() > 10
    assert (output_dir / "controlnet_samples.png").stat().st_size > 0
    # the coherence-aware section: CAD at coherence 0 -> 1 and the baseline, measured back
    with (output_dir / "coherence_aware_metrics.csv").open() as handle:
        cad_rows = list(csv.DictReader(handle))
    assert [row["test-time coherence"] for row in cad_rows] == ["0", "0.25", "0.5", "0.75", "1", "(none)"]
    assert [row["model"] for row in cad_rows] == ["CAD"] * 5 + ["baseline"]
    assert all(0.0 <= float(row["overall"]) <= 1.0 for row in cad_rows)
    assert (output_dir / "coherence_aware_samples.png").stat().st_size > 0
    printed = result.stdout
    assert str(grid.resolve()) in printed and "dynamic_cfg_metrics.md" in printed
    assert "director_3_blender.py" in printed


def fake_section(output_dir, device):
    path = output_dir / "fake.txt"
    path.write_text(device)
    return [path]


def test_a_section_is_added_with_one_registry_line(tmp_path, monkeypatch, capsys):
    extra = demo.DemoSection("Fake capability", "fake", f"{__name__}:fake_section")
    monkeypatch.setattr(demo, "DEMO_SECTIONS", [*demo.DEMO_SECTIONS, extra])
    written = demo.run_demo(tmp_path, device="cpu", sections=["fake"])
    assert written == {"fake": [tmp_path / "fake.txt"]}
    assert (tmp_path / "fake.txt").read_text() == "cpu"
    assert "Fake capability" in capsys.readouterr().out


def test_unknown_sections_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="available: dynamic_cfg"):
        demo.run_demo(tmp_path, sections=["nope"])


def test_command_line_help_lists_the_demo():
    result = subprocess.run(
        [sys.executable, "-m", "storydiff.cli", "demo", "--help"], capture_output=True, text=True, check=True
    )
    assert "--output-dir" in result.stdout
