"""CoherenceAwareGuidance (CA-CFG) in a small diffusers modular pipeline: text hidden states -> CoherenceConditioner
(with each branch's coherence from the guider) -> UNet2DConditionModel, DDIM, a guidance schedule."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines import (
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    SequentialPipelineBlocks,
)
from diffusers.modular_pipelines.modular_pipeline import BlockState
from diffusers.modular_pipelines.modular_pipeline_utils import ComponentSpec, InputParam, OutputParam

from storydiff import CoherenceAwareGuidance, CoherenceConditioner, GuidanceSchedule

TEXT_DIM, CONTEXT_DIM, STEPS = 8, 16, 4


# ---------------------------------------------------------------------------------------------------------------
# A minimal coherence-aware text-to-latents modular pipeline


class SetTimesteps(ModularPipelineBlocks):
    @property
    def description(self):
        return "Sets the scheduler's timesteps."

    @property
    def expected_components(self):
        return [ComponentSpec("scheduler", DDIMScheduler)]

    @property
    def inputs(self):
        return [InputParam("num_inference_steps", default=STEPS)]

    @property
    def intermediate_outputs(self):
        return [OutputParam("timesteps")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        components.scheduler.set_timesteps(block_state.num_inference_steps)
        block_state.timesteps = components.scheduler.timesteps
        self.set_block_state(state, block_state)
        return components, state


class PrepareLatents(ModularPipelineBlocks):
    @property
    def description(self):
        return "Draws the initial latents, one per prompt."

    @property
    def inputs(self):
        return [InputParam("text_hidden_states", required=True), InputParam("generator")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("latents")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        batch = block_state.text_hidden_states.shape[0]
        block_state.latents = torch.randn(batch, 4, 8, 8, generator=block_state.generator)
        self.set_block_state(state, block_state)
        return components, state


class CoherenceLoopDenoiser(ModularPipelineBlocks):
    """The CA-CFG denoise step: each guidance batch is encoded by the conditioner with that batch's coherence."""

    @property
    def description(self):
        return "Runs conditioner + UNet once per guidance batch and combines the predictions with the guider."

    @property
    def expected_components(self):
        return [
            ComponentSpec(
                "guider",
                CoherenceAwareGuidance,
                config=FrozenDict({"guidance_scale": 3.0}),
                default_creation_method="from_config",
            ),
            ComponentSpec("conditioner", CoherenceConditioner),
            ComponentSpec("unet", UNet2DConditionModel),
        ]

    @property
    def inputs(self):
        return [
            InputParam("latents", required=True),
            InputParam("num_inference_steps", required=True),
            InputParam("text_hidden_states", required=True),
            InputParam("text_attention_mask"),
            InputParam("negative_text_hidden_states"),
            InputParam("negative_text_attention_mask"),
            InputParam("coherence"),
            InputParam("negative_coherence"),
        ]

    @property
    def intermediate_outputs(self):
        return [OutputParam("noise_pred")]

    def __call__(self, components, block_state, i, t):
        guider_inputs = {
            "text_hidden_states": (block_state.text_hidden_states, block_state.negative_text_hidden_states),
            "text_attention_mask": (block_state.text_attention_mask, block_state.negative_text_attention_mask),
            "coherence": (block_state.coherence, block_state.negative_coherence),
        }
        components.guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        guider_state = components.guider.prepare_inputs(guider_inputs)
        for batch in guider_state:
            components.guider.prepare_models(components.unet)
            context = components.conditioner(
                batch.text_hidden_states, batch.coherence, getattr(batch, "text_attention_mask", None)
            )
            batch.noise_pred = components.unet(
                block_state.latents,
                t,
                encoder_hidden_states=context.encoder_hidden_states,
                encoder_attention_mask=context.encoder_attention_mask,
            ).sample
            components.guider.cleanup_models(components.unet)
        block_state.noise_pred = components.guider(guider_state).pred
        return components, block_state


