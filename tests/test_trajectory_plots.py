"""The trajectory plot and GIF read without a caption: axis names and a legend for everything drawn."""

import matplotlib.animation
import numpy as np

from storydiff.trajectories import animate_trajectory, plot_trajectory

AXIS_NAMES = ("x (right)", "z (forward)", "-y (up)")


def walking_scene(num_frames=12):
    poses = np.tile(np.eye(4), (num_frames, 1, 1))
    poses[:, 0, 3] = np.linspace(-1.0, 1.0, num_frames)  # the camera trucks right, looking along +z
    character = np.stack([np.linspace(0, 2, num_frames), np.zeros(num_frames), np.full(num_frames, 3.0)], axis=1)
    return poses, character


def legend_entries(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_the_plot_names_its_axes_and_every_marker_in_the_legend():
    poses, character = walking_scene()
    ax = plot_trajectory(poses, character=character)
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == AXIS_NAMES
    assert legend_entries(ax) == [
        "camera path",
        "camera start",
        "camera end",
        "character path",
        "character start",
        "view direction",
    ]


def test_the_plot_can_leave_the_legend_to_the_figure():
    poses, character = walking_scene()
    ax = plot_trajectory(poses, character=character, legend=False)
    assert ax.get_legend() is None
    assert "view direction" in ax.get_legend_handles_labels()[1]


def test_every_gif_frame_has_axis_names_and_a_legend(tmp_path, monkeypatch):
    frames_seen = []
    real_save = matplotlib.animation.Animation.save

    def save_and_inspect(animation, path, writer=None, **kwargs):
        def grab_frame(**grab_kwargs):
            (ax,) = animation._fig.get_axes()
            frames_seen.append(((ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()), legend_entries(ax)))
            return original_grab(**grab_kwargs)

        original_grab = writer.grab_frame
        writer.grab_frame = grab_frame
        return real_save(animation, path, writer=writer, **kwargs)

    monkeypatch.setattr(matplotlib.animation.Animation, "save", save_and_inspect)
    poses, character = walking_scene()
    animate_trajectory(poses, tmp_path / "walk.gif", character=character, max_frames=4)
    assert len(frames_seen) == 4
    for axis_names, entries in frames_seen:
        assert axis_names == AXIS_NAMES
        assert entries == ["camera path", "camera so far", "view direction", "character path", "character"]
