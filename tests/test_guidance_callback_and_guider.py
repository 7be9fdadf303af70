"""GuidanceScheduleCallback on stock SD / SDXL pipelines, and the DynamicClassifierFreeGuidance guider."""

import logging

import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    ControlNetModel,
    HeunDiscreteScheduler,
    MotionAdapter,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import ClassifierFreeGuidance
from tiny_stable_diffusion import tiny_sd_components, tiny_sdxl_components

from storydiff import DynamicClassifierFreeGuidance, GuidanceSchedule, GuidanceScheduleCallback
from storydiff.schedulers.guidance_schedule_callback import NEAR_UNGUIDED_SCALE

PROMPTS = ["a cat", "the dog and the cat"]
SDXL_CFG_TENSORS = ["prompt_embeds", "add_text_embeds", "add_time_ids"]


@pytest.fixture(scope="module")
def sd_pipe(tmp_path_factory):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path_factory.mktemp("sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory):
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path_factory.mktemp("sdxl")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, callback=None, guidance_scale=5.0, num_inference_steps=5, **kwargs):
    arguments = dict(
        prompt=PROMPTS,
        negative_prompt=["blurry", "ugly"],
        num_images_per_prompt=2,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        callback_on_step_end=callback,
    )
    arguments.update(kwargs)
    return pipe(**arguments).images


class GuidanceRecorder:
    """Records, for every UNet call of a pipeline run, the unconditional and conditional predictions, the UNet inputs
    and the prediction the pipeline passed to `scheduler.step`, so tests can measure the guidance really applied."""

    def __init__(self, pipe):
        self.pipe, self.unet_outputs, self.unet_inputs, self.guided = pipe, [], [], []

    def __enter__(self):
        def record_inputs(module, args, kwargs):
            added = kwargs.get("added_cond_kwargs") or {}
            self.unet_inputs.append({"encoder_hidden_states": kwargs["encoder_hidden_states"], **added})

        def record_outputs(module, args, kwargs, output):
            self.unet_outputs.append(output[0] if isinstance(output, tuple) else output.sample)

        self.hooks = [
            self.pipe.unet.register_forward_pre_hook(record_inputs, with_kwargs=True),
            self.pipe.unet.register_forward_hook(record_outputs, with_kwargs=True),
        ]
        scheduler_step = self.pipe.scheduler.step

        def step(model_output, *args, **kwargs):
            self.guided.append(model_output)
            return scheduler_step(model_output, *args, **kwargs)

        self.pipe.scheduler.step = step
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()
        del self.pipe.scheduler.step  # back to the class method

    def effective_scales(self):
        """Per UNet call: the scale g with guided = u + g (c - u) (least squares), or None where u == c exactly,
        after checking that the guided prediction then is exactly the conditional one."""
        scales = []
        for output, guided in zip(self.unet_outputs, self.guided):
            unconditional, conditional = output.double().chunk(2)
            if torch.equal(unconditional, conditional):
                assert torch.equal(guided.double(), conditional)
                scales.append(None)
                continue
            shift = conditional - unconditional
            scales.append(((guided.double() - unconditional) * shift).sum().item() / shift.pow(2).sum().item())
        return scales


def assert_scales(actual, expected):
    assert len(actual) == len(expected)
    for step, (got, wanted) in enumerate(zip(actual, expected)):
        if wanted is None:
            assert got is None, f"step {step}: expected the conditional prediction, got scale {got}"
        else:
            assert got == pytest.approx(wanted, rel=1e-4), f"step {step}"


def test_static_schedule_equals_no_callback(sd_pipe, sdxl_pipe):
    for pipe in (sd_pipe, sdxl_pipe):
        reference = generate(pipe)
        for callback in (
            GuidanceScheduleCallback(),
            GuidanceScheduleCallback("static", guidance_scale=5.0, pipeline=pipe),
        ):
            assert torch.equal(generate(pipe, callback), reference)


