"""CoherenceAwarePipeline: CA-CFG against its formula with a recording denoiser, the coherence knob reaching the
conditioner as given, the negative-branch options, skipped negative passes, per-branch self-conditioning, loading."""

import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_stable_diffusion import TEXT_HIDDEN_SIZE, tiny_sd_components

import storydiff
from storydiff import CoherenceAwarePipeline, CoherenceConditioner, GuidanceSchedule
from storydiff.custom_pipelines.coherence_aware import encode_text, random_prompts


def tiny_conditioner(text_dim: int = TEXT_HIDDEN_SIZE, cross_attention_dim: int = TEXT_HIDDEN_SIZE, seed: int = 0):
    torch.manual_seed(seed)
    conditioner = CoherenceConditioner(text_dim=text_dim, dim=16, cross_attention_dim=cross_attention_dim,
                                       num_registers=2, num_layers=1, num_heads=2)  # fmt: skip
    # the output projection of a new conditioner is generic; make the coherence token matter visibly
    with torch.no_grad():
        conditioner.coherence_embedding.position.mul_(20)
    return conditioner.eval()


def tiny_cad_pipeline(tmp_path, denoiser=None) -> CoherenceAwarePipeline:
    components = tiny_sd_components(tmp_path / "cad")
    pipe = CoherenceAwarePipeline(
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        conditioner=tiny_conditioner(),
        denoiser=denoiser if denoiser is not None else components["unet"],
        scheduler=components["scheduler"],
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class RecordingDenoiser(torch.nn.Module):
    """Wraps a denoiser; records every call's batch size and context, and adds a context-dependent offset so that
    the two branches predict visibly different noise."""

    def __init__(self, denoiser):
        super().__init__()
        self.inner = denoiser
        self.calls = []

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None):
        self.calls.append({"batch": sample.shape[0], "context": encoder_hidden_states.clone()})
        output = self.inner(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                            encoder_attention_mask=encoder_attention_mask)  # fmt: skip
        offset = encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        output.sample = output.sample + offset
        return output


@pytest.fixture
def pipe(tmp_path):
    return tiny_cad_pipeline(tmp_path)


def test_ca_cfg_equals_its_formula(pipe):
    prompt = "the cat"
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    scale = 3.0
    guided = pipe(prompt, guidance_scale=scale, num_inference_steps=1, latents=latents, output_type="latent").images

    # by hand: one DDIM step from the same noise with eps = eps(y, 0) + g (eps(y, 1) - eps(y, 0))
    embeds, mask = encode_text(pipe.tokenizer, pipe.text_encoder, [prompt])
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(1)
    t = scheduler.timesteps[0]
    eps = {}
    for c in (0.0, 1.0):
        context = pipe.conditioner(embeds, c, mask)
        eps[c] = pipe.denoiser(latents, t.reshape(1), encoder_hidden_states=context.encoder_hidden_states,
                               encoder_attention_mask=context.encoder_attention_mask).sample  # fmt: skip
    noise = eps[0.0] + scale * (eps[1.0] - eps[0.0])
    expected = scheduler.step(noise, t, latents).prev_sample
    torch.testing.assert_close(guided, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps[0.0], eps[1.0], atol=1e-4), "coherence must change the prediction"


def test_coherence_reaches_the_conditioner_as_given(pipe):
    seen = []
    original = pipe.conditioner.forward

    def recording(text_hidden_states, coherence, text_attention_mask=None, return_dict=True):
        seen.append(torch.as_tensor(coherence).tolist())
        return original(text_hidden_states, coherence, text_attention_mask, return_dict)

    pipe.conditioner.forward = recording
    pipe(["the cat", "a dog"], coherence=[1.0, 0.25], negative_coherence=[0.0, 0.5], num_images_per_prompt=2,
         num_inference_steps=2, output_type="latent")  # fmt: skip
    assert seen == [[1.0, 1.0, 0.25, 0.25], [0.0, 0.0, 0.5, 0.5]]
    out = pipe("the cat", coherence=0.0, num_inference_steps=1, output_type="latent", guidance_scale=1.0)
    assert seen[-1] == [0.0] and out.coherence == [0.0]


