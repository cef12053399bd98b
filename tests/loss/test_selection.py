"""Batch-wide selection across micro-batches: FusedPolicyLoss.select and the `selection=` keyword.

The top-entropy threshold and the covariance statistics belong to the whole training batch
(docs/algorithms.md sections 2 and 3). Splitting a batch into micro-batches for gradient accumulation must
not change them: with a Selection made once over the batch, the micro-batches' weighted losses and
their gradients add up to those of one call on the whole batch. Without it each call computes its own
statistics, and the sum differs (the per-micro-batch bug the Selection removes).
"""

from __future__ import annotations

import pytest
import torch

from fusedrl import FusedPolicyLoss
from fusedrl.loss import Selection
from fusedrl.kernels import linear_logprobs_and_entropy, logprobs_and_entropy

B, T, V, HID = 6, 9, 37, 16
SEED = 99
LENGTHS = [9, 3, 6, 7, 2, 8]
# Row groups of unequal size; [1, 2] and [4] are trimmed to their longest response, as the engine does.
MICRO = ([0, 3], [1, 2], [4], [5])

CASES = {
    "top_entropy_dapo": dict(loss_type="dapo", top_entropy_fraction=0.2, epsilon_high=0.28),
    "top_entropy_bnpo_on_policy": dict(loss_type="bnpo", top_entropy_fraction=0.2, temperature=0.7),
    "clip_cov_dapo": dict(loss_type="dapo", cov_mode="clip_cov", cov_ratio=0.1, cov_lower=0.02, cov_upper=4.0),
    "kl_cov_bnpo": dict(loss_type="bnpo", cov_mode="kl_cov", cov_ratio=0.1, kl_cov_coef=0.7),
    "combined_dapo": dict(loss_type="dapo", top_entropy_fraction=0.4, cov_mode="clip_cov", cov_ratio=0.2,
                          cov_lower=0.0, prob_mask_threshold=0.8, beta=0.1),
}


def make_batch(hidden_path: bool):
    g = torch.Generator().manual_seed(SEED)
    if hidden_path:
        inputs = dict(hidden=torch.randn(B, T, HID, generator=g), weight=torch.randn(V, HID, generator=g) * 0.6,
                      bias=torch.randn(V, generator=g) * 0.5)
        logits = inputs["hidden"] @ inputs["weight"].T + inputs["bias"]
    else:
        inputs = dict(logits=torch.randn(B, T, V, generator=g) * 3.0)
        logits = inputs["logits"]
    ids = torch.multinomial(logits.detach().softmax(-1).reshape(-1, V), 1, generator=g).reshape(B, T)
    mask = (torch.arange(T) < torch.tensor(LENGTHS)[:, None]).long()
    ids = torch.where(mask.bool(), ids, 0)
    lp = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    old = lp + 0.3 * torch.randn(B, T, generator=g)
    ref = lp + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, T, generator=g)  # per-token advantages spread the covariance widely
    return inputs, ids, mask, adv, old, ref


def current_lp_h(loss_fn, inputs, ids, mask):
    """The no-grad lp and H of the whole batch, as the engine's pass computes them."""
    targets = ids.masked_fill(~mask.bool(), loss_fn.ignore_index)
    options = dict(temperature=loss_fn.temperature, ignore_index=loss_fn.ignore_index, backend=loss_fn.backend)
    with torch.no_grad():
        if "logits" in inputs:
            return logprobs_and_entropy(inputs["logits"], targets, **options)
        return linear_logprobs_and_entropy(inputs["hidden"], inputs["weight"], targets, bias=inputs["bias"], **options)


