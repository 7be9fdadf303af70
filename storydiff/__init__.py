"""storydiff: diffusers components for story-level generation.

Every component class (pipeline, model, scheduler) is importable from here. A saved pipeline's `model_index.json`
records a storydiff component by its defining module (`["storydiff.models.director", "DirectorModel"]`) and a
storydiff pipeline class as `["storydiff_pipeline", "ClassName"]`, a one-line module saved beside it that imports the
class from here (storydiff.pipeline_mixins). Imports are lazy so that `import storydiff` stays cheap and a command
line tool does not pay for torch modules it never uses.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # dynamic classifier-free guidance
    "GuidanceSchedule": "storydiff.schedulers.guidance_schedule",
    "GUIDANCE_SCHEDULE_KINDS": "storydiff.schedulers.guidance_schedule",
    "guidance_scales": "storydiff.schedulers.guidance_schedule",
    "GuidanceScheduleCallback": "storydiff.schedulers.guidance_schedule_callback",
    "DynamicClassifierFreeGuidance": "storydiff.schedulers.dynamic_guider",
    "DynamicCFGStableDiffusionPipeline": "storydiff.custom_pipelines.dynamic_cfg_stable_diffusion",
    "DynamicCFGStableDiffusionXLPipeline": "storydiff.custom_pipelines.dynamic_cfg_stable_diffusion_xl",
    "DynamicCFGStableDiffusionControlNetPipeline": "storydiff.custom_pipelines.dynamic_cfg_stable_diffusion_controlnet",
    "ClassConditionalPipeline": "storydiff.custom_pipelines.class_conditional",
    "ClassConditionalPipelineOutput": "storydiff.custom_pipelines.class_conditional",
    "custom_pipeline_path": "storydiff.custom_pipelines",
    "DigitClassifier": "storydiff.evaluation.digits",
    # DIRECTOR
    "DirectorModel": "storydiff.models.director",
    "CLaTrModel": "storydiff.models.clatr",
    "EDMHeunScheduler": "storydiff.schedulers.scheduling_edm_heun",
    "DirectorPipeline": "storydiff.custom_pipelines.director",
    "DirectorPipelineOutput": "storydiff.custom_pipelines.director",
    # Video LDM
    "VideoLDMUNet": "storydiff.models.video_ldm_unet",
    "VideoLDMPipeline": "storydiff.custom_pipelines.video_ldm",
    "VideoLDMPipelineOutput": "storydiff.custom_pipelines.video_ldm",
    # ControlNet variants
    "ControlNetFullModel": "storydiff.models.controlnet_variants",
    "ControlNetLiteModel": "storydiff.models.controlnet_variants",
    "unet2d_forward_with_residuals": "storydiff.models.controlnet_variants",
    # coherence-aware diffusion (in progress)
    "CoherenceEmbedding": "storydiff.models.coherence",
    "CoherenceConditioner": "storydiff.models.coherence",
    "CoherenceAwareUNet2DModel": "storydiff.models.coherence_unet_2d",
    "TextRINModel": "storydiff.models.text_rin",
    "CoherenceAwarePipeline": "storydiff.custom_pipelines.coherence_aware",
    "CoherenceAwarePipelineOutput": "storydiff.custom_pipelines.coherence_aware",
    "CoherenceAwareGuidance": "storydiff.schedulers.coherence_guider",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # import once
        return value
    raise AttributeError(f"module 'storydiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .schedulers.guidance_schedule import GUIDANCE_SCHEDULE_KINDS, GuidanceSchedule, guidance_scales  # noqa: F401
