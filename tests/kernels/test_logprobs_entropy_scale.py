"""fusedrl.kernels.logprobs_and_entropy at scale: 10^6 rows, offsets past 2^31, memory that does
not grow with N, and the GPU tests at real sizes (skipped on CPU; their CPU twins are here too).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes

import fusedrl.kernels.logprobs_entropy as le
from fusedrl.kernels import logprobs_and_entropy
from fusedrl.kernels.torch_backend import LogprobsEntropyOptions, logprobs_and_entropy_torch
from logprobs_oracle import (
    BACKENDS,
    IGNORE,
    AllocationRecorder,
    check_rows_against_oracle,
    make_inputs,
    oracle_grad_of_full,
    run_with_grads,
)

# The interpreter evaluates both sides of tl.where in numpy (exp(-inf - -inf) and so on); the
# kernels select the finite side, which the tests check. The warnings are noise. (The interpreter
# rounds fp32 to bf16 like a GPU for every test: tests/conftest.py.)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---------------------------------------------------------------------------------------------
# scale: 10^6 rows, offsets past 2^31, memory that does not grow with N
# ---------------------------------------------------------------------------------------------


def test_a_million_rows_torch_backend():
    """10^6 rows in one call (the CPU twin of the GPU test below): every row against fp64."""
    logits, targets = make_inputs(10**6, 3, torch.bfloat16)
    results = run_with_grads("torch", logits, targets, 0.6)
    check_rows_against_oracle(logits, targets, 0.6, *results, slice(None))


def test_triton_grid_is_one_axis_beyond_65535():
    """The CPU twin of the GPU test below: its launch grid uses axis 0 only (2^31 - 1 programs),
    never axes 1 and 2 (65,535), and the kernels' row counts are runtime arguments."""
    block_n, _, _, _ = le._config(151936)
    assert le._grid(10**6, block_n) == (10**6,)
    assert le._grid(2**31 - 1, block_n) == (2**31 - 1,)
    too_many = torch.zeros(1, 1).expand(2**31, 1)  # no memory behind it
    with pytest.raises(ValueError, match="fewer than 2\\^31 rows"):
        logprobs_and_entropy(too_many, torch.zeros(1, dtype=torch.long).expand(2**31), backend="triton")


@pytest.mark.parametrize("kernel", ["_forward_kernel", "_backward_kernel"])
def test_only_block_sizes_and_flags_are_compile_time(kernel):
    """Row count, vocabulary, strides, temperature, ignore_index and vocab_start are runtime arguments: a new
    batch length or temperature never recompiles (the GPU test below counts compilations)."""
    import inspect

    fn = getattr(le, kernel).fn
    constexprs = {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}
    # HAS_THRESHOLD: the top-k / top-p kept set is on (a feature flag; the threshold itself is a run-time tensor).
    assert constexprs <= {"BLOCK_N", "BLOCK_V", "NUM_STAGES", "HAS_GRAD_LP", "HAS_GRAD_ENTROPY", "HAS_THRESHOLD"}
    assert {"n_rows", "vocab", "inv_temperature", "ignore_index", "stride_outer", "vocab_start"} <= set(
        inspect.signature(fn).parameters
    )


