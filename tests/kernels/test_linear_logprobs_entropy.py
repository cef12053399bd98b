"""linear_logprobs_and_entropy against float64 PyTorch on the same rounded inputs.

Rule, elementwise for outputs and all three gradients under random upstream gradients:
|ours - fp64| <= |same-dtype PyTorch two-step - fp64| + tol. The Triton backend runs through the
interpreter on CPU (small blocks, so every tile, vocabulary split and backward chunk boundary is crossed).
"""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.kernels import linear_logprobs_entropy as kernel_module
from fusedrl.kernels import torch_backend
from fusedrl.kernels.linear_logprobs_entropy import linear_logprobs_and_entropy
from fusedrl.kernels.logprobs_entropy import logprobs_and_entropy

IGNORE = -100
# (rtol, atol as a fraction of the tensor's largest fp64 magnitude): about one rounding of the dtype.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-9), torch.float16: (2**-10, 2**-12)}


def _inputs(n, h, v, dtype, with_bias, ignored=(1, 5)):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype)  # logits of a few units: peaked but not one-hot rows
    bias = torch.randn(v).to(dtype) if with_bias else None
    targets = torch.randint(0, v, (n,))
    targets[[i for i in ignored if i < n]] = IGNORE
    return hidden, weight, bias, targets


def _two_step(hidden, weight, bias, targets, temperature, dtype):
    """Matmul to logits in `dtype`, then log_softmax / gather / entropy in fp32 (fp64 when dtype is)."""
    leaves = [hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()]
    logits = leaves[0] @ leaves[1].T
    if bias is not None:
        leaves.append(bias.to(dtype).requires_grad_())
        logits = logits + leaves[2]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    logp = (logits.to(acc) / temperature).log_softmax(-1)
    valid = targets != IGNORE
    lp = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    ent = -(logp.exp() * torch.where(logp.exp() > 0, logp, 0.0)).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0), leaves


def _run(fn, hidden, weight, bias, targets, g_lp, g_ent):
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_())
    lp, ent = fn(*leaves)
    loss = (0 if g_lp is None else (lp * g_lp).sum()) + (0 if g_ent is None else (ent * g_ent).sum())
    loss.backward()
    return [lp.detach(), ent.detach()] + [x.grad for x in leaves]


def _assert_rule(name, ours, same_dtype, exact, dtype):
    rtol, atol = TOL[dtype]
    ours, same_dtype = ours.double(), same_dtype.double()
    tol = rtol * exact.abs() + atol * exact.abs().max()
    excess = (ours - exact).abs() - (same_dtype - exact).abs() - tol
    worst = int(excess.flatten().argmax())
    if excess.flatten()[worst] > 0:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), exact.shape))
        pytest.fail(f"{name}: worst at {idx}: ours {ours[idx]:.8g}, same-dtype torch {same_dtype[idx]:.8g}, "
                    f"fp64 {exact[idx]:.8g}, tol {tol[idx]:.3g}")


def _check(backend, n, h, v, dtype, with_bias, temperature, upstream, ignored=(1, 5), device="cpu"):
    hidden, weight, bias, targets = (None if x is None else x.to(device)
                                     for x in _inputs(n, h, v, dtype, with_bias, ignored))
    g_lp = torch.randn(n, device=device) if upstream in ("lp", "both") else None
    g_ent = torch.randn(n, device=device) if upstream in ("entropy", "both") else None

    def ours(*leaves):
        return linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2] if with_bias else None,
                                           temperature=temperature, backend=backend)

    def two_step(dt):
        def fn(*leaves):
            lp, ent, _ = _two_step(leaves[0], leaves[1], leaves[2] if with_bias else None, targets, temperature, dt)
            return lp, ent
        return fn

    got = _run(ours, hidden, weight, bias, targets, g_lp, g_ent)
    same = _run(two_step(dtype), hidden, weight, bias, targets, g_lp, g_ent)
    exact = _run(two_step(torch.float64), hidden.double(), weight.double(),
                 None if bias is None else bias.double(), targets, g_lp, g_ent)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert got[2].dtype == got[3].dtype == dtype
    ignored = targets == IGNORE
    assert torch.all(got[0][ignored] == 0) and torch.all(got[1][ignored] == 0)
    for name, a, b, c in zip(("logprobs", "entropy", "d hidden", "d weight", "d bias"), got, same, exact):
        _assert_rule(name, a, b, c, dtype)


