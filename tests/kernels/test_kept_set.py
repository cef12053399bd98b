"""top_k / top_p: lp and H of the sampler's renormalised kept set, against a float64 reference that
sorts each row (vLLM's order: temperature, top-k, top-p; tied logits kept or dropped together)."""

from __future__ import annotations

import math

import pytest
import torch
from logprobs_oracle import GRAD_RTOL_OF_MAX, IGNORE, OUT_ATOL, OUT_RTOL, AllocationRecorder, assert_rule, grads
from logprobs_oracle import kept_mask, make_inputs

from fusedrl.kernels import logprobs_and_entropy
from fusedrl.kernels.torch_backend import LogprobsEntropyOptions, logprobs_and_entropy_torch

BACKENDS = ["torch", "triton"]


def oracle(x, targets, temperature, keep, dtype=torch.float64):
    """lp, H of the renormalised kept set, autograd-able through the kept logits only."""
    leaf = x.detach().to(dtype).requires_grad_()
    logp = torch.log_softmax(torch.where(keep, leaf / temperature, float("-inf")), dim=-1)
    ignored = targets == IGNORE
    lp = logp.gather(-1, targets.masked_fill(ignored, 0)[:, None]).squeeze(-1).masked_fill(ignored, 0.0)
    entropy = -(logp.exp() * logp.masked_fill(~keep, 0.0)).sum(-1).masked_fill(ignored, 0.0)
    return leaf, lp, entropy


def check_against_oracle(backend, x, targets, temperature, top_k, top_p):
    keep = kept_mask(x, temperature, top_k, top_p)
    leaf = x.detach().clone().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, temperature=temperature, backend=backend, top_k=top_k,
                                       top_p=top_p)
    ref_leaf, ref_lp, ref_h = oracle(x, targets, temperature, keep)
    base_leaf, base_lp, base_h = oracle(x, targets, temperature, keep, torch.float32)
    assert_rule("lp", lp, ref_lp, base_lp, OUT_ATOL, OUT_RTOL)
    assert_rule("H", entropy, ref_h, base_h, OUT_ATOL, OUT_RTOL)
    g_lp, g_h = torch.randn(targets.shape, device=x.device), torch.randn(targets.shape, device=x.device)
    ours = grads(leaf, lp, entropy, g_lp, g_h)
    ref = grads(ref_leaf, ref_lp, ref_h, g_lp, g_h)
    base = grads(base_leaf, base_lp, base_h, g_lp, g_h).to(x.dtype)
    assert_rule("d logits", ours, ref, base, GRAD_RTOL_OF_MAX * ref.abs().max().item())
    assert (ours[~keep] == 0).all(), "gradient outside the kept set"
    return lp, entropy


SETTINGS = [(1, None), (5, None), (None, 0.9), (None, 0.35), (12, 0.8), (3, 0.999)]
# Every setting on triton / fp32 and torch / bf16, one on the other two pairs (the interpreter is slow).
CASES = ([("triton", torch.float32, *s) for s in SETTINGS] + [("torch", torch.bfloat16, *s) for s in SETTINGS]
         + [("triton", torch.bfloat16, 12, 0.8), ("torch", torch.float32, 12, 0.8)])


@pytest.mark.parametrize("backend, dtype, top_k, top_p", CASES, ids=str)
def test_matches_sorting_oracle(backend, dtype, top_k, top_p):
    x, targets = make_inputs(23, 301, dtype)  # plain, peaked, far-below-zero and -inf-sprinkled rows
    # Targets drawn from the top of each row too, so that most rows' targets are kept.
    top = x.float().topk(3, dim=-1).indices[torch.arange(23), torch.arange(23) % 3]
    targets = torch.where((torch.arange(23) % 2 == 0) & (targets != IGNORE), top, targets)
    check_against_oracle(backend, x, targets, 0.8, top_k, top_p)


