import inspect
import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler, HeunDiscreteScheduler

from storydiff import EDMHeunScheduler


def gaussian_denoiser(mean, std):
    """Exact D(x; sigma) = E[x0 | x] for data ~ N(mean, std^2) per dimension."""

    def denoise(x, sigma):
        return mean + std**2 / (std**2 + sigma**2) * (x - mean)

    return denoise


def run_sampler(scheduler, denoise, latents):
    sample = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(denoise(model_input, t), t, sample).prev_sample
    return sample


def test_director_defaults_and_contract():
    scheduler = EDMHeunScheduler()
    assert scheduler.config.sigma_min == 0.002 and scheduler.config.sigma_max == 80.0 and scheduler.config.rho == 40.0
    assert scheduler.order == 2
    scheduler.set_timesteps(10)
    assert len(scheduler.timesteps) == 19  # 10 Heun steps, the last one Euler only
    assert len(scheduler.sigmas) == 20 and scheduler.sigmas[-1] == 0
    assert scheduler.init_noise_sigma == pytest.approx(80.0)
    torch.testing.assert_close(scheduler.timesteps[-1], torch.tensor(0.002))
    x = torch.randn(2, 5, 9)
    assert scheduler.scale_model_input(x, scheduler.timesteps[0]) is x
    noisy = scheduler.add_noise(x, torch.ones_like(x), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(noisy - x, torch.tensor([1.0, 2.0]).view(2, 1, 1).expand_as(x))


def test_karras_sigmas_match_diffusers_edm_euler():
    ours = EDMHeunScheduler(sigma_min=0.002, sigma_max=80.0, rho=40.0)
    theirs = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", rho=40.0)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    unique = torch.cat([ours.sigmas[:1], ours.sigmas[1:-1:2], ours.sigmas[-1:]])
    torch.testing.assert_close(unique, theirs.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_heun_steps_match_diffusers_heun_discrete():
    torch.manual_seed(0)
    ours = EDMHeunScheduler(rho=7.0)
    ours.set_timesteps(6)
    theirs = HeunDiscreteScheduler(prediction_type="sample")
    theirs.set_timesteps(6)
    # drive diffusers' Heun state machine over our Karras sigmas
    theirs.sigmas = ours.sigmas.clone()
    theirs.timesteps = ours.timesteps.clone()
    denoise = gaussian_denoiser(0.3, 0.7)
    latents = torch.randn(4, 8)
    a = run_sampler(ours, denoise, latents)
    b = latents * ours.sigmas[0]
    for t in theirs.timesteps:
        b = theirs.step(denoise(b, t), t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_second_order_state_machine():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(3)
    x = torch.randn(3)
    assert scheduler.state_in_first_order
    out = scheduler.step(torch.zeros(3), scheduler.timesteps[0], x).prev_sample
    assert not scheduler.state_in_first_order
    scheduler.step(torch.zeros(3), scheduler.timesteps[1], out)
    assert scheduler.state_in_first_order and scheduler.step_index == 2


def edm_heun_reference(denoise, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=40.0):
    """Karras et al. 2022, Algorithm 1 (deterministic), written out independently of the scheduler."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.double() * t[0]
    for n in range(num_steps):
        d = (x - denoise(x, t[n])) / t[n]
        x_next = x + (t[n + 1] - t[n]) * d
        if n < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t[n + 1])) / t[n + 1]
            x_next = x + (t[n + 1] - t[n]) * (d + d_prime) / 2
        x = x_next
    return x


def test_matches_edm_algorithm_1():
    denoise = gaussian_denoiser(1.5, 0.5)
    latents = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(10)
    ours = run_sampler(scheduler, denoise, latents)
    torch.testing.assert_close(ours.double(), edm_heun_reference(denoise, latents, 10), rtol=1e-4, atol=1e-4)


def test_exact_gaussian_denoiser_gives_data_distribution():
    # With enough steps the ODE solution maps N(0, sigma_max^2) onto the data distribution. (With DIRECTOR's 10
    # steps the discretisation error is visible on this 1-D toy: std 0.61 instead of 0.5, identical in Algorithm 1.)
    latents = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    mean, std = 1.5, 0.5
    for rho in (7.0, 40.0):
        scheduler = EDMHeunScheduler(rho=rho)
        scheduler.set_timesteps(40)
        samples = run_sampler(scheduler, gaussian_denoiser(mean, std), latents)
        assert samples.mean().item() == pytest.approx(mean, abs=0.03)
        assert samples.std().item() == pytest.approx(std, rel=0.03)


def test_single_step_is_denoised_sample():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(1)
    assert len(scheduler.timesteps) == 1
    x = torch.randn(5)
    out = scheduler.step(torch.full((5,), 2.0), scheduler.timesteps[0], x).prev_sample
    torch.testing.assert_close(out, torch.full((5,), 2.0))


def test_save_load_and_custom_sigmas(tmp_path):
    scheduler = EDMHeunScheduler(rho=12.0, sigma_max=20.0)
    scheduler.save_pretrained(tmp_path)
    loaded = EDMHeunScheduler.from_pretrained(tmp_path)
    assert loaded.config.rho == 12.0 and loaded.config.sigma_max == 20.0
    loaded.set_timesteps(sigmas=[5.0, 1.0, 0.1])
    assert loaded.timesteps.tolist() == pytest.approx([5.0, 1.0, 1.0, 0.1, 0.1])
    assert math.isclose(loaded.init_noise_sigma, 5.0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        EDMHeunScheduler(sigma_min=1.0, sigma_max=0.5)
    scheduler = EDMHeunScheduler()
    with pytest.raises(ValueError):
        scheduler.set_timesteps(0)
    with pytest.raises(TypeError):
        scheduler.set_timesteps(2.5)
    with pytest.raises(ValueError):
        scheduler.set_timesteps(sigmas=[1.0, 2.0])
    with pytest.raises(ValueError):
        scheduler.set_timesteps(3, sigmas=[1.0])


# ---------------------------------------------------------------------------------------------------------------------
# diffusers' SchedulerMixin contract, checked the way diffusers' own scheduler tests (SchedulerCommonTest and the
# EDMEulerScheduler overrides) check it.

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def dummy_sample():
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def test_compatibles_convert_both_ways():
    scheduler = EDMHeunScheduler(sigma_max=20.0, rho=7.0)
    assert [c.__name__ for c in scheduler.compatibles if c is not EDMHeunScheduler] != []
    assert {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"} <= {c.__name__ for c in scheduler.compatibles}
    assert all(c is not None for c in scheduler.compatibles)
    for compatible in scheduler.compatibles:
        other = compatible.from_config(scheduler.config)
        assert other.config.sigma_max == 20.0 and other.config.rho == 7.0
        back = EDMHeunScheduler.from_config(other.config)
        # as in diffusers' test_compatibles: the round trip gives the same config, extra keys only from elsewhere
        assert {k: v for k, v in back.config.items() if k in scheduler.config} == dict(scheduler.config)
        init_keys = inspect.signature(EDMHeunScheduler.__init__).parameters.keys()
        assert not {k for k in back.config if k not in scheduler.config} & set(init_keys)


def test_from_config_of_diffusers_edm_schedulers():
    for other_class in (EDMEulerScheduler, EDMDPMSolverMultistepScheduler):
        # stock defaults: each class keeps its own defaults for values the other only defaulted (diffusers' rule)
        default = EDMHeunScheduler.from_config(other_class().config)
        assert isinstance(default, EDMHeunScheduler) and default.config.rho == 40.0
        assert other_class.from_config(EDMHeunScheduler().config).config.rho == 7.0
        # values set explicitly travel, the schedule included
        other = other_class(sigma_min=0.01, sigma_max=30.0, sigma_data=0.3, rho=9.0, sigma_schedule="exponential")
        ours = EDMHeunScheduler.from_config(other.config)
        config = ours.config
        assert (config.sigma_min, config.sigma_max, config.sigma_data, config.rho) == (0.01, 30.0, 0.3, 9.0)
        assert config.sigma_schedule == "exponential"
        ours.set_timesteps(8)
        other.set_timesteps(8)
        unique = torch.cat([ours.sigmas[:1], ours.sigmas[1:-1:2], ours.sigmas[-1:]])
        torch.testing.assert_close(unique, other.sigmas.float(), rtol=1e-5, atol=1e-6)
        again = other_class.from_config(ours.config)
        assert again.config.sigma_schedule == "exponential" and again.config.rho == 9.0


def test_from_pretrained_and_save_pretrained_give_the_same_steps(tmp_path):
    scheduler = EDMHeunScheduler(num_train_timesteps=256, sigma_min=0.002, sigma_max=80.0)
    scheduler.save_pretrained(tmp_path)
    new_scheduler = EDMHeunScheduler.from_pretrained(tmp_path)
    config = dict(scheduler.config)
    del config["_use_default_values"]
    assert config == new_scheduler.config
    sample = dummy_sample()
    for s in (scheduler, new_scheduler):
        s.set_timesteps(10)
    timestep = scheduler.timesteps[0]
    output = scheduler.step(0.1 * scheduler.scale_model_input(sample, timestep), timestep, sample).prev_sample
    new_output = new_scheduler.step(0.1 * new_scheduler.scale_model_input(sample, timestep), timestep, sample)
    assert torch.sum(torch.abs(output - new_output.prev_sample)) < 1e-5


def test_public_api_and_scale_model_input_with_any_timestep():
    scheduler = EDMHeunScheduler()
    assert isinstance(scheduler.init_noise_sigma, float) and scheduler.order == 2
    sample = dummy_sample()
    # diffusers' test_scheduler_public_api / test_add_noise_device call scale_model_input(sample, 0.0) on a fresh
    # scheduler; an identity scaling must not care whether the timestep is in the schedule
    assert scheduler.scale_model_input(sample, 0.0).shape == sample.shape
    assert scheduler.step_index is None
    assert len(scheduler) == scheduler.config.num_train_timesteps


def test_step_shape_and_return_dict_false():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(10)
    sample = dummy_sample()
    t0, t1 = scheduler.timesteps[0], scheduler.timesteps[1]
    residual = 0.1 * scheduler.scale_model_input(sample, t0)
    output_0 = scheduler.step(residual, t0, sample).prev_sample
    output_1 = scheduler.step(residual, t1, sample).prev_sample
    assert output_0.shape == sample.shape == output_1.shape

    scheduler.set_timesteps(10)
    as_dict = scheduler.step(residual, t0, sample)
    scheduler.set_timesteps(10)
    as_tuple = scheduler.step(residual, t0, sample, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.prev_sample)
    torch.testing.assert_close(as_tuple[1], as_dict.pred_original_sample)


@pytest.mark.parametrize("device", DEVICES)
def test_set_timesteps_on_a_device_and_full_loop(device):
    denoise = gaussian_denoiser(0.3, 0.7)
    latents = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    reference = EDMHeunScheduler()
    reference.set_timesteps(6)
    expected = run_sampler(reference, denoise, latents)

    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(6, device=device)
    assert scheduler.timesteps.device.type == device
    torch.testing.assert_close(scheduler.timesteps.cpu(), reference.timesteps)
    sample = latents.to(device) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        sample = scheduler.step(denoise(model_input, t), t, sample, return_dict=False)[0]
    assert sample.device.type == device
    torch.testing.assert_close(sample.cpu(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_noise_with_the_schedulers_own_timesteps(device, dtype):
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(100, device=device)
    sample = dummy_sample().to(device=device, dtype=dtype)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    # diffusers' test_add_noise_device
    scaled_sample = scheduler.scale_model_input(sample, 0.0)
    noised = scheduler.add_noise(scaled_sample, noise, scheduler.timesteps[5][None])
    assert noised.shape == sample.shape and noised.dtype == dtype and noised.device.type == device
    sigma = float(scheduler.sigmas[5])
    expected = (sample.double() + sigma * noise.double()).to(dtype)
    torch.testing.assert_close(noised, expected, rtol=1e-2, atol=1e-2)
    # img2img style: one timestep repeated per sample, or one per sample; cast to the sample dtype or not; from the
    # CPU for samples elsewhere
    for timesteps in (
        scheduler.timesteps[:1].repeat(4),
        scheduler.timesteps[[0, 10, 50, 99]],
        scheduler.timesteps[[0, 10, 50, 99]].to(dtype),
        scheduler.timesteps[3],
        scheduler.timesteps[[0, 10, 50, 99]].cpu(),
    ):
        noised = scheduler.add_noise(sample, noise, timesteps)
        sigmas = torch.as_tensor(timesteps).double().cpu().flatten().view(-1, 1, 1, 1)
        expected = sample.double().cpu() + sigmas * noise.double().cpu()
        torch.testing.assert_close(noised.double().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_add_noise_rejects_timesteps_that_do_not_fit():
    scheduler = EDMHeunScheduler()
    sample = torch.zeros(1, 5, 9)
    with pytest.raises(ValueError, match="one per sample"):
        scheduler.add_noise(sample, torch.ones_like(sample), scheduler.timesteps[:5])  # would broadcast to (5, 5, 9)
    with pytest.raises(ValueError, match=">= 0"):
        scheduler.add_noise(sample, torch.ones_like(sample), torch.tensor([-1.0]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_step_finds_timesteps_cast_to_a_lower_precision(dtype):
    denoise = gaussian_denoiser(0.3, 0.7)
    latents = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    reference = EDMHeunScheduler(sigma_max=79.3)  # 79.3 is not a float16 or bfloat16 number
    reference.set_timesteps(10)
    expected = run_sampler(reference, denoise, latents)
    scheduler = EDMHeunScheduler(sigma_max=79.3)
    scheduler.set_timesteps(10)
    sample = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps.to(dtype):  # a pipeline that casts its timesteps to the model dtype
        sample = scheduler.step(denoise(sample, t.float()), t, sample).prev_sample
    torch.testing.assert_close(sample, expected, rtol=0.05, atol=0.05)


def test_begin_index_and_unknown_timestep():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(3), 12345.0, torch.zeros(3))
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)  # img2img: start at the third model call, whatever timestep is passed
    scheduler.step(torch.zeros(3), scheduler.timesteps[2], torch.ones(3))
    assert scheduler.step_index == 3


def test_exponential_schedule_and_bad_schedule_name():
    ours = EDMHeunScheduler(sigma_schedule="exponential")
    theirs = EDMEulerScheduler(sigma_schedule="exponential", sigma_min=0.002, sigma_max=80.0)
    ours.set_timesteps(7)
    theirs.set_timesteps(7)
    unique = torch.cat([ours.sigmas[:1], ours.sigmas[1:-1:2], ours.sigmas[-1:]])
    torch.testing.assert_close(unique, theirs.sigmas.float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sigma_schedule"):
        EDMHeunScheduler(sigma_schedule="linear")
