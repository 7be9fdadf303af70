"""Pipelines, one `DiffusionPipeline` subclass per file.

Each file also works on its own as `DiffusionPipeline.from_pretrained(..., custom_pipeline=<file>,
trust_remote_code=True)`: diffusers needs exactly one pipeline class defined outside diffusers in it, so
a pipeline file never imports another storydiff pipeline class.
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent


def custom_pipeline_path(name: str) -> str:
    """Path of a storydiff pipeline file, to pass as `custom_pipeline=` to `DiffusionPipeline.from_pretrained`.

    `name` is the file's stem (`"dynamic_cfg_stable_diffusion"`), with or without `.py`.
    """
    stem = name[:-3] if name.endswith(".py") else name
    path = _FOLDER / f"{stem}.py"
    if stem.startswith("_") or not path.is_file():
        available = sorted(p.stem for p in _FOLDER.glob("*.py") if not p.stem.startswith("_"))
        raise ValueError(f"No storydiff pipeline file named {name!r}. Available: {', '.join(available)}.")
    return str(path)