def test_linear_schedule_is_applied_step_by_step(sd_pipe):
    callback = GuidanceScheduleCallback("linear", guidance_scale=5.0, num_inference_steps=5)
    assert callback.first_step_guidance_scale() == NEAR_UNGUIDED_SCALE  # linear starts at w_0 = 0
    with GuidanceRecorder(sd_pipe) as recorder:
        latents = generate(sd_pipe, callback, guidance_scale=callback.first_step_guidance_scale())
    assert latents.shape == (4, 4, 16, 16)
    assert callback.run_scales.tolist() == [1.0, 3.0, 5.0, 7.0, 9.0]
    assert_scales(recorder.effective_scales(), [NEAR_UNGUIDED_SCALE, 3.0, 5.0, 7.0, 9.0])
    # batch 2 x 2 images, doubled for CFG on every step
    assert [inputs["encoder_hidden_states"].shape[0] for inputs in recorder.unet_inputs] == [8] * 5


def test_zero_weight_steps_give_the_conditional_prediction_and_restore_the_batch(sd_pipe):
    values = [4.0, 1.0, 3.0, 1.0, 1.0, 2.5]
    callback = GuidanceScheduleCallback(values)
    with GuidanceRecorder(sd_pipe) as recorder:
        generate(sd_pipe, callback, guidance_scale=4.0, num_inference_steps=6)
    assert_scales(recorder.effective_scales(), [4.0, None, 3.0, None, None, 2.5])
    embeddings = [inputs["encoder_hidden_states"] for inputs in recorder.unet_inputs]
    for step, hidden in enumerate(embeddings):
        unconditional, conditional = hidden.chunk(2)
        assert torch.equal(conditional, embeddings[0].chunk(2)[1])  # the conditional half is never touched
        # the negative prompts come back on guided steps
        assert torch.equal(unconditional, conditional) == (values[step] == 1.0), step
        if values[step] > 1.0:
            assert torch.equal(unconditional, embeddings[0].chunk(2)[0])


def test_sdxl_batch_and_images_per_prompt(sdxl_pipe):
    callback = GuidanceScheduleCallback("interval", interval=(0.0, 0.5), pipeline=sdxl_pipe)
    assert callback.tensor_inputs == SDXL_CFG_TENSORS
    with GuidanceRecorder(sdxl_pipe) as recorder:
        latents = generate(sdxl_pipe, callback, guidance_scale=3.0)
    assert latents.shape == (4, 4, 16, 16)
    assert callback.run_scales.tolist() == [3.0, 3.0, 3.0, 1.0, 1.0]
    assert_scales(recorder.effective_scales(), [3.0, 3.0, 3.0, None, None])
    for step, inputs in enumerate(recorder.unet_inputs):
        for name in ("encoder_hidden_states", "text_embeds"):
            unconditional, conditional = inputs[name].chunk(2)
            assert inputs[name].shape[0] == 8
            assert torch.equal(unconditional, conditional) == (step >= 3), (step, name)


def test_sdxl_cosine_schedule(sdxl_pipe):
    callback = GuidanceScheduleCallback("cosine", guidance_scale=6.0, num_inference_steps=4, pipeline=sdxl_pipe)
    expected = GuidanceSchedule("cosine").scales(6.0, 4).tolist()
    with GuidanceRecorder(sdxl_pipe) as recorder:
        generate(sdxl_pipe, callback, guidance_scale=callback.first_step_guidance_scale(), num_inference_steps=4)
    assert_scales(recorder.effective_scales(), [NEAR_UNGUIDED_SCALE, *expected[1:]])


def test_second_order_scheduler_uses_one_scale_per_step(sd_pipe):
    heun = HeunDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    pipe = StableDiffusionPipeline(**{**sd_pipe.components, "scheduler": heun})
    pipe.set_progress_bar_config(disable=True)
    callback = GuidanceScheduleCallback("invlinear", guidance_scale=4.0, num_inference_steps=3)
    with GuidanceRecorder(pipe) as recorder:
        generate(pipe, callback, guidance_scale=callback.first_step_guidance_scale(), num_inference_steps=3)
    scales = GuidanceSchedule("invlinear").scales(4.0, 3).tolist()  # 7, 4, 1
    # Heun evaluates the model 2N - 1 times: twice per step, once on the last (Euler) step
    assert_scales(recorder.effective_scales(), [scales[0], scales[0], scales[1], scales[1], None])


