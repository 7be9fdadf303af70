"""The DIRECTOR demo section on a tiny random pipeline (MiniLM width), saved without its text encoder."""

import torch

from storydiff import DirectorModel, DirectorPipeline, EDMHeunScheduler
from storydiff.demo.director import demo_character, director_demo


def test_director_demo_writes_plot_table_and_exports(tmp_path):
    torch.manual_seed(0)
    model = DirectorModel(
        conditioning_type="cross_attention", num_frames=30, hidden_size=16, num_layers=1, num_heads=2,
        text_embed_dim=384, num_registers=2, num_condition_layers=1,
    )  # fmt: skip
    DirectorPipeline(model=model.eval(), scheduler=EDMHeunScheduler()).save_pretrained(tmp_path / "ckpt")
    paths = director_demo(tmp_path / "out", checkpoint=str(tmp_path / "ckpt"), prompts=["The camera pushes in."])
    names = sorted(p.name for p in paths)
    assert names == [
        "director_0_blender.py",
        "director_0_camera.txt",
        "director_tagger.md",
        "director_trajectories.png",
    ]
    assert all(p.stat().st_size > 0 for p in paths)
    assert len((tmp_path / "out" / "director_0_camera.txt").read_text().splitlines()) == 30  # capped at the model max
    assert "The camera pushes in." in (tmp_path / "out" / "director_tagger.md").read_text()


def test_demo_character_walks_right():
    character = demo_character(50)
    assert character.shape == (50, 3) and character[-1, 0] > 1.5 and not character[:, 1:].any()
