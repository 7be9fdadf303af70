"""Small checkpoints shipped with storydiff, trained by the project's own scripts (commands in their model cards).

>>> from storydiff import ClassConditionalPipeline
>>> from storydiff.checkpoints import digits_pipeline_path
>>> pipe = ClassConditionalPipeline.from_pretrained(digits_pipeline_path())
>>> from diffusers import StableDiffusionPipeline
>>> from storydiff.checkpoints import text_to_image_pipeline_path
>>> pipe = StableDiffusionPipeline.from_pretrained(text_to_image_pipeline_path())
>>> from storydiff.checkpoints import video_ldm_pipeline
>>> video_pipe = video_ldm_pipeline()
>>> from storydiff.checkpoints import controlnet_pipeline
>>> control_pipe = controlnet_pipeline("digits-controlnet-edges")
>>> from storydiff.checkpoints import coherence_aware_pipeline
>>> cad_pipe = coherence_aware_pipeline("digits-coherence-aware-text")
"""

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent
DIGITS_CLASS_CONDITIONAL = "digits-class-conditional"
DIGITS_TEXT_TO_IMAGE = "digits-text-to-image"
DIGITS_VIDEO_LDM = "digits-video-ldm"


def _is_checkpoint(path: Path) -> bool:
    # a saved pipeline (model_index.json), a single saved model (config.json), temporal layers alone, or the
    # conditioner and denoiser of a coherence-aware model
    markers = ("model_index.json", "config.json", "temporal_config.json", "conditioner/config.json")
    return any((path / name).is_file() for name in markers)


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


DIGITS_CLIP = "digits-clip"


def digits_clip_path() -> str:
    """The tiny contrastive image-text model of the captioned digits world (a transformers `CLIPModel` with its
    `CLIPProcessor`, 32x32 canvases), trained by training/train_digits_clip.py: the offline CLIP for
    `storydiff.coherence.clip_coherence` and training/compute_coherence.py. See its README.md for the command and
    the held-out retrieval accuracy and cosines of true, wrong and vague captions."""
    return checkpoint_path(DIGITS_CLIP)


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


DIGITS_CONTROLNET_EDGES = "digits-controlnet-edges"
DIGITS_CONTROLNET_LITE_EDGES = "digits-controlnet-lite-edges"
DIGITS_CONTROLNET_EDGES_POSITION = "digits-controlnet-edges-position"


def controlnet_pipeline(controlnets=DIGITS_CONTROLNET_EDGES, device: str = "cpu"):
    """A `DynamicCFGStableDiffusionControlNetPipeline` of the shipped digits text-to-image model with shipped
    ControlNet(s), trained by training/train_controlnet.py (commands and measured edge IoU in their README.md):

    - `"digits-controlnet-edges"`: the full ControlNet on Canny edges of the canvas (1 channel, 32x32);
    - `"digits-controlnet-lite-edges"`: ControlNet-lite on the same edges;
    - `"digits-controlnet-edges-position"`: one full ControlNet on edges + a position/colour mask (4 channels:
      edges, then the digit's box filled with its RGB colour), trained with per-condition dropout.

    `controlnets` is one name or a list of names (a `MultiControlNetModel`; give one condition per ControlNet). Only
    the ControlNet weights are shipped; the base components come from `text_to_image_pipeline_path()`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from storydiff.custom_pipelines.dynamic_cfg_stable_diffusion_controlnet import (
        DynamicCFGStableDiffusionControlNetPipeline,
    )
    from storydiff.models.controlnet_variants import load_controlnet

    names = [controlnets] if isinstance(controlnets, str) else list(controlnets)
    models = [load_controlnet(checkpoint_path(name)) for name in names]
    base = text_to_image_pipeline_path()
    pipe = DynamicCFGStableDiffusionControlNetPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        controlnet=models[0] if len(models) == 1 else models,
        scheduler=DDIMScheduler.from_pretrained(base, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe.to(device)


DIGITS_COHERENCE_AWARE_TEXT = "digits-coherence-aware-text"
DIGITS_COHERENCE_BASELINE_TEXT = "digits-coherence-baseline-text"
DIGITS_COHERENCE_AWARE_CLASS = "digits-coherence-aware-class"


def coherence_aware_pipeline(name: str = DIGITS_COHERENCE_AWARE_TEXT, device: str = "cpu"):
    """A `CoherenceAwarePipeline` of a shipped coherence-aware model of the captioned digits world, trained by
    training/train_coherence_aware.py on captions of which 40 % were made wrong or vague (commands, data preparation
    and measured figures in its README.md):

    - `"digits-coherence-aware-text"`: the digits text-to-image UNet fine-tuned with a `CoherenceConditioner` in `cad`
      mode; sample it with CA-CFG (the defaults: `negative_prompt=None`, `negative_coherence=0.0`);
    - `"digits-coherence-baseline-text"`: the same, trained in `baseline` mode (condition dropout 0.1, no coherence):
      sample it with `negative_prompt=""`.

    Only the conditioner and the denoiser are shipped; the VAE, text encoder and tokenizer come from
    `text_to_image_pipeline_path()`. The class-conditional model (`"digits-coherence-aware-class"`) is a whole
    `ClassConditionalPipeline` folder: load it with `ClassConditionalPipeline.from_pretrained(checkpoint_path(name))`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from storydiff.custom_pipelines.coherence_aware import CoherenceAwarePipeline
    from storydiff.models.coherence import CoherenceConditioner
    from storydiff.models.text_rin import TextRINModel

    folder = Path(checkpoint_path(name))
    if not (folder / "conditioner").is_dir():
        raise ValueError(f"{name!r} is not a shipped text coherence-aware model (it has no conditioner).")
    denoiser_class = UNet2DConditionModel
    if TextRINModel.load_config(folder / "denoiser")["_class_name"] == TextRINModel.__name__:
        denoiser_class = TextRINModel
    base = text_to_image_pipeline_path()
    pipe = CoherenceAwarePipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        conditioner=CoherenceConditioner.from_pretrained(folder / "conditioner"),
        denoiser=denoiser_class.from_pretrained(folder / "denoiser"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
    )
    return pipe.to(device)