def test_coherence_changes_the_image(pipe):
    def run(c):
        return pipe("the cat", coherence=c, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                    generator=torch.manual_seed(0)).images  # fmt: skip

    assert not torch.allclose(run(1.0), run(0.0))
    torch.testing.assert_close(run(0.5), run(0.5))


def test_negative_prompt_options(pipe):
    recorder = RecordingDenoiser(pipe.denoiser)
    pipe = CoherenceAwarePipeline.from_pipe(pipe, denoiser=recorder)

    def context(texts, coherence):
        return pipe.condition(*encode_text(pipe.tokenizer, pipe.text_encoder, texts), coherence)

    def branches(**kwargs):
        """The [negative, positive] context the denoiser received on the first (guided) step."""
        recorder.calls.clear()
        pipe("the cat", num_inference_steps=1, output_type="latent", generator=torch.manual_seed(0), **kwargs)
        return recorder.calls[0]["context"]

    def expected(negative_texts, negative_coherence=0.0):
        negative, negative_mask = context(negative_texts, negative_coherence)
        positive, positive_mask = context(["the cat"], 1.0)
        return pipe.drop_padding(torch.cat([negative, positive]), torch.cat([negative_mask, positive_mask]))[0]

    same = branches()
    torch.testing.assert_close(same, expected(["the cat"]))  # the paper's pure form: same text at c = 0
    empty = branches(negative_prompt="")
    torch.testing.assert_close(empty, expected([""]))
    random = branches(random_negative_prompt=True)  # the generator's first draws are the random strings
    torch.testing.assert_close(random, expected(random_prompts(["the cat"], torch.Generator().manual_seed(0))))
    assert random_prompts(["the cat"], torch.Generator().manual_seed(0)) != ["the cat"]
    assert not torch.allclose(same[:1], same[1:])
    with pytest.raises(ValueError, match="not both"):
        pipe("the cat", negative_prompt="", random_negative_prompt=True, num_inference_steps=1)


