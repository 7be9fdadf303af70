"""Model cards for pipelines saved by the training scripts (huggingface_hub `ModelCard`).

A new script writes one next to its `save_pretrained` output::

    write_model_card(
        args.output_dir,
        title="DIRECTOR trained on E.T.",
        description="What the model does, what data, how to load it.",
        tags=["director", "camera-trajectory"],
        command=training_command(argv, script=__file__),     # "accelerate launch ..." when launched so
        metrics={**recent_loss_metric(position.recent_losses), "train_steps": 5000,
                 "train_wall_time_s": round(position.total_wall_time_s(), 1)},
        datasets=["my/dataset"],
    )

The card records `library_name: diffusers`, the tags, the exact command that produced the weights and the
measured metrics (pass only numbers you measured, under names that say what was measured: `recent_loss_metric`
names the loss mean by the number of steps it really averages).
"""

import os
import shlex
import sys
from typing import Dict, Optional, Sequence

from huggingface_hub import ModelCard, ModelCardData

from storydiff.atomic_files import atomic_write

BASE_TAGS = ("storydiff", "diffusers")


def training_command(argv: Optional[Sequence[str]] = None, script: Optional[str] = None) -> str:
    """The command line that ran this script: `python <script> <args>`, or `accelerate launch [--num_processes N]
    [--mixed_precision P] <script> <args>` when `accelerate launch` started it (it leaves ACCELERATE_* variables in
    the environment; the launcher's own flags are rebuilt from what they set). The script path is relative to the
    working directory when it is inside it (absolute otherwise). `argv` are the arguments (default
    `sys.argv[1:]`)."""
    script = os.path.abspath(script or sys.argv[0])
    try:
        relative = os.path.relpath(script)
        if not relative.startswith(".."):
            script = relative
    except ValueError:  # a different drive on Windows
        pass
    arguments = [str(argument) for argument in (sys.argv[1:] if argv is None else argv)]
    return shlex.join([*launcher_command(), script, *arguments])


def launcher_command(environ=None) -> list:
    """`["python"]`, or the `accelerate launch` (or `torchrun`) words that reproduce how this process was started."""
    environ = os.environ if environ is None else environ
    if "ACCELERATE_MIXED_PRECISION" not in environ or "ACCELERATE_DYNAMO_BACKEND" not in environ:
        if "TORCHELASTIC_RUN_ID" in environ:  # torchrun, which also starts accelerate scripts
            return ["torchrun", "--nproc_per_node", environ.get("LOCAL_WORLD_SIZE", environ.get("WORLD_SIZE", "1"))]
        return ["python"]
    words = ["accelerate", "launch"]
    if environ.get("ACCELERATE_USE_CPU", "").lower() == "true":
        words.append("--cpu")
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        words += ["--num_processes", environ["WORLD_SIZE"]]
    if environ["ACCELERATE_MIXED_PRECISION"] not in ("no", ""):
        words += ["--mixed_precision", environ["ACCELERATE_MIXED_PRECISION"]]
    return words


def recent_loss_metric(recent_losses: Sequence[float]) -> Dict[str, float]:
    """`{"train_loss_mean_last_<N>_steps": mean}` over the N losses given (empty when there are none)."""
    if not recent_losses:
        return {}
    return {f"train_loss_mean_last_{len(recent_losses)}_steps": sum(recent_losses) / len(recent_losses)}


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
    with atomic_write(os.path.join(output_dir, "README.md")) as file:
        file.write(content)
    return card


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
