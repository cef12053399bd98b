"""Shared test setup.

On a machine without CUDA, Triton kernels run under the Triton interpreter; the variable must be set
before triton is first imported, which is why it is set here, at collection time. An autouse session
fixture then makes the interpreter round fp32 to bf16 as the GPU does (see below).
"""

import os
import random
import sys

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The fakegpu device of the device-placement tests must exist before the process's first backward:
    # the autograd engine sets up one queue per device then. A GPU session has real devices instead.
    import fake_device  # noqa: F401

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


@pytest.fixture(scope="session", autouse=True)
def _interpreter_rounds_bf16_like_gpu():
    """Triton 3.9's interpreter converts fp32 to bf16 by truncation (and its round-to-nearest path
    carries into the exponent incorrectly); CUDA rounds to nearest even. For the whole session, every
    interpreted kernel rounds like the GPU, so bf16 outputs and gradients are held to the GPU's rule
    (a truncated gradient is a whole ulp off and fails the kernels' tolerances). Nothing changes on a
    GPU, where the kernels are compiled."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    truncating = interpreter._convert_float

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return truncating(values, input_dtype, output_dtype, rounding_mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_convert_float", convert)
        yield


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def fake_gpu():
    """tests/fake_device.py: a second device on which mixing devices fails as on CUDA (CPU sessions)."""
    if "fake_device" not in sys.modules:
        pytest.skip("the fakegpu device is set up in CPU sessions; this one has CUDA")
    return sys.modules["fake_device"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; its CPU twin runs under the Triton interpreter")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