TORCH_CASES = [
    (67, 48, 1003, torch.float32, True, 1.0, "both"),
    (67, 48, 1003, torch.bfloat16, True, 0.6, "both"),
    (67, 48, 1003, torch.float16, False, 1.7, "lp"),
    (7, 40, 3, torch.bfloat16, True, 1.7, "entropy"),
    (33, 72, 517, torch.float32, False, 0.6, "entropy"),
    (1, 16, 1003, torch.float16, True, 1.0, "both"),
]


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_torch_backend_matches_float64(case, monkeypatch):
    # A small chunk budget so that the tested shapes cross token and vocabulary chunk boundaries.
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_COLS", 128)
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_ELEMENTS", 128 * 16)
    _check("torch", *case)


TRITON_CASES = [
    (67, 48, 1003, torch.bfloat16, True, 0.6, "both"),
    (67, 40, 1003, torch.float16, False, 1.7, "lp"),
    (50, 72, 3, torch.float32, True, 1.0, "entropy"),
    (19, 48, 200, torch.float32, True, 0.6, "both"),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_backend_matches_float64(case):
    _check("triton", *case)


@pytest.mark.parametrize(
    "switch, expected",
    [
        (None, "ieee"),
        (lambda: torch.set_float32_matmul_precision("high"), "tf32"),
        (lambda: torch.set_float32_matmul_precision("medium"), "tf32"),
        (lambda: torch.set_float32_matmul_precision("highest"), "ieee"),
        (lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True), "tf32"),
    ],
)
def test_reads_the_users_tf32_switch(switch, expected, monkeypatch):
    """Each of torch's ways to allow TF32 for fp32 matmuls is seen; torch's default is exact fp32."""
    before = torch.get_float32_matmul_precision()
    try:
        if switch is not None:
            switch()
        assert kernel_module._cuda_fp32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_triton_tf32_path_runs_under_the_interpreter(monkeypatch):
    """CPU twin of the fp32 GPU test: forward and backward kernels take DOT_PRECISION="tf32". (The
    interpreter multiplies tf32 dots exactly, so this checks the plumbing; the rounding itself is
    checked on a GPU.)"""
    monkeypatch.setattr(kernel_module, "_INTERPRETER",
                        dataclasses.replace(kernel_module._INTERPRETER, dot_precision="tf32"))
    _check("triton", 19, 48, 200, torch.float32, True, 0.6, "both")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_ignored_row_blocks(backend):
    """Leading prompt-like rows all ignored: the Triton kernels skip those row blocks (16 rows under the
    interpreter) entirely, and a partly ignored block still gives exact zeros for its ignored rows."""
    _check(backend, 67, 40, 300, torch.float32, True, 0.6, "both", ignored=range(0, 40))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_minus_inf_bias_masks_vocabulary(backend):
    """-inf logits (a masked vocabulary) have p = 0: finite lp, H and gradients, as if the columns were gone."""
    hidden, weight, bias, targets = _inputs(20, 16, 130, torch.float32, True)
    masked = torch.zeros(130, dtype=torch.bool)
    masked[::3] = True
    bias[masked] = float("-inf")
    targets = torch.where(masked[targets.clamp(min=0)], 1, targets)  # targets on unmasked columns
    g = torch.randn(20), torch.randn(20)
    got = _run(lambda h, w, b: linear_logprobs_and_entropy(h, w, targets, bias=b, backend=backend),
               hidden, weight, bias, targets, *g)
    keep = ~masked
    remap = torch.cumsum(keep.long(), 0) - 1
    small_targets = torch.where(targets == IGNORE, IGNORE, remap[targets.clamp(min=0)])
    exact = _run(lambda h, w, b: _two_step(h, w, b, small_targets, 1.0, torch.float64)[:2],
                 hidden.double(), weight[keep].double(), bias[keep].double(), small_targets, *g)
    for a, b in zip(got[:3], exact[:3]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[3][keep].double(), exact[3], rtol=1e-5, atol=1e-5)
    assert torch.all(got[3][masked] == 0) and torch.all(got[4][masked] == 0)