def test_img2img_runs_the_schedule_over_the_steps_taken(sd_pipe):
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    callback = GuidanceScheduleCallback("linear", guidance_scale=3.0, num_inference_steps=4)
    with GuidanceRecorder(pipe) as recorder:
        pipe(
            prompt="a cat",
            image=image,
            strength=0.5,
            num_inference_steps=8,
            guidance_scale=callback.first_step_guidance_scale(),
            callback_on_step_end=callback,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    assert callback.run_scales.tolist() == GuidanceSchedule("linear").scales(3.0, 4).tolist()
    assert_scales(recorder.effective_scales(), [NEAR_UNGUIDED_SCALE, *callback.run_scales.tolist()[1:]])
    with pytest.raises(ValueError, match="runs 4 steps"):
        pipe(
            prompt="a cat",
            image=image,
            strength=0.5,
            num_inference_steps=8,
            output_type="latent",
            callback_on_step_end=GuidanceScheduleCallback("linear", num_inference_steps=8),
        )


def test_works_next_to_other_callbacks(sd_pipe):
    class CountSteps(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            steps.append(step_index)
            return callback_kwargs

    steps = []
    callbacks = MultiPipelineCallbacks([GuidanceScheduleCallback([3.0, 1.0, 2.0]), CountSteps()])
    with GuidanceRecorder(sd_pipe) as recorder:
        generate(sd_pipe, callbacks, guidance_scale=3.0, num_inference_steps=3)
    assert steps == [0, 1, 2]
    assert_scales(recorder.effective_scales(), [3.0, None, 2.0])


def test_first_step_warning_and_default_overall_scale(sd_pipe):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("storydiff.schedulers.guidance_schedule_callback")
    logger.addHandler(handler)
    try:
        callback = GuidanceScheduleCallback("linear")  # overall scale taken from the pipeline call
        with GuidanceRecorder(sd_pipe) as recorder:
            generate(sd_pipe, callback, guidance_scale=3.0, num_inference_steps=3)
        generate(sd_pipe, callback, guidance_scale=3.0, num_inference_steps=3)
    finally:
        logger.removeHandler(handler)
    assert callback.run_scales.tolist() == [1.0, 3.0, 5.0]
    assert_scales(recorder.effective_scales(), [3.0, 3.0, 5.0])  # step 0 at the pipeline's scale
    assert len(records) == 1 and "Step 0 ran at the pipeline's guidance_scale=3.0" in records[0].getMessage()


def test_callback_errors(sd_pipe, sdxl_pipe):
    with pytest.raises(ValueError, match="runs without classifier-free guidance"):
        generate(sd_pipe, GuidanceScheduleCallback("linear", guidance_scale=5.0), guidance_scale=1.0)
    # with no guidance anywhere there is nothing to do
    generate(sd_pipe, GuidanceScheduleCallback("static"), guidance_scale=1.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="add_text_embeds"):
        generate(sdxl_pipe, GuidanceScheduleCallback("interval", interval=(0.0, 0.5)))
    with pytest.raises(ValueError, match="built for num_inference_steps=4"):
        generate(sd_pipe, GuidanceScheduleCallback("linear", num_inference_steps=4))
    with pytest.raises(ValueError, match="needs guidance_scale >= 1"):
        GuidanceScheduleCallback("linear", guidance_scale=0.5)
    with pytest.raises(ValueError, match="Unknown guidance schedule kind"):
        GuidanceScheduleCallback("quadratic")
    with pytest.raises(ValueError, match="needs `power`"):
        GuidanceScheduleCallback("pcs")
    with pytest.raises(ValueError, match="leave them None"):
        GuidanceScheduleCallback(GuidanceSchedule("linear"), clamp=2.0)
    with pytest.raises(ValueError, match="may only name CFG batch tensors"):
        GuidanceScheduleCallback("linear", tensor_inputs=["latents"])
    with pytest.raises(TypeError, match="must be a diffusers pipeline"):
        GuidanceScheduleCallback("linear", pipeline="sdxl")
    with pytest.raises(TypeError, match="`num_inference_steps` must be an int"):
        GuidanceScheduleCallback("linear", num_inference_steps=5.0)
    with pytest.raises(ValueError, match="Give `guidance_scale` and `num_inference_steps`"):
        GuidanceScheduleCallback("linear").first_step_guidance_scale()


def test_callback_config():
    callback = GuidanceScheduleCallback("pcs", guidance_scale=7.5, num_inference_steps=30, power=0.1)
    assert callback.config.guidance_schedule == "pcs" and callback.config.power == 0.1
    assert callback.guidance_schedule.config.kind == "pcs"
    rebuilt = GuidanceScheduleCallback.from_config(callback.config)
    assert rebuilt.scales().tolist() == callback.scales().tolist()
    assert GuidanceScheduleCallback(pipeline=StableDiffusionXLPipeline).tensor_inputs == SDXL_CFG_TENSORS
    assert GuidanceScheduleCallback(pipeline=StableDiffusionPipeline).tensor_inputs == ["prompt_embeds"]


# ---------------------------------------------------------------------------------------------------------------
# DynamicClassifierFreeGuidance


def random_predictions(seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)


@pytest.mark.parametrize(
    "settings",
    [
        {"guidance_scale": 7.5},
        {"guidance_scale": 3.3, "guidance_rescale": 0.7},
        {"guidance_scale": 1.0},
        {"guidance_scale": 2.5, "use_original_formulation": True},
        {"guidance_scale": 5.0, "start": 0.2, "stop": 0.7},
        {"guidance_scale": 5.0, "enabled": False},
    ],
)
def test_static_guider_matches_stock_cfg(settings):
    stock = ClassifierFreeGuidance(**settings)
    dynamic = DynamicClassifierFreeGuidance(**settings)
    steps = 10
    for step in range(steps):
        for guider in (stock, dynamic):
            guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(1000 - 100 * step))
        assert dynamic.num_conditions == stock.num_conditions
        data = {"prompt_embeds": (torch.ones(1), torch.zeros(1)), "latents": torch.ones(2)}
        assert [batch.__guidance_identifier__ for batch in dynamic.prepare_inputs(data)] == [
            batch.__guidance_identifier__ for batch in stock.prepare_inputs(data)
        ]
        pred_cond, pred_uncond = random_predictions(step)
        pred_uncond = pred_uncond if stock.num_conditions == 2 else None
        expected, actual = stock.forward(pred_cond, pred_uncond), dynamic.forward(pred_cond, pred_uncond)
        assert torch.equal(actual.pred, expected.pred), step


def test_guider_follows_the_schedule_and_skips_the_unconditional_pass():
    guider = DynamicClassifierFreeGuidance(guidance_scale=5.0, guidance_schedule="interval", interval=(0.5, 1.0))
    steps = 5
    expected = GuidanceSchedule("interval", interval=(0.5, 1.0)).scales(5.0, steps).tolist()  # 1, 1, 5, 5, 5
    assert expected == [1.0, 1.0, 5.0, 5.0, 5.0]
    for step in range(steps):
        guider.set_state(step=step, num_inference_steps=steps, timestep=torch.tensor(step))
        batches = guider.prepare_inputs({"prompt_embeds": (torch.ones(1), torch.zeros(1))})
        pred_cond, pred_uncond = random_predictions(step)
        if expected[step] == 1.0:
            assert guider.num_conditions == 1 and len(batches) == 1
            assert batches[0].__guidance_identifier__ == "pred_cond" and torch.equal(
                batches[0].prompt_embeds, torch.ones(1)
            )
            assert torch.equal(guider.forward(pred_cond).pred, pred_cond)
        else:
            assert guider.num_conditions == 2 and len(batches) == 2
            assert torch.equal(batches[1].prompt_embeds, torch.zeros(1))
            pred = guider.forward(pred_cond, pred_uncond).pred
            assert torch.equal(pred, pred_uncond + expected[step] * (pred_cond - pred_uncond))
        assert guider.current_guidance_scale == expected[step]


@pytest.mark.parametrize(
    "kind, parameters", [("linear", {}), ("cosine", {}), ("pcs", {"power": 0.1}), ("clamp-linear", {"clamp": 2.0})]
)
def test_guider_scales_per_step(kind, parameters):
    for original in (False, True):
        guider = DynamicClassifierFreeGuidance(
            guidance_scale=6.0,
            guidance_schedule=kind,
            use_original_formulation=original,
            guidance_rescale=0.5,
            **parameters,
        )
        g = GuidanceSchedule(kind, **parameters).scales(7.0 if original else 6.0, 7)
        expected = g - 1.0 if original else g
        for step in range(7):
            guider.set_state(step=step, num_inference_steps=7, timestep=torch.tensor(step))
            assert guider.current_guidance_scale == expected[step].item()
            pred_cond, pred_uncond = random_predictions(step)
            reference = ClassifierFreeGuidance(
                guidance_scale=expected[step].item(), use_original_formulation=original, guidance_rescale=0.5
            )
            assert guider.num_conditions == reference.num_conditions
            uncond = pred_uncond if reference.num_conditions == 2 else None
            assert torch.equal(guider.forward(pred_cond, uncond).pred, reference.forward(pred_cond, uncond).pred)


def test_guider_save_load(tmp_path):
    guider = DynamicClassifierFreeGuidance(6.0, 0.3, guidance_schedule=GuidanceSchedule("pcs", power=0.5))
    guider.save_pretrained(tmp_path)
    assert (tmp_path / "guider_config.json").is_file()
    loaded = DynamicClassifierFreeGuidance.from_pretrained(tmp_path)
    assert loaded.config.guidance_schedule == "pcs" and loaded.config.power == 0.5
    assert loaded.guidance_scale == 6.0 and loaded.guidance_rescale == 0.3
    assert torch.equal(loaded.scales(9), guider.scales(9))
    assert torch.equal(guider.new().scales(9), guider.scales(9))
    assert guider.new(guidance_schedule="linear", power=None).guidance_schedule.config.kind == "linear"
    listed = DynamicClassifierFreeGuidance(guidance_schedule=[3.0, 1.0])
    listed.save_pretrained(tmp_path / "listed")
    assert DynamicClassifierFreeGuidance.from_pretrained(tmp_path / "listed").scales(2).tolist() == [3.0, 1.0]
    with_function = DynamicClassifierFreeGuidance(guidance_schedule=lambda i, n, g: 1.0 + i)
    assert with_function.new().scales(3).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="cannot be saved"):
        with_function.save_pretrained(tmp_path / "function")


