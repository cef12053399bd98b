"""FusedPolicyLoss on the sampler's kept set (top_k / top_p) against a float64 oracle written here.

The oracle sorts nothing clever: it builds each row's kept set from the definition (temperature, then
the k largest logits with ties, then the tokens with less than top_p of the top-k set's mass strictly
above them), renormalises on it in float64, and aggregates the loss by hand. Tokens outside the kept
set (lp = -inf) must give a finite loss: no policy-gradient or KL term, still counted as valid.
"""

from __future__ import annotations

import math

import pytest
import torch

from spawn_helpers import run_ranks

from fusedrl import FusedPolicyLoss

B, T, V, HID = 3, 9, 37, 16
SEED = 4321


def kept_logp64(logits64: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """float64 log-probs [..., V] of the renormalised kept set, -inf outside it."""
    z = logits64 / temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if top_k is not None:
        kth = z.sort(-1, descending=True).values[..., top_k - 1: top_k]
        keep &= z >= kth
    if top_p is not None:
        probs = torch.where(keep, z, -torch.inf).softmax(-1)
        above = (probs[..., None, :] * (z[..., None, :] > z[..., :, None])).sum(-1)  # mass strictly above each token
        keep &= above < top_p
    return torch.where(keep, z, -torch.inf).log_softmax(-1)


def entropy64(logp: torch.Tensor) -> torch.Tensor:
    # p log p = 0 outside the set; the where keeps -inf out of the backward.
    return -(logp.exp() * torch.where(logp > -torch.inf, logp, 0.0)).sum(-1)


def make_batch(hidden_path: bool, temperature: float, top_k, top_p, outside: int = 0):
    """Inputs, float64 logits, ids drawn from the kept set (the last `outside` valid tokens of row 0 replaced
    by the row's least likely token, outside the set), mask, advantages, old and reference log-probs."""
    g = torch.Generator().manual_seed(SEED)
    if hidden_path:
        hidden = torch.randn(B, T, HID, generator=g)
        weight = torch.randn(V, HID, generator=g) * 0.6
        bias = torch.randn(V, generator=g) * 0.5
        logits64 = hidden.double() @ weight.double().T + bias.double()
        inputs = dict(hidden=hidden, weight=weight, bias=bias)
    else:
        logits = torch.randn(B, T, V, generator=g) * 2.0
        logits64 = logits.double()
        inputs = dict(logits=logits)
    logp = kept_logp64(logits64, temperature, top_k, top_p)
    ids = torch.distributions.Categorical(logits=logp).sample()
    lengths = torch.tensor([T, 5, 7])
    mask = (torch.arange(T) < lengths[:, None]).long()
    if outside:
        ids[0, T - outside:] = logits64[0, T - outside:].argmin(-1)
    ids = torch.where(mask.bool(), ids, 10**6)
    lp = logp.gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    finite = torch.where(lp > -torch.inf, lp, 0.0)
    old = (finite + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (finite + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    adv = torch.tensor([1.1, -0.7, -1.6])
    return inputs, logits64, ids, mask, adv, old, ref


def oracle_loss(cfg, logits64, ids, mask, adv, old, ref, top_k, top_p):
    """DAPO (token sum over the valid tokens) with the PPO clip, k3 KL, entropy bonus and top-entropy
    mask, on the kept set; tokens outside it: no policy-gradient and no KL term, counted as valid."""
    t = cfg.get("temperature", 1.0)
    valid = mask.bool()
    logp = kept_logp64(logits64, t, top_k, top_p)
    lp = logp.gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    h = entropy64(logp)
    scored = valid & (lp > -torch.inf)
    lp = torch.where(scored, lp, 0.0)
    olp = torch.where(scored, old.double(), 0.0)
    a = adv[:, None].double().expand(B, T)
    ratio = torch.exp(lp - olp)
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(0.8, 1.2))
    keep = scored.clone()
    if cfg.get("top_entropy_fraction", 1.0) < 1.0:
        tau = torch.quantile(h.detach()[scored], 1 - cfg["top_entropy_fraction"])
        keep &= h.detach() >= tau
    n = valid.sum()
    loss = (pg * keep).sum() / n
    diff = torch.where(scored, ref.double(), 0.0) - lp
    loss = loss + cfg.get("beta", 0.0) * ((torch.exp(diff) - diff - 1) * scored).sum() / n
    loss = loss - cfg.get("entropy_coef", 0.0) * (h * valid).sum() / n
    return loss, h, keep, scored


CASES = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.7),
    "both": dict(top_k=8, top_p=0.8, temperature=0.7),
    "both_options": dict(top_k=8, top_p=0.8, temperature=0.7, beta=0.2, entropy_coef=0.03, top_entropy_fraction=0.5),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("outside", [0, 2], ids=["inside", "outside"])
def test_kept_set_loss_matches_float64(case, path, backend, outside):
    check_against_float64(case, path, backend, outside, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("case", ["both", "both_options"])
def test_gpu_kept_set_loss_matches_float64(case, path):
    """GPU twin: the compiled kernels' threshold search and kept-set passes, same oracle."""
    check_against_float64(case, path, "triton", 2, "cuda")


def check_against_float64(case, path, backend, outside, device):
    """The loss on `device` against the float64 oracle on the CPU: value, gradients, three metrics."""
    cfg = CASES[case]
    top_k, top_p = cfg.get("top_k"), cfg.get("top_p")
    inputs, logits64, ids, mask, adv, old, ref = make_batch(path == "hidden", cfg.get("temperature", 1.0), top_k,
                                                            top_p, outside)
    leaves = {k: v.to(device, copy=True).requires_grad_(True) for k, v in inputs.items()}
    loss_fn = FusedPolicyLoss(loss_type="dapo", backend=backend, **cfg)
    moved = [t.to(device) for t in (ids, mask, adv, old, ref)]
    loss, metrics = loss_fn(*moved[:3], **leaves, old_logprobs=moved[3], ref_logprobs=moved[4])
    loss.backward()
    loss, metrics = loss.detach().cpu(), {k: v.cpu() for k, v in metrics.items()}

    ref_leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    logits = (ref_leaves["hidden"] @ ref_leaves["weight"].T + ref_leaves["bias"]) if path == "hidden" else ref_leaves["logits"]
    expected, h, keep, scored = oracle_loss(cfg, logits, ids, mask, adv, old, ref, top_k, top_p)
    expected.backward()
    valid = mask.bool()
    assert int((valid & ~scored).sum()) == outside  # the constructed targets are where they were put
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-6, atol=2e-6)
    for name, leaf in leaves.items():
        want = ref_leaves[name].grad
        assert want.abs().max() > 0 and torch.isfinite(leaf.grad).all(), name
        grad = leaf.grad.double().cpu()
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))
    assert metrics["entropy/mean"].item() == pytest.approx(h[valid].mean().item(), rel=1e-5)
    assert metrics["mask/selected"].item() == pytest.approx(keep.sum().item() / valid.sum().item())
    assert metrics["mask/outside_kept_set"].item() == pytest.approx(outside / valid.sum().item())


