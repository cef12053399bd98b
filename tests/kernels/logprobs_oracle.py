"""The float64 oracle and the comparison rule shared by the logprobs_and_entropy tests.

The oracle is float64 PyTorch autograd on the inputs already rounded to the tested dtype. Every
output and gradient must satisfy, elementwise, |ours - fp64| <= |baseline - fp64| + tol, where the
baseline is PyTorch computing in fp32 on the same rounded inputs (its gradient then rounded to the
tested dtype): the best a careful unfused implementation gives, stricter than PyTorch run in bf16.
tol is a few fp32 rounding errors: a rounding of the bf16 gradient that differs from the
baseline's can only happen at a rounding boundary, where both errors are within fp32 error of half
an ulp, so a whole-ulp error (e.g. truncation instead of rounding) fails.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.kernels import logprobs_and_entropy

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100


def oracle(x: torch.Tensor, targets: torch.Tensor, temperature: float, compute_dtype=torch.float64):
    """lp, H in compute_dtype by plain autograd-able PyTorch, and the leaf they depend on."""
    leaf = x.detach().to(compute_dtype).requires_grad_()
    logp = torch.log_softmax(leaf / temperature, dim=-1)
    ignored = targets == IGNORE
    lp = logp.gather(-1, targets.masked_fill(ignored, 0).long()[..., None]).squeeze(-1)
    p_logp = logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)
    entropy = -p_logp.sum(-1)
    return leaf, lp.masked_fill(ignored, 0.0), entropy.masked_fill(ignored, 0.0)


def kept_mask(x: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """[N, V] bool, by sorting in float64: top-k keeps z >= the k-th largest z; top-p then keeps the
    tokens with less than p of the top-k set's probability strictly above them."""
    z = x.double() / temperature
    values, _ = z.sort(dim=-1, descending=True)
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None and top_k < z.shape[-1]:
        keep &= z >= values[:, top_k - 1 : top_k]
    if top_p is not None:
        probs = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
        sorted_probs = probs.gather(-1, z.argsort(dim=-1, descending=True))
        exclusive = sorted_probs.cumsum(-1) - sorted_probs  # mass before each sorted position
        # A token's mass strictly above it: the exclusive sum at the first position of its value.
        first = torch.searchsorted(-values.contiguous(), -z.contiguous(), side="left")
        keep &= exclusive.gather(-1, first) < top_p
    return keep


def grads(leaf, lp, entropy, g_lp, g_h):
    """d(sum(lp * g_lp) + sum(H * g_h)) / d leaf; a None upstream gradient leaves that output out."""
    outputs = [o for o, g in ((lp, g_lp), (entropy, g_h)) if g is not None]
    upstream = [g.to(o.dtype) for o, g in ((lp, g_lp), (entropy, g_h)) if g is not None]
    (grad,) = torch.autograd.grad(outputs, [leaf], upstream, retain_graph=True)
    return grad


def assert_rule(name, ours, ref, base, atol, rtol=0.0):
    """|ours - ref| <= |base - ref| + atol + rtol |ref|, elementwise; equal infinities count as exact."""
    ours, ref, base = ours.detach().double(), ref.detach().double(), base.detach().double()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    err = torch.where(ours == ref, 0.0, (ours - ref).abs())
    allowed = torch.where(base == ref, 0.0, (base - ref).abs()) + atol + rtol * ref.abs().nan_to_num(0.0, 0.0, 0.0)
    bad = ~(err <= allowed)  # a nan error is bad
    if bool(bad.any()):
        i = tuple(int(k) for k in bad.nonzero()[err[bad].nan_to_num(float("inf")).argmax()])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements outside the rule; worst at {i}: "
            f"ours={ours[i].item()!r} fp64={ref[i].item()!r} baseline={base[i].item()!r} "
            f"allowed={allowed[i].item():.3g}"
        )


def make_inputs(n, vocab, dtype, device="cpu"):
    """Logits [n, vocab] whose rows cycle through the cases real kernels got wrong, and targets.

    Row kinds: plain; peaked (one logit 40 above the rest, in the last, partial tile); far below
    zero with a peak (a masked load with other=0 would dominate the max); sprinkled with -inf
    (never at the target). Every fifth row from row 3 is ignored.
    """
    x = torch.randn(n, vocab, device=device) * 3.0
    targets = torch.randint(0, vocab, (n,), device=device)
    rows = torch.arange(n, device=device)
    peaked = rows[rows % 4 == 1]
    x[peaked, vocab - 1] += 40.0
    targets[peaked[peaked % 8 == 1]] = vocab - 1
    low = rows[rows % 4 == 2]
    x[low] -= 200.0
    x[low, low % vocab] = -150.0
    targets[low] = low % vocab
    if vocab > 1:
        sprinkled = rows[rows % 4 == 3]
        neg = torch.rand(len(sprinkled), vocab, device=device) < 0.1
        neg[torch.arange(len(sprinkled), device=device), targets[sprinkled]] = False
        x[sprinkled] = x[sprinkled].masked_fill(neg, float("-inf"))
    targets[3::5] = IGNORE
    return x.to(dtype), targets