def test_guider_errors():
    with pytest.raises(ValueError, match="needs guidance_scale >= 1"):
        DynamicClassifierFreeGuidance(guidance_scale=0.5, guidance_schedule="linear")
    with pytest.raises(ValueError, match="Valid kinds"):
        DynamicClassifierFreeGuidance(guidance_schedule="quadratic")
    with pytest.raises(ValueError, match="needs `clamp`"):
        DynamicClassifierFreeGuidance(guidance_schedule="clamp-cosine")
    with pytest.raises(ValueError, match="leave them None"):
        DynamicClassifierFreeGuidance(guidance_schedule=GuidanceSchedule("linear"), power=1.0)
    with pytest.raises(TypeError, match="`guidance_scale` must be a number"):
        DynamicClassifierFreeGuidance(guidance_scale="7.5")
    with pytest.raises(ValueError, match="must be finite"):
        DynamicClassifierFreeGuidance(guidance_scale=float("nan"))
    guider = DynamicClassifierFreeGuidance(guidance_schedule="linear")
    guider.set_state(step=5, num_inference_steps=5, timestep=torch.tensor(0))
    assert guider.num_conditions == 1  # past the last step, as ClassifierFreeGuidance: no guidance
    with pytest.raises(ValueError, match="step 5 of 5"):
        _ = guider.current_guidance_scale
    wrong_length = DynamicClassifierFreeGuidance(guidance_schedule=[2.0, 2.0])
    wrong_length.set_state(step=0, num_inference_steps=3, timestep=torch.tensor(0))
    with pytest.raises(ValueError, match="has 2 scales but num_inference_steps is 3"):
        _ = wrong_length.num_conditions


