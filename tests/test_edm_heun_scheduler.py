import math

import pytest
import torch
from diffusers import EDMEulerScheduler, HeunDiscreteScheduler

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
    assert scheduler.order == 2 and scheduler._compatibles == []
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
