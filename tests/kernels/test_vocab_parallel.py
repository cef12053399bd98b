"""Vocabulary-parallel lp and H (process_group=, vocab_start=) on real gloo processes: each rank
holds an unequal slice of the vocabulary (of the logits, or of the output embedding) and must get the
single-process op's lp and H on the whole vocabulary, and its slice of the single-process gradient
(the full hidden gradient for the fused-linear op), to float32 rounding.

Each rank also computes the single-process op on the whole vocabulary, so both sides run under the
same interpreter settings; the single-process op is itself held to float64 in its own tests.
"""

from __future__ import annotations

import pytest
import torch
from logprobs_oracle import IGNORE, make_inputs
from spawn_helpers import run_ranks

from fusedrl.kernels import linear_logprobs_and_entropy, logprobs_and_entropy

TEMPERATURE = 0.7
# Slice boundaries (unequal; they cross the interpreter's 64-wide tiles of the fused-linear op).
LOGITS_SLICES = {2: [0, 15, 37], 3: [0, 5, 20, 37]}
LINEAR_SLICES = {2: [0, 70, 150], 3: [0, 37, 100, 150]}


def _logits_job(x, targets, g_lp, g_h, start, end, backend, *, process_group, **kept):
    """(lp, H, d logits of [start, end)) with vocabulary parallelism, then the same single-process."""
    out = []
    for logits, group, vocab_start in ((x[:, start:end], process_group, start), (x, None, 0)):
        leaf = logits.detach().clone().requires_grad_()
        lp, h = logprobs_and_entropy(leaf, targets, temperature=TEMPERATURE, backend=backend,
                                     process_group=group, vocab_start=vocab_start, **kept)
        (grad,) = torch.autograd.grad((lp * g_lp).sum() + (h * g_h).sum(), leaf)
        out.append((lp.detach(), h.detach(), grad if group is not None else grad[:, start:end]))
    return out


def _linear_job(hidden, weight, bias, targets, g_lp, g_h, start, end, backend, *, process_group, **kept):
    out = []
    for group, vocab_start, rows in ((process_group, start, slice(start, end)), (None, 0, slice(None))):
        leaves = [hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_(),
                  bias[rows].clone().requires_grad_()]
        lp, h = linear_logprobs_and_entropy(leaves[0], leaves[1], targets, bias=leaves[2], temperature=TEMPERATURE,
                                            backend=backend, process_group=group, vocab_start=vocab_start, **kept)
        grads = torch.autograd.grad((lp * g_lp).sum() + (h * g_h).sum(), leaves)
        if group is None:
            grads = (grads[0], grads[1][start:end], grads[2][start:end])
        out.append((lp.detach(), h.detach(), *grads))
    return out


def _bad_slices_job(x, targets, start, *, process_group):
    try:
        logprobs_and_entropy(x, targets, process_group=process_group, vocab_start=start)
    except ValueError as e:
        return str(e)
    return None


def _logits_inputs(dtype, bounds):
    vocab = bounds[-1]
    x, targets = make_inputs(24, vocab, dtype)
    x[0, : bounds[1]] = float("-inf")  # rank 0's slice of row 0 holds no probability
    targets[0] = vocab - 1
    for rank, start in enumerate(bounds[:-1]):  # a target on every rank's slice
        targets[4 + 4 * rank] = start + rank
    return x, targets


def _linear_inputs(dtype, vocab):
    hidden = torch.randn(12, 40).to(dtype)
    weight = (torch.randn(vocab, 40) / 40**0.5 * 3).to(dtype)
    bias = torch.randn(vocab).to(dtype)
    targets = torch.randint(0, vocab, (12,))
    targets[[0, 1, 2]] = torch.tensor([0, 80, vocab - 1])
    targets[[3, 7]] = IGNORE
    return hidden, weight, bias, targets


def _assert_close(name, got, want, dtype):
    """float32 rounding: a few ulps of the values' scale (one ulp of a 16-bit gradient)."""
    scale = want.abs().max().item() if want.numel() else 0.0
    rtol, atol = (2e-6, 2e-6 * max(scale, 1.0)) if dtype == torch.float32 else (2**-8, 2**-9 * scale)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


LOGITS_CASES = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32),
                ("triton", torch.bfloat16)]
LINEAR_CASES = [("torch", torch.float32), ("torch", torch.bfloat16), ("triton", torch.float32)]