def test_leading_shape_and_frozen_weight():
    hidden, weight, _, targets = _inputs(12, 16, 50, torch.float32, False)
    h = hidden.view(3, 4, 16).clone().requires_grad_()
    lp, ent = linear_logprobs_and_entropy(h, weight, targets.view(3, 4), backend="triton")
    assert lp.shape == ent.shape == (3, 4)
    (lp.sum() + ent.sum()).backward()  # weight has no grad: that GEMM is skipped
    ref_lp, ref_ent, leaves = _two_step(hidden.double(), weight.double(), None, targets, 1.0, torch.float64)
    (ref_lp.sum() + ref_ent.sum()).backward()
    torch.testing.assert_close(lp.flatten().double(), ref_lp.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad.view(12, 16).double(), leaves[0].grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_bias_still_enters_the_recomputed_logits(backend):
    hidden, weight, bias, targets = _inputs(30, 24, 150, torch.float32, True)
    bias = bias * 4  # large enough that leaving it out of the backward's logits would show
    g = torch.randn(30), torch.randn(30)
    got = _run(lambda h, w: linear_logprobs_and_entropy(h, w, targets, bias=bias, temperature=0.6, backend=backend),
               hidden, weight, None, targets, *g)
    exact = _run(lambda h, w: _two_step(h, w, bias.double(), targets, 0.6, torch.float64)[:2],
                 hidden.double(), weight.double(), None, targets, *g)
    for a, b in zip(got, exact):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


ORDERS = [kernel_module.ROWS_OUTER, kernel_module.VOCAB_OUTER]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", *ORDERS])
def test_nan_and_inf_hidden_in_ignored_rows_change_nothing(backend, dtype, force_order):
    """Padding holds whatever the model left there, NaN included: an ignored row must contribute exactly
    nothing, so lp, H and all three gradients equal those of the same inputs with finite padding
    (bitwise), and the ignored rows' hidden gradient is exactly 0. Rows 1, 5 and 30 share row blocks
    and backward chunks with valid rows (0 * NaN in the weight-gradient GEMM gave an all-NaN d weight)."""
    if backend != "torch":
        force_order(backend)
    ignored = (1, 5, 30)
    hidden, weight, bias, targets = _inputs(50, 40, 300, dtype, True, ignored=ignored)
    poisoned = hidden.clone()
    poisoned[1], poisoned[5, :7], poisoned[30] = float("nan"), float("inf"), float("-inf")
    g = torch.randn(50), torch.randn(50)
    fn = lambda h, w, b: linear_logprobs_and_entropy(  # noqa: E731
        h, w, targets, bias=b, temperature=0.7, backend="torch" if backend == "torch" else "triton")
    clean, dirty = _run(fn, hidden, weight, bias, targets, *g), _run(fn, poisoned, weight, bias, targets, *g)
    for name, a, b in zip(("lp", "H", "d hidden", "d weight", "d bias"), clean, dirty):
        assert torch.isfinite(b).all(), f"{name}: non-finite values from NaN / inf padding"
        assert torch.equal(a, b), name
    assert torch.all(dirty[2][list(ignored)] == 0)



@pytest.fixture
def force_order(monkeypatch):
    """force_order(order): the Triton backward runs that loop order, in steps of 24 rows x 384 columns
    (rows-outer) or 24 x 192 (vocab-outer), so the tested shapes cross several row and vocabulary chunks;
    returns the list of orders the backward actually chose."""
    chosen = []

    def force(order):
        monkeypatch.setattr(kernel_module, "_INTERPRETER", dataclasses.replace(
            kernel_module._INTERPRETER, chunk_rows=24, chunk_cols=384, vocab_outer_cols=192))
        monkeypatch.setattr(kernel_module, "_loop_order", lambda *args: chosen.append(order) or order)
        return chosen

    return force


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", [(67, 48, 1003, torch.bfloat16, True, 0.6, "both"),
                                  (50, 40, 300, torch.float32, True, 1.7, "both")], ids=str)
