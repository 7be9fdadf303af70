"""diffusers' step-callback protocol in every storydiff pipeline (ClassConditional, Director, SD, SDXL).

One rule for callbacks that change `pipe._guidance_scale` (storydiff.schedulers.guidance_schedule.StepGuidance):
under the static schedule the callback's value wins from the next step on; under any other schedule only a value
<= 1 (guidance off) applies. Each case is checked as an equality with a per-step schedule that says the same thing.
"""

import numpy as np
import pytest
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback, SDCFGCutoffCallback, SDXLCFGCutoffCallback
from diffusers.utils import logging as diffusers_logging
from pipeline_contracts_fixtures import PIPELINE_CASES, STEPS

from storydiff import DirectorPipeline
from storydiff.schedulers.guidance_schedule import GuidanceSchedule, StepGuidance


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


class GuidanceCutoffCallback(PipelineCallback):
    """diffusers' `SDCFGCutoffCallback` for pipelines without prompt embeddings among their callback tensors: at the
    cut-off step (from `cutoff_step_ratio * pipeline.num_timesteps` or `cutoff_step_index`) it sets
    `pipeline._guidance_scale = 0.0`."""

    tensor_inputs = []

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        ratio, index = self.config.cutoff_step_ratio, self.config.cutoff_step_index
        if step_index == (index if index is not None else int(pipeline.num_timesteps * ratio)):
            pipeline._guidance_scale = 0.0
        return callback_kwargs


def diffusers_cutoff_callback(case_name, cutoff_step_index):
    """The cut-off callback a user of this pipeline takes from diffusers."""
    if case_name == "sd":
        return SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff_step_index)
    if case_name == "sdxl":
        return SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff_step_index)
    return GuidanceCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=cutoff_step_index)


def set_guidance_scale(value, at_step):
    def callback(pipeline, step_index, timestep, callback_kwargs):
        if step_index == at_step:
            pipeline._guidance_scale = value
        return callback_kwargs

    return callback


def last_evaluation_of_first_step(pipe) -> int:
    # a callback at this index changes the scale from schedule step 1 on (Heun evaluates twice per step)
    return pipe.scheduler.order - 1


@pytest.fixture(params=list(PIPELINE_CASES), scope="module")
def case_and_pipe(request, tmp_path_factory):
    case = PIPELINE_CASES[request.param]
    return case, case.build(tmp_path_factory.mktemp(case.name))


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_static_schedule_takes_the_callbacks_guidance_scale(case_and_pipe):
    case, pipe = case_and_pipe
    at = last_evaluation_of_first_step(pipe)
    changed = case.call(pipe, guidance_scale=4.0, callback_on_step_end=set_guidance_scale(2.0, at))
    assert_same(changed, case.call(pipe, guidance_scale=4.0, guidance_schedule=[4.0, 2.0, 2.0]))
    assert not torch.allclose(changed, case.call(pipe, guidance_scale=4.0))


def test_cutoff_callback_switches_guidance_off_under_any_schedule(case_and_pipe):
    case, pipe = case_and_pipe
    at = last_evaluation_of_first_step(pipe)
    # static: 4 then off
    static = case.call(pipe, guidance_scale=4.0, callback_on_step_end=diffusers_cutoff_callback(case.name, at))
    assert_same(static, case.call(pipe, guidance_scale=4.0, guidance_schedule=[4.0, 1.0, 1.0]))
    # invlinear at g = 3 is [5, 3, 1]; cut off after step 0: [5, 1, 1]
    assert GuidanceSchedule("invlinear").scales(3.0, STEPS).tolist() == [5.0, 3.0, 1.0]
    scheduled = case.call(
        pipe,
        guidance_scale=3.0,
        guidance_schedule="invlinear",
        callback_on_step_end=diffusers_cutoff_callback(case.name, at),
    )
    assert_same(scheduled, case.call(pipe, guidance_scale=3.0, guidance_schedule=[5.0, 1.0, 1.0]))


def test_other_values_do_not_override_a_non_static_schedule(case_and_pipe):
    case, pipe = case_and_pipe
    at = last_evaluation_of_first_step(pipe)
    ignored = case.call(pipe, guidance_scale=3.0, guidance_schedule="invlinear",
                        callback_on_step_end=set_guidance_scale(9.0, at))  # fmt: skip
    assert_same(ignored, case.call(pipe, guidance_scale=3.0, guidance_schedule="invlinear"))


