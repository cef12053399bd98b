"""Benchmark: log-prob and entropy straight from hidden states (fusedrl.kernels.linear_logprobs_and_entropy).

Paths compared, forward only and forward + backward (random upstream gradients on lp and H):
- "fused": the op itself (Triton on CUDA; the chunked torch backend on CPU);
- "two_step": matmul to [N, V] logits, then log_softmax / gather / entropy (what most RL code does);
- "two_step_op": matmul to logits, then fusedrl's logits op (logprobs_and_entropy);
- "chunked_torch": the op's plain-PyTorch backend (token x vocabulary chunks, recomputing backward);
- "liger" / "cce": Liger-Kernel's fused linear cross-entropy and Apple's cut-cross-entropy, where they
  import (CUDA only). They compute the log-prob alone, so they are compared with "fused_lp", the op with
  the entropy output unused;
- "fused_top_k50", "fused_top_p0.95", "fused_batch_invariant": the op's other modes (the sampler's kept
  set at vLLM-style settings, batch invariance), for each mode's cost relative to "fused" in the same
  run. The kept-set modes compute another distribution, so the float64 full-softmax check skips them
  (tests/kernels/test_linear_kept_set.py holds them to float64).

Rows go through the shared runner (bench/_runner.py): time, TFLOP/s (model flops: 2NVH forward, 6NVH
forward + backward; a path's own recompute is not counted) and its fraction of the measured matmul
rate, peak memory above the inputs. Each path's lp (and H) are first checked against float64 on 256
rows. Runs on CPU at reduced sizes without Triton in well under a minute:
`pytest bench/test_bench_linear_logprobs_entropy.py -n 0`.
"""

import pytest
import torch

from bench._runner import check_against_float64, run_case
from fusedrl.kernels import torch_backend
from fusedrl.kernels.linear_logprobs_entropy import linear_logprobs_and_entropy
from fusedrl.kernels.logprobs_entropy import logprobs_and_entropy

CUDA = torch.cuda.is_available()
# The GPU target shape, and a CPU shape that keeps the whole module under a minute.
N, H, V = (8192, 4096, 131072) if CUDA else (128, 64, 2048)
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 5 if CUDA else 2
CHECKED_ROWS = 256  # rows whose answer is checked against float64 before timing


def _two_step(hidden, weight, targets):
    logp = (hidden @ weight.T).float().log_softmax(-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _two_step_op(hidden, weight, targets):
    return logprobs_and_entropy(hidden @ weight.T, targets)


def _fused(hidden, weight, targets):
    return linear_logprobs_and_entropy(hidden, weight, targets, backend="auto")


def _chunked(hidden, weight, targets):
    return torch_backend.linear_logprobs_and_entropy_torch(hidden, weight, targets)


def _liger(hidden, weight, targets):
    loss = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")
    return (-loss.LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets),)


def _cce(hidden, weight, targets):
    cce = pytest.importorskip("cut_cross_entropy")
    return (-cce.linear_cross_entropy(hidden, weight, targets, reduction="none"),)


def _fused_lp(hidden, weight, targets):
    return linear_logprobs_and_entropy(hidden, weight, targets, backend="auto")[:1]


def _mode(**kwargs):
    return lambda hidden, weight, targets: linear_logprobs_and_entropy(hidden, weight, targets, backend="auto",
                                                                       **kwargs)


PATHS = {"fused": _fused, "two_step": _two_step, "two_step_op": _two_step_op, "chunked_torch": _chunked, "fused_lp": _fused_lp,
         "liger": _liger, "cce": _cce, "fused_top_k50": _mode(top_k=50), "fused_top_p0.95": _mode(top_p=0.95),
         "fused_batch_invariant": _mode(batch_invariant=True)}
KEPT_SET_PATHS = ("fused_top_k50", "fused_top_p0.95")


def check_path(fn, hidden, weight, targets, dtype) -> None:
    """The path's lp (and H, where it computes it) against float64 logits of the same inputs."""
    with torch.no_grad():
        outs = fn(hidden, weight, targets)
    check_against_float64(outs[0], outs[1] if len(outs) > 1 else None, hidden.double() @ weight.double().T,
                          targets, dtype)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", list(PATHS))
def test_linear_logprobs_entropy(benchmark, ceilings, device, path, backward):
    if path in ("liger", "cce") and not CUDA:
        pytest.skip(f"{path} is benchmarked on CUDA only (the CPU interpreter is not a kernel)")
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=device, dtype=DTYPE).requires_grad_(backward)
    weight = (torch.randn(V, H, device=device) / H**0.5).to(DTYPE).requires_grad_(backward)
    targets = torch.randint(0, V, (N,), device=device)
    fn = PATHS[path]
    if path not in KEPT_SET_PATHS:
        check_path(fn, hidden.detach()[:CHECKED_ROWS], weight.detach(), targets[:CHECKED_ROWS], DTYPE)
    grads = [torch.randn(N, device=device) for _ in range(2)]

    def step():
        outs = fn(hidden, weight, targets)
        if backward:
            sum((o * g).sum() for o, g in zip(outs, grads)).backward()
            hidden.grad = weight.grad = None

    # Model flops: 2NVH forward, 6NVH forward + backward (a path's own recompute is not counted); the
    # bytes are the inputs read once.
    run_case(benchmark, ceilings, step, device=device, bytes_moved=(N + V) * H * hidden.element_size(),
             flops=(6 if backward else 2) * N * V * H, rounds=ROUNDS, op="linear_logprobs_and_entropy",
             impl=path, mode="fwd_bwd" if backward else "fwd", shape=f"N={N} H={H} V={V} {str(DTYPE).removeprefix('torch.')}")