def test_hand_worked_ties_and_a_target_outside():
    """Logits [2, 2, 1, 0], top_p = 0.3: the tied 2's are kept whole (mass 1/2 each), so lp(0) = log 1/2
    and H = log 2; token 2 is outside. bnpo on-policy with A = 1 over the two tokens: the inside token's
    term is -ratio = -1, the outside one has none but counts: loss = -1/2. d lp(0) / d logits =
    onehot(0) - p = [1/2, -1/2, 0, 0], times dloss/dlp = -1/2; the outside row gets no gradient."""
    logits = torch.tensor([[[2.0, 2.0, 1.0, 0.0], [2.0, 2.0, 1.0, 0.0]]], requires_grad=True)
    ids, mask = torch.tensor([[0, 2]]), torch.ones(1, 2)
    loss_fn = FusedPolicyLoss(loss_type="bnpo", top_p=0.3, entropy_coef=0.0)
    loss, metrics = loss_fn(ids, mask, torch.tensor([1.0]), logits=logits)
    loss.backward()
    assert loss.item() == pytest.approx(-0.5)
    assert metrics["entropy/mean"].item() == pytest.approx(math.log(2))
    assert metrics["mask/outside_kept_set"].item() == 0.5 and metrics["mask/selected"].item() == 0.5
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.25, 0.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]))


