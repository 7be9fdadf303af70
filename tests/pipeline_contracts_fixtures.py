"""Tiny instances of every storydiff pipeline and one way to call them, for the tests/test_pipeline_contracts_*.py
files: each contract (callbacks, loading, threads, input checks) is tested on all the pipelines with the same code.

    case = PIPELINE_CASES["director"]
    pipe = case.build(tmp_path)
    samples = case.call(pipe, batch=2, guidance_scale=3.0, seed=0)   # a float tensor, comparable bit for bit
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from test_class_conditional_pipeline import unet_pipeline
from test_coherence_aware_pipeline import tiny_cad_pipeline
from test_director_pipeline import tiny_pipeline as tiny_director_pipeline
from test_dynamic_cfg_controlnet_pipeline import condition as control_condition
from test_dynamic_cfg_controlnet_pipeline import tiny_controlnet
from tiny_stable_diffusion import tiny_sd_components, tiny_sdxl_components

from storydiff import (
    ClassConditionalPipeline,
    CoherenceAwarePipeline,
    DirectorPipeline,
    DynamicCFGStableDiffusionControlNetPipeline,
    DynamicCFGStableDiffusionPipeline,
    DynamicCFGStableDiffusionXLPipeline,
)

STEPS = 3


def _tensor(samples) -> torch.Tensor:
    return torch.as_tensor(np.asarray(samples)) if not isinstance(samples, torch.Tensor) else samples


@dataclass
class PipelineCase:
    name: str
    pipeline_class: type
    file_name: str  # for storydiff.custom_pipeline_path
    make: Callable  # tmp_path -> pipeline
    arguments: Callable  # batch -> the call's conditioning arguments
    samples_of: Callable  # output -> samples
    latent_shape: Callable  # batch -> shape of `latents`

    def build(self, tmp_path):
        pipe = self.make(tmp_path)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, pipe, batch: int = 1, seed: int = 0, **kwargs) -> torch.Tensor:
        arguments = {"num_inference_steps": STEPS, **self.arguments(batch)}
        arguments.update(kwargs)
        if "generator" not in arguments:
            arguments["generator"] = torch.Generator().manual_seed(seed)
        return _tensor(self.samples_of(pipe(**arguments)))


def _sd(tmp_path):
    return DynamicCFGStableDiffusionPipeline(**tiny_sd_components(tmp_path / "sd"))


def _sdxl(tmp_path):
    return DynamicCFGStableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path / "sdxl"))


def _sd_controlnet(tmp_path):
    components = tiny_sd_components(tmp_path / "sd_controlnet")
    return DynamicCFGStableDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet(components["unet"]))


PROMPTS = ["the cat", "a dog"]
CAPTIONS = ["trucks left", "pushes in"]

PIPELINE_CASES = {
    "class_conditional": PipelineCase(
        "class_conditional",
        ClassConditionalPipeline,
        "class_conditional",
        lambda tmp_path: unet_pipeline(),
        lambda batch: {"class_labels": [0, 1, 2][:batch], "output_type": "pt"},
        lambda out: out.images,
        lambda batch: (batch, 1, 8, 8),
    ),
    "director": PipelineCase(
        "director",
        DirectorPipeline,
        "director",
        lambda tmp_path: tiny_director_pipeline(tmp_path / "director"),
        lambda batch: {"prompt": CAPTIONS[:batch] if batch > 1 else CAPTIONS[0], "output_type": "pt"},
        lambda out: out.trajectories,
        lambda batch: (batch, 16, 9),
    ),
    "sd": PipelineCase(
        "sd",
        DynamicCFGStableDiffusionPipeline,
        "dynamic_cfg_stable_diffusion",
        _sd,
        lambda batch: {"prompt": PROMPTS[:batch], "output_type": "latent"},
        lambda out: out.images,
        lambda batch: (batch, 4, 16, 16),
    ),
    "sdxl": PipelineCase(
        "sdxl",
        DynamicCFGStableDiffusionXLPipeline,
        "dynamic_cfg_stable_diffusion_xl",
        _sdxl,
        lambda batch: {"prompt": PROMPTS[:batch], "output_type": "latent"},
        lambda out: out.images,
        lambda batch: (batch, 4, 16, 16),
    ),
    "sd_controlnet": PipelineCase(
        "sd_controlnet",
        DynamicCFGStableDiffusionControlNetPipeline,
        "dynamic_cfg_stable_diffusion_controlnet",
        _sd_controlnet,
        lambda batch: {"prompt": PROMPTS[:batch], "image": control_condition(), "output_type": "latent"},
        lambda out: out.images,
        lambda batch: (batch, 4, 16, 16),
    ),
    "coherence_aware": PipelineCase(
        "coherence_aware",
        CoherenceAwarePipeline,
        "coherence_aware",
        lambda tmp_path: tiny_cad_pipeline(tmp_path),
        lambda batch: {"prompt": PROMPTS[:batch], "coherence": [1.0, 0.5][:batch], "output_type": "latent"},
        lambda out: out.images,
        lambda batch: (batch, 4, 16, 16),
    ),
}
