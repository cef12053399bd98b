"""Benchmark: log-prob and entropy straight from hidden states (fusedrl.kernels.linear_logprobs_and_entropy).

Paths compared, forward only and forward + backward (random upstream gradients on lp and H):
- "fused": the op itself (Triton on CUDA; the chunked torch backend on CPU);
- "two_step": matmul to [N, V] logits, then log_softmax / gather / entropy (what most RL code does);
- "two_step_op": matmul to logits, then fusedrl's logits op (logprobs_and_entropy);
- "chunked_torch": the op's plain-PyTorch backend (token x vocabulary chunks, recomputing backward);
- "liger" / "cce": Liger-Kernel's fused linear cross-entropy and Apple's cut-cross-entropy, where they
  import (CUDA only). They compute the log-prob alone, so they are compared with "fused_lp", the op with
  the entropy output unused.

Each result's extra_info holds the shape, TFLOP/s (model flops: 2NVH forward, 6NVH forward + backward; a
path's own recompute is not counted) and peak memory above the inputs. Runs on CPU at reduced sizes
without Triton in well under a minute: `pytest bench/test_bench_linear_logprobs_entropy.py -n 0`.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.kernels import reference
from fusedrl.kernels.linear_logprobs_entropy import linear_logprobs_and_entropy
from fusedrl.kernels.logprobs_entropy import logprobs_and_entropy

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The GPU target shape, and a CPU shape that keeps the whole module under a minute.
N, H, V = (8192, 4096, 131072) if CUDA else (128, 64, 2048)
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS = 5 if CUDA else 2


def _two_step(hidden, weight, targets):
    logp = (hidden @ weight.T).float().log_softmax(-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _two_step_op(hidden, weight, targets):
    return logprobs_and_entropy(hidden @ weight.T, targets)


def _fused(hidden, weight, targets):
    return linear_logprobs_and_entropy(hidden, weight, targets, backend="auto")


def _chunked(hidden, weight, targets):
    return reference.linear_logprobs_and_entropy_torch(hidden, weight, targets)


def _liger(hidden, weight, targets):
    loss = pytest.importorskip("liger_kernel.transformers.fused_linear_cross_entropy")
    return (-loss.LigerFusedLinearCrossEntropyLoss(reduction="none")(weight, hidden, targets),)


def _cce(hidden, weight, targets):
    cce = pytest.importorskip("cut_cross_entropy")
    return (-cce.linear_cross_entropy(hidden, weight, targets, reduction="none"),)


def _fused_lp(hidden, weight, targets):
    return linear_logprobs_and_entropy(hidden, weight, targets, backend="auto")[:1]


PATHS = {"fused": _fused, "two_step": _two_step, "two_step_op": _two_step_op, "chunked_torch": _chunked, "fused_lp": _fused_lp,
         "liger": _liger, "cce": _cce}


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of live tensors created inside the mode (CPU stand-in for CUDA's allocator stats)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t._base is None and not func._schema.is_mutable:
                nbytes = t.untyped_storage().nbytes()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, nbytes)
        return out


def _peak_bytes(step) -> int:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _PeakBytes() as mode:
        step()
    return mode.peak


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("path", list(PATHS))
def test_linear_logprobs_entropy(benchmark, path, backward):
    if path in ("liger", "cce") and not CUDA:
        pytest.skip(f"{path} runs on CUDA only")
    torch.manual_seed(0)
    hidden = torch.randn(N, H, device=DEVICE, dtype=DTYPE).requires_grad_(backward)
    weight = (torch.randn(V, H, device=DEVICE) / H**0.5).to(DTYPE).requires_grad_(backward)
    targets = torch.randint(0, V, (N,), device=DEVICE)
    fn = PATHS[path]
    fn(hidden, weight, targets)  # import check and warm-up (compiles the kernels)
    grads = [torch.randn(N, device=DEVICE) for _ in range(2)]

    def step():
        outs = fn(hidden, weight, targets)
        if backward:
            sum((o * g).sum() for o, g in zip(outs, grads)).backward()
            hidden.grad = weight.grad = None
        if CUDA:
            torch.cuda.synchronize()

    peak = _peak_bytes(step)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    flops = (6 if backward else 2) * N * V * H
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if CUDA else "cpu", dtype=str(DTYPE).replace("torch.", ""),
        N=N, H=H, V=V, tflops=flops / benchmark.stats.stats.mean / 1e12, peak_extra_mib=peak / 2**20,
    )