def test_full_kept_set_is_the_plain_loss():
    """top_p = 1 and top_k >= V keep every token: the loss and its gradient are the full softmax's, bit for bit."""
    inputs, _, ids, mask, adv, old, ref = make_batch(False, 1.0, None, None)
    results = []
    for kept in ({}, dict(top_p=1.0), dict(top_k=V), dict(top_k=V + 5, top_p=1.0)):
        logits = inputs["logits"].clone().requires_grad_(True)
        loss_fn = FusedPolicyLoss(loss_type="dapo", beta=0.1, entropy_coef=0.01, backend="torch", **kept)
        loss, _ = loss_fn(ids, mask, adv, logits=logits, old_logprobs=old, ref_logprobs=ref)
        loss.backward()
        results.append((loss.detach(), logits.grad))
    assert FusedPolicyLoss(top_p=1.0).top_p is None and not FusedPolicyLoss(top_p=1.0).kept_set
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_minus_inf_log_probs_are_accepted_only_with_a_kept_set():
    """Old and reference log-probs of -inf mean 'outside the kept set' with top_k / top_p (no term, a
    finite loss), and stay an error without; NaN and +inf are errors either way."""
    inputs, _, ids, mask, adv, old, ref = make_batch(False, 1.0, 6, None)
    old_inf, ref_inf = old.clone(), ref.clone()
    old_inf[1, 0], ref_inf[2, 1] = -torch.inf, -torch.inf
    loss, metrics = FusedPolicyLoss(top_k=6, beta=0.1)(ids, mask, adv, **inputs, old_logprobs=old_inf,
                                                      ref_logprobs=ref_inf)
    assert torch.isfinite(loss)
    n = mask.sum().item()
    assert metrics["mask/outside_kept_set"].item() == pytest.approx(1 / n)
    assert metrics["kl/outside_kept_set"].item() == pytest.approx(2 / n)  # no KL where old or ref lp is -inf
    with pytest.raises(ValueError, match=r"^old_logprobs must be finite at valid positions"):
        FusedPolicyLoss()(ids, mask, adv, **inputs, old_logprobs=old_inf)
    for bad in (torch.nan, torch.inf):
        old_bad = old.clone()
        old_bad[0, 0] = bad
        with pytest.raises(ValueError, match=r"^old_logprobs must be finite \(or -inf, outside the kept set\)"):
            FusedPolicyLoss(top_p=0.9)(ids, mask, adv, **inputs, old_logprobs=old_bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=0), "top_k must be None or an int >= 1, got 0"),
    (dict(top_k=2.5), "top_k must be None or an int >= 1, got 2.5"),
    (dict(top_k=True), "top_k must be None or an int >= 1, got True"),
    (dict(top_p=0.0), "top_p must be None or a number in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be None or a number in (0, 1], got 1.5"),
    (dict(top_p="high"), "top_p must be None or a number in (0, 1], got 'high'"),
])
def test_bad_kept_set_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError) as error:
        FusedPolicyLoss(**kwargs)
    assert str(error.value) == message


def test_select_on_the_kept_set_equals_the_loss_own_masks():
    """A Selection made by select() from no-grad kept-set lp and H (with -inf for tokens outside) gives the
    micro-batch calls the loss of one call on the whole batch."""
    cfg = dict(loss_type="dapo", top_k=6, top_p=0.9, top_entropy_fraction=0.4, normalize_by="selected")
    inputs, _, ids, mask, adv, old, _ = make_batch(True, 1.0, 6, 0.9, outside=2)
    loss_fn = FusedPolicyLoss(**cfg, backend="torch")
    whole, _ = loss_fn(ids, mask, adv, **inputs, old_logprobs=old)
    from fusedrl.kernels import linear_logprobs_and_entropy

    valid = mask.bool()
    lp, h = linear_logprobs_and_entropy(inputs["hidden"], inputs["weight"], ids.masked_fill(~valid, -100),
                                        bias=inputs["bias"], top_k=6, top_p=0.9)
    assert (lp[valid] == -torch.inf).sum() == 2
    selection = loss_fn.select(mask, adv, entropy=h, logprobs=lp, old_logprobs=old)
    parts = 0.0
    for rows in (torch.tensor([0]), torch.tensor([1, 2])):
        part, _ = loss_fn(ids[rows], mask[rows], adv[rows], hidden=inputs["hidden"][rows], weight=inputs["weight"],
                          bias=inputs["bias"], old_logprobs=old[rows], selection=selection.rows(rows, T))
        parts = parts + part
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-7)


def loss_on_rank(hidden, weight, bias, ids, mask, adv, old, num_items, *, process_group=None):
    """One rank's kept-set DAPO loss over the selected tokens, masks from the global batch."""
    loss_fn = FusedPolicyLoss(loss_type="dapo", top_k=6, top_p=0.9, top_entropy_fraction=0.4, normalize_by="selected",
                              process_group=process_group, backend="torch")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = loss_fn(ids, mask, adv, hidden=leaves[0], weight=leaves[1], bias=leaves[2], old_logprobs=old,
                            num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad, metrics["mask/selected"]


@pytest.mark.distributed
def test_two_ranks_equal_one_process_with_tokens_outside():
    """Two gloo ranks, one holding the tokens outside the kept set: the global entropy threshold and the
    selected count leave them out on every rank, so the ranks' losses sum to one process's."""
    inputs, _, ids, mask, adv, old, _ = make_batch(True, 1.0, 6, 0.9, outside=2)
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    n = int(mask.sum())
    rows = (slice(0, 1), slice(1, B))
    per_rank = run_ranks(2, [(loss_on_rank, [(hidden[r], weight, bias, ids[r], mask[r], adv[r], old[r], n)
                                             for r in rows], {})])[0]
    loss, grad_hidden, grad_weight, selected = loss_on_rank(hidden, weight, bias, ids, mask, adv, old, n)
    torch.testing.assert_close(sum(r[0] for r in per_rank), loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat([r[1] for r in per_rank]), grad_hidden, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(sum(r[2] for r in per_rank), grad_weight, rtol=1e-5, atol=1e-7)
    assert 0 < selected.item() < 1
