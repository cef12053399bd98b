"""logprobs_and_entropy: fused Triton and chunked-torch backends against plain PyTorch.

Implementations:
- fusedrl_triton: the fused kernels (GPU only);
- fusedrl_torch: fusedrl's plain-PyTorch backend, streaming over row chunks;
- eager: log_softmax + gather + entropy in PyTorch, upcast to fp32 (the usual RL-library code);
- compiled: torch.compile of the same eager function;
- fusedrl_{triton,torch}_{top_k50,top_p0.95} and fusedrl_triton_batch_invariant: the op's other modes
  (the sampler's kept set at vLLM-style settings; batch invariance), for each mode's cost relative to
  the plain op in the same run. The kept-set modes compute another distribution, so the float64
  full-softmax check skips them (tests/kernels/test_kept_set.py holds them to float64).

bytes_moved is the minimum the op must move: the forward reads the logits once (and writes 8
bytes of output a row); forward + backward also reads them again and writes the gradient once.
The GPU goal is >= 90% of copy bandwidth for the forward at N = 8192, V = 151,936 bf16 and >= 80%
for forward + backward. Each implementation's lp and H are first checked against float64 on 512 rows.
"""

from __future__ import annotations

import pytest
import torch

from bench._runner import check_against_float64, run_case
from fusedrl.kernels import logprobs_and_entropy

GPU_SHAPES = [(8192, 151936), (32768, 32000)]
CPU_SHAPES = [(256, 32000)]


def eager(logits, targets, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


_compiled = torch.compile(eager, dynamic=False)

IMPLS = {
    "fusedrl_triton": lambda x, y: logprobs_and_entropy(x, y, backend="triton"),
    "fusedrl_torch": lambda x, y: logprobs_and_entropy(x, y, backend="torch"),
    "eager": eager,
    "compiled": lambda x, y: _compiled(x, y),
}
MODES = {"top_k50": {"top_k": 50}, "top_p0.95": {"top_p": 0.95}, "batch_invariant": {"batch_invariant": True}}
for _backend in ("triton", "torch"):
    for _mode, _kwargs in MODES.items():
        if (_backend, _mode) != ("torch", "batch_invariant"):  # one row at a time: not a GPU path
            IMPLS[f"fusedrl_{_backend}_{_mode}"] = (
                lambda x, y, b=_backend, k=_kwargs: logprobs_and_entropy(x, y, backend=b, **k))
KEPT_SET_IMPLS = tuple(name for name in IMPLS if "top_" in name)


def _shapes():
    return GPU_SHAPES if torch.cuda.is_available() else CPU_SHAPES


@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"N{s[0]}-V{s[1]}")
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_logprobs_entropy(benchmark, ceilings, device, on_gpu, impl, mode, shape):
    if impl.startswith("fusedrl_triton") and not on_gpu:
        pytest.skip("the Triton backend is benchmarked on a GPU only (the CPU interpreter is not a kernel)")
    n_rows, vocab = shape
    dtype = torch.bfloat16
    logits = torch.randn(n_rows, vocab, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (n_rows,), device=device)
    fn = IMPLS[impl]
    if impl not in KEPT_SET_IMPLS:
        with torch.no_grad():
            check_against_float64(*fn(logits[:512], targets[:512]), logits[:512], targets[:512], dtype)
    element = logits.element_size()
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return fn(logits, targets)

        bytes_moved = n_rows * vocab * element + n_rows * (8 + 8)
    else:
        leaf = logits.requires_grad_()

        def call():
            lp, entropy = fn(leaf, targets)
            (grad,) = torch.autograd.grad(lp.sum() + entropy.sum(), leaf)
            return grad

        bytes_moved = 3 * n_rows * vocab * element + n_rows * (8 + 8 + 8)
    run_case(
        benchmark,
        ceilings,
        call,
        device=device,
        bytes_moved=bytes_moved,
        rounds=10 if on_gpu else 3,
        op="logprobs_and_entropy",
        impl=impl,
        mode=mode,
        shape=f"N={n_rows} V={vocab} {str(dtype).removeprefix('torch.')}",
    )