def test_callbacks_read_the_diffusers_protocol_attributes_and_can_interrupt(case_and_pipe):
    case, pipe = case_and_pipe
    seen = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        seen.append((pipeline.num_timesteps, pipeline.guidance_scale, pipeline.do_classifier_free_guidance))
        pipeline._interrupt = pipeline.interrupt or step_index == 0
        return callback_kwargs

    case.call(pipe, guidance_scale=3.0, callback_on_step_end=callback)
    evaluations = 2 * STEPS - 1 if case.name == "director" else STEPS  # Heun evaluates twice per step but the last
    assert seen == [(evaluations, 3.0, True)]  # interrupted after the first step


@pytest.mark.parametrize("name", ["class_conditional", "director"])  # SD/SDXL: SDCFGCutoffCallback above
def test_multiple_diffusers_callbacks_with_a_ratio_cutoff(name, tmp_path):
    case = PIPELINE_CASES[name]
    pipe = case.build(tmp_path)
    # ratio 0.5 of num_timesteps: evaluation 1 of 3 (DDIM) or 2 of 5 (Heun: the first evaluation of step 1)
    cutoff = GuidanceCutoffCallback(cutoff_step_ratio=0.5)
    steps_seen = []

    class CountSteps(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            steps_seen.append(step_index)
            return callback_kwargs

    both = MultiPipelineCallbacks([CountSteps(), cutoff])
    got = case.call(pipe, guidance_scale=4.0, callback_on_step_end=both)
    assert steps_seen == list(range(pipe.num_timesteps))
    if case.name == "class_conditional":
        assert_same(got, case.call(pipe, guidance_scale=4.0, guidance_schedule=[4.0, 4.0, 1.0]))
    else:  # evaluation 3 (second of step 1) and 4 run unguided
        assert pipe.guidance_scales.tolist() == [4.0, 4.0, 1.0]


def test_step_guidance_rule():
    static = StepGuidance(GuidanceSchedule(), torch.full((3,), 4.0), 4.0)
    assert static.scale(0) == 4.0
    static.after_callback(4.0, 2.5)
    assert static.scale(1) == 2.5
    static.after_callback(2.5, 0.0)
    assert static.scale(2) == 1.0 and static.switched_off
    linear = GuidanceSchedule("linear")
    scheduled = StepGuidance(linear, linear.scales(3.0, 3), 3.0)
    scheduled.after_callback(1.0, 7.0)  # ignored: the schedule decides
    assert [scheduled.scale(i) for i in range(3)] == [1.0, 3.0, 5.0]
    scheduled.after_callback(3.0, 1.0)
    assert scheduled.scale(2) == 1.0
    scheduled.after_callback(1.0, 2.0)  # switched back on
    assert scheduled.scale(2) == 5.0
    with pytest.raises(ValueError, match="finite"):
        scheduled.after_callback(5.0, float("nan"))


def test_director_encode_prompt_without_model_or_scheduler(tmp_path):
    full = PIPELINE_CASES["director"].build(tmp_path)
    encoder_only = DirectorPipeline(
        model=None, scheduler=None, text_encoder=full.text_encoder, tokenizer=full.tokenizer
    )
    features = encoder_only.encode_prompt(["trucks left", "pushes in"])
    expected = full.encode_prompt(["trucks left", "pushes in"])
    for field in ("pooled", "tokens", "mask"):
        torch.testing.assert_close(getattr(features, field), getattr(expected, field))
    # the encoder can go; the model samples from the features alone
    full.text_encoder = full.tokenizer = None
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    trajectories = full(text_features=features, **kwargs).trajectories
    assert trajectories.shape == (2, 16, 4, 4) and torch.isfinite(trajectories).all()
    with pytest.raises(ValueError, match="no model or scheduler"):
        encoder_only("trucks left")


def test_director_encode_only_pipeline_from_a_saved_folder(tmp_path):
    full = PIPELINE_CASES["director"].build(tmp_path)
    full.save_pretrained(tmp_path / "saved")
    encoder_only = DirectorPipeline.from_pretrained(tmp_path / "saved", model=None, scheduler=None)
    assert encoder_only.model is None and encoder_only.scheduler is None
    np.testing.assert_allclose(
        encoder_only.encode_prompt("trucks left").pooled.numpy(), full.encode_prompt("trucks left").pooled.numpy()
    )