# Tolerances: a few fp32 rounding errors of the quantity's scale.
OUT_ATOL, OUT_RTOL = 2e-6, 2e-6
GRAD_RTOL_OF_MAX = 2e-6


def check_all(backend, x, targets, temperature, **kwargs):
    """Forward and the three gradient modes of one backend against the oracle and the fp32 baseline."""
    n_rows = targets.numel()
    leaf = x.detach().clone().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, temperature=temperature, backend=backend, **kwargs)
    assert lp.dtype == entropy.dtype == torch.float32
    ref_leaf, ref_lp, ref_h = oracle(x, targets, temperature)
    base_leaf, base_lp, base_h = oracle(x, targets, temperature, torch.float32)
    assert_rule("lp", lp, ref_lp, base_lp, OUT_ATOL, OUT_RTOL)
    assert_rule("H", entropy, ref_h, base_h, OUT_ATOL, OUT_RTOL)
    g_lp, g_h = torch.randn(targets.shape), torch.randn(targets.shape)
    for mode, (a, b) in {"lp": (g_lp, None), "H": (None, g_h), "both": (g_lp, g_h)}.items():
        ours = grads(leaf, lp, entropy, a, b)
        assert ours.dtype == x.dtype and ours.shape == x.shape
        ref = grads(ref_leaf, ref_lp, ref_h, a, b)
        base = grads(base_leaf, base_lp, base_h, a, b).to(x.dtype)
        scale = ref.abs().max().item() if n_rows else 0.0
        assert_rule(f"d logits (upstream {mode})", ours, ref, base, GRAD_RTOL_OF_MAX * scale)
    return lp, entropy


class AllocationRecorder(TorchDispatchMode):
    """Records (numel, dtype) of every tensor an aten op allocates; outputs that alias an input
    (views, in-place and out= ops) are not allocations and are skipped."""

    def __init__(self):
        super().__init__()
        self.allocations: list[tuple[int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(returns, outputs):
            if isinstance(value, torch.Tensor) and ret.alias_info is None:
                self.allocations.append((value.numel(), value.dtype))
        return out


def oracle_grad_of_full(full, logits_of, targets, temperature, g_lp, g_h):
    """fp64 gradient with respect to a full tensor of which the op sees logits_of(full)."""
    leaf = full.detach().double().requires_grad_()
    logp = torch.log_softmax(logits_of(leaf) / temperature, dim=-1)
    ignored = targets == IGNORE
    lp = logp.gather(-1, targets.masked_fill(ignored, 0)[..., None]).squeeze(-1).masked_fill(ignored, 0.0)
    entropy = -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0.0)).sum(-1).masked_fill(ignored, 0.0)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
    return lp, entropy, grad


def check_rows_against_oracle(logits, targets, temperature, lp, entropy, grad, g_lp, g_h, rows):
    """Compare the given rows of full-size results with the fp64 oracle of those rows alone."""
    x = logits[rows]
    ref_leaf, ref_lp, ref_h = oracle(x, targets[rows], temperature)
    base_leaf, base_lp, base_h = oracle(x, targets[rows], temperature, torch.float32)
    assert_rule("lp", lp[rows], ref_lp, base_lp, OUT_ATOL, OUT_RTOL)
    assert_rule("H", entropy[rows], ref_h, base_h, OUT_ATOL, OUT_RTOL)
    ref = grads(ref_leaf, ref_lp, ref_h, g_lp[rows], g_h[rows])
    base = grads(base_leaf, base_lp, base_h, g_lp[rows], g_h[rows]).to(x.dtype)
    assert_rule("d logits", grad[rows], ref, base, GRAD_RTOL_OF_MAX * ref.abs().max().item())


def run_with_grads(backend, logits, targets, temperature, **kwargs):
    leaf = logits.detach().requires_grad_()
    lp, entropy = logprobs_and_entropy(leaf, targets, temperature=temperature, backend=backend, **kwargs)
    g_lp, g_h = torch.randn_like(lp), torch.randn_like(entropy)
    (grad,) = torch.autograd.grad((lp * g_lp).sum() + (entropy * g_h).sum(), leaf)
    return lp.detach(), entropy.detach(), grad, g_lp, g_h