@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_equals_one_process(world_size):
    bounds, linear_bounds = LOGITS_SLICES[world_size], LINEAR_SLICES[world_size]
    jobs = []
    for backend, dtype in LOGITS_CASES:
        x, targets = _logits_inputs(dtype, bounds)
        g_lp, g_h = torch.randn(24), torch.randn(24)
        args = [(x, targets, g_lp, g_h, bounds[r], bounds[r + 1], backend) for r in range(world_size)]
        jobs.append((_logits_job, args, {}))
    for backend, dtype in LINEAR_CASES:
        hidden, weight, bias, targets = _linear_inputs(dtype, linear_bounds[-1])
        g_lp, g_h = torch.randn(12), torch.randn(12)
        args = [(hidden, weight, bias, targets, g_lp, g_h, linear_bounds[r], linear_bounds[r + 1], backend)
                for r in range(world_size)]
        jobs.append((_linear_job, args, {}))
    results = run_ranks(world_size, jobs)

    names = {3: ("lp", "H", "d logits"), 5: ("lp", "H", "d hidden", "d weight", "d bias")}
    for (backend, dtype), per_rank in zip(LOGITS_CASES + LINEAR_CASES, results):
        for rank, (parallel, single) in enumerate(per_rank):
            for name, got, want in zip(names[len(parallel)], parallel, single):
                _assert_close(f"{backend} {dtype} rank {rank} {name}", got, want, dtype)
            lp, h = parallel[0], parallel[1]
            assert torch.isfinite(lp).all() and torch.isfinite(h).all()


def test_kept_set_across_ranks():
    """top_k / top_p with the vocabulary split: the threshold search all-reduces its histograms, so
    the kept set, lp, H and gradients are those of one process (rows with lp = -inf included)."""
    bounds = LOGITS_SLICES[3]
    jobs, cases = [], [("torch", torch.float32, 7, 0.8), ("triton", torch.bfloat16, None, 0.6),
                       ("triton", torch.float32, 3, None)]
    for backend, dtype, top_k, top_p in cases:
        x, targets = _logits_inputs(dtype, bounds)
        g_lp, g_h = torch.randn(24), torch.randn(24)
        args = [(x, targets, g_lp, g_h, bounds[r], bounds[r + 1], backend) for r in range(3)]
        jobs.append((_logits_job, args, {"top_k": top_k, "top_p": top_p}))
    linear_bounds = LINEAR_SLICES[3]
    for backend, top_k, top_p in (("triton", 4, 0.9), ("torch", None, 0.5)):
        hidden, weight, bias, targets = _linear_inputs(torch.float32, linear_bounds[-1])
        g_lp, g_h = torch.randn(12), torch.randn(12)
        args = [(hidden, weight, bias, targets, g_lp, g_h, linear_bounds[r], linear_bounds[r + 1], backend)
                for r in range(3)]
        jobs.append((_linear_job, args, {"top_k": top_k, "top_p": top_p}))
        cases.append((backend, torch.float32, top_k, top_p))
    names = {3: ("lp", "H", "d logits"), 5: ("lp", "H", "d hidden", "d weight", "d bias")}
    for (backend, dtype, *_), per_rank in zip(cases, run_ranks(3, jobs)):
        some_outside = False
        for rank, (parallel, single) in enumerate(per_rank):
            for name, got, want in zip(names[len(parallel)], parallel, single):
                _assert_close(f"{backend} {dtype} rank {rank} {name}", got, want, dtype)
            some_outside |= bool((parallel[0] == float("-inf")).any())
        assert some_outside, "no target fell outside the kept set: the case proves less than it should"


def test_all_ranks_agree_and_ignored_rows_are_zero():
    x, targets = _logits_inputs(torch.float32, LOGITS_SLICES[3])
    g = torch.randn(24)
    args = [(x, targets, g, g, LOGITS_SLICES[3][r], LOGITS_SLICES[3][r + 1], "torch") for r in range(3)]
    (per_rank,) = run_ranks(3, [(_logits_job, args, {})])
    ignored = targets == IGNORE
    for parallel, _ in per_rank:
        assert torch.equal(parallel[0], per_rank[0][0][0]) and torch.equal(parallel[1], per_rank[0][0][1])
        assert (parallel[0][ignored] == 0).all() and (parallel[1][ignored] == 0).all()
        assert (parallel[2][ignored] == 0).all()


def test_slices_that_do_not_tile_the_vocabulary_are_refused_on_every_rank():
    x, targets = make_inputs(4, 10, torch.float32)
    args = [(x[:, :5], targets.clamp(max=9), 0), (x[:, 5:], targets.clamp(max=9), 6)]  # a gap at id 5
    (messages,) = run_ranks(2, [(_bad_slices_job, args, {})])
    for message in messages:
        assert message is not None and message.startswith("vocab_start must tile the vocabulary")


def test_bad_arguments_without_a_group():
    x, targets = make_inputs(4, 10, torch.float32)
    with pytest.raises(ValueError, match="vocab_start must be 0 without a process_group"):
        logprobs_and_entropy(x, targets, vocab_start=3)
    with pytest.raises(ValueError, match="vocab_start must be an int"):
        logprobs_and_entropy(x, targets, vocab_start=-1)
    with pytest.raises(ValueError, match="process_group must be a torch.distributed ProcessGroup"):
        logprobs_and_entropy(x, targets, process_group="tp")
    with pytest.raises(ValueError, match="vocab_start must be 0"):
        linear_logprobs_and_entropy(torch.randn(3, 4), torch.randn(10, 4), torch.zeros(3, dtype=torch.long),
                                    vocab_start=2)
