"""Concurrent calls: two threads with different arguments get the same samples as the same calls made one after the
other, both on one shared pipeline (ClassConditional, Director: their per-call state is kept out of shared objects)
and with diffusers' serving pattern, `Pipeline.from_pipe(pipe, scheduler=...)` per request (all four pipelines)."""

import copy
import threading

import pytest
import torch
from diffusers.utils import logging as diffusers_logging
from pipeline_contracts_fixtures import PIPELINE_CASES

ROUNDS = 3


@pytest.fixture(autouse=True, scope="module")
def quiet_diffusers():
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(verbosity)


def two_requests(callback=None):
    """Two requests that differ in everything a call sets up: batch, steps, scale, schedule, seed."""
    first = dict(batch=1, num_inference_steps=4, guidance_scale=3.0, seed=1)
    second = dict(batch=2, num_inference_steps=7, guidance_scale=2.0, guidance_schedule="linear", seed=2)
    if callback is not None:
        first["callback_on_step_end"] = callback
    return [first, second]


def run_concurrently(serve, requests):
    """Run `serve(request)` for every request in its own thread, all released at once; returns the results."""
    results, errors = [None] * len(requests), []
    start = threading.Barrier(len(requests))

    def worker(index):
        try:
            start.wait()
            results[index] = serve(requests[index])
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("name", ["class_conditional", "director"])
def test_concurrent_calls_on_one_shared_pipeline(name, tmp_path):
    case = PIPELINE_CASES[name]
    pipe = case.build(tmp_path)
    requests = two_requests()
    expected = [case.call(pipe, **request) for request in requests]
    for _ in range(ROUNDS):
        got = run_concurrently(lambda request: case.call(pipe, **request), requests)
        for one, reference in zip(got, expected):
            torch.testing.assert_close(one, reference, rtol=0, atol=0)
    # a call does not touch the shared scheduler (it steps a copy)
    assert len(pipe.scheduler.timesteps) not in (4, 7, 13)


def halve_guidance_after_the_first_step(pipeline, step_index, timestep, callback_kwargs):
    if step_index == 0:
        pipeline._guidance_scale = pipeline.guidance_scale / 2
    return callback_kwargs


@pytest.mark.parametrize("name", list(PIPELINE_CASES))
def test_from_pipe_per_request_serving_pattern(name, tmp_path):
    case = PIPELINE_CASES[name]
    shared = case.build(tmp_path)

    def serve(request):
        # diffusers' "create a server" recipe: models shared, a fresh scheduler and pipeline state per request, and a
        # copy of each (fast) tokenizer, whose padding / truncation setting is state that concurrent calls overwrite
        scheduler = shared.scheduler.from_config(shared.scheduler.config)
        tokenizers = {name: copy.deepcopy(component) for name, component in shared.components.items()
                      if name.startswith("tokenizer") and component is not None}  # fmt: skip
        request_pipe = case.pipeline_class.from_pipe(shared, scheduler=scheduler, **tokenizers)
        request_pipe.set_progress_bar_config(disable=True)
        return case.call(request_pipe, **request)

    # a step callback that changes pipeline state stays inside its own request
    requests = two_requests(callback=halve_guidance_after_the_first_step)
    expected = [serve(request) for request in requests]
    for _ in range(ROUNDS):
        for one, reference in zip(run_concurrently(serve, requests), expected):
            torch.testing.assert_close(one, reference, rtol=0, atol=0)
