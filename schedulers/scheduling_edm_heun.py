"""EDM second-order Heun sampler with Karras sigmas (Karras et al., "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022, Algorithm 1 without stochastic churn), as used by DIRECTOR:
10 steps from sigma 80 down to 0.002 with rho = 40, then one Euler step to sigma 0.

The model is expected to return the denoised sample `D(x; sigma)` (EDM preconditioning inside the model, as in
`storydiff.DirectorModel`). `timesteps` are the noise levels themselves, so a pipeline calls
`model(sample, t)` with `t` from `scheduler.timesteps`.
"""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput


@dataclass
class EDMHeunSchedulerOutput(BaseOutput):
    """
    Args:
        prev_sample (`torch.Tensor`): the sample for the next model call.
        pred_original_sample (`torch.Tensor`): the denoised sample the step used.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """`sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`, `i = 0..N-1`, float64."""
    ramp = (
        torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    )
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """`num_steps` noise levels evenly spaced in log from `sigma_max` down to `sigma_min` (k-diffusion's
    `get_sigmas_exponential`, diffusers' EDM `sigma_schedule="exponential"`), float64."""
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


SIGMA_SCHEDULES = ("karras", "exponential")


class EDMHeunScheduler(SchedulerMixin, ConfigMixin):
    r"""Deterministic EDM Heun sampler over Karras sigmas.

    Like diffusers' `HeunDiscreteScheduler`, every Heun step takes two `step` calls (`order = 2`): `timesteps` holds
    `[s_0, s_1, s_1, s_2, s_2, ..., s_{N-1}, s_{N-1}]` (2N - 1 model calls). The first call of a pair makes an Euler
    step and stores it (`state_in_first_order` is then `False`); the second evaluates the model at the Euler
    estimate and applies the trapezoidal correction. The last step goes to sigma 0 and is Euler only.

    Configs convert both ways with diffusers' EDM schedulers (`_compatibles`): `EDMHeunScheduler.from_config(
    EDMEulerScheduler(...).config)` keeps `sigma_min`, `sigma_max`, `sigma_data`, `rho` and `sigma_schedule`, and
    `EDMEulerScheduler.from_config(EDMHeunScheduler(...).config)` likewise. The model contract differs, though: this
    scheduler hands out the noise levels as `timesteps`, scales nothing and expects the model to return the denoised
    sample (the model does its own EDM preconditioning, as `DirectorModel` does), whereas diffusers' EDM schedulers
    hand out `c_noise`, scale inputs by `c_in` and precondition a raw network output (`prediction_type`, which this
    scheduler therefore does not take). Swap between them only together with a model built for the other contract.

    Args:
        sigma_min (`float`, defaults to 0.002): the smallest noise level sampled.
        sigma_max (`float`, defaults to 80.0): the starting noise level; `init_noise_sigma`.
        sigma_data (`float`, defaults to 0.5): the data standard deviation the model was trained with (kept here
            for pipelines and training scripts; sampling itself does not use it).
        rho (`float`, defaults to 40.0): Karras schedule exponent (DIRECTOR uses 40; EDM's image default is 7).
        num_train_timesteps (`int`, defaults to 1000): unused by sampling; kept for diffusers' scheduler API.
        sigma_schedule (`str`, defaults to `"karras"`): `"karras"` (EDM's schedule, spaced by `rho`) or
            `"exponential"` (evenly spaced in log sigma, `rho` unused), as in diffusers' EDM schedulers.
    """

    # diffusers' EDM schedulers whose configs this one reads and writes (see the class docstring for the model side)
    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        rho: float = 40.0,
        num_train_timesteps: int = 1000,
        sigma_schedule: str = "karras",
    ):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")
        if rho <= 0:
            raise ValueError(f"`rho` must be > 0, got {rho}.")
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"`sigma_schedule` must be one of {SIGMA_SCHEDULES}, got {sigma_schedule!r}.")
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._step_index = None
        self._begin_index = None
        self._reset_state()
        self.set_timesteps(10)

    def _reset_state(self):
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise: `sigma_max` (the first sigma of the schedule)."""
        return float(self.sigmas[0]) if self.sigmas is not None else self.config.sigma_max

    @property
    def state_in_first_order(self) -> bool:
        return self.dt is None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Union[List[float], torch.Tensor]] = None,
    ):
        """Prepare the schedule for `num_inference_steps` Heun steps (or for custom decreasing `sigmas`, 0 excluded).

        `timesteps` are put on `device` (the pipeline's, for the model calls); `sigmas` stay on the CPU, as in
        diffusers' EDM schedulers, so that `step` needs no device round trip to read them.
        """
        if (num_inference_steps is None) == (sigmas is None):
            raise ValueError("Pass exactly one of `num_inference_steps` or `sigmas`.")
        if sigmas is None:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
                raise TypeError(f"`num_inference_steps` must be an int, got {type(num_inference_steps).__name__}.")
            if num_inference_steps < 1:
                raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
            config = self.config
            if config.sigma_schedule == "exponential":
                sigmas = exponential_sigmas(num_inference_steps, config.sigma_min, config.sigma_max)
            else:
                sigmas = karras_sigmas(num_inference_steps, config.sigma_min, config.sigma_max, config.rho)
        else:
            sigmas = torch.as_tensor(sigmas).detach().cpu().to(torch.float64).flatten()
            if len(sigmas) == 0 or not torch.all(sigmas > 0) or not torch.all(sigmas[1:] < sigmas[:-1]):
                raise ValueError("Custom `sigmas` must be positive and strictly decreasing (0 is appended).")
        self.num_inference_steps = len(sigmas)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
        # [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0]: one entry per `step` call plus the final 0
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        self.timesteps = self.sigmas[:-1].to(device)
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Position of `timestep` (a noise level from `timesteps`, on any device, in any float dtype) in the schedule.

        A timestep given in a lower precision than the schedule's (say cast to the pipeline's float16) is matched
        against the schedule rounded to that precision; a repeated noise level is entered at its first (Euler) call.
        """
        # `sigmas[:-1]` equals `timesteps` and lives on the CPU
        schedule_timesteps = self.sigmas[:-1] if schedule_timesteps is None else schedule_timesteps.detach().cpu()
        timestep = torch.as_tensor(timestep).detach().cpu()
        if timestep.numel() != 1:
            raise ValueError(f"Expected one timestep, got a tensor of shape {tuple(timestep.shape)}.")
        timestep = timestep.reshape(())
        if (
            timestep.is_floating_point()
            and torch.finfo(timestep.dtype).bits < torch.finfo(schedule_timesteps.dtype).bits
        ):
            schedule_timesteps = schedule_timesteps.to(timestep.dtype)
        timestep = timestep.to(schedule_timesteps.dtype)
        indices = torch.isclose(schedule_timesteps.double(), timestep.double(), rtol=1e-6, atol=0).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"Timestep {float(timestep)} is not in the schedule: pass one of `scheduler.timesteps` "
                f"({len(schedule_timesteps)} noise levels from {float(schedule_timesteps.max()):.4g} down to "
                f"{float(schedule_timesteps.min()):.4g}), or call `set_begin_index` first."
            )
        return int(indices[0].item())

    def _init_step_index(self, timestep):
        if self.begin_index is None:
            self._step_index = self.index_for_timestep(timestep)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: the EDM input scaling `c_in` is applied inside the model. `timestep` is accepted for diffusers'
        API and not needed (the step index is found by `step`), so any value, in the schedule or not, is fine."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[EDMHeunSchedulerOutput, Tuple[torch.Tensor, torch.Tensor]]:
        """One of the two calls of a Heun step.

        Args:
            model_output (`torch.Tensor`): the denoised sample `D(sample; timestep)` predicted by the model.
            timestep (`float` or `torch.Tensor`): the current noise level, from `timesteps`.
            sample (`torch.Tensor`): the current sample (the one the model was called on).
        """
        if self.timesteps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        if self.step_index >= len(self.timesteps):
            raise ValueError("The schedule is finished; call `set_timesteps` again to sample anew.")

        if self.state_in_first_order:
            sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        else:
            sigma, sigma_next = self.sigmas[self.step_index - 1], self.sigmas[self.step_index]
        last_step = bool(sigma_next == 0)  # read on the CPU, where `sigmas` live: no device sync
        sigma, sigma_next = sigma.to(sample.device), sigma_next.to(sample.device)
        denoised = model_output.to(device=sample.device, dtype=torch.float32)
        current = sample.to(torch.float32)

        if self.state_in_first_order:
            derivative = (current - denoised) / sigma
            dt = sigma_next - sigma
            prev_sample = current + derivative * dt
            if not last_step:  # keep the Euler step for the correction; the last step (to 0) is Euler only
                self.prev_derivative, self.dt, self.sample = derivative, dt, current
        else:
            derivative = (current - denoised) / sigma_next
            derivative = (self.prev_derivative + derivative) / 2
            prev_sample = self.sample + derivative * self.dt
            self._reset_state()

        self._step_index += 1
        prev_sample = prev_sample.to(sample.dtype)
        if not return_dict:
            return prev_sample, model_output
        return EDMHeunSchedulerOutput(prev_sample=prev_sample, pred_original_sample=model_output)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """`x + sigma * noise`, where `timesteps` are the noise levels: values of `scheduler.timesteps` (on any device,
        in any float dtype) or any other sigma >= 0 (EDM training draws them freely), one per sample or one for all.
        The result has the dtype and device of `original_samples`, as in diffusers' EDM schedulers."""
        sigma = torch.as_tensor(timesteps).detach().to(device=original_samples.device, dtype=torch.float32).flatten()
        batch = original_samples.shape[0] if original_samples.ndim > 0 else 1
        if sigma.numel() not in (1, batch):
            raise ValueError(
                f"`timesteps` must hold one noise level or one per sample ({batch}), got {sigma.numel()}."
            )
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError(f"`timesteps` are noise levels and must be finite and >= 0, got {sigma.tolist()}.")
        sigma = sigma.to(original_samples.dtype).view(-1, *([1] * (original_samples.ndim - 1)))
        noise = noise.to(device=original_samples.device, dtype=original_samples.dtype)
        return original_samples + sigma * noise

    def __len__(self):
        return self.config.num_train_timesteps
