"""GuidanceSchedule: exact values, the time convention, normalisation, edge cases, saving and every bad input."""

import math

import numpy as np
import pytest
import torch

from storydiff import GUIDANCE_SCHEDULE_KINDS, GuidanceSchedule, guidance_scales

ROOT2_HALF = math.sqrt(2.0) / 2.0
NORMALISED_KINDS = ["linear", "invlinear", "cosine", "sine", "v-shape", "lambda-shape"]
EVERY_BUILT_IN = [
    GuidanceSchedule("static"),
    *(GuidanceSchedule(kind) for kind in NORMALISED_KINDS),
    GuidanceSchedule("pcs", power=1.0),
    GuidanceSchedule("pcs", power=0.1),
    GuidanceSchedule("clamp-linear", clamp=2.0),
    GuidanceSchedule("clamp-cosine", clamp=4.0),
    GuidanceSchedule("interval", interval=(0.25, 0.75)),
]


def weights(schedule, guidance_scale, steps):
    return (schedule.scales(guidance_scale, steps) - 1.0).tolist()


# Hand-computed with guidance_scale 3 (w = 2) and N = 5 steps: s_i = 0, 1/4, 1/2, 3/4, 1 and t/T = 1 - s_i.
EXPECTED_N5_G3 = [
    (GuidanceSchedule("static"), [3.0, 3.0, 3.0, 3.0, 3.0]),
    # shape s, mean 1/2: w_i = 4 s_i
    (GuidanceSchedule("linear"), [1.0, 2.0, 3.0, 4.0, 5.0]),
    (GuidanceSchedule("invlinear"), [5.0, 4.0, 3.0, 2.0, 1.0]),
    # shape cos(pi t/T) + 1 = 1 - cos(pi s), mean 1: w_i = 2 (1 - cos(pi s_i))
    (GuidanceSchedule("cosine"), [1.0, 3.0 - math.sqrt(2.0), 3.0, 3.0 + math.sqrt(2.0), 5.0]),
    (GuidanceSchedule("sine"), [5.0, 3.0 + math.sqrt(2.0), 3.0, 3.0 - math.sqrt(2.0), 1.0]),
    # shape |1 - 2s| = 1, 1/2, 0, 1/2, 1 with mean 3/5: w_i = 10/3 |1 - 2 s_i|
    (GuidanceSchedule("v-shape"), [13 / 3, 8 / 3, 1.0, 8 / 3, 13 / 3]),
    # shape 1 - |1 - 2s| = 0, 1/2, 1, 1/2, 0 with mean 2/5: w_i = 5 (1 - |1 - 2 s_i|)
    (GuidanceSchedule("lambda-shape"), [1.0, 3.5, 6.0, 3.5, 1.0]),
    # w (1 - cos(pi s^p)) / 2, not normalised
    (GuidanceSchedule("pcs", power=1.0), [1.0, 2.0 - ROOT2_HALF, 2.0, 2.0 + ROOT2_HALF, 3.0]),
    # linear weights 0, 1, 2, 3, 4 floored at 1.5
    (GuidanceSchedule("clamp-linear", clamp=1.5), [2.5, 2.5, 3.0, 4.0, 5.0]),
    # cosine weights 0, 2 - sqrt 2, 2, 2 + sqrt 2, 4 floored at 1
    (GuidanceSchedule("clamp-cosine", clamp=1.0), [2.0, 2.0, 3.0, 3.0 + math.sqrt(2.0), 5.0]),
    # the window includes both ends
    (GuidanceSchedule("interval", interval=(0.25, 0.5)), [1.0, 3.0, 3.0, 1.0, 1.0]),
    (GuidanceSchedule("interval", interval=(0.0, 1.0)), [3.0, 3.0, 3.0, 3.0, 3.0]),
    (GuidanceSchedule("custom", values=[1.0, 7.0, 2.5, 1.0, 3.25]), [1.0, 7.0, 2.5, 1.0, 3.25]),
]