def test_each_loop_order_matches_float64(order, case, force_order):
    chosen = force_order(order)
    _check("triton", *case)
    assert chosen == [order]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("frozen", ["hidden", "weight"])
def test_each_loop_order_with_a_frozen_operand(order, frozen, force_order):
    """Only one of the two big gradients: the other accumulator (and its GEMM) is skipped."""
    force_order(order)
    hidden, weight, _, targets = _inputs(50, 24, 500, torch.bfloat16, False)
    g = torch.randn(50), torch.randn(50)
    leaves = [hidden.clone().requires_grad_(frozen != "hidden"), weight.clone().requires_grad_(frozen != "weight")]
    lp, ent = linear_logprobs_and_entropy(*leaves, targets, backend="triton")
    (lp * g[0] + ent * g[1]).sum().backward()
    same = _run(lambda h, w: _two_step(h, w, None, targets, 1.0, torch.bfloat16)[:2], hidden, weight, None,
                targets, *g)
    exact = _run(lambda h, w: _two_step(h, w, None, targets, 1.0, torch.float64)[:2], hidden.double(),
                 weight.double(), None, targets, *g)
    live = 1 if frozen == "hidden" else 0
    assert leaves[1 - live].grad is None
    _assert_rule(f"d {('hidden', 'weight')[live]}", leaves[live].grad, same[2 + live], exact[2 + live],
                 torch.bfloat16)