def _rows_past_two_to_the_31(vocab, dtype):
    """A [4, V] view of a mostly untouched huge storage whose rows 2 and 3 start past 2^31
    elements (row stride 2^30 + 64, less than 2^31: only 64-bit row * stride reaches them)."""
    stride = 2**30 + 64
    storage = torch.empty(3 * stride + vocab, dtype=dtype)  # untouched pages cost no memory
    view = storage.as_strided((4, vocab), (stride, 1))
    values, targets = make_inputs(4, vocab, dtype)
    view.copy_(values)
    return view, values, targets


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_past_two_to_the_31(backend):
    vocab = 1000
    view, values, targets = _rows_past_two_to_the_31(vocab, torch.float16)
    assert view.stride(0) * 3 > 2**31
    lp, entropy, grad, g_lp, g_h = run_with_grads(backend, view, targets, 1.7)
    check_rows_against_oracle(values, targets, 1.7, lp, entropy, grad, g_lp, g_h, slice(None))
    # In place, the gradient lands in the same far-away rows.
    leaf = view.detach()
    lp, entropy = logprobs_and_entropy(
        leaf.requires_grad_(), targets, temperature=1.7, backend=backend, inplace_backward=True
    )
    (grad_in_place,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
    assert grad_in_place.data_ptr() == view.data_ptr()
    assert torch.equal(grad_in_place, grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_torch_backend_memory_does_not_grow_with_rows(inplace):
    """Every tensor the torch backend allocates, forward and backward, recorded by a dispatch mode:
    the largest working tensor is one chunk whatever N is, no fp32 [N, V] tensor exists, and the
    only [N, V] allocation is the gradient itself (none when the backward may work in place)."""
    vocab, chunk_rows = 1000, 4
    options = LogprobsEntropyOptions(temperature=0.6, inplace_backward=inplace, chunk_bytes=chunk_rows * 4 * vocab)
    largest = {}
    for n_rows in (64, 512):
        logits, targets = make_inputs(n_rows, vocab, torch.bfloat16)
        leaf = logits.requires_grad_()
        model_out = leaf * 1.0
        recorder = AllocationRecorder()
        with recorder:
            lp, entropy = logprobs_and_entropy_torch(model_out, targets, options)
            torch.autograd.grad((lp * 2.0).sum() + entropy.sum(), model_out)
        full = [a for a in recorder.allocations if a[0] == n_rows * vocab]
        assert full == ([] if inplace else [(n_rows * vocab, torch.bfloat16)]), full
        working = [numel for numel, _ in recorder.allocations if numel != n_rows * vocab]
        largest[n_rows] = max(working)
    # Per-row state ([N] tensors) stays below one chunk for these N; the chunk is the peak.
    assert largest[64] == largest[512] == chunk_rows * vocab, largest


class _Unrecorded:
    """A kernel whose launches run outside the dispatch mode: under the Triton interpreter the
    kernel body makes torch allocations of its own, which a GPU launch does not."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with _disable_current_modes():
                return self.kernel[grid](*args, **kwargs)

        return launch


def test_triton_backend_allocates_only_per_row_state_and_the_gradient(monkeypatch):
    monkeypatch.setattr(le, "_forward_kernel", _Unrecorded(le._forward_kernel))
    monkeypatch.setattr(le, "_backward_kernel", _Unrecorded(le._backward_kernel))
    n_rows, vocab = 6, 3000
    logits, targets = make_inputs(n_rows, vocab, torch.bfloat16)
    leaf = logits.requires_grad_()
    recorder = AllocationRecorder()
    with recorder:
        lp, entropy = logprobs_and_entropy(leaf, targets, backend="triton")
        torch.autograd.grad(lp.sum() + entropy.sum(), leaf)
    large = [a for a in recorder.allocations if a[0] > n_rows]
    assert large == [(n_rows * vocab, torch.bfloat16)], large


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 100])
@pytest.mark.parametrize("inplace", [False, True])
def test_torch_backend_chunking_of_a_two_level_slice(chunk_rows, inplace):
    """Chunks within one outer slice (3 < L), whole outer slices (7 >= L) and everything at once
    (100) all cover every row of logits[:, :-1] exactly once, forward and backward."""
    batch, length, vocab = 3, 5, 50
    source = torch.randn(batch, length + 1, vocab) * 2
    targets = torch.randint(0, vocab, (batch, length))
    targets[2, 1] = IGNORE
    options = LogprobsEntropyOptions(temperature=0.6, inplace_backward=inplace, chunk_bytes=chunk_rows * 4 * vocab)
    leaf = source.clone().requires_grad_()
    lp, entropy = logprobs_and_entropy_torch((leaf * 1.0)[:, :-1], targets, options)
    g_lp, g_h = torch.randn(batch, length), torch.randn(batch, length)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
    ref_lp, ref_h, ref_grad = oracle_grad_of_full(source, lambda t: t[:, :-1], targets, 0.6, g_lp, g_h)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(entropy.double(), ref_h, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# GPU, real sizes (skipped on CPU; their CPU twins are above)
# ---------------------------------------------------------------------------------------------


def _check_sampled_rows(logits, targets, temperature, results, n_samples=64):
    """The fp64 oracle of a row sample (first, last and random rows): the oracle of all rows of a
    real-size batch would not fit in memory."""
    n_rows = targets.shape[0]
    rows = torch.cat([torch.tensor([0, n_rows - 1]), torch.randint(0, n_rows, (n_samples,))]).to(logits.device)
    check_rows_against_oracle(logits, targets, temperature, *results, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("inplace", [False, True])
def test_gpu_realistic_size_matches_fp64(inplace):
    """N = 8192, V = 151,936 bf16 (N * V = 1.24e9), the benchmark's shape."""
    logits, targets = make_inputs(8192, 151936, torch.bfloat16, "cuda")
    source = logits.clone()
    results = run_with_grads("triton", logits, targets, 0.6, inplace_backward=inplace)
    _check_sampled_rows(source, targets, 0.6, results)


@pytest.mark.gpu
def test_gpu_rows_past_two_to_the_31_elements():
    """N * V = 2.5e9 > 2^31: the last rows sit beyond 32-bit offsets."""
    n_rows, vocab = 16384, 151936
    logits = torch.randn(n_rows, vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, vocab, (n_rows,), device="cuda")
    results = run_with_grads("triton", logits, targets, 1.7)
    check_rows_against_oracle(logits, targets, 1.7, *results, slice(n_rows - 8, n_rows))


@pytest.mark.gpu
def test_gpu_a_million_rows():
    logits, targets = make_inputs(10**6, 1000, torch.bfloat16, "cuda")
    results = run_with_grads("triton", logits, targets, 0.6)
    _check_sampled_rows(logits, targets, 0.6, results, n_samples=256)


@pytest.mark.gpu
def test_gpu_new_lengths_and_temperatures_do_not_recompile():
    def compiled():
        return sum(len(cache[0]) for cache in le._forward_kernel.device_caches.values())

    logits = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, 32000, (4096,), device="cuda")
    logprobs_and_entropy(logits[:8], targets[:8])
    before = compiled()
    for n_rows, temperature in [(1, 0.6), (7, 1.7), (16, 1.0), (4095, 0.3), (4096, 2.5)]:
        logprobs_and_entropy(logits[:n_rows], targets[:n_rows], temperature=temperature)
    assert compiled() == before