@pytest.mark.parametrize("schedule, expected", EXPECTED_N5_G3, ids=lambda value: repr(value))
def test_exact_values_for_every_kind(schedule, expected):
    scales = schedule.scales(guidance_scale=3.0, num_inference_steps=5)
    assert scales.dtype == torch.float64
    assert scales.shape == (5,)
    torch.testing.assert_close(scales, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)


def test_every_kind_has_an_expected_value_test():
    tested = {schedule.config.kind for schedule, _ in EXPECTED_N5_G3}
    assert tested == set(GUIDANCE_SCHEDULE_KINDS) - {"callable"}


def test_pcs_formula_for_other_powers():
    for power in (0.1, 0.5, 2.0, 5.0):
        for steps in (3, 7, 20):
            progress = np.arange(steps) / (steps - 1)
            expected = 4.5 * (1.0 - np.cos(np.pi * progress**power)) / 2.0
            actual = np.array(weights(GuidanceSchedule("pcs", power=power), 5.5, steps))
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-12)
            assert actual[0] == 0.0 and actual[-1] == pytest.approx(4.5, abs=1e-12)
    # p = 2 at the middle of 3 steps: (1 - cos(pi / 4)) / 2 * w
    assert weights(GuidanceSchedule("pcs", power=2.0), 3.0, 3)[1] == pytest.approx(1.0 - ROOT2_HALF, abs=1e-12)


