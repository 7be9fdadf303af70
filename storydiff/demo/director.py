"""The DIRECTOR section of `storydiff demo`: text in, camera trajectories out (plots, Blender scripts, KITTI files).

Uses the small DIRECTOR checkpoint shipped in `storydiff/checkpoints/` (variant C when present, else B, else A) with
the offline all-MiniLM-L6-v2 text encoder. One character trajectory (walking to the right) is paired with four camera
prompts; every generated trajectory is plotted with the motion tagger's reading in its title and exported.
"""

from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch

from storydiff.demo import save_figure, write_text

DEMO_PROMPTS = (
    "The camera trucks right while the character moves right.",
    "The camera trucks left while the character moves right.",
    "The camera booms top while the character moves right.",
    "The camera pushes in while the character moves right.",
)
DEMO_FRAMES = 100
DEMO_SEED = 0
SHIPPED_VARIANTS = ("director-c", "director-b", "director-a")


def shipped_director_path() -> str:
    """The best shipped DIRECTOR checkpoint folder (C, else B, else A)."""
    from storydiff.checkpoints import checkpoint_path

    for name in SHIPPED_VARIANTS:
        try:
            return checkpoint_path(name)
        except ValueError:
            continue
    raise ValueError(f"No DIRECTOR checkpoint is shipped in storydiff/checkpoints (looked for {SHIPPED_VARIANTS}).")


def demo_character(num_frames: int = DEMO_FRAMES, speed: float = 1.0) -> np.ndarray:
    """A character walking to the right (+x) at `speed` m/s, 25 fps, starting at the origin."""
    t = np.arange(num_frames, dtype=np.float32) / 25.0
    return np.stack([speed * t, np.zeros_like(t), np.zeros_like(t)], axis=1)


def tagger_reading(poses) -> str:
    """The camera tagger's segments as text, e.g. "trucking_right (0-61), push_in (61-99)"."""
    from storydiff.trajectories import CAMERA_MOTION_NAMES, segments_from_labels, tag_camera_motion

    labels = tag_camera_motion(poses)
    return ", ".join(
        f"{CAMERA_MOTION_NAMES[label]} ({start}-{end})" for start, end, label in segments_from_labels(labels)
    )


def director_demo(
    output_dir: Union[str, Path],
    device: str = "cpu",
    checkpoint: Optional[str] = None,
    prompts: Sequence[str] = DEMO_PROMPTS,
    num_frames: int = DEMO_FRAMES,
) -> List[Path]:
    """Generate one camera trajectory per prompt for the demo character; write `director_*` files into
    `output_dir` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from storydiff.custom_pipelines.director import DirectorPipeline
    from storydiff.text_features import load_text_encoder
    from storydiff.trajectories import plot_trajectory, to_blender_script, to_kitti

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint or shipped_director_path()
    text_encoder, tokenizer = load_text_encoder()
    pipe = DirectorPipeline.from_pretrained(checkpoint, text_encoder=text_encoder, tokenizer=tokenizer).to(device)
    pipe.set_progress_bar_config(disable=True)
    num_frames = min(num_frames, pipe.model.config.num_frames)
    character = demo_character(num_frames)
    out = pipe(
        list(prompts),
        character_trajectory=character,
        generator=torch.Generator().manual_seed(DEMO_SEED),
    )

    written, rows = [], []
    figure = plt.figure(figsize=(4.2 * len(prompts), 4.9))
    for index, (prompt, poses) in enumerate(zip(prompts, out.trajectories)):
        reading = tagger_reading(poses)
        rows.append((prompt, reading))
        ax = figure.add_subplot(1, len(prompts), index + 1, projection="3d")
        plot_trajectory(poses, character=character, ax=ax, title=f"{prompt}\ntagger: {reading}", legend=False)
        ax.title.set_fontsize(7)
        stem = f"director_{index}"
        write_text(output_dir / f"{stem}_camera.txt", to_kitti(poses))
        write_text(output_dir / f"{stem}_blender.py", to_blender_script(poses, character=character))
        written += [output_dir / f"{stem}_camera.txt", output_dir / f"{stem}_blender.py"]
    # one legend for all plots, in a strip along the bottom: inside the 3D plots it would hide the paths
    handles, labels = ax.get_legend_handles_labels()
    legend_rows = 1 if len(prompts) > 1 else 2
    figure.legend(handles, labels, loc="lower center", ncol=-(-len(labels) // legend_rows), fontsize=8, frameon=False)
    prompt_count = "one camera prompt" if len(prompts) == 1 else f"{len(prompts)} camera prompts"
    separator = ": " if len(prompts) > 1 else "\n"  # one plot is too narrow for the title on one line
    figure.suptitle(
        f"DIRECTOR ({Path(checkpoint).name}){separator}one character walking right, {prompt_count}", fontsize=9
    )
    figure.tight_layout(rect=(0, 0.05 * legend_rows, 1, 0.95))  # the bottom strip: legend; the top: title
    figure_path = output_dir / "director_trajectories.png"
    save_figure(figure, figure_path, dpi=110)
    plt.close(figure)

    table_path = output_dir / "director_tagger.md"
    lines = [
        f"Checkpoint: `{Path(checkpoint).name}`, {num_frames} frames, seed {DEMO_SEED}, "
        f"guidance 1.4, 10 Heun steps.\n",
        "| prompt | tagger reading of the generated camera (frames) |",
        "|---|---|",
        *[f"| {prompt} | {reading} |" for prompt, reading in rows],
    ]
    write_text(table_path, "\n".join(lines) + "\n")
    return [figure_path, table_path, *written]
