"""Test-wide setup: Triton runs through its interpreter on CPU, and `gpu` tests skip without CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported, so that @triton.jit kernels run on CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

@pytest.fixture(autouse=True)
def one_thread():
    """Test shapes are tiny: one intra-op thread is faster, and far faster on a shared, oversubscribed CPU.
    (Tests that are about threading set their own count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