def test_interval_window_with_fractional_bounds_is_exact():
    # s_i = i / 10: 0.3 and 0.7 are inside although 3 * 0.1 and 7 * 0.1 are not exactly 0.3 and 0.7 in floating point
    scales = GuidanceSchedule("interval", interval=(0.3, 0.7)).scales(4.0, 11).tolist()
    assert scales == [1.0, 1.0, 1.0, 4.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0]
    # a window falling between two steps guides none of them
    assert GuidanceSchedule("interval", interval=(0.3, 0.4)).scales(4.0, 3).tolist() == [1.0, 1.0, 1.0]
    # guidance only in the second half, as the paper suggests ("static CFG overshoots early")
    assert GuidanceSchedule("interval", interval=(0.5, 1.0)).scales(2.0, 4).tolist() == [1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize("kind", NORMALISED_KINDS)
def test_normalised_kinds_have_mean_weight_w(kind):
    schedule = GuidanceSchedule(kind)
    for guidance_scale in (1.0, 1.5, 7.5, 12.0):
        for steps in range(1, 80):
            w_i = schedule.scales(guidance_scale, steps) - 1.0
            assert abs(w_i.mean().item() - (guidance_scale - 1.0)) < 1e-12, (guidance_scale, steps)
            assert (w_i >= 0).all()


@pytest.mark.parametrize("steps", [3, 4, 5, 10, 50])
def test_directions(steps):
    w = 6.5

    def w_of(kind, **parameters):
        return torch.tensor(weights(GuidanceSchedule(kind, **parameters), 1.0 + w, steps))

    for rising in (w_of("linear"), w_of("cosine"), w_of("pcs", power=1.0), w_of("pcs", power=0.1)):
        assert rising[0] == 0.0  # the first (noisiest) step has no guidance
        assert (rising.diff() > 0).all()
    for falling in (w_of("invlinear"), w_of("sine")):
        assert falling[-1] == 0.0
        assert (falling.diff() < 0).all()
    middle = (steps - 1) / 2
    v_shape, lambda_shape = w_of("v-shape"), w_of("lambda-shape")
    for i in range(steps - 1):
        if i + 1 <= middle:  # first half: V falls, Lambda rises
            assert v_shape[i + 1] < v_shape[i] and lambda_shape[i + 1] > lambda_shape[i]
        elif i >= middle:  # second half: V rises, Lambda falls
            assert v_shape[i + 1] > v_shape[i] and lambda_shape[i + 1] < lambda_shape[i]
    assert v_shape[0] == v_shape.max() and v_shape[-1] == v_shape.max()
    assert lambda_shape[0] == 0.0 and lambda_shape[-1] == 0.0
    assert lambda_shape.max() > w and v_shape.min() < w


def test_linear_matches_the_paper_in_diffusion_time():
    # paper: w(t) proportional to 1 - t/T, with t/T = 1 - s_i, scaled so that the mean is w
    steps, w = 9, 4.0
    paper_time = 1.0 - np.arange(steps) / (steps - 1)
    expected = w * (1.0 - paper_time) / np.mean(1.0 - paper_time)
    np.testing.assert_allclose(weights(GuidanceSchedule("linear"), 1.0 + w, steps), expected, atol=1e-12)
    expected = w * (np.cos(np.pi * paper_time) + 1.0) / np.mean(np.cos(np.pi * paper_time) + 1.0)
    np.testing.assert_allclose(weights(GuidanceSchedule("cosine"), 1.0 + w, steps), expected, atol=1e-12)
    expected = w * (np.sin(np.pi * paper_time - np.pi / 2) + 1.0)
    np.testing.assert_allclose(weights(GuidanceSchedule("sine"), 1.0 + w, steps), expected, atol=1e-12)


def test_clamp_floors():
    for steps in (2, 5, 30):
        for clamp in (0.0, 1.0, 4.0, 10.0):
            for kind, base in (("clamp-linear", "linear"), ("clamp-cosine", "cosine")):
                clamped = torch.tensor(weights(GuidanceSchedule(kind, clamp=clamp), 7.5, steps))
                heuristic = torch.tensor(weights(GuidanceSchedule(base), 7.5, steps))
                torch.testing.assert_close(clamped, heuristic.clamp(min=clamp), rtol=0, atol=0)
                assert clamped.min() >= clamp
    # clamp 0 is the plain heuristic; a clamp above every weight is static guidance at the clamp
    assert weights(GuidanceSchedule("clamp-linear", clamp=0.0), 3.0, 5) == weights(GuidanceSchedule("linear"), 3.0, 5)
    assert weights(GuidanceSchedule("clamp-linear", clamp=9.0), 3.0, 5) == [9.0] * 5


def test_single_step_runs_at_full_weight():
    for schedule in EVERY_BUILT_IN:
        assert schedule.scales(5.0, 1).tolist() == [5.0], schedule
    # even when the window would exclude a lone step; a clamp still floors it
    assert GuidanceSchedule("interval", interval=(0.5, 1.0)).scales(5.0, 1).tolist() == [5.0]
    assert GuidanceSchedule("clamp-linear", clamp=6.0).scales(5.0, 1).tolist() == [7.0]


def test_two_steps():
    w = 3.0
    expected = {
        "linear": [0.0, 2 * w],
        "invlinear": [2 * w, 0.0],
        "cosine": [0.0, 2 * w],
        "sine": [2 * w, 0.0],
        "v-shape": [w, w],
        # Lambda is zero at both ends, so with two steps it falls back to constant weight, keeping the mean at w
        "lambda-shape": [w, w],
    }
    for kind, expected_weights in expected.items():
        assert weights(GuidanceSchedule(kind), 1.0 + w, 2) == pytest.approx(expected_weights, abs=1e-12), kind
    assert weights(GuidanceSchedule("pcs", power=0.5), 1.0 + w, 2) == [0.0, w]
    assert weights(GuidanceSchedule("clamp-linear", clamp=1.0), 1.0 + w, 2) == [1.0, 2 * w]
    assert weights(GuidanceSchedule("interval", interval=(0.0, 0.5)), 1.0 + w, 2) == [w, 0.0]


@pytest.mark.parametrize("guidance_scale", [0.0, 0.5, 1.0, 1.1, 7.5, 7.000000000000001, 1e-300, 13.37, 1 / 3])
def test_static_returns_guidance_scale_bit_exactly(guidance_scale):
    scales = GuidanceSchedule().scales(guidance_scale, 7)
    assert all(value == guidance_scale for value in scales.tolist())
    assert (
        GuidanceSchedule().scales(torch.tensor(guidance_scale, dtype=torch.float64), 3).tolist()[0] == guidance_scale
    )
    assert guidance_scales(None, guidance_scale, 2).tolist() == [guidance_scale] * 2


def test_scale_one_is_no_guidance_except_under_a_clamp():
    for schedule in EVERY_BUILT_IN:
        if schedule.config.kind in ("clamp-linear", "clamp-cosine"):
            # max(c, 0) = c: the floor is a guidance weight of its own, as in the paper's formula
            assert schedule.scales(1.0, 6).tolist() == [1.0 + schedule.config.clamp] * 6
        else:
            assert schedule.scales(1.0, 6).tolist() == [1.0] * 6, schedule


@pytest.mark.parametrize("schedule", EVERY_BUILT_IN + [GuidanceSchedule("custom", values=[1.0, 2.0, 3.0])], ids=repr)
def test_save_load_round_trip(schedule, tmp_path):
    schedule.save_config(tmp_path)
    assert (tmp_path / "guidance_schedule_config.json").is_file()
    loaded = GuidanceSchedule.from_config(GuidanceSchedule.load_config(tmp_path))
    in_memory = GuidanceSchedule.from_config(schedule.config)
    for copy in (loaded, in_memory):
        assert copy.config.kind == schedule.config.kind
        assert repr(copy) == repr(schedule)
        torch.testing.assert_close(copy.scales(4.0, 3), schedule.scales(4.0, 3), rtol=0, atol=0)


def test_positional_kind_survives_from_config():
    # diffusers records positional arguments as "default values"; from_config must still see the kind
    assert GuidanceSchedule.from_config(GuidanceSchedule("cosine").config).config.kind == "cosine"
    assert GuidanceSchedule.from_config(GuidanceSchedule("pcs", 0.5).config).config.power == 0.5


def test_inputs_users_pass_as_guidance_schedule():
    assert GuidanceSchedule.from_any(None).config.kind == "static"
    assert GuidanceSchedule.from_any("sine").config.kind == "sine"
    schedule = GuidanceSchedule("linear")
    assert GuidanceSchedule.from_any(schedule) is schedule
    for per_step in ([1.0, 2.0, 3.5], (1, 2, 3.5), torch.tensor([1.0, 2.0, 3.5]), np.array([1.0, 2.0, 3.5])):
        converted = GuidanceSchedule.from_any(per_step)
        assert converted.config.kind == "custom"
        assert converted.scales(9.0, 3).tolist() == [1.0, 2.0, 3.5]  # guidance_scale is ignored
    assert GuidanceSchedule("custom", values=torch.tensor([1.5, 2.0])).config["values"] == [1.5, 2.0]

    def halfway(step_index, num_inference_steps, guidance_scale):
        return guidance_scale if step_index >= num_inference_steps // 2 else 1.0

    for function in (halfway, lambda i, n, g: torch.tensor(1.0 + i), lambda i, n, g: np.float32(1.0 + i)):
        converted = GuidanceSchedule.from_any(function)
        assert converted.config.kind == "callable"
    assert GuidanceSchedule.from_any(halfway).scales(5.0, 4).tolist() == [1.0, 1.0, 5.0, 5.0]
    assert GuidanceSchedule.from_callable(lambda i, n, g: torch.tensor(1.0 + i)).scales(5.0, 3).tolist() == [1, 2, 3]
    assert guidance_scales("linear", 3.0, 5).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert guidance_scales([2.0, 1.0], 3.0, 2).tolist() == [2.0, 1.0]


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="Unknown guidance schedule kind 'quadratic'") as error:
        GuidanceSchedule("quadratic")
    for kind in GUIDANCE_SCHEDULE_KINDS:
        assert kind in str(error.value)
    with pytest.raises(ValueError, match="Valid kinds"):
        GuidanceSchedule.from_any("Linear")
    with pytest.raises(TypeError, match="`kind` must be a string"):
        GuidanceSchedule(kind=3)


