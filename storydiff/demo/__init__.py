"""`storydiff demo`: the main job. Offline, on CPU, from the checkpoints shipped in `storydiff/checkpoints/`.

The demo is a list of sections, `DEMO_SECTIONS`, one module of this package per capability. Each section is a
function `section(output_dir: Path, device: str) -> list[Path]` that writes its figures and tables into `output_dir`
(file names prefixed with the section's slug) and returns the paths it wrote. A capability adds its demo with a new
module here and one line in `DEMO_SECTIONS`; the module is imported only when its section runs, so a section's heavy
imports cost nothing elsewhere (`storydiff demo --list` does not even import torch).

Every file goes through `write_text` / `save_figure` / `storydiff.atomic_files`, so an interrupted or failed demo
leaves each output either as the previous run wrote it or complete, never truncated.
"""

import csv
import importlib
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from storydiff.atomic_files import atomic_save

DemoSectionFunction = Callable[[Path, str], list]


@dataclass(frozen=True)
class DemoSection:
    """One part of `storydiff demo`: a title, a file-name slug and `"module:function"` of the function to run."""

    title: str
    slug: str
    function: str

    def load(self) -> DemoSectionFunction:
        module_name, _, function_name = self.function.partition(":")
        return getattr(importlib.import_module(module_name), function_name)


DEMO_SECTIONS: list[DemoSection] = [
    DemoSection(
        "Dynamic classifier-free guidance on digits", "dynamic_cfg", "storydiff.demo.dynamic_cfg:dynamic_cfg_demo"
    ),
    DemoSection("DIRECTOR camera trajectories", "director", "storydiff.demo.director:director_demo"),
    DemoSection(
        "Text-to-image on the digits world", "text_to_image", "storydiff.demo.text_to_image:text_to_image_demo"
    ),
    DemoSection("Video LDM on moving digits", "video_ldm", "storydiff.demo.video_ldm:video_ldm_demo"),
    DemoSection("ControlNet variants on the digits world", "controlnet", "storydiff.demo.controlnet:controlnet_demo"),
    DemoSection(
        "Coherence-aware diffusion on noisy captions",
        "coherence_aware",
        "storydiff.demo.coherence_aware:coherence_aware_demo",
    ),
]

DEMO_CPU_THREADS = 1


class DemoInterrupted(KeyboardInterrupt):
    """Ctrl-C during `run_demo`; `remaining` holds the slugs of the sections that did not finish."""

    def __init__(self, remaining: Sequence[str]):
        super().__init__(f"demo interrupted; sections not finished: {', '.join(remaining)}")
        self.remaining = list(remaining)


# ----------------------------------------------------------------------------------------------- shared helpers


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: Union[str, Path], text: str) -> Path:
    """Write `text` (UTF-8, newlines as given) to `path` atomically: the old file survives any failure."""
    data = text.encode("utf-8")
    # atomic_save writes through an ordinary open(), so the file gets the usual permissions (mkstemp's are 0600)
    return atomic_save(path, lambda temporary: Path(temporary).write_bytes(data))


