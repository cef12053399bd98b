"""fusedrl.kernels.logprobs_and_entropy, both backends: values and gradients against a float64
oracle (the rule is in logprobs_oracle.py), special rows, leading-dimension layouts, the in-place
backward and bad input.

On CPU the triton backend runs under the Triton interpreter (tests/conftest.py), which is slow:
interpreter cases keep N * (tiles per row) small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fusedrl.kernels.logprobs_entropy as le
from fusedrl.kernels import logprobs_and_entropy
from logprobs_oracle import (
    BACKENDS,
    DTYPES,
    IGNORE,
    AllocationRecorder,
    check_all,
    make_inputs,
    oracle_grad_of_full,
)

# The interpreter evaluates both sides of tl.where in numpy (exp(-inf - -inf) and so on); the
# kernels select the finite side, which the tests check. The warnings are noise. (The interpreter
# rounds fp32 to bf16 like a GPU for every test: tests/conftest.py.)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


# ---------------------------------------------------------------------------------------------
# correctness against float64
# ---------------------------------------------------------------------------------------------

# (N, V, T): odd and realistic vocabularies, a vocabulary one past a whole tile (its last tile
# holds a single valid lane), N from 1 to a few hundred.
CASES = [(1, 3, 1.7), (423, 3, 0.6), (130, 1000, 1.7), (2, 8193, 0.6), (6, 32003, 1.7), (3, 151936, 0.6)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-V{c[1]}-T{c[2]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_and_gradients_match_fp64(backend, case, dtype):
    n, vocab, temperature = case
    x, targets = make_inputs(n, vocab, dtype)
    check_all(backend, x, targets, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_temperature_and_leading_shape(backend):
    x, targets = make_inputs(12, 517, torch.bfloat16)
    lp, entropy = check_all(backend, x.view(3, 4, 517), targets.view(3, 4), 1.0)
    assert lp.shape == entropy.shape == (3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_rows_exact(backend):
    """Hand-checkable rows: uniform, one-hot by -inf, target at -inf, ignored with nan logits."""
    inf = float("inf")
    x = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],  # uniform: lp = H = log 4
            [-inf, 5.0, -inf, -inf],  # only one finite logit: lp = 0, H = 0
            [1.0, -inf, 1.0, 1.0],  # target at -inf: lp = -inf, H = log 3
            [float("nan"), inf, 0.0, 1.0],  # ignored: zeros whatever the logits
        ]
    ).requires_grad_()
    targets = torch.tensor([2, 1, 1, IGNORE])
    lp, entropy = logprobs_and_entropy(x, targets, backend=backend)
    log4, log3 = float(np.log(4)), float(np.log(3))
    torch.testing.assert_close(lp, torch.tensor([-log4, 0.0, -inf, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, torch.tensor([log4, 0.0, log3, 0.0]), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(entropy.sum(), x, retain_graph=True)
    # dH/dz = -p (log p + H): zero for a uniform row and for a one-hot row; 0 (not nan) at -inf.
    torch.testing.assert_close(grad, torch.zeros_like(x), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(lp[:3].sum(), x)
    expected = torch.tensor(
        [[-0.25, -0.25, 0.75, -0.25], [0.0, 0.0, 0.0, 0.0], [-1 / 3, 1.0, -1 / 3, -1 / 3], [0.0, 0.0, 0.0, 0.0]]
    )
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_tile_all_minus_inf(backend):
    """A row whose first 8192-wide tile is entirely -inf: the running max stays -inf for a whole
    tile and must not turn the later tiles' sums into nan."""
    x, targets = make_inputs(3, 8200, torch.bfloat16)
    x[:, :8192] = float("-inf")
    targets[:] = 8195
    check_all(backend, x, targets, 0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates_to_its_row_only(backend):
    x, targets = make_inputs(6, 300, torch.float32)
    targets[:] = 7
    x[2, 123] = float("nan")
    x[4, 5] = float("inf")
    x[5] = float("-inf")  # no distribution: nan, as torch.log_softmax gives
    leaf = x.clone().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, backend=backend)
    bad_rows = torch.tensor([False, False, True, False, True, True])
    assert lp[bad_rows].isnan().all() and entropy[bad_rows].isnan().all()
    assert lp[~bad_rows].isfinite().all() and entropy[~bad_rows].isfinite().all()
    (grad,) = torch.autograd.grad((lp + entropy).sum(), leaf)
    assert grad[bad_rows].isnan().all()
    assert grad[~bad_rows].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    x, targets = make_inputs(9, 1000, torch.float32)
    leaf = x.clone().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, temperature=0.6, backend=backend)
    (lp.sum() + entropy.sum()).backward()
    assert torch.equal(leaf.detach(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_each_other(backend):
    """The two backends compute the same fp32 quantities; they agree to a few fp32 ulps."""
    x, targets = make_inputs(24, 2000, torch.bfloat16)
    other = "triton" if backend == "torch" else "torch"
    a = logprobs_and_entropy(x, targets, temperature=1.7, backend=backend)
    b = logprobs_and_entropy(x, targets, temperature=1.7, backend=other)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, atol=5e-6, rtol=5e-6)


# ---------------------------------------------------------------------------------------------
# layouts: strided leading dimensions, in-place backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_slice_of_batch_needs_no_copy(backend):
    """logits[:, :-1, :] of [B, L + 1, V] with targets ids[:, 1:]: the usual next-token layout."""
    batch, length, vocab = 3, 9, 1000
    full = (torch.randn(batch, length + 1, vocab) * 3).bfloat16().requires_grad_()
    ids = torch.randint(0, vocab, (batch, length + 1))
    ids[1, 4] = IGNORE
    targets = ids[:, 1:]
    logits = full[:, :-1, :]
    recorder = AllocationRecorder()
    with recorder:
        lp, entropy = logprobs_and_entropy(logits, targets, temperature=0.6, backend=backend)
    n_rows = batch * length
    # The triton forward allocates O(N) only; the torch one its fp32 chunk, never a bf16 copy.
    copies = [a for a in recorder.allocations if a[0] >= n_rows * vocab and (backend == "triton" or a[1] == full.dtype)]
    assert not copies, f"the forward copied the logits: {copies}"
    g_lp, g_h = torch.randn(batch, length), torch.randn(batch, length)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), full)
    ref_lp, ref_h, ref_grad = oracle_grad_of_full(full, lambda t: t[:, :-1, :], targets, 0.6, g_lp, g_h)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(entropy.double(), ref_h, atol=2e-6, rtol=2e-6)
    # One bf16 rounding of the exact gradient (0.5 ulp = 2^-9 relative), and exact zeros at the
    # last position, which the op never sees.
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=2**-8)
    assert torch.equal(grad[:, -1], torch.zeros_like(grad[:, -1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "layout",
    [
        ("transposed", (9, 3, 257), lambda t: t.transpose(0, 1)),  # two levels, outer stride < inner
        ("two_axis_slice", (2, 4, 5, 257), lambda t: t[:, 1:, 1:]),  # three levels: copied once
        ("strided_rows", (12, 2, 257), lambda t: t[:, 0]),  # one level, row stride 2 V
    ],
    ids=lambda layout: layout[0],
)
def test_other_leading_layouts(backend, layout):
    _, shape, view = layout
    full = (torch.randn(shape) * 2).float().requires_grad_()
    logits = view(full)
    targets = torch.randint(0, shape[-1], logits.shape[:-1])
    lp, entropy = logprobs_and_entropy(logits, targets, temperature=1.7, backend=backend)
    g_lp, g_h = torch.randn(targets.shape), torch.randn(targets.shape)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), full)
    ref_lp, ref_h, ref_grad = oracle_grad_of_full(full, view, targets, 1.7, g_lp, g_h)
    torch.testing.assert_close(lp.double(), ref_lp, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(entropy.double(), ref_h, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_into_the_logits(backend):
    batch, length, vocab = 2, 6, 700
    source = (torch.randn(batch, length + 1, vocab) * 3).bfloat16()
    targets = torch.randint(0, vocab, (batch, length))
    targets[0, 2] = IGNORE
    g_lp, g_h = torch.randn(batch, length), torch.randn(batch, length)
    results = {}
    for inplace in (False, True):
        leaf = source.clone().requires_grad_()
        model_out = leaf * 1.0  # an intermediate, like a model's logits
        lp, entropy = logprobs_and_entropy(
            model_out[:, :-1], targets, temperature=0.6, backend=backend, inplace_backward=inplace
        )
        (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
        results[inplace] = (grad, model_out.detach())
    grad, overwritten = results[True]
    assert torch.equal(grad, results[False][0]), "in-place and out-of-place gradients differ"
    assert torch.equal(overwritten[:, :-1], grad[:, :-1]), "the gradient was not written into the logits"
    assert torch.equal(overwritten[:, -1], source[:, -1]), "a position outside the op was overwritten"
    assert torch.equal(results[False][1], source), "without the option the logits must be left alone"


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_with_rows_sharing_memory_is_still_correct(backend):
    """Expanded logits: every row is the same memory, so the backward must not write in place."""
    row = torch.randn(1, 300).requires_grad_()
    targets = torch.tensor([3, 17, IGNORE, 250])
    lp, entropy = logprobs_and_entropy(row.expand(4, 300), targets, backend=backend, inplace_backward=True)
    g_lp, g_h = torch.randn(4), torch.randn(4)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), row)
    _, _, ref_grad = oracle_grad_of_full(row, lambda t: t.expand(4, 300), targets, 1.0, g_lp, g_h)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input, empty batch
# ---------------------------------------------------------------------------------------------


def _bad_inputs():
    x = torch.randn(4, 10)
    y = torch.tensor([1, 2, 3, IGNORE])
    return [
        ("target_too_large", dict(logits=x, targets=torch.tensor([1, 2, 10, 0])), r"targets must be in \[0, 10\)"),
        ("target_negative", dict(logits=x, targets=torch.tensor([1, -1, 3, 0])), r"targets must be in \[0, 10\).*-1"),
        ("other_ignore_index", dict(logits=x, targets=y, ignore_index=-1), r"targets must be in \[0, 10\)"),
        ("target_shape", dict(logits=x, targets=torch.tensor([1, 2, 3])), r"targets must have shape \(4,\)"),
        ("target_dtype", dict(logits=x, targets=y.float()), r"targets must be an integer tensor"),
        ("target_not_tensor", dict(logits=x, targets=[1, 2, 3, 4]), r"targets must be a torch.Tensor"),
        ("logits_dtype", dict(logits=x.double(), targets=y), r"logits must have dtype in"),
        ("logits_int", dict(logits=x.long(), targets=y), r"logits must have dtype in"),
        ("logits_scalar", dict(logits=torch.tensor(1.0), targets=torch.tensor(0)), r"shape \[\.\.\., V\]"),
        ("empty_vocab", dict(logits=torch.randn(4, 0), targets=y), r"V >= 1"),
        ("last_dim_strided", dict(logits=torch.randn(10, 4).t(), targets=y), r"last dimension must be contiguous"),
        ("temperature_zero", dict(logits=x, targets=y, temperature=0.0), r"temperature must be a finite number > 0"),
        ("temperature_negative", dict(logits=x, targets=y, temperature=-1.0), r"temperature"),
        ("temperature_nan", dict(logits=x, targets=y, temperature=float("nan")), r"temperature"),
        ("temperature_inf", dict(logits=x, targets=y, temperature=float("inf")), r"temperature"),
        ("temperature_text", dict(logits=x, targets=y, temperature="hot"), r"temperature"),
        ("ignore_index_float", dict(logits=x, targets=y, ignore_index=-100.0), r"ignore_index must be an int"),
        ("backend_unknown", dict(logits=x, targets=y, backend="cuda"), r"backend must be one of"),
        ("inplace_not_bool", dict(logits=x, targets=y, inplace_backward=1), r"inplace_backward must be a bool"),
        ("device_mismatch", dict(logits=x, targets=y.to("meta")), r"one device"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_before_any_kernel(backend, case, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(le, "logprobs_and_entropy_torch", launched)
    monkeypatch.setattr(le._LogprobsEntropy, "apply", launched)
    _, kwargs, match = case
    kwargs = {"backend": backend, **kwargs}
    with pytest.raises(ValueError, match=match):
        logprobs_and_entropy(kwargs.pop("logits"), kwargs.pop("targets"), **kwargs)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(le, "_INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        logprobs_and_entropy(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


def test_auto_backend_is_torch_on_cpu():
    lp, _ = logprobs_and_entropy(torch.randn(2, 5).requires_grad_(), torch.tensor([0, 1]))
    assert type(lp.grad_fn).__name__ == "_TorchLogprobsEntropyBackward"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 7), (2, 0, 7)])
def test_empty_batch_gives_empty_outputs_and_gradient(backend, shape):
    logits = torch.randn(shape).requires_grad_()
    targets = torch.zeros(shape[:-1], dtype=torch.long)
    lp, entropy = logprobs_and_entropy(logits, targets, backend=backend)
    assert lp.shape == entropy.shape == shape[:-1]
    assert lp.dtype == entropy.dtype == torch.float32
    (lp.sum() + entropy.sum()).backward()
    assert logits.grad.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    logits = torch.randn(5, 40).requires_grad_()
    targets = torch.full((5,), IGNORE)
    lp, entropy = logprobs_and_entropy(logits, targets, backend=backend)
    assert torch.equal(lp, torch.zeros(5)) and torch.equal(entropy, torch.zeros(5))
    (lp.sum() + entropy.sum()).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_of_any_integer_dtype_and_layout(backend):
    x, targets = make_inputs(8, 50, torch.float32)
    targets[targets == IGNORE] = 0
    expected = logprobs_and_entropy(x, targets, backend=backend)
    for other in (targets.int(), targets.short(), targets.repeat_interleave(2)[::2]):
        for u, v in zip(logprobs_and_entropy(x, other, backend=backend), expected):
            assert torch.equal(u, v)
