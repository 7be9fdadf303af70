"""Classifier-free guidance weight schedules (Wang et al., "Analysis of Classifier-Free Guidance Weight
Schedulers", TMLR 2024).

Convention (pinned down here, tested in tests/test_guidance_schedule.py, documented in docs/):

* diffusers writes CFG as ``eps_u + g * (eps_c - eps_u)``; the paper writes ``eps_c + w * (eps_c - eps_u)``.
  They are the same when ``g = 1 + w``. ``guidance_scale`` is always diffusers' ``g``; the shapes act on
  ``w = guidance_scale - 1``; :meth:`GuidanceSchedule.scales` returns diffusers scales ``g_i = 1 + w_i``.
* With ``N`` steps run, step ``i = 0 .. N-1`` (``i = 0`` is the noisiest) has sampling progress
  ``s_i = i / (N - 1)`` and paper time ``t/T = 1 - s_i``. A single step (``N = 1``) runs at full weight ``w``
  (floored by the clamp of the clamp kinds).
* Normalised kinds (linear, invlinear, cosine, sine, v-shape, lambda-shape) are rescaled over the steps
  actually run so that ``mean(w_i) == w``: the schedule redistributes guidance, it does not add any. Lambda is
  zero at both ends, so with ``N = 2`` it has no area and falls back to the constant weight ``w``.
* Increasing kinds (linear, cosine, pcs) start at ``w_0 = 0``, so the first step needs no unconditional
  pass; pipelines skip the unconditional half of the batch on every step where ``w_i == 0``.
"""

import inspect
import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

# Shapes f(s) of sampling progress s in [0, 1]; w_i = w * f(s_i) / mean_i f(s_i).
# The paper states them in diffusion time t/T = 1 - s, e.g. linear 1 - t/T and cosine cos(pi t/T) + 1.
_NORMALISED_SHAPES = {
    "linear": lambda s: s,
    "invlinear": lambda s: 1.0 - s,
    "cosine": lambda s: 1.0 - torch.cos(math.pi * s),
    "sine": lambda s: 1.0 + torch.cos(math.pi * s),
    # The thesis' piecewise formulas, read literally, give the opposite shapes to these names; we follow the
    # names: V is high at both ends and low in the middle, Lambda low at both ends and high in the middle.
    "v-shape": lambda s: (1.0 - 2.0 * s).abs(),
    "lambda-shape": lambda s: 1.0 - (1.0 - 2.0 * s).abs(),
}
_CLAMPED_SHAPES = {"clamp-linear": "linear", "clamp-cosine": "cosine"}

GUIDANCE_SCHEDULE_KINDS = (
    "static",
    *_NORMALISED_SHAPES,
    "pcs",
    *_CLAMPED_SHAPES,
    "interval",
    "custom",
    "callable",
)

ScaleFunction = Callable[[int, int, float], float]
GuidanceScheduleLike = Union[str, "GuidanceSchedule", Sequence[float], torch.Tensor, ScaleFunction, None]