@pytest.mark.parametrize(
    "parameters, error, message",
    [
        ({"kind": "pcs"}, ValueError, "needs `power`"),
        ({"kind": "pcs", "power": 0.0}, ValueError, "must be > 0"),
        ({"kind": "pcs", "power": -1.0}, ValueError, "must be > 0"),
        ({"kind": "pcs", "power": float("nan")}, ValueError, "must be finite"),
        ({"kind": "pcs", "power": float("inf")}, ValueError, "must be finite"),
        ({"kind": "pcs", "power": "1"}, TypeError, "`power` must be a number"),
        ({"kind": "pcs", "power": True}, TypeError, "`power` must be a number"),
        ({"kind": "clamp-linear"}, ValueError, "needs `clamp`"),
        ({"kind": "clamp-cosine"}, ValueError, "needs `clamp`"),
        ({"kind": "clamp-linear", "clamp": -0.5}, ValueError, "must be >= 0"),
        ({"kind": "clamp-linear", "clamp": float("-inf")}, ValueError, "must be finite"),
        ({"kind": "clamp-cosine", "clamp": [2.0]}, TypeError, "`clamp` must be a number"),
        ({"kind": "interval"}, ValueError, "needs `interval"),
        ({"kind": "interval", "interval": (0.5,)}, ValueError, "needs `interval"),
        ({"kind": "interval", "interval": (0.1, 0.5, 0.9)}, ValueError, "needs `interval"),
        ({"kind": "interval", "interval": (0.5, 0.5)}, ValueError, "0 <= start < end <= 1"),
        ({"kind": "interval", "interval": (0.6, 0.2)}, ValueError, "0 <= start < end <= 1"),
        ({"kind": "interval", "interval": (-0.1, 0.5)}, ValueError, "0 <= start < end <= 1"),
        ({"kind": "interval", "interval": (0.5, 1.5)}, ValueError, "0 <= start < end <= 1"),
        ({"kind": "interval", "interval": (0.0, float("nan"))}, ValueError, "must be finite"),
        ({"kind": "interval", "interval": ("0", 1.0)}, TypeError, "`interval` must be a number"),
        ({"kind": "interval", "interval": "0,1"}, TypeError, "`interval` must be a \\(start, end\\) pair"),
        ({"kind": "interval", "interval": 0.5}, TypeError, "`interval` must be a \\(start, end\\) pair"),
        ({"kind": "custom"}, ValueError, "non-empty list"),
        ({"kind": "custom", "values": []}, ValueError, "non-empty list"),
        ({"kind": "custom", "values": [1.0, 0.5]}, ValueError, "must be >= 1"),
        ({"kind": "custom", "values": [1.0, float("nan")]}, ValueError, "must be finite"),
        ({"kind": "custom", "values": [float("inf")]}, ValueError, "must be finite"),
        ({"kind": "custom", "values": [1.0, "2"]}, TypeError, "`values` must be a number"),
        ({"kind": "custom", "values": [1.0, None]}, TypeError, "`values` must be a number"),
        ({"kind": "custom", "values": 2.0}, TypeError, "`values` must be a list"),
        ({"kind": "linear", "power": 1.0}, ValueError, "`power` is not a parameter of the 'linear' schedule"),
        ({"kind": "static", "clamp": 1.0}, ValueError, "`clamp` is not a parameter"),
        ({"kind": "pcs", "power": 1.0, "interval": (0.0, 1.0)}, ValueError, "`interval` is not a parameter"),
        ({"kind": "cosine", "values": [1.0]}, ValueError, "`values` is not a parameter"),
    ],
)
def test_bad_parameters(parameters, error, message):
    with pytest.raises(error, match=message):
        GuidanceSchedule(**parameters)


