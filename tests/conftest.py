"""Suite-wide settings: offline, and one intra-op thread per test process.

Tests build tiny models; intra-op threads gain them nothing, and on a shared 2-core CI machine
(with pytest-xdist's two workers) threads wait on each other, several times slower than one.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hidden download fails loudly instead of hanging

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