def write_csv(path: Union[str, Path], header: Sequence[str], rows: Sequence[Sequence]) -> Path:
    """Write a CSV table (the `csv` module's default dialect) atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def save_figure(figure, path: Union[str, Path], **savefig_kwargs) -> Path:
    """`figure.savefig(path)` atomically (the format follows `path`'s suffix)."""
    return atomic_save(path, lambda temporary: figure.savefig(temporary, **savefig_kwargs))


def save_comparison_grid(
    path: Union[str, Path],
    rows: dict,
    column_titles: Sequence[str],
    title: str,
    cell_inches: float = 0.9,
    title_wrap: int = 16,
) -> Path:
    """A labelled image grid: `rows` maps a row label (e.g. a schedule and its scores) to images (N, H, W, C) in
    [0, 1], one column per `column_titles` entry (wrapped to `title_wrap` characters); greyscale images are drawn in
    grey. Written atomically."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_rows, num_columns = len(rows), len(column_titles)
    title_lines = max(len(textwrap.wrap(str(text), title_wrap)) for text in column_titles)
    figure, axes = plt.subplots(num_rows, num_columns, squeeze=False, figsize=(
        cell_inches * num_columns + 1.6, 0.95 * num_rows + 0.45 + 0.15 * title_lines))  # fmt: skip
    for row, (label, images) in enumerate(rows.items()):
        for column in range(num_columns):
            axis = axes[row, column]
            image = images[column]
            if image.shape[-1] == 1:
                axis.imshow(image.squeeze(-1), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                axis.imshow(image.clip(0.0, 1.0), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title("\n".join(textwrap.wrap(str(column_titles[column]), title_wrap)), fontsize=8)
            if column == 0:
                axis.set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=120)
    plt.close(figure)
    return Path(path)


def section_slugs() -> list:
    return [section.slug for section in DEMO_SECTIONS]


def select_sections(sections: Optional[Sequence[str]] = None) -> list:
    """The registered sections named in `sections` (all of them for None), in registry order."""
    available = {section.slug: section for section in DEMO_SECTIONS}
    if sections is None:
        return list(DEMO_SECTIONS)
    unknown = [slug for slug in sections if slug not in available]
    if unknown:
        raise ValueError(f"Unknown demo sections {unknown}; available: {', '.join(available)}.")
    if not sections:
        raise ValueError(f"No demo section chosen; available: {', '.join(available)}.")
    return [section for section in DEMO_SECTIONS if section.slug in sections]


def check_device(device: str) -> str:
    """Return `device` if this torch build can run on it; a ValueError that says what is available otherwise."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps.") from None
    if parsed.type == "cpu":
        return str(device)
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(
                f"device {device!r} asked, but this PyTorch build ({torch.__version__}) has no CUDA support; "
                "use --device cpu or install a CUDA build of torch."
            )
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked, but no CUDA GPU is visible; use --device cpu.")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked, but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
            )
        return str(device)
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} asked, but Apple's MPS backend is not available; use --device cpu.")
        return str(device)
    raise ValueError(f"the demo runs on cpu, cuda or mps, not on {parsed.type!r} (device {device!r}).")


def prepare_output_dir(output_dir: Union[str, Path]) -> Path:
    """Create `output_dir` if needed and prove it is a writable folder; a one-line ValueError otherwise."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output dir {str(output_dir)!r} is an existing file; pass a folder (created if missing).")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise ValueError(f"cannot write into output dir {str(output_dir)!r}: {error.strerror or error}.") from None
    return output_dir


# ----------------------------------------------------------------------------------------------- entry point


def run_demo(
    output_dir: Union[str, Path] = "outputs", device: str = "cpu", sections: Optional[Sequence[str]] = None
) -> dict:
    """Run every demo section (or only those whose slug is in `sections`) and print where the results are.

    The device, the output folder and the section names are checked before any section starts (ValueError).
    Ctrl-C raises `DemoInterrupted`, which names the sections left to run. Returns `{slug: [paths written]}`.
    """
    chosen = select_sections(sections)
    device = check_device(device)
    output_dir = prepare_output_dir(output_dir)
    import torch

    written = {}
    threads = torch.get_num_threads()
    if str(device) == "cpu":
        # The demo's models are tiny: one thread per process runs their small convolutions fastest, and several
        # threads slow down sharply when the CPU is shared with other work.
        torch.set_num_threads(DEMO_CPU_THREADS)
    try:
        for number, section in enumerate(chosen, start=1):
            print(f"[{number}/{len(chosen)}] {section.title}")
            start = time.perf_counter()
            written[section.slug] = [Path(path) for path in section.load()(output_dir, device)]
            print(f"[{number}/{len(chosen)}] done in {time.perf_counter() - start:.1f} s")
    except KeyboardInterrupt:
        raise DemoInterrupted([section.slug for section in chosen if section.slug not in written]) from None
    finally:
        torch.set_num_threads(threads)

    print(f"\nstorydiff demo wrote {sum(len(paths) for paths in written.values())} files to {output_dir.resolve()}:")
    for paths in written.values():
        for path in paths:
            print(f"  {path.resolve()}")
    return written
