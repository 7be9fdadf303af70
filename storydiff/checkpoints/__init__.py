"""Small checkpoints shipped with storydiff, trained by the project's own scripts (commands in their model cards).

>>> from storydiff import ClassConditionalPipeline
>>> from storydiff.checkpoints import digits_pipeline_path
>>> pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
>>> from diffusers import StableDiffusionPipeline
>>> from storydiff.checkpoints import text_to_image_pipeline_path
>>> pipe = StableDiffusionPipeline.from_pretrained(text_to_image_pipeline_path())
>>> from storydiff.checkpoints import video_ldm_pipeline
>>> video_pipe = video_ldm_pipeline()
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent
DIGITS_CLASS_CONDITIONAL = "digits-class-conditional"
DIGITS_TEXT_TO_IMAGE = "digits-text-to-image"
DIGITS_VIDEO_LDM = "digits-video-ldm"


def _is_checkpoint(path: Path) -> bool:
    # a saved pipeline (model_index.json), a single saved model (config.json) or temporal layers alone
    return any((path / name).is_file() for name in ("model_index.json", "config.json", "temporal_config.json"))


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


def video_ldm_temporal_layers_path() -> str:
    """The Video LDM temporal layers trained by training/train_video_ldm.py on the shipped digits text-to-image model
    (moving digits, 8 frames of 32x32); only the temporal weights are shipped, see its README.md."""
    return checkpoint_path(DIGITS_VIDEO_LDM)


def video_ldm_pipeline(device: str = "cpu"):
    """A `VideoLDMPipeline` of the shipped digits text-to-image model with the shipped temporal layers inserted
    (`VideoLDMUNet.from_unet2d(unet, temporal_layers=...)`) and a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from storydiff.custom_pipelines.video_ldm import VideoLDMPipeline
    from storydiff.models.video_ldm_unet import VideoLDMUNet

    base = text_to_image_pipeline_path()
    unet = VideoLDMUNet.from_unet2d(
        UNet2DConditionModel.from_pretrained(base, subfolder="unet"), temporal_layers=video_ldm_temporal_layers_path()
    )
    pipe = VideoLDMPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=unet,
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
    )
    return pipe.to(device)
