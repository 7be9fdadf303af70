"""The shipped digits ControlNets: they load offline onto the shipped text-to-image model, follow their condition
(edge IoU far above the base model's when the prompt is empty), and their cards give the training command; the
README's ControlNet quick start runs as written."""

import json
import re
from pathlib import Path

import pytest
import torch

from storydiff import ControlNetFullModel, ControlNetLiteModel
from storydiff.checkpoints import (
    DIGITS_CONTROLNET_EDGES,
    DIGITS_CONTROLNET_EDGES_POSITION,
    DIGITS_CONTROLNET_LITE_EDGES,
    checkpoint_path,
    controlnet_pipeline,
)
from storydiff.evaluation.conditions import edge_iou
from storydiff.training.controlnet_data import digits_world_control_arrays

REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED = {
    DIGITS_CONTROLNET_EDGES: (ControlNetFullModel, 1),
    DIGITS_CONTROLNET_LITE_EDGES: (ControlNetLiteModel, 1),
    DIGITS_CONTROLNET_EDGES_POSITION: (ControlNetFullModel, 4),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_the_card_gives_the_command_and_the_measured_fidelity(name):
    folder = Path(checkpoint_path(name))
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 4_000_000
    card = (folder / "README.md").read_text()
    assert "training/train_controlnet.py" in card and "--dataset digits_world" in card
    metrics = json.loads((folder / "train_metrics.json").read_text())
    assert metrics["train_steps"] >= 1000
    if "edge_iou_no_prompt" in metrics:
        assert f"{metrics['edge_iou_no_prompt']}" in card


@pytest.mark.parametrize("name", [DIGITS_CONTROLNET_EDGES, DIGITS_CONTROLNET_LITE_EDGES])
def test_a_shipped_controlnet_follows_held_out_edges(name):
    pipe = controlnet_pipeline(name)
    cls, channels = SHIPPED[name]
    assert type(pipe.controlnet) is cls and pipe.controlnet.config.conditioning_channels == channels
    pipe.set_progress_bar_config(disable=True)
    _, _, _, conditions = digits_world_control_arrays("test", 8, 3, 32, ["edges"])
    edges = torch.from_numpy(conditions)
    settings = {"num_inference_steps": 8, "guidance_scale": 4.0, "output_type": "np"}
    controlled = pipe([""] * 8, image=edges, generator=torch.manual_seed(0), **settings).images
    base = pipe(
        [""] * 8, image=edges, generator=torch.manual_seed(0), controlnet_conditioning_scale=0.0, **settings
    ).images
    assert edge_iou(controlled, edges[:, 0].numpy()) > 0.4 > 0.2 > edge_iou(base, edges[:, 0].numpy())


def test_the_readme_quick_start_runs():
    readme = (REPOSITORY / "README.md").read_text()
    section = readme[readme.index("## Quick start: ControlNet variants") :]
    code = re.search(r"```py\n(.*?)```", section, re.DOTALL).group(1)
    namespace = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    assert namespace["image"].size == (32, 32)