@pytest.mark.parametrize("order", ORDERS)
def test_each_loop_order_is_bitwise_repeatable(order, force_order):
    force_order(order)
    hidden, weight, bias, targets = _inputs(40, 32, 300, torch.bfloat16, True)
    g = torch.randn(40), torch.randn(40)
    fn = lambda h, w, b: linear_logprobs_and_entropy(h, w, targets, bias=b, backend="triton")  # noqa: E731
    first, second = _run(fn, hidden, weight, bias, targets, *g), _run(fn, hidden, weight, bias, targets, *g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


ALL_GRADS = (True, True, True)


def test_loop_order_choice_follows_the_shapes():
    gpu = kernel_module._GPU_16BIT
    choose = kernel_module._loop_order
    # Long RL batch against a large vocabulary: the fp32 [N, H] hidden buffer (1 GiB) beats [V, H] (2.3 GiB).
    assert choose(65536, 151936, 4096, torch.bfloat16, ALL_GRADS, gpu) == kernel_module.VOCAB_OUTER
    # N >> V: the fp32 [V, H] weight accumulator is the smaller one.
    assert choose(2**20, 32000, 4096, torch.bfloat16, ALL_GRADS, gpu) == kernel_module.ROWS_OUTER
    # A frozen weight needs no [V, H] accumulator at all.
    assert choose(65536, 151936, 4096, torch.bfloat16, (True, False, False), gpu) == kernel_module.ROWS_OUTER
    # fp32 gradients are accumulated in place and both orders use the same workspace: today's order.
    assert choose(65536, 151936, 4096, torch.float32, ALL_GRADS, kernel_module._GPU_FP32) == kernel_module.ROWS_OUTER


def test_backward_extra_memory_formula_at_the_issue_shape():
    """Issue 3: peak extra memory under 1.5 GiB at N = 65536, V = 151936, H = 4096 in bf16."""
    n, v, h = 65536, 151936, 4096
    gpu = kernel_module._GPU_16BIT
    extra = kernel_module.backward_extra_bytes(kernel_module.VOCAB_OUTER, n, v, h, torch.bfloat16, ALL_GRADS, gpu)
    workspace = 2048 * 8192 * 2  # bf16 dz, 32 MiB
    hidden_acc = n * h * 4  # fp32 [N, H], 1 GiB
    weight_acc = 8192 * h * 4  # fp32 [8192, H], 128 MiB
    vectors = (2048 // 128 * 8192 + v) * 4 + 2 * n * 4  # bias column sums, fp32 d bias, upstream gradients
    assert extra == workspace + hidden_acc + weight_acc + vectors == 1_243_170_304
    assert extra < 1.5 * 2**30
    rows_outer = kernel_module.backward_extra_bytes(kernel_module.ROWS_OUTER, n, v, h, torch.bfloat16, ALL_GRADS, gpu)
    assert rows_outer > v * h * 4 > 2.3 * 2**30  # the fp32 [V, H] accumulator alone


@pytest.mark.parametrize(
    "change, argument",
    [
        (dict(weight=torch.randn(50, 15)), "weight"),
        (dict(weight=torch.randn(50, 16, dtype=torch.float16)), "weight"),
        (dict(bias=torch.randn(49)), "bias"),
        (dict(bias=torch.randn(50, dtype=torch.bfloat16)), "bias"),
        (dict(targets=torch.full((12,), 50)), "targets"),
        (dict(targets=torch.zeros(11, dtype=torch.long)), "targets"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(hidden=torch.randn(12, 16).long()), "hidden"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_inputs_raise_value_error_naming_argument(change, argument):
    args = dict(hidden=torch.randn(12, 16), weight=torch.randn(50, 16), targets=torch.zeros(12, dtype=torch.long),
                bias=None, temperature=1.0, backend="torch")
    args.update(change)
    with pytest.raises(ValueError, match=argument):
        linear_logprobs_and_entropy(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op creates (outputs of each dispatched op)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t._base is None and not func._schema.is_mutable:
                self.sizes.append(t.numel())
        return out


def _largest_allocation(backend, n, h, v):
    hidden, weight, bias, targets = _inputs(n, h, v, torch.float32, True)
    leaves = [x.requires_grad_() for x in (hidden, weight, bias)]
    with _Allocations() as mode:
        lp, ent = linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2], backend=backend)
        (lp.sum() + ent.sum()).backward()
    return max(mode.sizes)


@pytest.mark.parametrize("backend", ["torch", "triton", *ORDERS])
def test_no_n_by_v_allocation_and_peak_independent_of_n(backend, monkeypatch, force_order):
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_COLS", 128)
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_ELEMENTS", 128 * 16)
    if backend in ORDERS:  # the Triton backend in a forced loop order
        force_order(backend)
        backend = "triton"
    # fp32 inputs: both orders accumulate straight into the gradients. (In bf16 the vocab-outer order
    # adds an fp32 [N, H] hidden accumulator: O(N H), like the hidden gradient itself, never O(N V).)
    h, v = 4, 1024  # small H: the [N, H] hidden gradient stays below the chunk budget
    small, large = _largest_allocation(backend, 64, h, v), _largest_allocation(backend, 128, h, v)
    assert small < 64 * v
    assert large == small, f"largest allocation grew with N: {small} -> {large}"
    assert large >= v * h  # the fp32 [V, H] weight gradient: proves the mode saw the allocations


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_size_matches_torch_backend(dtype):
    n, h, v = 2048, 4096, 32003
    hidden = torch.randn(n, h, device="cuda").to(dtype)
    weight = (torch.randn(v, h, device="cuda") / h**0.5 * 3).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::7] = IGNORE
    g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    outs = [_run(lambda a, b: linear_logprobs_and_entropy(a, b, targets, temperature=0.7, backend=be),
                 hidden, weight, None, targets, *g) for be in ("triton", "torch")]
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-3 * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("case", TRITON_CASES + [
    (300, 1024, 32003, torch.bfloat16, True, 0.7, "both"),
    (513, 4096, 8191, torch.bfloat16, False, 1.0, "both"),
    (129, 2048, 4099, torch.float16, True, 1.7, "entropy"),
    (257, 512, 2053, torch.float32, True, 0.6, "both"),
], ids=str)
def test_gpu_compiled_kernels_match_float64(case):
    """GPU twin of test_triton_backend_matches_float64: the same fp64 rule for the compiled kernels,
    at the interpreter's shapes and at shapes that cross the GPU tiles (128 x 128, BLOCK_H 64)."""
    _check("triton", *case, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["highest", "high"])
def test_gpu_fp32_error_no_worse_than_torch_matmul_at_the_same_precision(precision):
    """fp32 inputs: exact products by default, TF32 when torch.matmul may use it; either way the error
    against fp64 stays within that of the two-step torch path run at the same precision (TF32 keeps
    fp16's 10-bit mantissa, hence fp16's tolerances for it)."""
    n, h, v = 1024, 2048, 32003
    hidden, weight, _, targets = (None if x is None else x.cuda() for x in _inputs(n, h, v, torch.float32, False))
    g = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")

    def two_step(dtype):
        return lambda a, b: _two_step(a, b, None, targets, 0.7, dtype)[:2]

    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        ours = _run(lambda a, b: linear_logprobs_and_entropy(a, b, targets, temperature=0.7), hidden, weight, None,
                    targets, *g)
        same = _run(two_step(torch.float32), hidden, weight, None, targets, *g)
    finally:
        torch.set_float32_matmul_precision(before)
    exact = _run(two_step(torch.float64), hidden.double(), weight.double(), None, targets, *g)
    tolerances = torch.float32 if precision == "highest" else torch.float16
    for name, a, b, e in zip(("lp", "entropy", "d hidden", "d weight"), ours, same, exact):
        _assert_rule(name, a, b, e, tolerances)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU to hold the tensors off the current one")
def test_gpu_kernels_run_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device; both ops must switch to their inputs' GPU themselves."""
    hidden, weight, _, targets = _inputs(300, 256, 4099, torch.bfloat16, False)
    g = torch.randn(300), torch.randn(300)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        on = [x.to(device) for x in (hidden, weight, targets, *g)]
        linear = _run(lambda a, b: linear_logprobs_and_entropy(a, b, on[2]), *on[:2], None, *on[2:])
        logits = (on[0].float() @ on[1].float().T).requires_grad_()
        lp, ent = logprobs_and_entropy(logits, on[2])
        (lp * on[3] + ent * on[4]).sum().backward()
        results[device] = [t.cpu() for t in (*linear, lp.detach(), ent.detach(), logits.grad)]
    assert torch.cuda.current_device() == 0
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        assert torch.equal(a, b)  # deterministic kernels: the same bits on either GPU


@pytest.mark.gpu
def test_gpu_peak_memory_far_below_logits():
    n, h, v = 16384, 4096, 32000
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / h**0.5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = linear_logprobs_and_entropy(hidden, weight, targets)
    (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads_and_fp32_acc = (n * h + v * h) * 2 + v * h * 4
    assert extra < grads_and_fp32_acc + 512 * 2**20, extra  # bf16 logits alone would be 1 GiB


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_agrees_with_logits_op(backend):
    """Same values and gradients as logprobs_and_entropy(hidden @ weight.T + bias, ...) (issue 3)."""
    hidden, weight, bias, targets = _inputs(67, 48, 1003, torch.float32, True)
    g = torch.randn(67), torch.randn(67)
    ours = _run(lambda h, w, b: linear_logprobs_and_entropy(h, w, targets, bias=b, temperature=0.6, backend=backend),
                hidden, weight, bias, targets, *g)
    # The logits op gets fp32 logits rounded once from an exact product, its gradient flows back in fp64.
    theirs = _run(lambda h, w, b: logprobs_and_entropy((h @ w.T + b).float(), targets, temperature=0.6),
                  hidden.double(), weight.double(), bias.double(), targets, *g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.parametrize(
    "dtype, precision, expected",
    [
        (torch.bfloat16, "ieee", "_GPU_16BIT"),
        (torch.float16, "tf32", "_GPU_16BIT"),
        (torch.float32, "ieee", "_GPU_FP32"),
        (torch.float32, "tf32", "_GPU_TF32"),
    ],
)
def test_fp32_follows_torchs_matmul_precision(dtype, precision, expected):
    """On a GPU, fp32 inputs use exact fp32 products unless the user allowed TF32 for torch.matmul."""
    blocks = kernel_module._gpu_blocks(dtype, precision)
    assert blocks is getattr(kernel_module, expected)
    assert blocks.dot_precision == {"_GPU_16BIT": "ieee", "_GPU_FP32": "ieee", "_GPU_TF32": "tf32"}[expected]
