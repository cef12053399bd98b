"""Other projects' kernels for the same two ops, on the shapes and with the byte and FLOP counts of
fusedrl's own benchmark modules, so that their rows sit in one table.

- From logits: TRL's `selective_log_softmax_and_entropy` (one fused Triton pass on a GPU, a chunked
  PyTorch path elsewhere), TRL's older pair `selective_log_softmax` + `entropy_from_logits`, and
  Liger-Kernel's cross-entropy with `reduction="none"` (log-prob only: it computes no entropy).
- From hidden states: TRL's `ChunkedLogProbFunction` (log-prob and entropy). Liger-Kernel's and
  cut-cross-entropy's fused linear cross-entropy are in bench/test_bench_linear_logprobs_entropy.py.

Liger-Kernel is Triton-only: on a machine without CUDA its rows skip, saying so.
Each row checks its log-probs (and entropies, where the peer computes them) against float64 before it
is timed: a fast wrong answer is not a result.
"""

from __future__ import annotations

import pytest
import torch

from bench._runner import check_against_float64, run_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# As test_bench_logprobs_entropy.py on a GPU; on a CPU fewer rows, in fp32 (TRL's CPU path is slow in bf16).
LOGITS_SHAPES = [(8192, 151936), (32768, 32000)] if DEVICE == "cuda" else [(64, 32000)]
# As test_bench_linear_logprobs_entropy.py.
LINEAR_SHAPES = [(8192, 4096, 131072)] if DEVICE == "cuda" else [(128, 64, 2048)]
MODES = ["fwd", "fwd_bwd"]
ROUNDS = 10 if DEVICE == "cuda" else 3
def _trl_fused(logits, targets):
    from trl.trainer.utils import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, targets)


def _trl_pair(logits, targets):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax(logits, targets), entropy_from_logits(logits)


def _liger(logits, targets):
    if DEVICE != "cuda":
        pytest.skip("Liger-Kernel runs Triton kernels on CUDA only")
    liger = pytest.importorskip("liger_kernel.transformers.functional")
    # Liger writes the gradient into the logits during the forward; work on a copy so that repeated
    # calls keep reading logits, and so that the copy's cost is the same in both modes.
    return -liger.liger_cross_entropy(logits.clone(), targets, reduction="none"), None


LOGITS_IMPLS = {"trl": _trl_fused, "trl-pair": _trl_pair, "liger": _liger}


def _check(lp, entropy, logits, targets):
    check_against_float64(lp, entropy, logits, targets, DTYPE)


def _call(fn, mode, inputs):
    """fn(*inputs) for "fwd"; for "fwd_bwd" also the backward of a loss that uses both outputs."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs)
    lp, entropy = fn(*inputs)
    loss = lp.sum() if entropy is None else lp.sum() + 0.1 * entropy.sum()
    loss.backward()
    return lp, entropy


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LOGITS_SHAPES, ids=lambda s: f"N={s[0]} V={s[1]}")
@pytest.mark.parametrize("impl", LOGITS_IMPLS)
def test_logprobs_and_entropy_peers(benchmark, ceilings, device, impl, shape, mode):
    n, vocab = shape
    logits = torch.randn(n, vocab, device=DEVICE, dtype=DTYPE).mul_(3).requires_grad_(mode != "fwd")
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    fn = LOGITS_IMPLS[impl]
    with torch.no_grad():
        rows = min(n, 512)
        _check(*fn(logits[:rows], targets[:rows]), logits.detach()[:rows], targets[:rows])
    element = logits.element_size()
    # fwd: read the logits; fwd_bwd: read them again in the backward and write their gradient.
    moved = (1 if mode == "fwd" else 3) * n * vocab * element + 16 * n
    run_case(benchmark, ceilings, lambda: _call(fn, mode, (logits, targets)), device=device, bytes_moved=moved,
             rounds=ROUNDS, op="logprobs_and_entropy", impl=impl, mode=mode,
             shape=f"N={n} V={vocab} {str(DTYPE).removeprefix('torch.')}")


def _trl_linear(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    lp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0,
                                                   ("entropy",))
    return lp, entropy


LINEAR_IMPLS = {"trl-chunked": _trl_linear}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"N={s[0]} H={s[1]} V={s[2]}")
@pytest.mark.parametrize("impl", LINEAR_IMPLS)
def test_linear_logprobs_and_entropy_peers(benchmark, ceilings, device, impl, shape, mode):
    n, hidden_size, vocab = shape
    grad = mode != "fwd"
    hidden = (torch.randn(n, hidden_size, device=DEVICE) / hidden_size**0.25).to(DTYPE).requires_grad_(grad)
    weight = (torch.randn(vocab, hidden_size, device=DEVICE) / hidden_size**0.25).to(DTYPE).requires_grad_(grad)
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    fn = LINEAR_IMPLS[impl]
    with torch.no_grad():
        rows = min(n, 256)
        lp, entropy = fn(hidden[:rows], weight, targets[:rows])
        _check(lp, entropy, (hidden[:rows].double() @ weight.double().T), targets[:rows])
    # 2NHV for the logits; the backward does the two gradient matmuls, 4NHV more.
    flops = (2 if mode == "fwd" else 6) * n * hidden_size * vocab
    run_case(benchmark, ceilings, lambda: _call(fn, mode, (hidden, weight, targets)), device=device,
             bytes_moved=(n * hidden_size + vocab * hidden_size) * hidden.element_size(), flops=flops, rounds=3,
             op="linear_logprobs_entropy", impl=impl, mode=mode,
             shape=f"N={n} H={hidden_size} V={vocab} {str(DTYPE).removeprefix('torch.')}")
