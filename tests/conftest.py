"""Settings every test shares."""

import os
import socket

import pytest
import torch

# Nothing in the tests may touch the network: the Hub libraries stay offline, and a name lookup of anything but this
# machine fails the test that made it (worker processes of multi-process tests look up localhost only).
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
_LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), None}
_getaddrinfo = socket.getaddrinfo


def _local_getaddrinfo(host, *args, **kwargs):
    if host not in _LOCAL_NAMES:
        raise OSError(f"A test tried to look up {host!r}: tests run offline.")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _local_getaddrinfo


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The tests run tiny models, whose cost is per-op overhead: one thread is faster and steadier than several,
    # above all on a shared 2-core CI machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
