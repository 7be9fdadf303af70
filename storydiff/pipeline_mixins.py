"""Mixins every storydiff pipeline inherits: saved folders that plain `DiffusionPipeline.from_pretrained` can load,
and the attributes diffusers' step callbacks read.

Neither mixin is a `DiffusionPipeline` subclass, so a pipeline file that uses them still defines exactly one pipeline
class, as `custom_pipeline=` loading requires:

    class MyPipeline(SavedPipelineClassMixin, StepCallbackStateMixin, DiffusionPipeline):
        ...

Saved folders. diffusers resolves a string `_class_name` in `model_index.json` inside the `diffusers` package only,
so a folder saved by a storydiff pipeline used to fail with "module diffusers has no attribute ...". diffusers'
own format for pipelines defined outside it is `"_class_name": [module_file, class_name]` with `module_file.py` in the
folder. `SavedPipelineClassMixin.save_pretrained` writes that: a one-line module, `storydiff_pipeline.py`, that
imports the class from the installed storydiff package (no copy of its code). Then

* `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it (without the flag, diffusers refuses
  with an error that asks for `trust_remote_code=True`, as for any folder that names its own module);
* `StorydiffClass.from_pretrained(folder)` needs no flag: the class is known, so the module is not read;
* `custom_pipeline=storydiff.custom_pipeline_path(...)` keeps working.
"""

import importlib
import json
import os
from typing import Optional

from storydiff.atomic_files import atomic_write

CLASS_MODULE_NAME = "storydiff_pipeline"  # the module file written beside model_index.json
CLASS_MODULE_TEMPLATE = '''"""Written by storydiff's save_pretrained so that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`
finds the pipeline class. It holds no code of its own: it imports the class from the installed storydiff package
(pip install storydiff). `{class_name}.from_pretrained(folder)` does not read this file."""

from storydiff import {class_name}  # noqa: F401
'''


def storydiff_class_name(pipeline_class: type) -> Optional[str]:
    """The name under which storydiff exports `pipeline_class` (or the storydiff pipeline it is a copy of, when it was
    loaded through `custom_pipeline=`), or None for classes storydiff does not export (a user's subclass)."""
    storydiff = importlib.import_module("storydiff")
    name = pipeline_class.__name__
    exported = getattr(storydiff, name, None) if name in getattr(storydiff, "__all__", ()) else None
    return name if isinstance(exported, type) else None


class SavedPipelineClassMixin:
    """Saves `model_index.json` with `"_class_name": ["storydiff_pipeline", "<ClassName>"]` and the one-line
    `storydiff_pipeline.py` beside it, so that plain `DiffusionPipeline.from_pretrained(folder,
    trust_remote_code=True)` resolves the class from storydiff; loading through the class itself reads the folder
    as an ordinary one."""

    def to_json_string(self) -> str:
        text = super().to_json_string()
        class_name = storydiff_class_name(type(self))
        if class_name is None:
            return text
        config = json.loads(text)
        config["_class_name"] = [CLASS_MODULE_NAME, class_name]
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        class_name = storydiff_class_name(type(self))
        if class_name is not None:
            # written before model_index.json, so a folder that names the module always has it
            path = os.path.join(save_directory, f"{CLASS_MODULE_NAME}.py")
            with atomic_write(path) as file:
                file.write(CLASS_MODULE_TEMPLATE.format(class_name=class_name))
        return super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        # diffusers reads `model_index.json` through this hook, both for local folders and for Hub downloads. Loaded
        # through a concrete class (`ClassConditionalPipeline.from_pretrained`), the class is already known: give
        # diffusers the plain class name, so that it does not import the folder's module (which would need
        # `trust_remote_code=True`) and uses `cls` as it does for any folder.
        config = super()._dict_from_json_file(json_file)
        class_name = config.get("_class_name")
        if isinstance(class_name, list) and len(class_name) == 2 and class_name[0] == CLASS_MODULE_NAME:
            config["_class_name"] = class_name[1]
        return config


class SavedAsStockPipelineMixin(SavedPipelineClassMixin):
    """For storydiff pipelines that extend a stock one and keep its components (the dynamic-CFG SD, SDXL and ControlNet
    pipelines): `model_index.json` names the stock class (`StableDiffusionPipeline`), so a saved folder is an ordinary
    diffusers folder that the stock class, plain `DiffusionPipeline.from_pretrained`, other tools and the storydiff
    class itself (`DynamicCFGStableDiffusionPipeline.from_pretrained(folder)`) all load without `trust_remote_code`.

    Unless a component is storydiff's own (a `ControlNetLiteModel`, say): diffusers then has to import storydiff to
    load the folder, which the stock class name would never do, so the folder is saved as `SavedPipelineClassMixin`
    saves it (`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` imports the storydiff class, and with
    it the component's module)."""

    def _has_storydiff_components(self) -> bool:
        for component in self.components.values():
            parts = getattr(component, "nets", [component])  # a MultiControlNetModel holds its ControlNets in `nets`
            if any(type(part).__module__.startswith("storydiff.") for part in parts):
                return True
        return False

    def to_json_string(self) -> str:
        if self._has_storydiff_components():
            return super().to_json_string()
        config = json.loads(super(SavedPipelineClassMixin, self).to_json_string())
        config["_class_name"] = stock_pipeline_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        if self._has_storydiff_components():
            return super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        return super(SavedPipelineClassMixin, self).save_config(save_directory, push_to_hub=push_to_hub, **kwargs)


def stock_pipeline_class(pipeline_class: type) -> type:
    """The nearest base class of `pipeline_class` that diffusers itself defines (other than `DiffusionPipeline`)."""
    for base in pipeline_class.__mro__:
        if (
            base.__module__.startswith("diffusers.")
            and base.__name__ != "DiffusionPipeline"
            and base.__name__.endswith("Pipeline")
        ):
            return base
    raise TypeError(f"{pipeline_class.__name__} extends no stock diffusers pipeline.")


class StepCallbackStateMixin:
    """The attributes diffusers' step callbacks (`diffusers.callbacks.PipelineCallback` and friends) read and set, with
    the meaning they have in the stock pipelines:

    * `guidance_scale` (`_guidance_scale`): during a call, the guidance scale of the step that just ran; a callback
      may set `_guidance_scale`, and `storydiff.schedulers.guidance_schedule.StepGuidance` applies the one rule all
      storydiff pipelines follow;
    * `do_classifier_free_guidance`: `guidance_scale > 1`;
    * `num_timesteps`: denoiser evaluations of the call (`len(scheduler.timesteps)`);
    * `interrupt` (`_interrupt`): a callback sets `pipe._interrupt = True` to skip the remaining steps;
    * `guidance_scales`: the per-step scales the last call applied.

    The pipeline class declares `_callback_tensor_inputs` and sets these at the start of `__call__`.
    """

    _guidance_scale: Optional[float] = None
    _guidance_scales = None
    _num_timesteps: int = 0
    _interrupt: bool = False

    @property
    def guidance_scale(self) -> Optional[float]:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale is not None and self._guidance_scale > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def guidance_scales(self):
        """The per-step guidance scales `g_i` the last call applied, step 0 (noisiest) first."""
        return self._guidance_scales