def test_bad_scales_arguments():
    linear = GuidanceSchedule("linear")
    with pytest.raises(ValueError, match="needs guidance_scale >= 1"):
        linear.scales(0.5, 10)
    for schedule in EVERY_BUILT_IN[1:]:
        with pytest.raises(ValueError, match="needs guidance_scale >= 1"):
            schedule.scales(0.99, 4)
    with pytest.raises(ValueError, match="must be finite"):
        linear.scales(float("nan"), 10)
    with pytest.raises(ValueError, match="must be finite"):
        GuidanceSchedule().scales(float("inf"), 10)
    with pytest.raises(TypeError, match="`guidance_scale` must be a number"):
        linear.scales("7.5", 10)
    with pytest.raises(TypeError, match="`guidance_scale` must be a number"):
        linear.scales(torch.tensor([7.5, 2.0]), 10)
    with pytest.raises(ValueError, match="`num_inference_steps` must be >= 1"):
        linear.scales(7.5, 0)
    with pytest.raises(TypeError, match="`num_inference_steps` must be an int"):
        linear.scales(7.5, 10.0)
    with pytest.raises(TypeError, match="`num_inference_steps` must be an int"):
        linear.scales(7.5, True)
    with pytest.raises(ValueError, match="has 3 scales but num_inference_steps is 4"):
        GuidanceSchedule.from_any([1.0, 2.0, 3.0]).scales(7.5, 4)


