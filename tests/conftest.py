"""Shared test setup.

On a machine without CUDA, Triton kernels run under the Triton interpreter; the variable must be set
before triton is first imported, which is why it is set here, at collection time.
"""

import os
import random

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """One fixed seed per test, derived from its name, so failures reproduce in isolation."""
    seed = _stable_seed(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


def _stable_seed(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs under the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
