"""Model cards for pipelines saved by the training scripts (huggingface_hub `ModelCard`).

A new script writes one next to its `save_pretrained` output::

    write_model_card(
        args.output_dir,
        title="DIRECTOR trained on E.T.",
        description="What the model does, what data, how to load it.",
        tags=["director", "camera-trajectory"],
        command=training_command(argv),
        metrics={"final_train_loss": 0.031, "train_steps": 5000, "train_wall_time_s": 812.4},
        datasets=["my/dataset"],
    )

The card records `library_name: diffusers`, the tags, the exact command that produced the weights and the
measured metrics (pass only numbers you measured).
"""

import os
import shlex
import sys
from typing import Dict, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData

BASE_TAGS = ("storydiff", "diffusers")


def training_command(argv: Optional[Sequence[str]] = None, script: Optional[str] = None) -> str:
    """The command line that ran this script: `python <script> <args>`, with the script path relative to the
    working directory when it is inside it (absolute otherwise). `argv` are the arguments (default
    `sys.argv[1:]`)."""
    script = os.path.abspath(script or sys.argv[0])
    try:
        relative = os.path.relpath(script)
        if not relative.startswith(".."):
            script = relative
    except ValueError:  # a different drive on Windows
        pass
    arguments = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", script, *arguments])


def write_model_card(
    output_dir: str,
    *,
    title: str,
    description: str,
    tags: Sequence[str] = (),
    command: str,
    metrics: Optional[Dict[str, object]] = None,
    datasets: Optional[Sequence[str]] = None,
    base_model: Optional[str] = None,
    pipeline_tag: Optional[str] = None,
    license: str = "apache-2.0",
    images: Sequence[str] = (),
    usage: Optional[str] = None,
) -> ModelCard:
    """Write `output_dir/README.md` and return the card. `images` are paths relative to `output_dir`."""
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=list(dict.fromkeys([*BASE_TAGS, *tags])),
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
    )
    sections = [f"# {title}", description.strip()]
    if usage:
        sections += ["## Usage", f"```py\n{usage.strip()}\n```"]
    sections += ["## Training command", "Trained with exactly this command:", f"```bash\n{command}\n```"]
    if metrics:
        rows = "\n".join(f"| {name} | {_format(value)} |" for name, value in metrics.items())
        sections += ["## Metrics", "| metric | value |\n|---|---|\n" + rows]
    if images:
        sections += ["## Samples", "\n\n".join(f"![{os.path.basename(path)}]({path})" for path in images)]
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    card = ModelCard(content)
    card.save(os.path.join(output_dir, "README.md"))
    return card


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
