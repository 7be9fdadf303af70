"""Bad input that used to pass silently (or fail deep inside diffusers) gets a clear ValueError in every storydiff
pipeline: generator lists of the wrong length, non-finite starting latents, guidance scales that overflow."""

import math

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from pipeline_contracts_fixtures import PIPELINE_CASES

from storydiff import GuidanceSchedule
from storydiff.pipeline_checks import check_generator, check_guidance_scales, check_latents


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


@pytest.fixture(params=list(PIPELINE_CASES), scope="module")
def case_and_pipe(request, tmp_path_factory):
    case = PIPELINE_CASES[request.param]
    return case, case.build(tmp_path_factory.mktemp(case.name))


@pytest.mark.parametrize("count", [1, 3])  # one short (IndexError before) and one extra (silently ignored before)
def test_generator_list_must_have_one_generator_per_sample(case_and_pipe, count):
    case, pipe = case_and_pipe
    generators = [torch.Generator().manual_seed(i) for i in range(count)]
    with pytest.raises(ValueError, match="one generator per sample"):
        case.call(pipe, batch=2, generator=generators)
    # the right number works, and each sample follows its own generator
    two = case.call(pipe, batch=2, generator=[torch.Generator().manual_seed(i) for i in range(2)])
    assert two.shape[0] == 2 and torch.isfinite(two).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_latents_are_refused(case_and_pipe, bad):
    case, pipe = case_and_pipe
    latents = torch.randn(case.latent_shape(1))
    latents[0, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        case.call(pipe, batch=1, latents=latents)


def test_guidance_scale_overflowing_the_model_dtype_is_refused(case_and_pipe):
    case, pipe = case_and_pipe
    with pytest.raises(ValueError, match="overflow"):
        case.call(pipe, batch=1, guidance_scale=1e39)  # finite in float64, inf in the model's float32
    with pytest.raises(ValueError, match="overflow"):
        case.call(pipe, batch=1, guidance_scale=1e308, guidance_schedule="linear")  # 2w overflows float64


@pytest.mark.parametrize("kind", ["linear", "cosine", "lambda-shape", "invlinear", "sine"])  # peaks of 2w or more
def test_schedules_that_overflow_to_inf_are_refused(kind):
    with pytest.raises(ValueError, match="overflow"):
        GuidanceSchedule(kind).scales(1e308, 5)
    assert torch.isfinite(GuidanceSchedule(kind).scales(1e300, 5)).all()


def test_shared_checks():
    check_generator(None, 3)
    check_generator(torch.Generator(), 3)
    with pytest.raises(ValueError, match="2 generators, but this call generates 3 samples"):
        check_generator([torch.Generator()] * 2, 3)
    with pytest.raises(TypeError, match=r"generator\[1\]"):
        check_generator([torch.Generator(), 5], 2)
    with pytest.raises(TypeError, match="torch.Generator"):
        check_generator(7, 1)
    assert check_latents(None) is None
    with pytest.raises(ValueError, match="shape"):
        check_latents(torch.zeros(1, 2), (1, 3))
    with pytest.raises(TypeError, match="floating-point"):
        check_latents(torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_latents([0.0])
    check_guidance_scales(torch.tensor([7.5, 60000.0]), torch.float32)
    with pytest.raises(ValueError, match="float16"):
        check_guidance_scales(torch.tensor([7.5, 70000.0]), torch.float16)