class PrecomputedContextLoopDenoiser(CoherenceLoopDenoiser):
    """CA-CFG done by hand with a stock guider: both contexts are encoded up front, coherence 1 and 0."""

    def __call__(self, components, block_state, i, t):
        text, mask = block_state.text_hidden_states, block_state.text_attention_mask
        positive, negative = components.conditioner(text, 1.0, mask), components.conditioner(text, 0.0, mask)
        guider_inputs = {
            "encoder_hidden_states": (positive.encoder_hidden_states, negative.encoder_hidden_states),
            "encoder_attention_mask": (positive.encoder_attention_mask, negative.encoder_attention_mask),
        }
        components.guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        guider_state = components.guider.prepare_inputs(guider_inputs)
        for batch in guider_state:
            batch.noise_pred = components.unet(
                block_state.latents,
                t,
                encoder_hidden_states=batch.encoder_hidden_states,
                encoder_attention_mask=batch.encoder_attention_mask,
            ).sample
        block_state.noise_pred = components.guider(guider_state).pred
        return components, block_state


class SchedulerStep(ModularPipelineBlocks):
    @property
    def description(self):
        return "One DDIM step with the guided prediction."

    @property
    def expected_components(self):
        return [ComponentSpec("scheduler", DDIMScheduler)]

    @property
    def intermediate_outputs(self):
        return [OutputParam("latents")]

    def __call__(self, components, block_state, i, t):
        block_state.latents = components.scheduler.step(block_state.noise_pred, t, block_state.latents).prev_sample
        return components, block_state


class DenoiseLoop(LoopSequentialPipelineBlocks):
    block_classes = [CoherenceLoopDenoiser, SchedulerStep]
    block_names = ["denoiser", "scheduler_step"]

    @property
    def description(self):
        return "Denoises the latents over the timesteps."

    @property
    def loop_inputs(self):
        return [InputParam("timesteps", required=True), InputParam("num_inference_steps", required=True)]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        for i, t in enumerate(block_state.timesteps):
            components, block_state = self.loop_step(components, block_state, i=i, t=t)
        self.set_block_state(state, block_state)
        return components, state


class PrecomputedContextDenoiseLoop(DenoiseLoop):
    block_classes = [PrecomputedContextLoopDenoiser, SchedulerStep]


def text_to_latents_blocks(loop=DenoiseLoop):
    return SequentialPipelineBlocks.from_blocks_dict(
        {"set_timesteps": SetTimesteps(), "prepare_latents": PrepareLatents(), "denoise": loop()}
    )


class Recorder:
    """What the conditioner received (text, coherence) and what the UNet and the scheduler were given."""

    def __init__(self, pipe):
        self.coherences, self.texts, self.unet_outputs, self.guided = [], [], [], []
        pipe.conditioner.register_forward_pre_hook(self._conditioner_call)
        pipe.unet.register_forward_hook(lambda module, args, output: self.unet_outputs.append(output.sample))
        scheduler_step = pipe.scheduler.step

        def recording_step(model_output, *args, **kwargs):
            self.guided.append(model_output)
            return scheduler_step(model_output, *args, **kwargs)

        pipe.scheduler.step = recording_step

    def _conditioner_call(self, module, args):
        self.texts.append(args[0])
        self.coherences.append(torch.as_tensor(args[1]).reshape(-1).tolist())

    def clear(self):
        for records in (self.coherences, self.texts, self.unet_outputs, self.guided):
            records.clear()


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    conditioner = CoherenceConditioner(
        text_dim=TEXT_DIM, dim=16, cross_attention_dim=CONTEXT_DIM, num_registers=2, num_layers=1, num_heads=2
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=CONTEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=4,
    ).eval()
    pipeline = text_to_latents_blocks().init_pipeline()
    pipeline.update_components(conditioner=conditioner, unet=unet, scheduler=DDIMScheduler())
    pipeline.recorder = Recorder(pipeline)
    return pipeline


TEXT = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def run(pipe, guider, **inputs):
    pipe.update_components(guider=guider)
    pipe.recorder.clear()
    inputs = {"text_hidden_states": TEXT, "text_attention_mask": MASK, **inputs}
    return pipe(**inputs, generator=torch.Generator().manual_seed(0), output="latents")


# ---------------------------------------------------------------------------------------------------------------
# In the pipeline


def test_default_guider_comes_from_the_block_spec(pipe):
    fresh = text_to_latents_blocks().init_pipeline()
    assert isinstance(fresh.guider, CoherenceAwareGuidance)
    assert fresh.guider.guidance_scale == 3.0
    assert (fresh.guider.coherence, fresh.guider.negative_coherence) == (1.0, 0.0)


