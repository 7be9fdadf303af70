"""Settings every test shares."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests run tiny models, whose cost is per-op overhead: one thread is faster and steadier than several,
    # above all on a shared 2-core CI machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