@pytest.mark.gpu
@pytest.mark.parametrize("top_k, top_p", [(50, None), (None, 0.95), (20, 0.9)])
def test_gpu_production_vocabulary_matches_sorting_oracle(top_k, top_p):
    x, targets = make_inputs(64, 151936, torch.bfloat16, "cuda")
    top = x.float().topk(3, dim=-1).indices[:, 0]
    targets = torch.where(targets != IGNORE, top, targets)  # most targets kept, the peaked ones' too
    check_against_oracle("triton", x, targets, 0.8, top_k, top_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties(backend):
    """Few distinct logit values: top-k and top-p thresholds fall inside groups of ties."""
    x = (torch.randint(0, 6, (16, 64)) * 0.75).float()
    targets = torch.randint(0, 64, (16,))
    for top_k, top_p in [(1, None), (4, None), (10, None), (None, 0.3), (None, 0.61), (7, 0.55)]:
        check_against_oracle(backend, x, targets, 1.3, top_k, top_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked(backend):
    # p proportional to e^2, e^2, e, 1 (T = 1). top_k = 1 keeps both tied maxima; top_p = 0.3 too
    # (nothing lies strictly above either), where vLLM's sort keeps only one of them.
    x = torch.tensor([[2.0, 2.0, 1.0, 0.0]] * 3)
    targets = torch.tensor([1, 2, 0])
    for kwargs in ({"top_k": 1}, {"top_p": 0.3}, {"top_k": 2, "top_p": 0.5}):
        lp, h = logprobs_and_entropy(x, targets, backend=backend, **kwargs)
        assert lp[0].item() == pytest.approx(math.log(0.5)) and lp[2].item() == pytest.approx(math.log(0.5))
        assert lp[1].item() == float("-inf")  # token 2 is outside the kept set
        assert h.tolist() == pytest.approx([math.log(2)] * 3)
    # top_p = 0.85: token 2 has 2e^2 / (2e^2 + e + 1) = 0.799 of the mass above it: kept; token 3 not.
    lp, _ = logprobs_and_entropy(x, targets, backend=backend, top_p=0.85)
    z = 2 * math.e**2 + math.e
    assert lp.tolist() == pytest.approx([math.log(math.e**2 / z), math.log(math.e / z), math.log(math.e**2 / z)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeping_everything_is_the_plain_op_bit_for_bit(backend):
    x, targets = make_inputs(9, 50, torch.bfloat16)
    want = logprobs_and_entropy(x, targets, backend=backend, temperature=0.7)
    for kwargs in ({"top_p": 1.0}, {"top_k": 50}, {"top_k": 1000, "top_p": 1}):
        got = logprobs_and_entropy(x, targets, backend=backend, temperature=0.7, **kwargs)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), kwargs


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_1_is_greedy(backend):
    x = torch.randn(12, 40)
    argmax = x.argmax(-1)
    targets = torch.where(torch.arange(12) % 2 == 0, argmax, (argmax + 1) % 40)
    leaf = x.clone().requires_grad_()
    lp, h = logprobs_and_entropy(leaf, targets, backend=backend, top_k=1)
    assert (lp[0::2] == 0).all() and (lp[1::2] == float("-inf")).all() and (h == 0).all()
    (lp[0::2].sum() + h.sum()).backward()
    assert (leaf.grad == 0).all()  # a one-token distribution does not move


def test_target_outside_the_kept_set_gives_minus_inf_and_a_finite_gradient():
    x = torch.randn(6, 30)
    targets = x.argmin(-1)
    for backend in BACKENDS:
        lp, h = check_against_oracle(backend, x, targets, 1.0, 5, None)
        assert (lp == float("-inf")).all() and torch.isfinite(h).all()


def test_search_memory_does_not_grow_with_rows():
    """The threshold search streams pieces of rows: its largest allocation (a block's histogram,
    256 x 2049) is set by the chunk budget and the block size, not by N (an [N, V] tensor would show up)."""
    vocab = 4000
    options = LogprobsEntropyOptions(top_k=20, top_p=0.9, chunk_bytes=64 * 4 * vocab)
    largest = []
    for n in (300, 600):
        x, targets = torch.randn(n, vocab), torch.randint(0, vocab, (n,))
        recorder = AllocationRecorder()
        with recorder:
            logprobs_and_entropy_torch(x, targets, options)
        largest.append(max(numel for numel, _ in recorder.allocations))
    assert largest[0] == largest[1] < 300 * vocab // 2


@pytest.mark.parametrize(
    "kwargs, message",
    [({"top_k": 0}, "top_k must be None or an int >= 1"), ({"top_k": 2.5}, "top_k must be None or an int"),
     ({"top_k": True}, "top_k must be None or an int"), ({"top_p": 0.0}, "top_p must be None or a number in"),
     ({"top_p": 1.5}, "top_p must be None or a number in"), ({"top_p": "x"}, "top_p must be None or a number")],
)
def test_bad_arguments(kwargs, message):
    x, targets = make_inputs(3, 10, torch.float32)
    with pytest.raises(ValueError, match=message):
        logprobs_and_entropy(x, targets, **kwargs)
