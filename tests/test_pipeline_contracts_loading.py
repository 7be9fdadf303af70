"""Saved storydiff pipelines load through every diffusers entry point: the class itself, plain
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` and `custom_pipeline=`; the shipped checkpoints too.
The dynamic-CFG SD / SDXL / SD-ControlNet pipelines save stock folders, which plain loading reads as the stock class.
"""

import json

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from pipeline_contracts_fixtures import PIPELINE_CASES, STEPS, _tensor

from storydiff import ClassConditionalPipeline, DirectorPipeline, custom_pipeline_path
from storydiff.checkpoints import checkpoint_path
from storydiff.pipeline_mixins import CLASS_MODULE_NAME, SavedAsStockPipelineMixin, stock_pipeline_class


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_saved_folder_loads_through_every_entry_point(name, tmp_path):
    case = PIPELINE_CASES[name]
    pipe = case.build(tmp_path)
    folder = tmp_path / "saved"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    expected = case.call(pipe, batch=1, guidance_scale=3.0)
    extends_stock = issubclass(case.pipeline_class, SavedAsStockPipelineMixin)  # SD, SDXL, SD + ControlNet
    if extends_stock:
        # extends a stock pipeline with the same components: the folder is a stock folder that every loader reads
        # without trust_remote_code, the stock class for plain DiffusionPipeline (static CFG is the same there)
        assert index["_class_name"] == stock_pipeline_class(case.pipeline_class).__name__
        loaded = DiffusionPipeline.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is stock_pipeline_class(case.pipeline_class)
        torch.testing.assert_close(_tensor(case.samples_of(loaded(**{"num_inference_steps": STEPS, **case.arguments(1),
                                   "guidance_scale": 3.0, "generator": torch.Generator().manual_seed(0)}))),
                                   expected)  # fmt: skip
        loaders = {"class": lambda: case.pipeline_class.from_pretrained(folder)}
    else:
        assert index["_class_name"] == [CLASS_MODULE_NAME, case.pipeline_class.__name__]
        module_text = (folder / f"{CLASS_MODULE_NAME}.py").read_text()
        assert f"from storydiff import {case.pipeline_class.__name__}" in module_text
        loaders = {
            "class": lambda: case.pipeline_class.from_pretrained(folder),
            "plain": lambda: DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
        }
        # without diffusers' consent flag, plain loading says which argument to add (not "module diffusers has no
        # attribute ...")
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            DiffusionPipeline.from_pretrained(folder)
    loaders["custom_pipeline"] = lambda: DiffusionPipeline.from_pretrained(
        folder, custom_pipeline=custom_pipeline_path(case.file_name), trust_remote_code=True
    )
    for how, load in loaders.items():
        loaded = load()
        loaded.set_progress_bar_config(disable=True)
        if how == "custom_pipeline" and extends_stock:  # diffusers imports the file itself
            assert type(loaded).__name__ == case.pipeline_class.__name__
        else:  # the storydiff class itself, not a copy of its file
            assert type(loaded) is case.pipeline_class, how
        torch.testing.assert_close(case.call(loaded, batch=1, guidance_scale=3.0), expected, rtol=1e-5, atol=1e-5)


def save_in_the_earlier_format(pipe, folder):
    """A folder as storydiff saved it before its pipelines named their class module: `_class_name` a plain string."""
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = type(pipe).__name__
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / f"{CLASS_MODULE_NAME}.py").unlink()


def test_folders_in_the_earlier_format_still_load_through_the_class_and_custom_pipeline(tmp_path):
    save_in_the_earlier_format(PIPELINE_CASES["class_conditional"].build(tmp_path), tmp_path / "old")
    assert type(ClassConditionalPipeline.from_pretrained(tmp_path / "old")) is ClassConditionalPipeline
    copy = DiffusionPipeline.from_pretrained(
        tmp_path / "old", custom_pipeline=custom_pipeline_path("class_conditional"), trust_remote_code=True
    )
    # diffusers imported a copy of the pipeline file; saving it names storydiff's own class
    assert type(copy).__name__ == "ClassConditionalPipeline" and type(copy) is not ClassConditionalPipeline
    copy.save_pretrained(tmp_path / "new")
    index = json.loads((tmp_path / "new" / "model_index.json").read_text())
    assert index["_class_name"] == [CLASS_MODULE_NAME, "ClassConditionalPipeline"]
    assert (
        type(DiffusionPipeline.from_pretrained(tmp_path / "new", trust_remote_code=True)) is ClassConditionalPipeline
    )


@pytest.mark.parametrize(
    "name", ["digits-class-conditional", "director-a", "director-b", "director-c", "director-c-450"]
)
def test_shipped_checkpoints_load_with_and_without_their_class(name):
    pipeline_class = ClassConditionalPipeline if name.startswith("digits") else DirectorPipeline
    folder = checkpoint_path(name)
    index = json.loads(open(f"{folder}/model_index.json").read())
    assert index["_class_name"] == [CLASS_MODULE_NAME, pipeline_class.__name__]
    assert type(pipeline_class.from_pretrained(folder)) is pipeline_class
    assert type(DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)) is pipeline_class
