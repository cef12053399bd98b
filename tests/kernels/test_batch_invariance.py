"""batch_invariant=True: every row's lp, H and gradient (d logits, or d hidden for the fused-linear op)
are bitwise the same whether the row is computed alone, in the whole batch, or in other batches of any
size at any offset. Both ops, both backends (Triton through the interpreter), fp32 and bf16, with and
without the sampler's kept set."""

from __future__ import annotations

import pytest
import torch
from logprobs_oracle import IGNORE, make_inputs

from fusedrl.kernels import linear_logprobs_and_entropy, logprobs_and_entropy

N_ROWS = 23
ALONE = (0, 3, 9, 16, 22)  # rows also computed on their own (3 is ignored)


def _logits_rows(x, targets, g_lp, g_h, backend, kept, rows):
    """lp, H, d logits of the given rows of the pool, computed together as one batch."""
    rows = rows.to(x.device)
    leaf = x[rows].detach().clone().requires_grad_()
    lp, h = logprobs_and_entropy(leaf, targets[rows], temperature=0.7, backend=backend, batch_invariant=True,
                                 **kept)
    (grad,) = torch.autograd.grad((lp * g_lp[rows]).sum() + (h * g_h[rows]).sum(), leaf)
    return lp.detach(), h.detach(), grad


def _linear_rows(inputs, g_lp, g_h, backend, kept, rows):
    """lp, H, d hidden of the given rows of the pool, computed together as one batch."""
    hidden, weight, bias, targets = inputs
    rows = rows.to(hidden.device)
    leaf = hidden[rows].detach().clone().requires_grad_()
    lp, h = linear_logprobs_and_entropy(leaf, weight, targets[rows], bias=bias, temperature=0.7, backend=backend,
                                        batch_invariant=True, **kept)
    (grad,) = torch.autograd.grad((lp * g_lp[rows]).sum() + (h * g_h[rows]).sum(), leaf)
    return lp.detach(), h.detach(), grad


def _batches(generator, n_rows):
    """Row index lists: each row alone (a few), and shuffled batches of several sizes, so that rows sit
    at many offsets and share tiles with different neighbours."""
    batches = [torch.tensor([r]) for r in ALONE]
    for size in (2, 7, 16, n_rows):
        batches.append(torch.randperm(n_rows, generator=generator)[:size])
    return batches


def _assert_invariant(run, n_rows=N_ROWS):
    """run(rows) -> per-row outputs; every batch must reproduce the full batch's rows bit for bit."""
    full = run(torch.arange(n_rows))
    generator = torch.Generator().manual_seed(0)
    for rows in _batches(generator, n_rows):
        got = run(rows)
        for name, a, b in zip(("lp", "H", "grad"), got, full):
            b = b[rows.to(b.device)]
            same = (a == b) | (a.isnan() & b.isnan())
            if a.dim() > 1:
                same = same.all(-1)
            same = same.cpu()
            assert same.all(), f"{name}: rows {rows[~same].tolist()} differ when computed as {rows.tolist()}"


KEPT = {"top_k": 5, "top_p": 0.9}
# (backend, dtype, V, kept-set arguments): V = 100 puts several rows in a Triton program, V = 3000 one
# row per program in one 4096-wide tile. A subset of the product keeps the interpreter's time down.
LOGITS_CASES = [
    ("torch", torch.float32, 100, {}), ("torch", torch.bfloat16, 3000, {}), ("torch", torch.bfloat16, 100, KEPT),
    ("triton", torch.float32, 100, {}), ("triton", torch.bfloat16, 3000, {}), ("triton", torch.float32, 100, KEPT),
]
LINEAR_CASES = [("torch", torch.float32, {}), ("torch", torch.bfloat16, KEPT), ("triton", torch.bfloat16, {}),
                ("triton", torch.float32, KEPT)]


@pytest.mark.parametrize("backend, dtype, vocab, kept", LOGITS_CASES, ids=str)
def test_logits_op(backend, dtype, vocab, kept):
    x, targets = make_inputs(N_ROWS, vocab, dtype)
    g_lp, g_h = torch.randn(N_ROWS), torch.randn(N_ROWS)
    assert (targets == IGNORE).any()
    _assert_invariant(lambda rows: _logits_rows(x, targets, g_lp, g_h, backend, kept, rows))


@pytest.mark.parametrize("backend, dtype, kept", LINEAR_CASES, ids=str)
def test_linear_op(backend, dtype, kept):
    hidden = torch.randn(N_ROWS, 40).to(dtype)
    weight = (torch.randn(300, 40) / 40**0.5 * 3).to(dtype)
    bias = torch.randn(300).to(dtype)
    targets = torch.randint(0, 300, (N_ROWS,))
    targets[[3, 12]] = IGNORE
    g_lp, g_h = torch.randn(N_ROWS), torch.randn(N_ROWS)
    _assert_invariant(lambda rows: _linear_rows((hidden, weight, bias, targets), g_lp, g_h, backend, kept, rows))


@pytest.mark.gpu
@pytest.mark.parametrize("kept", [{}, KEPT], ids=["full", "kept"])
def test_gpu_logits_op_production_vocabulary(kept):
    x, targets = make_inputs(64, 151936, torch.bfloat16, "cuda")
    g_lp, g_h = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    _assert_invariant(lambda rows: _logits_rows(x, targets, g_lp, g_h, "triton", kept, rows), 64)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_linear_op_tensor_core_tiles(dtype):
    """On tensor cores: a row's logits must not depend on the rows that share its 128-row tile."""
    n = 300
    hidden = torch.randn(n, 4096, device="cuda").to(dtype)
    weight = (torch.randn(32000, 4096, device="cuda") / 64).to(dtype)
    bias = torch.randn(32000, device="cuda").to(dtype)
    targets = torch.randint(0, 32000, (n,), device="cuda")
    g_lp, g_h = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    _assert_invariant(lambda rows: _linear_rows((hidden, weight, bias, targets), g_lp, g_h, "triton", {}, rows), n)


def test_bad_flag():
    x, targets = make_inputs(3, 10, torch.float32)
    with pytest.raises(ValueError, match="batch_invariant must be a bool"):
        logprobs_and_entropy(x, targets, batch_invariant=1)
    with pytest.raises(ValueError, match="batch_invariant must be a bool"):
        linear_logprobs_and_entropy(torch.randn(3, 4), torch.randn(10, 4), targets, batch_invariant="yes")