def test_bad_schedule_inputs():
    with pytest.raises(ValueError, match="must be 1-D"):
        GuidanceSchedule.from_any(torch.ones(2, 3))
    with pytest.raises(ValueError, match="non-empty"):
        GuidanceSchedule.from_any([])
    with pytest.raises(ValueError, match="must be >= 1"):
        GuidanceSchedule.from_any([2.0, 0.0])
    with pytest.raises(TypeError, match="`guidance_schedule` must be"):
        GuidanceSchedule.from_any({"kind": "linear"})
    with pytest.raises(TypeError, match="`guidance_schedule` must be"):
        GuidanceSchedule.from_any(7.5)
    with pytest.raises(TypeError, match="Expected a callable"):
        GuidanceSchedule.from_callable("linear")


@pytest.mark.parametrize(
    "function, error, message",
    [
        (lambda i, n, g: 0.5, ValueError, "returned 0.5 at step 0"),
        (lambda i, n, g: float("nan") if i == 2 else 2.0, ValueError, "returned nan at step 2"),
        (lambda i, n, g: float("inf"), ValueError, "must be finite"),
        (lambda i, n, g: "2.0", TypeError, "returned str at step 0"),
        (lambda i, n, g: None, TypeError, "returned NoneType"),
        (lambda i, n, g: torch.ones(2), TypeError, "returned Tensor"),
    ],
)
def test_callable_returning_bad_values(function, error, message):
    with pytest.raises(error, match=message):
        GuidanceSchedule.from_callable(function).scales(3.0, 4)


def test_callable_schedule_cannot_be_saved(tmp_path):
    schedule = GuidanceSchedule.from_callable(lambda i, n, g: g)
    with pytest.raises(ValueError, match="cannot be saved"):
        schedule.save_config(tmp_path)
    assert not (tmp_path / "guidance_schedule_config.json").exists()
    # a 'callable' config without its function explains itself instead of failing inside
    with pytest.raises(ValueError, match="from_callable"):
        GuidanceSchedule(kind="callable").scales(3.0, 4)


def test_docstring_example():
    assert GuidanceSchedule("linear").scales(guidance_scale=3.0, num_inference_steps=5).tolist() == [1, 2, 3, 4, 5]