def test_guider_in_a_modular_sdxl_pipeline(tmp_path):
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    components = {name: value for name, value in tiny_sdxl_components(tmp_path).items() if value is not None}
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(**components)
    batch_sizes = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(args[0].shape[0]), with_kwargs=True
    )

    def run(guider):
        pipe.update_components(guider=guider)
        batch_sizes.clear()
        latents = pipe(
            prompt=PROMPTS, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output="latents"
        )
        return latents, list(batch_sizes)

    stock_latents, stock_calls = run(ClassifierFreeGuidance(guidance_scale=5.0))
    static_latents, static_calls = run(DynamicClassifierFreeGuidance(guidance_scale=5.0))
    assert torch.equal(static_latents, stock_latents) and static_calls == stock_calls == [2] * 8
    # linear starts at w_0 = 0: the first step runs the conditional batch only
    linear_latents, linear_calls = run(DynamicClassifierFreeGuidance(guidance_scale=5.0, guidance_schedule="linear"))
    assert linear_calls == [2] * 7 and linear_latents.shape == stock_latents.shape
    assert not torch.equal(linear_latents, stock_latents)
    # guidance only in the second half: 2 of 4 steps without the unconditional pass, (2N - k) / 2N = 6 / 8
    _, interval_calls = run(DynamicClassifierFreeGuidance(5.0, guidance_schedule="interval", interval=(0.5, 1.0)))
    assert len(interval_calls) == 6


