"""Matplotlib views of a camera trajectory (and the character): a 3D plot and an animated GIF.

World axes are E.T.'s (y points down), so the plots show x to the right, z (depth) into the scene and -y up.
"""

import os
from typing import Optional, Union

import numpy as np

from .validation import check_poses, check_positions

CAMERA_COLOR, CHARACTER_COLOR, VIEW_COLOR = "tab:blue", "tab:orange", "tab:purple"
# The vertical axis's label sits outside the 3D box, where the figure edge or a neighbouring plot cuts it: the box is
# drawn a little smaller so that the label fits in the axes' own area.
BOX_ZOOM = 0.85


def _prepare(poses, character):
    poses = check_poses(poses)
    if poses.ndim != 3:
        raise ValueError(f"expected one trajectory of shape (N, 4, 4), got a batch of shape {tuple(poses.shape)}.")
    poses = poses.detach().cpu().double().numpy()
    if character is not None:
        character = check_positions(character)
        if character.ndim != 2:
            raise ValueError(f"expected one character trajectory of shape (N, 3), got {tuple(character.shape)}.")
        character = character.detach().cpu().double().numpy()
    return poses, character


def _to_plot_axes(points: np.ndarray) -> np.ndarray:
    """(x, y-down, z-forward) -> plot (x, z, -y) so that up is up."""
    return np.stack([points[..., 0], points[..., 2], -points[..., 1]], axis=-1)


def _set_equal_limits(ax, points: np.ndarray) -> None:
    low, high = points.min(axis=0), points.max(axis=0)
    centre, radius = (low + high) / 2, max(float((high - low).max()) / 2, 0.5)
    ax.set_xlim(centre[0] - radius, centre[0] + radius)
    ax.set_ylim(centre[1] - radius, centre[1] + radius)
    ax.set_zlim(centre[2] - radius, centre[2] + radius)


def _new_axes(ax):
    import matplotlib.pyplot as plt

    if ax is not None:
        if getattr(ax, "name", None) != "3d":
            raise ValueError("ax must be a 3D axes (created with projection='3d').")
        return ax
    figure = plt.figure(figsize=(6, 6))
    return figure.add_subplot(projection="3d")


def _label_axes(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(nbins=5))  # matplotlib's default crowds the short 3D axes
    ax.set_xlabel("x (right)")
    ax.set_ylabel("z (forward)")
    ax.set_zlabel("-y (up)")
    ax.set_box_aspect(None, zoom=BOX_ZOOM)


def plot_trajectory(
    poses,
    character=None,
    ax=None,
    title: Optional[str] = None,
    num_arrows: int = 10,
    legend: bool = True,
):
    """Plots the camera path with its start and end, its viewing direction (arrows along camera +z) at
    `num_arrows` frames, and the character path with its start. Returns the matplotlib 3D axes.

    `legend=False` leaves the legend out (every artist is labelled, so `ax.get_legend_handles_labels()` gives the
    entries for one shared figure legend)."""
    poses, character = _prepare(poses, character)
    ax = _new_axes(ax)
    positions = _to_plot_axes(poses[:, :3, 3])
    forward = _to_plot_axes(poses[:, :3, 2])
    ax.plot(*positions.T, color=CAMERA_COLOR, label="camera path")
    ax.scatter(*positions[0], color="tab:green", s=30, label="camera start")
    ax.scatter(*positions[-1], color="tab:red", s=30, label="camera end")
    everything = [positions]
    if character is not None:
        character_points = _to_plot_axes(character)
        ax.plot(*character_points.T, color=CHARACTER_COLOR, label="character path")
        ax.scatter(*character_points[0], color=CHARACTER_COLOR, s=30, marker="s", label="character start")
        everything.append(character_points)
    everything = np.concatenate(everything)
    arrow_length = 0.15 * max(float(np.ptp(everything, axis=0).max()), 1.0)
    frames = np.unique(np.linspace(0, len(poses) - 1, max(num_arrows, 1)).round().astype(int))
    ax.quiver(
        *positions[frames].T,
        *forward[frames].T,
        length=arrow_length,
        color=VIEW_COLOR,
        normalize=True,
        label="view direction",
    )
    _set_equal_limits(ax, everything)
    _label_axes(ax)
    if title:
        ax.set_title(title)
    if legend:
        ax.legend(loc="upper left", fontsize="small")
    return ax


def animate_trajectory(
    poses,
    path: Union[str, os.PathLike],
    character=None,
    fps: int = 25,
    max_frames: int = 75,
    title: Optional[str] = None,
) -> str:
    """Writes an animated GIF (matplotlib `PillowWriter`) of the camera moving along its path, with the
    character; long trajectories are subsampled to at most `max_frames` GIF frames. Returns the path."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    poses, character = _prepare(poses, character)
    positions = _to_plot_axes(poses[:, :3, 3])
    forward = _to_plot_axes(poses[:, :3, 2])
    character_points = _to_plot_axes(character) if character is not None else None
    everything = positions if character_points is None else np.concatenate([positions, character_points])
    arrow_length = 0.2 * max(float(np.ptp(everything, axis=0).max()), 1.0)
    frames = np.unique(np.linspace(0, len(poses) - 1, min(max_frames, len(poses))).round().astype(int))

    # a bare Agg figure: works headless and leaves the user's pyplot backend alone
    figure = Figure(figsize=(5, 5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(projection="3d")

    def draw(frame):
        ax.cla()  # also clears the labels: every frame draws the whole picture
        ax.plot(*positions.T, color=CAMERA_COLOR, alpha=0.3, label="camera path")
        ax.plot(*positions[: frame + 1].T, color=CAMERA_COLOR, label="camera so far")
        ax.quiver(
            *positions[frame],
            *forward[frame],
            length=arrow_length,
            color=VIEW_COLOR,
            normalize=True,
            label="view direction",
        )
        if character_points is not None:
            ax.plot(*character_points.T, color=CHARACTER_COLOR, alpha=0.3, label="character path")
            ax.scatter(*character_points[frame], color=CHARACTER_COLOR, s=40, label="character")
        _set_equal_limits(ax, everything)
        _label_axes(ax)
        ax.legend(loc="upper left", fontsize="x-small")
        ax.set_title(f"{title + ' - ' if title else ''}frame {frame + 1}/{len(poses)}", fontsize="small")
        return []

    animation = FuncAnimation(figure, draw, frames=frames, blit=False)
    subsampled_fps = max(1, round(fps * len(frames) / len(poses)))
    animation.save(os.fspath(path), writer=PillowWriter(fps=subsampled_fps))
    return os.fspath(path)
