"""fusedrl.kernels.logprobs_and_entropy, both backends, against a float64 oracle.

The oracle is float64 PyTorch autograd on the inputs already rounded to the tested dtype. Every
output and gradient must satisfy, elementwise, |ours - fp64| <= |baseline - fp64| + tol, where the
baseline is PyTorch computing in fp32 on the same rounded inputs (its gradient then rounded to the
tested dtype): the best a careful unfused implementation gives, stricter than PyTorch run in bf16.
tol is a few fp32 rounding errors: a rounding of the bf16 gradient that differs from the
baseline's can only happen at a rounding boundary, where both errors are within fp32 error of half
an ulp, so a whole-ulp error (e.g. truncation instead of rounding) fails.

On CPU the triton backend runs under the Triton interpreter (tests/conftest.py), which is slow:
interpreter cases keep N * (tiles per row) small.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrl.kernels.logprobs_entropy as le
from fusedrl.kernels import logprobs_and_entropy
from fusedrl.kernels.reference import LogprobsEntropyOptions, logprobs_and_entropy_torch

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100

# The interpreter evaluates both sides of tl.where in numpy (exp(-inf - -inf) and so on); the
# kernels select the finite side, which the tests check. The warnings are noise.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


@pytest.fixture(autouse=True, scope="module")
def _interpreter_rounds_bf16_like_gpu():
    """Triton 3.9's interpreter converts fp32 to bf16 by truncation (and its round-to-nearest path
    carries into the exponent incorrectly); CUDA rounds to nearest even. Make the interpreter round
    like the GPU so that the bf16 gradient is held to the same rule as on a GPU."""
    if not le._INTERPRETED:
        yield
        return
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    original = interpreter._convert_float

    def convert(values, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return original(values, input_dtype, output_dtype, rounding_mode)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter, "_convert_float", convert)
        yield


# ---------------------------------------------------------------------------------------------
# oracle and comparison
# ---------------------------------------------------------------------------------------------


def reference(x: torch.Tensor, targets: torch.Tensor, temperature: float, compute_dtype=torch.float64):
    """lp, H in compute_dtype by plain autograd-able PyTorch, and the leaf they depend on."""
    leaf = x.detach().to(compute_dtype).requires_grad_()
    logp = torch.log_softmax(leaf / temperature, dim=-1)
    ignored = targets == IGNORE
    lp = logp.gather(-1, targets.masked_fill(ignored, 0).long()[..., None]).squeeze(-1)
    p_logp = logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)
    entropy = -p_logp.sum(-1)
    return leaf, lp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def grads(leaf, lp, entropy, g_lp, g_h):
    """d(sum(lp * g_lp) + sum(H * g_h)) / d leaf; a None upstream gradient leaves that output out."""
    outputs = [o for o, g in ((lp, g_lp), (entropy, g_h)) if g is not None]
    upstream = [g.to(o.dtype) for o, g in ((lp, g_lp), (entropy, g_h)) if g is not None]
    (grad,) = torch.autograd.grad(outputs, [leaf], upstream, retain_graph=True)
    return grad


def assert_rule(name, ours, ref, base, atol, rtol=0.0):
    """|ours - ref| <= |base - ref| + atol + rtol |ref|, elementwise; equal infinities count as exact."""
    ours, ref, base = ours.detach().double(), ref.detach().double(), base.detach().double()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = torch.where(ours == ref, 0.0, (ours - ref).abs())
    allowed = torch.where(base == ref, 0.0, (base - ref).abs()) + atol + rtol * ref.abs().nan_to_num(0.0, 0.0, 0.0)
    bad = ~(err <= allowed)  # a nan error is bad
    if bool(bad.any()):
        i = tuple(int(k) for k in bad.nonzero()[err[bad].nan_to_num(float("inf")).argmax()])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside the rule; worst at {i}: "
            f"ours={ours[i].item()!r} fp64={ref[i].item()!r} baseline={base[i].item()!r} allowed={allowed[i].item():.3g}"
        )


def make_inputs(n, vocab, dtype, *, seed_shift=0.0):
    """Logits [n, vocab] whose rows cycle through the cases real kernels got wrong, and targets.

    Row kinds: plain; peaked (one logit 40 above the rest, in the last, partial tile); far below
    zero with a peak (a masked load with other=0 would dominate the max); sprinkled with -inf
    (never at the target). Every fifth row from row 3 is ignored.
    """
    x = torch.randn(n, vocab) * 3.0 + seed_shift
    targets = torch.randint(0, vocab, (n,))
    for r in range(n):
        kind = r % 4
        if kind == 1:
            x[r, vocab - 1] += 40.0
            if r % 8 == 1:
                targets[r] = vocab - 1
        elif kind == 2:
            x[r] -= 200.0
            x[r, r % vocab] = -150.0
            targets[r] = r % vocab
        elif kind == 3 and vocab > 1:
            neg = torch.rand(vocab) < 0.1
            neg[targets[r]] = False
            x[r, neg] = float("-inf")
    targets[3::5] = IGNORE
    return x.to(dtype), targets


# Tolerances: a few fp32 rounding errors of the quantity's scale.
OUT_ATOL, OUT_RTOL = 2e-6, 2e-6
GRAD_RTOL_OF_MAX = 2e-6


def check_all(backend, x, targets, temperature, **kwargs):
    """Forward and the three gradient modes of one backend against the oracle and the fp32 baseline."""
    n_rows = targets.numel()
    leaf = x.detach().clone().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, temperature=temperature, backend=backend, **kwargs)
    assert lp.dtype == entropy.dtype == torch.float32
    ref_leaf, ref_lp, ref_h = reference(x, targets, temperature)
    base_leaf, base_lp, base_h = reference(x, targets, temperature, torch.float32)
    assert_rule("lp", lp, ref_lp, base_lp, OUT_ATOL, OUT_RTOL)
    assert_rule("H", entropy, ref_h, base_h, OUT_ATOL, OUT_RTOL)
    g_lp, g_h = torch.randn(targets.shape), torch.randn(targets.shape)
    for mode, (a, b) in {"lp": (g_lp, None), "H": (None, g_h), "both": (g_lp, g_h)}.items():
        ours = grads(leaf, lp, entropy, a, b)
        assert ours.dtype == x.dtype and ours.shape == x.shape
        ref = grads(ref_leaf, ref_lp, ref_h, a, b)
        base = grads(base_leaf, base_lp, base_h, a, b).to(x.dtype)
        scale = ref.abs().max().item() if n_rows else 0.0
        assert_rule(f"d logits (upstream {mode})", ours, ref, base, GRAD_RTOL_OF_MAX * scale)
    return lp, entropy


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


class AllocationRecorder(TorchDispatchMode):
    """Records (numel, dtype) of every tensor an aten op allocates; outputs that alias an input
    (views, in-place and out= ops) are not allocations and are skipped."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(returns, outputs):
            if isinstance(value, torch.Tensor) and ret.alias_info is None:
                self.allocations.append((value.numel(), value.dtype))
        return out


def reference_grad_of_full(full, logits_of, targets, temperature, g_lp, g_h):
    """fp64 gradient with respect to a full tensor of which the op sees logits_of(full)."""
    leaf = full.detach().double().requires_grad_()
    logp = torch.log_softmax(logits_of(leaf) / temperature, dim=-1)
    ignored = targets == IGNORE
    lp = logp.gather(-1, targets.masked_fill(ignored, 0)[..., None]).squeeze(-1).masked_fill(ignored, 0.0)
    entropy = -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1).masked_fill(ignored, 0.0)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
    return lp, entropy, grad


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
    ref_lp, ref_h, ref_grad = reference_grad_of_full(full, lambda t: t[:, :-1, :], targets, 0.6, g_lp, g_h)
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
    ref_lp, ref_h, ref_grad = reference_grad_of_full(full, view, targets, 1.7, g_lp, g_h)
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
    _, _, ref_grad = reference_grad_of_full(row, lambda t: t.expand(4, 300), targets, 1.0, g_lp, g_h)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-6, rtol=1e-5)
