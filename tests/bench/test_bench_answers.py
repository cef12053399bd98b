"""The benchmark modules' adapters compute what their rows claim: each path of
bench/test_bench_linear_logprobs_entropy.py and each peer of bench/test_bench_trl_and_liger.py, run at
a small shape, against float64. On a CPU the Triton paths (fusedrl's and Liger-Kernel's kernels) run
under the Triton interpreter, so a misused peer API (argument order, reduction, sign) fails here, in
CI, rather than on the first GPU that runs the benchmarks. cut-cross-entropy's kernel does not run
under the interpreter; its row is checked on a GPU, before it is timed."""

import pytest
import torch

from bench import test_bench_linear_logprobs_entropy as linear_bench
from bench import test_bench_trl_and_liger as peers_bench
from bench._runner import check_against_float64

N, H, V = 37, 48, 1003


# The kept-set paths compute another distribution than the full softmax; tests/kernels/test_linear_kept_set.py
# holds that mode to float64.
@pytest.mark.parametrize("path", [p for p in linear_bench.PATHS if p != "cce" and p not in linear_bench.KEPT_SET_PATHS])
def test_linear_paths_match_float64(path):
    hidden = torch.randn(N, H)
    weight = torch.randn(V, H) / H**0.5 * 3
    targets = torch.randint(0, V, (N,))
    fn = linear_bench.PATHS[path]
    if path == "fused" or path == "fused_lp":  # "auto" is the torch backend on a CPU: run the kernels too
        fn = lambda h, w, t: linear_bench.linear_logprobs_and_entropy(h, w, t, backend="triton")  # noqa: E731
    linear_bench.check_path(fn, hidden, weight, targets, torch.float32)


@pytest.mark.parametrize("impl", list(peers_bench.LOGITS_IMPLS))
def test_logits_peers_match_float64(impl, monkeypatch):
    monkeypatch.setattr(peers_bench, "DEVICE", "cuda")  # lets the Liger adapter run (interpreted)
    logits = torch.randn(N, V) * 3
    targets = torch.randint(0, V, (N,))
    lp, entropy = peers_bench.LOGITS_IMPLS[impl](logits, targets)
    check_against_float64(lp, entropy, logits, targets, torch.float32)


def test_the_check_rejects_a_wrong_answer():
    logits = torch.randn(N, V)
    targets = torch.randint(0, V, (N,))
    lp = logits.double().log_softmax(-1).gather(1, targets[:, None])[:, 0]
    with pytest.raises(AssertionError):
        check_against_float64(-lp, None, logits, targets, torch.bfloat16)  # the cross-entropy's sign
    with pytest.raises(AssertionError):
        check_against_float64(lp.mean().expand(N), None, logits, targets, torch.bfloat16)  # a mean reduction