class GuidanceSchedule(ConfigMixin):
    r"""A per-step classifier-free guidance weight schedule, saved and loaded like a diffusers config.

    Args:
        kind (`str`, defaults to `"static"`):
            One of `static`, `linear`, `invlinear`, `cosine`, `sine`, `v-shape`, `lambda-shape` (area-normalised:
            the mean weight over the run equals `w`), `pcs` (power-cosine, needs `power`), `clamp-linear` and
            `clamp-cosine` (need `clamp`), `interval` (needs `interval`), `custom` (needs `values`).
            A callable is wrapped with :meth:`from_callable` and cannot be saved.
        power (`float`, *optional*):
            Exponent `s > 0` of `pcs`: `w_i = w * (1 - cos(pi * s_i**power)) / 2`. The paper's best values are 1 for
            SD1.5 and 0.1 for SDXL.
        clamp (`float`, *optional*):
            Floor `c >= 0` of the clamp kinds, in the paper's `w` units (`w = guidance_scale - 1`):
            `w_i = max(c, w_i(heuristic))`, where the heuristic is the normalised linear or cosine schedule. The
            paper's best values are 2 for SD1.5 and 4 for SDXL. The floor applies even at `guidance_scale = 1`.
        interval (`tuple[float, float]`, *optional*):
            `(start, end)` with `0 <= start < end <= 1`, a window of sampling progress `s_i`. Steps inside it
            (`start <= s_i <= end`) use the full weight `w`, steps outside use no guidance at all (Kynkaanniemi
            et al. 2024). Not normalised.
        values (`list[float]`, *optional*):
            Per-step diffusers guidance scales `g_i >= 1` for `custom`, step 0 (noisiest) first. Their length must
            equal `num_inference_steps`; `guidance_scale` is then ignored.

    Convention: with `N` steps, step `i` (0 = noisiest) has progress `s_i = i / (N - 1)`, the paper's diffusion
    time is `t/T = 1 - s_i`, and the shapes act on the paper's weight `w = guidance_scale - 1`, giving diffusers
    scales `g_i = 1 + w_i`. Shapes as functions of `s` (before normalisation to mean `w`): linear `s`, invlinear
    `1 - s`, cosine `1 - cos(pi s)`, sine `1 + cos(pi s)`, v-shape `|1 - 2s|`, lambda-shape `1 - |1 - 2s|`.
    `N = 1` runs at full weight.

    Example:
        ```py
        >>> from storydiff import GuidanceSchedule
        >>> GuidanceSchedule("linear").scales(guidance_scale=3.0, num_inference_steps=5)
        tensor([1.0000, 2.0000, 3.0000, 4.0000, 5.0000], dtype=torch.float64)
        ```
    """

    config_name = "guidance_schedule_config.json"

    @register_to_config
    def __init__(
        self,
        kind: str = "static",
        power: Optional[float] = None,
        clamp: Optional[float] = None,
        interval: Optional[Sequence[float]] = None,
        values: Optional[Sequence[float]] = None,
    ):
        if not isinstance(kind, str):
            raise TypeError(f"`kind` must be a string, got {type(kind).__name__}.")
        if kind not in GUIDANCE_SCHEDULE_KINDS:
            raise ValueError(
                f"Unknown guidance schedule kind {kind!r}. Valid kinds: {', '.join(GUIDANCE_SCHEDULE_KINDS)}."
            )
        self._check_parameters(kind, power, clamp, interval, values)
        # Store plain floats so that tuples, numpy values or tensors given by the user save as JSON.
        if interval is not None:
            self.register_to_config(interval=[float(bound) for bound in interval])
        if values is not None:
            self.register_to_config(values=[float(value) for value in values])
        _fix_use_default_values(self)
        self._scale_function: Optional[ScaleFunction] = None

    @staticmethod
    def _check_parameters(kind, power, clamp, interval, values):
        def finite_number(name, value):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
            if not math.isfinite(value):
                raise ValueError(f"`{name}` must be finite, got {value}.")

        def unused(name, value):
            if value is not None:
                raise ValueError(f"`{name}` is not a parameter of the {kind!r} schedule; leave it as None.")

        if kind == "pcs":
            if power is None:
                raise ValueError("The 'pcs' schedule needs `power` (> 0), e.g. 1.0 for SD1.5 or 0.1 for SDXL.")
            finite_number("power", power)
            if power <= 0:
                raise ValueError(f"`power` of the 'pcs' schedule must be > 0, got {power}.")
        else:
            unused("power", power)

        if kind in _CLAMPED_SHAPES:
            if clamp is None:
                raise ValueError(f"The {kind!r} schedule needs `clamp` (>= 0, in w units), e.g. 2 for SD1.5.")
            finite_number("clamp", clamp)
            if clamp < 0:
                raise ValueError(f"`clamp` must be >= 0 (it is a guidance weight w), got {clamp}.")
        else:
            unused("clamp", clamp)

        if kind == "interval":
            if interval is not None and not isinstance(interval, (list, tuple)):
                raise TypeError(f"`interval` must be a (start, end) pair, got {type(interval).__name__}.")
            if interval is None or len(interval) != 2:
                raise ValueError(f"The 'interval' schedule needs `interval=(start, end)`, got {interval!r}.")
            for bound in interval:
                finite_number("interval", bound)
            start, end = interval
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"`interval` must satisfy 0 <= start < end <= 1, got ({start}, {end}).")
        else:
            unused("interval", interval)

        if kind == "custom":
            if isinstance(values, torch.Tensor):
                values = values.tolist() if values.ndim == 1 else values
            if values is not None and not isinstance(values, (list, tuple)):
                raise TypeError(f"`values` must be a list of per-step scales, got {type(values).__name__}.")
            if values is None or len(values) == 0:
                raise ValueError("The 'custom' schedule needs a non-empty list of per-step scales in `values`.")
            for value in values:
                finite_number("values", value)
            if min(float(value) for value in values) < 1.0:
                raise ValueError(
                    f"Per-step guidance scales must be >= 1 (1 turns guidance off for that step), got {min(values)}."
                )
        else:
            unused("values", values)

    @classmethod
    def from_callable(cls, function: ScaleFunction) -> "GuidanceSchedule":
        """Wrap `function(step_index, num_inference_steps, guidance_scale) -> scale`, returning diffusers scales
        `g_i >= 1` with step 0 the noisiest. Such a schedule works everywhere but cannot be saved."""
        if not callable(function):
            raise TypeError(f"Expected a callable, got {type(function).__name__}.")
        schedule = cls(kind="callable")
        schedule._scale_function = function
        return schedule

    @classmethod
    def from_any(cls, schedule: GuidanceScheduleLike) -> "GuidanceSchedule":
        """Normalise what users pass as `guidance_schedule=`: a kind name, a `GuidanceSchedule`, a list or 1-D
        tensor of per-step scales, a callable, or None (static)."""
        if schedule is None:
            return cls()
        if isinstance(schedule, GuidanceSchedule):
            return schedule
        if isinstance(schedule, str):
            return cls(kind=schedule)
        if isinstance(schedule, torch.Tensor):
            if schedule.ndim != 1:
                raise ValueError(
                    f"A tensor schedule must be 1-D (one scale per step), got shape {tuple(schedule.shape)}."
                )
            return cls(kind="custom", values=schedule.tolist())
        if isinstance(schedule, (list, tuple)):
            return cls(kind="custom", values=list(schedule))
        if type(schedule).__module__ == "numpy" and hasattr(schedule, "tolist"):  # numpy array, without importing it
            return cls.from_any(torch.as_tensor(schedule))
        if callable(schedule):
            return cls.from_callable(schedule)
        raise TypeError(
            "`guidance_schedule` must be a kind name, a GuidanceSchedule, a list of per-step scales or a callable, "
            f"got {type(schedule).__name__}."
        )

    @property
    def is_static(self) -> bool:
        return self.config.kind == "static"

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        if self.config.kind == "callable":
            raise ValueError("A schedule made from a callable cannot be saved; use a kind name or a list of scales.")
        return super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def scales(self, guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
        """Per-step diffusers guidance scales `g_i = 1 + w_i`, step 0 (noisiest) first, as a float64 tensor.

        `guidance_scale` is diffusers' `g`, so the paper's weight is `w = guidance_scale - 1`. The static
        schedule returns `guidance_scale` itself on every step, bit for bit, so that static pipelines equal
        stock ones. Other schedules need `guidance_scale >= 1`.
        """
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"`num_inference_steps` must be an int, got {type(num_inference_steps).__name__}.")
        if num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}.")
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.numel() == 1:
            guidance_scale = guidance_scale.item()
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real):
            raise TypeError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale}.")
        guidance_scale = float(guidance_scale)

        kind, steps = self.config.kind, num_inference_steps
        if kind == "static":
            return torch.full((steps,), float(guidance_scale), dtype=torch.float64)
        if kind == "custom":
            return self._custom_scales(steps)
        if kind == "callable":
            return self._callable_scales(guidance_scale, steps)
        if guidance_scale < 1:
            raise ValueError(
                f"The {kind!r} schedule needs guidance_scale >= 1 (diffusers' g = 1 + w), got {guidance_scale}."
            )
        scales = 1.0 + self._weights(guidance_scale - 1.0, steps)
        if not torch.isfinite(scales).all():
            # The normalised kinds reach up to 2w (lambda-shape more): a huge finite scale can overflow to inf.
            raise ValueError(
                f"guidance_scale={guidance_scale} makes the {kind!r} schedule overflow (a step scale is not finite); "
                "use a smaller guidance_scale."
            )
        return scales

    def _weights(self, w: float, steps: int) -> torch.Tensor:
        """Paper weights w_i for the built-in kinds."""
        kind = self.config.kind
        if steps == 1:
            # A single step has no progress to schedule over: it runs at full weight (still floored by a clamp).
            full = torch.full((1,), w, dtype=torch.float64)
            return full.clamp(min=self.config.clamp) if kind in _CLAMPED_SHAPES else full
        # i / (N - 1) rounded once, so that a fraction such as 0.7 compares equal to the literal 0.7 in `interval`
        progress = torch.arange(steps, dtype=torch.float64) / (steps - 1)
        if kind in _NORMALISED_SHAPES:
            return w * _normalised(_NORMALISED_SHAPES[kind](progress))
        if kind in _CLAMPED_SHAPES:
            heuristic = w * _normalised(_NORMALISED_SHAPES[_CLAMPED_SHAPES[kind]](progress))
            return heuristic.clamp(min=self.config.clamp)
        if kind == "pcs":
            return w * (1.0 - torch.cos(math.pi * progress.pow(self.config.power))) / 2.0
        if kind == "interval":
            start, end = self.config.interval
            inside = (progress >= start) & (progress <= end)
            return torch.where(inside, w, 0.0).to(torch.float64)
        raise AssertionError(f"unhandled kind {kind!r}")  # every kind is handled above

    def _custom_scales(self, steps: int) -> torch.Tensor:
        values = self.config.values
        if len(values) != steps:
            raise ValueError(
                f"The custom schedule has {len(values)} scales but num_inference_steps is {steps}; "
                "give exactly one scale per step."
            )
        return torch.tensor(values, dtype=torch.float64)

    def _callable_scales(self, guidance_scale: float, steps: int) -> torch.Tensor:
        if self._scale_function is None:
            raise ValueError(
                "This 'callable' schedule has no function (it was built from a config); use "
                "GuidanceSchedule.from_callable(function)."
            )
        scales = [self._scale_function(i, steps, guidance_scale) for i in range(steps)]
        for i, scale in enumerate(scales):
            if isinstance(scale, torch.Tensor) and scale.numel() == 1:
                scale = scale.item()
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise TypeError(
                    f"The schedule callable returned {type(scale).__name__} at step {i}, expected a float."
                )
            if not math.isfinite(scale) or scale < 1.0:
                raise ValueError(
                    f"The schedule callable returned {scale} at step {i}; scales must be finite and >= 1."
                )
            scales[i] = float(scale)
        return torch.tensor(scales, dtype=torch.float64)

    def __repr__(self) -> str:
        parameters = {
            key: value
            for key, value in self.config.items()
            if value is not None and key != "kind" and not key.startswith("_")
        }
        details = "".join(f", {key}={value!r}" for key, value in parameters.items())
        return f"GuidanceSchedule(kind={self.config.kind!r}{details})"