def test_ca_cfg_combination_equals_the_formula(pipe):
    run(pipe, CoherenceAwareGuidance(guidance_scale=4.0))
    recorder = pipe.recorder
    # every step: positive branch (same text, c = 1), then negative branch (same text, c = 0)
    assert recorder.coherences == [[1.0], [0.0]] * STEPS
    assert all(torch.equal(text, TEXT) for text in recorder.texts)
    assert len(recorder.unet_outputs) == 2 * STEPS and len(recorder.guided) == STEPS
    for step in range(STEPS):
        positive, negative = recorder.unet_outputs[2 * step], recorder.unet_outputs[2 * step + 1]
        assert not torch.allclose(positive, negative)  # the coherence token changes the prediction
        expected = negative + 4.0 * (positive - negative)
        torch.testing.assert_close(recorder.guided[step], expected, rtol=0, atol=1e-6)


def test_original_formulation_is_the_papers_weight(pipe):
    # the authors' eps(c+) + w (eps(c+) - eps(c-)), w = 2.5, equals diffusers g = 3.5
    run(pipe, CoherenceAwareGuidance(guidance_scale=2.5, use_original_formulation=True))
    positive, negative = pipe.recorder.unet_outputs[:2]
    torch.testing.assert_close(pipe.recorder.guided[0], positive + 2.5 * (positive - negative), rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.recorder.guided[0], negative + 3.5 * (positive - negative), rtol=0, atol=1e-5)


def test_custom_coherences_reach_the_conditioner(pipe):
    run(pipe, CoherenceAwareGuidance(guidance_scale=2.0, coherence=0.75, negative_coherence=0.25))
    assert pipe.recorder.coherences == [[0.75], [0.25]] * STEPS
    # per call, per prompt: the pipeline's inputs override the config; None keeps the configured value
    run(pipe, CoherenceAwareGuidance(guidance_scale=2.0, negative_coherence=0.25), coherence=torch.tensor([1.0, 0.5]))
    assert pipe.recorder.coherences == [[1.0, 0.5], [0.25]] * STEPS
    run(pipe, CoherenceAwareGuidance(guidance_scale=2.0), negative_coherence=0.125)
    assert pipe.recorder.coherences == [[1.0], [0.125]] * STEPS


def test_a_given_negative_prompt_is_used(pipe):
    empty_prompt = torch.zeros_like(TEXT)
    run(pipe, CoherenceAwareGuidance(guidance_scale=2.0), negative_text_hidden_states=empty_prompt)
    texts = pipe.recorder.texts
    assert all(torch.equal(text, TEXT) for text in texts[0::2])
    assert all(torch.equal(text, empty_prompt) for text in texts[1::2])


@pytest.mark.parametrize(
    "schedule, expected_scales",
    [
        ({"guidance_schedule": "interval", "interval": (0.5, 1.0)}, [1.0, 1.0, 5.0, 5.0]),
        ({"guidance_schedule": "custom", "values": [3.0, 1.0, 2.0, 1.0]}, [3.0, 1.0, 2.0, 1.0]),
        ({"guidance_schedule": "linear"}, GuidanceSchedule("linear").scales(5.0, STEPS).tolist()),
    ],
)
def test_zero_weight_steps_run_the_positive_branch_only(pipe, schedule, expected_scales):
    run(pipe, CoherenceAwareGuidance(guidance_scale=5.0, **schedule))
    recorder = pipe.recorder
    assert len(recorder.guided) == STEPS
    expected_coherences, call = [], 0
    for step, scale in enumerate(expected_scales):
        positive = recorder.unet_outputs[call]
        if math.isclose(scale, 1.0):
            expected_coherences += [[1.0]]
            assert torch.equal(recorder.guided[step], positive)
            call += 1
        else:
            expected_coherences += [[1.0], [0.0]]
            negative = recorder.unet_outputs[call + 1]
            expected = negative + scale * (positive - negative)
            torch.testing.assert_close(recorder.guided[step], expected, rtol=0, atol=1e-5)
            call += 2
    assert call == len(recorder.unet_outputs) < 2 * STEPS
    assert recorder.coherences == expected_coherences