@pytest.fixture(scope="module")
def controlnet(sd_pipe):
    torch.manual_seed(0)
    # the tiny VAE downsamples by 2, so the condition embedding must too
    return ControlNetModel.from_unet(sd_pipe.unet, conditioning_embedding_out_channels=(4, 8)).eval()


def test_sd_controlnet(sd_pipe, controlnet):
    pipe = StableDiffusionControlNetPipeline(**sd_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    callback = GuidanceScheduleCallback("cosine", guidance_scale=4.0, num_inference_steps=4, pipeline=pipe)
    with GuidanceRecorder(pipe) as recorder:
        generate(
            pipe,
            callback,
            guidance_scale=callback.first_step_guidance_scale(),
            num_inference_steps=4,
            image=torch.rand(1, 3, 32, 32),
        )
    assert_scales(recorder.effective_scales(), [NEAR_UNGUIDED_SCALE, *callback.run_scales.tolist()[1:]])


def test_pipelines_that_ignore_pipeline_guidance_scale(sd_pipe, controlnet):
    # diffusers' ControlNet img2img multiplies by its `guidance_scale` argument: only on/off schedules can work
    pipe = StableDiffusionControlNetImg2ImgPipeline(**sd_pipe.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    images = {"image": torch.rand(1, 3, 32, 32), "control_image": torch.rand(1, 3, 32, 32), "strength": 1.0}
    with pytest.raises(ValueError, match="weighs its predictions with the `guidance_scale` argument"):
        generate(pipe, GuidanceScheduleCallback("linear"), num_inference_steps=4, **images)
    callback = GuidanceScheduleCallback("interval", interval=(0.0, 0.5))
    with GuidanceRecorder(pipe) as recorder:
        generate(pipe, callback, guidance_scale=3.0, num_inference_steps=4, **images)
    assert_scales(recorder.effective_scales(), [3.0, 3.0, None, None])


def test_animatediff(sd_pipe):
    torch.manual_seed(0)
    adapter = MotionAdapter(
        block_out_channels=(8, 16),
        motion_layers_per_block=1,
        motion_norm_num_groups=4,
        motion_num_attention_heads=2,
        motion_max_seq_length=8,
    )
    components = {name: sd_pipe.components[name] for name in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = AnimateDiffPipeline(**components, motion_adapter=adapter, feature_extractor=None, image_encoder=None)
    pipe.set_progress_bar_config(disable=True)
    callback = GuidanceScheduleCallback("interval", interval=(0.0, 0.5), pipeline=pipe)
    # AnimateDiff does not read the callback's tensor_inputs itself
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs=callback.tensor_inputs"):
        pipe(PROMPTS, num_frames=3, num_inference_steps=4, output_type="latent", callback_on_step_end=callback)
    with GuidanceRecorder(pipe) as recorder:
        frames = pipe(
            PROMPTS,
            num_frames=3,
            num_inference_steps=4,
            guidance_scale=3.0,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=callback.tensor_inputs,
        ).frames
    assert frames.shape == (2, 4, 3, 16, 16)
    assert_scales(recorder.effective_scales(), [3.0, 3.0, None, None])
