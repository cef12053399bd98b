"""linear_logprobs_and_entropy with top_k / top_p: lp, H and the hidden, weight and bias gradients of
the sampler's renormalised kept set, against float64 autograd on the same rounded inputs, with the
kept set found by sorting the float64 logits (logprobs_oracle.kept_mask)."""

from __future__ import annotations

import pytest
import torch
from logprobs_oracle import IGNORE, assert_rule, kept_mask

from fusedrl.kernels import linear_logprobs_and_entropy, torch_backend

# (rtol, atol as a fraction of the largest fp64 magnitude): about one rounding of the dtype.
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2**-7, 2**-9)}
# (backend, dtype, top_k, top_p): each setting on each backend, each dtype on each backend; not the
# whole product, which the interpreter makes slow.
CASES = [("torch", torch.float32, 1, None), ("torch", torch.bfloat16, 9, 0.7), ("torch", torch.float32, None, 0.9),
         ("triton", torch.float32, 6, None), ("triton", torch.bfloat16, None, 0.9), ("triton", torch.float32, 9, 0.7),
         ("triton", torch.bfloat16, 1, None)]


def _inputs(dtype):
    hidden = torch.randn(37, 40).to(dtype)
    weight = (torch.randn(300, 40) / 40**0.5 * 3).to(dtype)
    bias = torch.randn(300).to(dtype)
    targets = torch.randint(0, 300, (37,))
    targets[[2, 11]] = IGNORE
    return hidden, weight, bias, targets


def _run(fn, leaves, g_lp, g_h):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    lp, h = fn(*leaves)
    torch.autograd.backward([lp, h], [g_lp, g_h])
    return [lp.detach(), h.detach()] + [x.grad for x in leaves]


def _softmax_of_kept(keep, targets, temperature, compute):
    def fn(hidden, weight, bias):
        z = (hidden @ weight.T + bias).to(compute) / temperature
        logp = torch.log_softmax(torch.where(keep, z, float("-inf")), dim=-1)
        ignored = targets == IGNORE
        lp = logp.gather(1, targets.clamp(min=0)[:, None])[:, 0].masked_fill(ignored, 0.0)
        h = -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1).masked_fill(ignored, 0.0)
        return lp, h
    return fn


@pytest.mark.parametrize("backend, dtype, top_k, top_p", CASES, ids=str)
def test_matches_float64(backend, dtype, top_k, top_p, monkeypatch):
    # Small torch-backend chunks, so that the search's row blocks and vocabulary pieces are crossed.
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_COLS", 128)
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_ELEMENTS", 128 * 16)
    hidden, weight, bias, targets = _inputs(dtype)
    temperature = 0.8
    z64 = (hidden.double() @ weight.double().T + bias.double()) / temperature
    keep = kept_mask(z64, 1.0, top_k, top_p)
    # Half the rows sample their target from the kept set (the usual case), half anywhere.
    first_kept = keep.float().argmax(-1)
    targets = torch.where((torch.arange(37) % 2 == 0) & (targets != IGNORE), first_kept, targets)
    g_lp, g_h = torch.randn(37), torch.randn(37)

    def ours(h, w, b):
        return linear_logprobs_and_entropy(h, w, targets, bias=b, temperature=temperature, backend=backend,
                                           top_k=top_k, top_p=top_p)

    got = _run(ours, (hidden, weight, bias), g_lp, g_h)
    same = _run(_softmax_of_kept(keep, targets, temperature, torch.float32), (hidden, weight, bias), g_lp, g_h)
    exact = _run(_softmax_of_kept(keep, targets, temperature, torch.float64),
                 (hidden.double(), weight.double(), bias.double()), g_lp, g_h)
    rtol, atol = TOL[dtype]
    for name, a, b, c in zip(("lp", "H", "d hidden", "d weight", "d bias"), got, same, exact):
        finite = c[torch.isfinite(c)]
        assert_rule(name, a, c, b, atol * (finite.abs().max().item() if finite.numel() else 0.0), rtol)
    if top_k is not None:  # some targets outside the kept set: the lp = -inf path is exercised
        assert (got[0] == float("-inf")).any()