def run(case, hidden_path, backend, mode):
    """The loss and gradients of one call on the batch (mode "one"), or of the micro-batches summed with
    the engine's weights, with a Selection of the whole batch ("selection") or without ("per_call")."""
    cfg = CASES[case]
    inputs, ids, mask, adv, old, ref = make_batch(hidden_path)
    if case.endswith("on_policy"):
        old = None
    loss_fn = FusedPolicyLoss(**cfg, generator=torch.Generator().manual_seed(SEED), backend=backend)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    n = int(mask.sum())
    num_items = n if cfg["loss_type"] == "dapo" else None
    ref_lp = ref if cfg.get("beta", 0) > 0 else None
    if mode == "one":
        loss, _ = loss_fn(ids, mask, adv, **leaves, old_logprobs=old, ref_logprobs=ref_lp, num_items_in_batch=num_items)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in leaves.items()}
    selection = None
    if mode == "selection":
        lp, h = current_lp_h(loss_fn, inputs, ids, mask)
        selection = loss_fn.select(mask, adv, entropy=h, logprobs=lp, old_logprobs=old)
    total = torch.zeros(())
    for rows in MICRO:
        r = torch.tensor(rows)
        length = int(mask[r].sum(1).max())

        def cut(t):
            return None if t is None else t[r][:, :length]
        part = {k: (v if k in ("weight", "bias") else cut(v)) for k, v in leaves.items()}
        loss, _ = loss_fn(cut(ids), cut(mask), cut(adv), **part, old_logprobs=cut(old), ref_logprobs=cut(ref_lp),
                          num_items_in_batch=num_items,
                          selection=None if selection is None else selection.rows(r, length))
        share = 1.0 if cfg["loss_type"] == "dapo" else int(mask[r].sum()) / n  # bnpo: token share
        (loss * share).backward()
        total = total + loss.detach() * share
    return total, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize(
    "case,path,backend",
    [(c, p, "torch") for c in CASES for p in ("logits", "hidden")] + [("top_entropy_dapo", "hidden", "triton")],
)
def test_micro_batches_with_selection_equal_one_call(case, path, backend):
    one_loss, one_grads = run(case, path == "hidden", backend, "one")
    loss, grads = run(case, path == "hidden", backend, "selection")
    torch.testing.assert_close(loss, one_loss, rtol=1e-6, atol=1e-7)
    for name, want in one_grads.items():
        assert want.abs().max() > 0, f"gradient of {name} is all zero: the case tests nothing"
        torch.testing.assert_close(grads[name], want, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("case", ["top_entropy_dapo", "clip_cov_dapo", "kl_cov_bnpo"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_micro_batches_without_selection_differ(case, path):
    """The bug: per-call statistics change the loss and the gradient of a micro-batched batch."""
    one_loss, one_grads = run(case, path == "hidden", "torch", "one")
    loss, grads = run(case, path == "hidden", "torch", "per_call")
    key = "logits" if path == "logits" else "hidden"
    assert (grads[key] - one_grads[key]).abs().max() > 1e-3 * one_grads[key].abs().max()
    assert not torch.allclose(loss, one_loss, rtol=1e-4, atol=1e-6)


def test_selection_masks_are_the_whole_batch_statistics():
    """The top-entropy mask is the torch.quantile rule over all valid tokens of the batch."""
    loss_fn = FusedPolicyLoss(top_entropy_fraction=0.2, cov_mode="kl_cov", cov_ratio=0.1, backend="torch")
    inputs, ids, mask, adv, old, _ = make_batch(False)
    lp, h = current_lp_h(loss_fn, inputs, ids, mask)
    selection = loss_fn.select(mask, adv, entropy=h, logprobs=lp, old_logprobs=old)
    valid = mask.bool()
    tau = torch.quantile(h[valid].double(), 0.8)
    assert torch.equal(selection.high_entropy, valid & (h.double() >= tau))
    lp64, a64 = lp.double()[valid], adv.double()[valid]
    cov = (lp64 - lp64.mean()) * (a64 - a64.mean())
    k = max(1, int(0.1 * valid.sum().item()))
    top = torch.zeros(valid.sum().item(), dtype=torch.bool)
    top[cov.topk(k).indices] = True
    assert torch.equal(selection.covariance[valid], top) and not selection.covariance[~valid].any()
    torch.testing.assert_close(selection.covariance_values[valid], cov)
    part = selection.rows(torch.tensor([4, 1]), 3)
    assert torch.equal(part.high_entropy, selection.high_entropy[[4, 1], :3])
    assert torch.equal(part.covariance, selection.covariance[[4, 1], :3])


def test_selection_errors_name_the_argument():
    loss_fn = FusedPolicyLoss(top_entropy_fraction=0.2, backend="torch")
    inputs, ids, mask, adv, _, _ = make_batch(False)
    lp, h = current_lp_h(loss_fn, inputs, ids, mask)
    with pytest.raises(ValueError, match="entropy"):
        loss_fn.select(mask, adv, entropy=h[:, :4], logprobs=lp)
    with pytest.raises(ValueError, match="entropy must be a tensor"):
        loss_fn.select(mask, adv, entropy=None, logprobs=lp)
    with pytest.raises(ValueError, match="^logprobs"):
        loss_fn.select(mask, adv, entropy=h, logprobs=lp[1:])
    with pytest.raises(ValueError, match="old_logprobs"):
        loss_fn.select(mask, adv, entropy=h, logprobs=lp, old_logprobs=lp[:, 1:])
    with pytest.raises(ValueError, match="completion_mask"):
        loss_fn.select(mask[0], adv, entropy=h, logprobs=lp)
    selection = loss_fn.select(mask, adv, entropy=h, logprobs=lp)
    with pytest.raises(ValueError, match=r"selection\.high_entropy must have shape"):
        loss_fn(ids[:2], mask[:2], adv[:2], logits=inputs["logits"][:2], selection=selection.rows([0, 1, 2]))
    with pytest.raises(ValueError, match=r"selection\.high_entropy must be given"):
        loss_fn(ids, mask, adv, logits=inputs["logits"], selection=Selection())
    with pytest.raises(ValueError, match=r"selection\.covariance must be None"):
        loss_fn(ids, mask, adv, logits=inputs["logits"],
                selection=Selection(high_entropy=selection.high_entropy, covariance=selection.high_entropy))
    with pytest.raises(ValueError, match="selection must be a Selection"):
        loss_fn(ids, mask, adv, logits=inputs["logits"], selection=selection.high_entropy)


# normalize_by="selected": the policy-gradient part over the selected tokens M of the whole batch.
SELECTED_CASES = {
    "dapo_top_entropy": dict(loss_type="dapo", top_entropy_fraction=0.2, epsilon_high=0.28),
    "dapo_top_entropy_probability_kl": dict(loss_type="dapo", top_entropy_fraction=0.2, prob_mask_threshold=0.8,
                                            beta=0.1),
    "bnpo_probability_on_policy": dict(loss_type="bnpo", prob_mask_threshold=0.8),  # SPO's setting
    "bnpo_top_entropy_kl_entropy": dict(loss_type="bnpo", top_entropy_fraction=0.2, beta=0.1, entropy_coef=0.02),
    "grpo_top_entropy": dict(loss_type="grpo", top_entropy_fraction=0.2),
}
# The batch in 1, 2 and 3 micro-batches.
SPLITS = (([0, 1, 2, 3, 4, 5],), ([0, 3, 5], [1, 2, 4]), ([0, 3], [1, 2], [4, 5]))


def selected_oracle(cfg, logits64, ids, mask, adv, old, ref):
    """float64 loss: dapo and bnpo sum(M pg) / sum(M) over the batch, grpo the mean over responses of
    each one's sum(M pg) / sum(M); KL and entropy terms over the valid tokens."""
    valid = mask.bool()
    logp = logits64.log_softmax(-1)
    lp = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    olp = lp.detach() if old is None else old.double()
    ratio = torch.exp(lp - olp)
    a = adv.double()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - 0.2, 1 + cfg.get("epsilon_high", 0.2)))
    m = valid.clone()
    if "top_entropy_fraction" in cfg:
        m &= h.detach() >= torch.quantile(h.detach()[valid], 1 - cfg["top_entropy_fraction"])
    if "prob_mask_threshold" in cfg:
        m &= olp.exp() < cfg["prob_mask_threshold"]
    assert 0 < m.sum() < valid.sum()
    if cfg["loss_type"] == "grpo":
        loss = ((pg * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    else:
        loss = (pg * m).sum() / m.sum()
    k3 = torch.exp(ref.double() - lp) - (ref.double() - lp) - 1
    extra = cfg.get("beta", 0.0) * k3 - cfg.get("entropy_coef", 0.0) * h
    return loss + (extra * valid).sum() / valid.sum()


def split_gradient(cfg, split, logits, ids, mask, adv, old, ref):
    """The logits' gradient of the batch's loss as the engine accumulates it over the micro-batches in
    `split`: one Selection over the whole batch, each call weighted by its share (dapo 1, bnpo its valid
    tokens, grpo its rows)."""
    loss_fn = FusedPolicyLoss(**cfg, normalize_by="selected", backend="torch")
    leaf = logits.clone().requires_grad_(True)
    lp, h = current_lp_h(loss_fn, dict(logits=logits), ids, mask)
    selection = loss_fn.select(mask, adv, entropy=h, logprobs=lp, old_logprobs=old)
    n = int(mask.sum())
    for rows in split:
        r = torch.tensor(rows)
        length = int(mask[r].sum(1).max())

        def cut(t):
            return None if t is None else t[r][:, :length]
        loss, _ = loss_fn(cut(ids), cut(mask), cut(adv), logits=cut(leaf), old_logprobs=cut(old),
                          ref_logprobs=cut(ref) if "beta" in cfg else None,
                          num_items_in_batch=n if cfg["loss_type"] == "dapo" else None,
                          selection=selection.rows(r, length))
        share = {"dapo": 1.0, "bnpo": int(mask[r].sum()) / n, "grpo": len(rows) / B}[cfg["loss_type"]]
        (loss * share).backward()
    return leaf.grad


@pytest.mark.parametrize("case", list(SELECTED_CASES))
def test_selected_normalisation_does_not_depend_on_micro_batches(case):
    """With normalize_by="selected" the batch's gradient is the same in 1, 2 or 3 micro-batches, and is
    the float64 gradient of sum(M pg) / sum(M) over the whole batch (per response for grpo)."""
    cfg = SELECTED_CASES[case]
    inputs, ids, mask, adv, old, ref = make_batch(False)
    if case.endswith("on_policy"):
        old = None
    grads = [split_gradient(cfg, split, inputs["logits"], ids, mask, adv, old, ref) for split in SPLITS]
    for got in grads[1:]:
        torch.testing.assert_close(got, grads[0], rtol=1e-6, atol=1e-9)
    logits64 = inputs["logits"].double().requires_grad_(True)
    selected_oracle(cfg, logits64, ids, mask, adv, old, ref).backward()
    scale = logits64.grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grads[0].double(), logits64.grad, rtol=1e-5, atol=1e-6 * scale)