def test_static_schedule_equals_stock_cfg_on_coherence_contexts(pipe):
    ca_cfg = run(pipe, CoherenceAwareGuidance(guidance_scale=4.0))
    stock_pipe = text_to_latents_blocks(PrecomputedContextDenoiseLoop).init_pipeline()
    stock_pipe.update_components(**{name: getattr(pipe, name) for name in ("conditioner", "unet")})
    stock_pipe.update_components(scheduler=DDIMScheduler(), guider=ClassifierFreeGuidance(guidance_scale=4.0))
    stock = stock_pipe(
        text_hidden_states=TEXT, text_attention_mask=MASK, generator=torch.Generator().manual_seed(0), output="latents"
    )
    torch.testing.assert_close(ca_cfg, stock, rtol=0, atol=1e-6)


def test_bad_coherence_in_the_pipeline_inputs(pipe):
    with pytest.raises(ValueError, match=r"finite value in \[0, 1\].*\[1.5\]"):
        run(pipe, CoherenceAwareGuidance(), coherence=torch.tensor([1.0, 1.5]))
    with pytest.raises(ValueError, match=r"finite value in \[0, 1\]"):
        run(pipe, CoherenceAwareGuidance(), negative_coherence=float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# The guider itself


def test_prepare_inputs_from_block_state():
    guider = CoherenceAwareGuidance(guidance_scale=2.0, negative_coherence=0.5)
    guider.set_state(step=0, num_inference_steps=1, timestep=torch.tensor(999))
    state = BlockState(prompt_embeds=TEXT, negative_prompt_embeds=None, coherence=torch.tensor([0.9, 0.8]))
    fields = {"encoder_hidden_states": ("prompt_embeds", "negative_prompt_embeds"), "coherence": ("coherence", None)}
    positive, negative = guider.prepare_inputs_from_block_state(state, fields)
    assert (positive.__guidance_identifier__, negative.__guidance_identifier__) == ("pred_cond", "pred_uncond")
    assert torch.equal(positive.encoder_hidden_states, TEXT) and torch.equal(negative.encoder_hidden_states, TEXT)
    assert positive.coherence.tolist() == pytest.approx([0.9, 0.8]) and negative.coherence.tolist() == [0.5]
    # without a coherence field, the configured values; a given negative input is used as given
    state.negative_prompt_embeds = torch.zeros_like(TEXT)
    positive, negative = guider.prepare_inputs_from_block_state(
        state, {"encoder_hidden_states": fields["encoder_hidden_states"]}
    )
    assert (positive.coherence.tolist(), negative.coherence.tolist()) == ([1.0], [0.5])
    assert torch.equal(negative.encoder_hidden_states, torch.zeros_like(TEXT))


def test_config_round_trip(tmp_path):
    guider = CoherenceAwareGuidance(
        5.0, guidance_schedule="pcs", power=0.5, coherence=0.875, negative_coherence=0.125, guidance_rescale=0.2
    )
    guider.save_pretrained(tmp_path)
    loaded = CoherenceAwareGuidance.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(guider.config)
    assert (loaded.coherence, loaded.negative_coherence) == (0.875, 0.125)
    assert loaded.guidance_schedule.config.kind == "pcs" and torch.equal(loaded.scales(7), guider.scales(7))
    assert CoherenceAwareGuidance.from_config(guider.config).negative_coherence == 0.125
    assert guider.new(negative_coherence=0.0).negative_coherence == 0.0
    assert guider.new().coherence == 0.875
    assert "negative_coherence: 0.125" in repr(guider)


def test_bad_coherence_values_raise_clear_errors():
    for name, value in [("coherence", 1.5), ("negative_coherence", -0.1), ("coherence", float("nan"))]:
        with pytest.raises(ValueError, match=rf"`{name}` must be a finite value in \[0, 1\]"):
            CoherenceAwareGuidance(**{name: value})
    with pytest.raises(TypeError, match="`negative_coherence` must be a number"):
        CoherenceAwareGuidance(negative_coherence="0")
    with pytest.raises(TypeError, match="`coherence` must be a number"):
        CoherenceAwareGuidance(coherence=True)
    guider = CoherenceAwareGuidance()
    guider.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(999))
    with pytest.raises(ValueError, match=r"must be \(positive, negative\), got 3"):
        guider.prepare_inputs({"text_hidden_states": (TEXT, None), "coherence": (1.0, 0.0, 0.5)})
