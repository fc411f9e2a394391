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