def test_padding_is_dropped_from_the_context_without_changing_the_result(pipe):
    recorder = RecordingDenoiser(pipe.denoiser)
    recording = CoherenceAwarePipeline.from_pipe(pipe, denoiser=recorder)
    recording(["a", "the cat"], num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    embeds, mask = encode_text(pipe.tokenizer, pipe.text_encoder, ["a", "the cat"])
    longest = int(mask.sum(1).max())
    registers = pipe.conditioner.config.num_registers
    assert recorder.calls[0]["context"].shape[1] == 1 + registers + longest < 1 + registers + mask.shape[1]
    context, context_mask = pipe.condition(embeds, mask, 1.0)
    trimmed, trimmed_mask = pipe.drop_padding(context, context_mask)
    assert trimmed_mask is not None and trimmed_mask[0].sum() < trimmed_mask[1].sum()  # "a" is shorter: still masked
    assert (
        pipe.drop_padding(*pipe.condition(*encode_text(pipe.tokenizer, pipe.text_encoder, ["the cat"]), 1.0))[1]
        is None
    )
    # the denoiser's output is the same with the padded, masked context and with the trimmed one
    latents, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    full = pipe.denoiser(latents, t, encoder_hidden_states=context, encoder_attention_mask=context_mask).sample
    short = pipe.denoiser(latents, t, encoder_hidden_states=trimmed, encoder_attention_mask=trimmed_mask).sample
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_random_prompts_keep_the_word_lengths():
    strings = random_prompts(["a small red 7", "x"], torch.Generator().manual_seed(0))
    assert [len(w) for w in strings[0].split()] == [1, 5, 3, 1] and len(strings[1]) == 1
    assert strings == random_prompts(["a small red 7", "x"], torch.Generator().manual_seed(0))


def test_zero_weight_steps_skip_the_negative_pass(pipe):
    recorder = RecordingDenoiser(pipe.denoiser)
    pipe = CoherenceAwarePipeline.from_pipe(pipe, denoiser=recorder)
    pipe(["the cat", "a dog"], guidance_scale=4.0, guidance_schedule=GuidanceSchedule("interval", interval=(0.5, 1.0)),
         num_inference_steps=4, output_type="latent")  # fmt: skip
    assert [call["batch"] for call in recorder.calls] == [2, 2, 4, 4]
    assert pipe.guidance_scales.tolist() == [1.0, 1.0, 4.0, 4.0]
    recorder.calls.clear()
    pipe("the cat", guidance_scale=1.0, num_inference_steps=2, output_type="latent")
    assert [call["batch"] for call in recorder.calls] == [1, 1]


def test_static_guidance_costs_what_cfg_costs(pipe):
    recorder = RecordingDenoiser(pipe.denoiser)
    pipe = CoherenceAwarePipeline.from_pipe(pipe, denoiser=recorder)
    calls = []
    pipe.conditioner.register_forward_hook(lambda *args: calls.append(1))
    pipe("the cat", guidance_scale=4.0, num_inference_steps=5, output_type="latent")
    assert [call["batch"] for call in recorder.calls] == [2] * 5  # one batched denoiser call per step, as CFG
    assert len(calls) == 2  # the conditioner runs once per branch per call, not per step


def test_batch_and_images_per_prompt_match_single_runs(pipe):
    generators = [torch.Generator().manual_seed(k) for k in range(4)]
    batched = pipe(["the cat", "a dog"], coherence=[1.0, 0.5], num_images_per_prompt=2, num_inference_steps=2,
                   generator=generators, output_type="pt").images  # fmt: skip
    assert batched.shape == (4, 3, 32, 32) and 0 <= batched.min() and batched.max() <= 1
    single = pipe("a dog", coherence=0.5, num_inference_steps=2, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images  # fmt: skip
    torch.testing.assert_close(batched[3:], single, atol=1e-5, rtol=1e-4)


def test_output_types(pipe):
    common = {"num_inference_steps": 1, "generator": torch.manual_seed(0)}
    assert pipe("the cat", output_type="np", **common).images.shape == (1, 32, 32, 3)
    assert pipe("the cat", **common).images[0].size == (32, 32)
    images, coherence = pipe("the cat", output_type="latent", return_dict=False, **common)
    assert images.shape == (1, 4, 16, 16) and coherence == [1.0]


def test_callbacks_follow_the_protocol(pipe):
    seen = []

    def callback(pipeline, step, timestep, kwargs):
        seen.append((step, pipeline.guidance_scale, pipeline.num_timesteps, tuple(kwargs)))
        if step == 1:
            pipeline._interrupt = True
        return {"latents": kwargs["latents"]}

    pipe("the cat", guidance_scale=2.0, num_inference_steps=4, callback_on_step_end=callback, output_type="latent")
    assert seen == [(0, 2.0, 4, ("latents",)), (1, 2.0, 4, ("latents",))]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coherence": 1.5}, "finite value in \\[0, 1\\]"),
        ({"coherence": float("nan")}, "finite value"),
        ({"negative_coherence": -0.1}, "negative_coherence"),
        ({"coherence": [1.0, 0.5, 0.2]}, "3 values for 1 prompts"),
        ({"negative_prompt": ["", ""]}, "2 negative prompts for 1 prompts"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"height": 31}, "multiple of 2"),
        ({"output_type": "jpg"}, "output_type"),
        ({"guidance_scale": float("inf")}, "finite"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("the cat", num_inference_steps=1, **kwargs)


def test_widths_are_checked_when_the_pipeline_is_built(tmp_path):
    components = tiny_sd_components(tmp_path / "sd")
    base = {k: components[k] for k in ("vae", "text_encoder", "tokenizer", "scheduler")}
    with pytest.raises(ValueError, match="text_dim=12"):
        CoherenceAwarePipeline(**base, conditioner=tiny_conditioner(text_dim=12), denoiser=components["unet"])
    with pytest.raises(ValueError, match="cross_attention_dim=24"):
        CoherenceAwarePipeline(**base, conditioner=tiny_conditioner(cross_attention_dim=24),
                               denoiser=components["unet"])  # fmt: skip


def test_save_load_and_custom_pipeline(pipe, tmp_path):
    expected = pipe("the cat", num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    pipe.save_pretrained(tmp_path / "saved")
    for loaded in (
        CoherenceAwarePipeline.from_pretrained(tmp_path / "saved"),
        DiffusionPipeline.from_pretrained(tmp_path / "saved", trust_remote_code=True),
        DiffusionPipeline.from_pretrained(
            tmp_path / "saved",
            trust_remote_code=True,
            custom_pipeline=storydiff.custom_pipeline_path("coherence_aware"),
        ),  # fmt: skip
    ):
        assert type(loaded).__name__ == "CoherenceAwarePipeline"
        loaded.set_progress_bar_config(disable=True)
        again = loaded("the cat", num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
        torch.testing.assert_close(again, expected)


def tiny_rin(seed: int = 0):
    from storydiff import TextRINModel

    torch.manual_seed(seed)
    model = TextRINModel(sample_size=16, in_channels=4, patch_size=2, interface_dim=16, latent_dim=16, num_latents=4,
                         num_blocks=1, compute_layers=1, num_heads=2, cross_attention_dim=TEXT_HIDDEN_SIZE)  # fmt: skip
    with torch.no_grad():  # a trained model's zero-initialised projections are not zero: make the feedback visible
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0, 0.2)
    return model.eval()


def test_text_rin_keeps_self_conditioning_per_branch(tmp_path):
    pipe = tiny_cad_pipeline(tmp_path, denoiser=tiny_rin())
    assert pipe.takes_self_conditioning
    seen = []
    original = pipe.denoiser.forward

    def recording(sample, timestep, **kwargs):
        output = original(sample, timestep, **kwargs)
        seen.append((kwargs["self_conditioning_latents"].clone(), output.latents.clone()))
        return output

    pipe.denoiser.forward = recording
    schedule = [4.0, 1.0, 4.0, 4.0]  # guided, positive only, guided, guided
    pipe(["the cat", "a dog"], guidance_scale=4.0, guidance_schedule=schedule, num_inference_steps=4,
         output_type="latent")  # fmt: skip
    assert [given.shape[0] for given, _ in seen] == [4, 2, 4, 4]
    assert not seen[0][0].any()  # the first step starts from zeros in both branches
    negative_0, positive_0 = seen[0][1].chunk(2)
    torch.testing.assert_close(seen[1][0], positive_0)  # the unguided step continues the positive branch only
    torch.testing.assert_close(seen[2][0], torch.cat([negative_0, seen[1][1]]))  # the negative branch kept its own
    negative_2, positive_2 = seen[2][1].chunk(2)
    torch.testing.assert_close(seen[3][0], torch.cat([negative_2, positive_2]))
    assert not torch.allclose(negative_2, positive_2)


def test_text_rin_pipeline_saves_and_loads(tmp_path):
    pipe = tiny_cad_pipeline(tmp_path, denoiser=tiny_rin())
    expected = pipe("a dog", num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    pipe.save_pretrained(tmp_path / "rin")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "rin", trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a dog", num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent").images
    torch.testing.assert_close(again, expected)


# ---------------------------------------------------------------------------------- ControlNet: control beside coherence


def test_controlnet_adds_control_beside_coherence(tmp_path):
    from test_dynamic_cfg_controlnet_pipeline import tiny_controlnet

    from storydiff import ControlNetFullModel

    pipe = tiny_cad_pipeline(tmp_path)
    hint = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    common = {"num_inference_steps": 2, "output_type": "latent", "guidance_scale": 3.0}
    plain = pipe("the cat", generator=torch.manual_seed(0), **common).images

    # a new ControlNet (zero convolutions) leaves the model exactly as it was
    fresh = CoherenceAwarePipeline.from_pipe(
        pipe, controlnet=ControlNetFullModel.from_unet(pipe.denoiser, conditioning_channels=1,
                                                       conditioning_embedding_out_channels=(4, 8)))  # fmt: skip
    torch.testing.assert_close(fresh("the cat", control_image=hint, generator=torch.manual_seed(0), **common).images,
                               plain, rtol=0, atol=0)  # fmt: skip

    controlled = CoherenceAwarePipeline.from_pipe(pipe, controlnet=tiny_controlnet(pipe.denoiser, 1))
    seen = []
    controlled.controlnet.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    steered = controlled("the cat", control_image=hint, generator=torch.manual_seed(0), **common).images
    assert not torch.allclose(steered, plain)
    # each CFG branch's ControlNet reads that branch's coherence-aware context (negative first)
    negative, positive = seen[0].chunk(2)
    embeds, mask = encode_text(pipe.tokenizer, pipe.text_encoder, ["the cat"])
    torch.testing.assert_close(positive, pipe.drop_padding(*pipe.condition(embeds, mask, 1.0))[0])
    torch.testing.assert_close(negative, pipe.drop_padding(*pipe.condition(embeds, mask, 0.0))[0])
    off = controlled("the cat", control_image=hint, controlnet_conditioning_scale=0.0, generator=torch.manual_seed(0),
                     **common).images  # fmt: skip
    torch.testing.assert_close(off, plain, rtol=0, atol=0)
    # coherence and control are separate knobs
    low = controlled("the cat", coherence=0.0, control_image=hint, generator=torch.manual_seed(0), **common).images
    assert not torch.allclose(low, steered)

    controlled.save_pretrained(tmp_path / "with_controlnet")
    loaded = CoherenceAwarePipeline.from_pretrained(tmp_path / "with_controlnet")
    loaded.set_progress_bar_config(disable=True)
    again = loaded("the cat", control_image=hint, generator=torch.manual_seed(0), **common).images
    torch.testing.assert_close(again, steered)


def test_controlnet_input_errors(tmp_path):
    from test_dynamic_cfg_controlnet_pipeline import tiny_controlnet

    pipe = tiny_cad_pipeline(tmp_path)
    controlled = CoherenceAwarePipeline.from_pipe(pipe, controlnet=tiny_controlnet(pipe.denoiser, 1))
    hint = torch.rand(1, 1, 32, 32)
    with pytest.raises(ValueError, match="needs `control_image`"):
        controlled("the cat", num_inference_steps=1)
    with pytest.raises(ValueError, match="no controlnet"):
        pipe("the cat", control_image=hint, num_inference_steps=1)
    with pytest.raises(ValueError, match="channels"):
        controlled("the cat", control_image=torch.rand(1, 3, 32, 32), num_inference_steps=1)
    with pytest.raises(ValueError, match="Resize the condition"):
        controlled("the cat", control_image=torch.rand(1, 1, 16, 16), num_inference_steps=1)
    with pytest.raises(ValueError, match="one per prompt"):
        controlled("the cat", control_image=torch.rand(2, 1, 32, 32), num_inference_steps=1)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        controlled("the cat", control_image=hint * 3, num_inference_steps=1)
    with pytest.raises(ValueError, match="skip connections"):
        CoherenceAwarePipeline(**{**pipe.components, "denoiser": tiny_rin(), "controlnet": controlled.controlnet})