def _schedule_from_arguments(
    guidance_schedule: GuidanceScheduleLike, power, clamp, interval, values
) -> GuidanceSchedule:
    """The schedule of a component that takes `guidance_schedule` plus the parameters of a kind (guider, callback)."""
    if isinstance(guidance_schedule, str):
        return GuidanceSchedule(guidance_schedule, power=power, clamp=clamp, interval=interval, values=values)
    if any(parameter is not None for parameter in (power, clamp, interval, values)):
        raise ValueError(
            "`power`, `clamp`, `interval` and `values` go with a schedule kind name; leave them None when "
            f"`guidance_schedule` is a {type(guidance_schedule).__name__}."
        )
    return GuidanceSchedule.from_any(guidance_schedule)


def _fix_use_default_values(config_object: ConfigMixin) -> None:
    """diffusers' `register_to_config` lists positional arguments among the values "left at their default", and
    `from_config` then drops them: `from_config(GuidanceSchedule("linear").config)` would build a static schedule.
    Record as defaults only the values that really equal their default."""
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(type(config_object).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    config = config_object.config
    used_defaults = [name for name, default in defaults.items() if name in config and config[name] == default]
    config_object.register_to_config(_use_default_values=used_defaults)


def _normalised(shape: torch.Tensor) -> torch.Tensor:
    """Rescale a shape to mean 1 over the steps actually run. A shape that is zero everywhere (Lambda with two
    steps: both ends are zero) falls back to constant weight, which keeps the mean equal to w."""
    mean = shape.mean()
    if mean <= 0:
        return torch.ones_like(shape)
    return shape / mean


def guidance_scales(schedule: GuidanceScheduleLike, guidance_scale: float, num_inference_steps: int) -> torch.Tensor:
    """Shorthand for `GuidanceSchedule.from_any(schedule).scales(guidance_scale, num_inference_steps)`."""
    return GuidanceSchedule.from_any(schedule).scales(guidance_scale, num_inference_steps)


def schedule_step_indices(timesteps: torch.Tensor, num_inference_steps: int, order: int) -> list[int]:
    """Index into the guidance schedule for every denoiser evaluation of the loop.

    Most schedulers evaluate the denoiser once per step. PNDM repeats a timestep in its warm-up and Heun evaluates
    twice per step at repeated timesteps: evaluations at the same timestep share a schedule step. KDPM2 evaluates at
    intermediate timesteps: its evaluations are grouped by the scheduler's order.
    """
    values = timesteps.tolist()
    if len(values) == num_inference_steps:
        return list(range(num_inference_steps))
    distinct = list(dict.fromkeys(values))
    if len(distinct) == num_inference_steps:
        position = {t: k for k, t in enumerate(distinct)}
        return [position[t] for t in values]
    return [min(i // order, num_inference_steps - 1) for i in range(len(values))]


def conditional_half(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The conditional half of a CFG batch, which diffusers concatenates as `[unconditional, conditional]`."""
    return None if tensor is None else tensor.chunk(2)[1]


class StepGuidance:
    r"""The guidance scale of every step of one pipeline call, with the one rule, shared by all storydiff pipelines,
    for a `callback_on_step_end` that changes `pipe._guidance_scale`.

    A pipeline builds one per call and asks `scale(schedule_step)` before each denoiser evaluation. Around a callback it
    calls `after_callback(seen, now)` with the `pipe._guidance_scale` the callback was shown and the value it left.
    The rule:

    * **static schedule**: every step uses the current guidance scale, which starts as the call's `guidance_scale`;
      a callback's new value wins from the next step on, exactly as in the stock diffusers pipelines.
    * **any other schedule**: every step uses the schedule's `g_i`; other values a callback sets are not applied,
      because the schedule decides each step's scale (to drive the scale from a callback, use the static schedule).
    * in both cases a callback that sets `pipe._guidance_scale <= 1` switches guidance off from the next step on (what
      diffusers' CFG cut-off callbacks do): those steps use `g = 1`, the conditional prediction alone, and skip the
      unconditional pass. A later callback may switch it back on with a value above 1.

    Args:
        schedule ([`GuidanceSchedule`]): the call's schedule.
        scales (`torch.Tensor`): its per-step scales, `schedule.scales(guidance_scale, num_inference_steps)`.
        guidance_scale (`float`): the call's `guidance_scale`.
    """

    def __init__(self, schedule: GuidanceSchedule, scales: torch.Tensor, guidance_scale: float):
        self.schedule = schedule
        self.scales = scales
        self.guidance_scale = float(guidance_scale)  # the static schedule's scale, as callbacks last set it
        self.switched_off = False  # a callback set `pipe._guidance_scale <= 1`

    def scale(self, schedule_step: int) -> float:
        """The scale `g` to apply at schedule step `schedule_step` (0 = noisiest)."""
        if self.switched_off:
            return 1.0
        if self.schedule.is_static:
            return self.guidance_scale
        return float(self.scales[schedule_step])

    def after_callback(self, seen, now) -> None:
        """Apply the rule to a callback that was shown `pipe._guidance_scale == seen` and left it at `now`."""
        if isinstance(now, torch.Tensor) and now.numel() == 1:
            now = now.item()
        if now == seen:
            return
        if isinstance(now, bool) or not isinstance(now, numbers.Real) or not math.isfinite(now):
            raise ValueError(
                f"A callback set `pipe._guidance_scale` to {now!r}; it must be a finite number (a value <= 1 switches "
                "guidance off)."
            )
        self.guidance_scale = float(now)
        self.switched_off = now <= 1
