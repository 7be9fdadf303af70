"""Small checkpoints shipped with storydiff, trained by the project's own scripts (commands in their model cards).

>>> from storydiff import ClassConditionalPipeline
>>> from storydiff.checkpoints import digits_pipeline_path
>>> pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent
DIGITS_CLASS_CONDITIONAL = "digits-class-conditional"


def checkpoint_path(name: str) -> str:
    """Folder of a shipped checkpoint, for `from_pretrained`."""
    path = _FOLDER / name
    if not (path / "model_index.json").is_file():
        available = sorted(p.name for p in _FOLDER.iterdir() if (p / "model_index.json").is_file())
        raise ValueError(f"No shipped checkpoint named {name!r}. Available: {', '.join(available) or '(none)'}.")
    return str(path)


def digits_pipeline_path() -> str:
    """The class-conditional digits `ClassConditionalPipeline` (16x16, 10 classes, null class 10), trained by
    training/train_class_conditional.py; see its README.md for the command and metrics."""
    return checkpoint_path(DIGITS_CLASS_CONDITIONAL)
