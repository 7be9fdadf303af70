"""Small checkpoints shipped with storydiff, trained by the project's own scripts (commands in their model cards).

>>> from storydiff import ClassConditionalPipeline
>>> from storydiff.checkpoints import digits_pipeline_path
>>> pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
>>> from diffusers import StableDiffusionPipeline
>>> from storydiff.checkpoints import text_to_image_pipeline_path
>>> pipe = StableDiffusionPipeline.from_pretrained(text_to_image_pipeline_path())
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent
DIGITS_CLASS_CONDITIONAL = "digits-class-conditional"
DIGITS_TEXT_TO_IMAGE = "digits-text-to-image"


def _is_checkpoint(path: Path) -> bool:
    # a saved pipeline (model_index.json) or a single saved model (config.json)
    return (path / "model_index.json").is_file() or (path / "config.json").is_file()


def checkpoint_path(name: str) -> str:
    """Folder of a shipped checkpoint (a saved pipeline or model), for `from_pretrained`."""
    path = _FOLDER / name
    if not _is_checkpoint(path):
        available = sorted(p.name for p in _FOLDER.iterdir() if p.is_dir() and _is_checkpoint(p))
        raise ValueError(f"No shipped checkpoint named {name!r}. Available: {', '.join(available) or '(none)'}.")
    return str(path)


def digits_pipeline_path() -> str:
    """The class-conditional digits `ClassConditionalPipeline` (16x16, 10 classes, null class 10), trained by
    training/train_class_conditional.py; see its README.md for the command and metrics."""
    return checkpoint_path(DIGITS_CLASS_CONDITIONAL)


def text_to_image_pipeline_path() -> str:
    """The miniature Stable Diffusion of the captioned digits world (32x32 images; VAE, CLIP text encoder and UNet
    trained by training/train_vae.py and training/train_text_to_image.py), a stock `StableDiffusionPipeline` folder;
    see its README.md for the commands and the measured caption adherence."""
    return checkpoint_path(DIGITS_TEXT_TO_IMAGE)
