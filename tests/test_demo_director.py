"""The DIRECTOR demo section on a tiny random pipeline (MiniLM width), saved without its text encoder."""

import pytest
import torch

from storydiff import DirectorModel, DirectorPipeline, EDMHeunScheduler
from storydiff.demo.director import demo_character, director_demo


def test_director_demo_writes_plot_table_and_exports(tmp_path):
    checkpoint = tiny_director_checkpoint(tmp_path / "ckpt")
    paths = director_demo(tmp_path / "out", checkpoint=checkpoint, prompts=["The camera pushes in."])
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


def tiny_director_checkpoint(folder):
    torch.manual_seed(0)
    model = DirectorModel(
        conditioning_type="cross_attention", num_frames=30, hidden_size=16, num_layers=1, num_heads=2,
        text_embed_dim=384, num_registers=2, num_condition_layers=1,
    )  # fmt: skip
    DirectorPipeline(model=model.eval(), scheduler=EDMHeunScheduler()).save_pretrained(folder)
    return str(folder)


def text_boxes_overlap(first, second) -> bool:
    return first.x0 < second.x1 and second.x0 < first.x1 and first.y0 < second.y1 and second.y0 < first.y1


def test_director_figure_reads_without_a_caption(tmp_path, monkeypatch):
    import storydiff.demo.director as director

    figures = []

    def keep_figure(figure, path, **kwargs):
        figures.append(figure)
        return director_module_save(figure, path, **kwargs)

    director_module_save = director.save_figure
    monkeypatch.setattr(director, "save_figure", keep_figure)
    prompts = ["The camera pushes in.", "The camera trucks left.", "The camera booms top."]
    director_demo(tmp_path / "out", checkpoint=tiny_director_checkpoint(tmp_path / "ckpt"), prompts=prompts)

    (figure,) = figures
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()  # the demo closed the figure; draw it again as it was saved
    renderer = figure.canvas.get_renderer()
    legend_entries = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    for entry in ("camera path", "camera start", "camera end", "character path", "character start", "view direction"):
        assert entry in legend_entries
    axes = figure.get_axes()
    assert len(axes) == len(prompts)
    page = figure.bbox
    for index, ax in enumerate(axes):
        for label in (ax.xaxis.label, ax.yaxis.label, ax.zaxis.label, ax.title):
            box = label.get_window_extent(renderer)
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, label
        assert ax.zaxis.label.get_text() == "-y (up)"
        if index + 1 < len(axes):  # the vertical-axis label stays clear of the next plot
            neighbour = axes[index + 1]
            assert not text_boxes_overlap(
                ax.zaxis.label.get_window_extent(renderer), neighbour.get_tightbbox(renderer)
            )
    for legend in figure.legends:
        box = legend.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0
        assert not any(text_boxes_overlap(box, ax.get_tightbbox(renderer)) for ax in axes)


class DiskFull(OSError):
    def __init__(self):
        super().__init__(28, "No space left on device")


def test_a_failing_rerun_keeps_the_previous_outputs(tmp_path, monkeypatch):
    """A full disk while the demo rewrites a figure or a table leaves the previous file whole, and no temp file."""
    import pathlib

    import matplotlib.figure

    checkpoint = tiny_director_checkpoint(tmp_path / "ckpt")
    output_dir = tmp_path / "out"
    first = director_demo(output_dir, checkpoint=checkpoint, prompts=["The camera pushes in."])
    before = {path.name: path.read_bytes() for path in first}

    def savefig_until_the_disk_is_full(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half a figure")
        raise DiskFull()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_until_the_disk_is_full)
    with pytest.raises(OSError, match="No space left"):
        director_demo(output_dir, checkpoint=checkpoint, prompts=["The camera trucks left."])
    assert (output_dir / "director_trajectories.png").read_bytes() == before["director_trajectories.png"]
    monkeypatch.undo()
    # the exports written before the figure are the new run's, complete: each file is one version or the other
    before = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    assert sorted(before) == sorted(path.name for path in first)

    real_write_bytes = pathlib.Path.write_bytes

    def write_half_then_fail(self, data):
        real_write_bytes(self, data[: len(data) // 2])
        raise DiskFull()

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        director_demo(output_dir, checkpoint=checkpoint, prompts=["The camera trucks left."])
    monkeypatch.undo()
    after = {path.name: path.read_bytes() for path in output_dir.iterdir()}
    assert after == before  # every file as the last run left it, no half files, no leftover temporary files
