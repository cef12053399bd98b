"""fusedrl's verl integration, against stand-ins mirroring verl 0.9's documented API (tests/_fake_verl.py).

References are written out here in float64 from the papers' formulas (docs/algorithms.md section 3 and 2),
with batch-wide statistics computed over the valid tokens of the whole (concatenated) batch.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from _fake_verl import POLICY_LOSS_PARAMETERS, actor_config, batch, install_fake_verl
from _tiny import tiny_model
from spawn_helpers import run_ranks

from fusedrl.integrations import verl as fused_verl


@pytest.fixture
def fake_verl(monkeypatch):
    return install_fake_verl(monkeypatch.setitem)


def _token_mean(values, mask):
    return torch.where(mask, values, 0.0).sum() / mask.sum()


def _clip_terms(old, lp, adv, low=0.2, high=0.28):
    ratio = torch.exp(lp - old)
    return ratio, -adv * ratio, -adv * ratio.clamp(1 - low, 1 + high)


def _batch_covariance(lp, adv, mask):
    lp, adv = lp.detach(), adv.detach()
    return (lp - lp[mask].mean()) * (adv - adv[mask].mean())


def test_registered_under_verl_names_with_verl_signature(fake_verl):
    fused_verl.register()
    registry = fake_verl["verl.trainer.ppo.core_algos"].POLICY_LOSS_REGISTRY
    assert set(registry) == {"fusedrl_clip_cov", "fusedrl_kl_cov", "fusedrl_top_entropy"}
    for fn in registry.values():
        assert list(inspect.signature(fn).parameters) == POLICY_LOSS_PARAMETERS


def test_kl_cov_matches_float64_reference(fake_verl):
    old, lp, adv, mask = batch(6, 9, torch.Generator().manual_seed(0))
    config = actor_config("fusedrl_kl_cov", kl_cov_ratio=0.1, ppo_kl_coef=0.7)
    loss, metrics = fused_verl.fusedrl_kl_cov(old, lp, adv, mask, "token-mean", config)
    (grad,) = torch.autograd.grad(loss, lp)

    ref_lp = lp.detach().clone().requires_grad_()
    cov = torch.where(mask, _batch_covariance(ref_lp, adv, mask), -torch.inf)
    k = max(1, int(0.1 * mask.sum().item()))
    chosen = torch.zeros_like(mask).flatten()
    chosen[cov.flatten().topk(k).indices] = True
    chosen = chosen.view_as(mask)
    ratio, unclipped, _ = _clip_terms(old, ref_lp, adv)
    expected = _token_mean(unclipped + 0.7 * (ref_lp - old).abs() * chosen, mask)
    (expected_grad,) = torch.autograd.grad(expected, ref_lp)

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert metrics["actor/kl_cov_frac"] == pytest.approx(k / mask.sum().item())


def test_clip_cov_zeroes_exactly_the_drawn_candidate(fake_verl):
    """One candidate in (lb, ub) and k = 1: the draw is forced, so the loss is known exactly."""
    g = torch.Generator().manual_seed(1)
    old, lp, adv, mask = batch(4, 8, g)
    with torch.no_grad():
        lp.copy_(old)  # ratio 1: nothing is clipped by PPO
    cov = torch.where(mask, _batch_covariance(lp, adv, mask), -torch.inf)
    lower = cov.max().item() - 1e-9  # only the largest Cov lies in (lower, upper)
    config = actor_config("fusedrl_clip_cov", clip_cov_ratio=1e-3, clip_cov_lb=lower, clip_cov_ub=lower + 10)
    loss, metrics = fused_verl.fusedrl_clip_cov(old, lp, adv, mask, "token-mean", config)
    (grad,) = torch.autograd.grad(loss, lp)

    drawn = cov == cov.max()
    _, unclipped, clipped = _clip_terms(old, lp, adv)
    expected = _token_mean(torch.where(drawn, 0.0, torch.maximum(unclipped, clipped)), mask)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(grad[drawn] == 0) and torch.all(grad[mask & ~drawn] != 0)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(1 / mask.sum().item())


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_top_entropy_matches_quantile_reference(fake_verl, loss_agg_mode):
    g = torch.Generator().manual_seed(2)
    old, lp, adv, mask = batch(5, 12, g)
    entropy = torch.rand(5, 12, generator=g, dtype=torch.float64) * 2
    fused_verl.install()
    ppo_loss = fake_verl["verl.workers.utils.losses"].ppo_loss
    config = actor_config("fusedrl_top_entropy", loss_agg_mode, top_entropy_fraction=0.3)
    data = {"old_log_probs": old, "advantages": adv, "response_mask": mask}
    loss, _ = ppo_loss(config, {"log_probs": lp, "entropy": entropy}, data)
    (grad,) = torch.autograd.grad(loss, lp)

    tau = torch.quantile(entropy[mask], 1 - 0.3)
    selected = mask & (entropy >= tau)
    ratio, unclipped, clipped = _clip_terms(old, lp, adv)
    pg = torch.maximum(unclipped, clipped)
    pg = torch.where(adv < 0, torch.minimum(pg, -adv * 3.0), pg)
    pg = torch.where(selected, pg, 0.0)
    if loss_agg_mode == "token-mean":
        expected = _token_mean(pg, mask)
    else:
        expected = (pg.sum(-1) / (mask.sum(-1).double() + 1e-8)).mean()
    (expected_grad,) = torch.autograd.grad(expected, lp)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert 0 < selected.sum() < mask.sum()


def test_top_entropy_without_entropy_says_how_to_enable_it(fake_verl):
    old, lp, adv, mask = batch(2, 4, torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="calculate_entropy"):
        fused_verl.fusedrl_top_entropy(old, lp, adv, mask, "token-mean", actor_config("fusedrl_top_entropy"))


def test_install_routes_verl_fused_forward_to_fusedrl(fake_verl):
    fused_verl.install()
    fused_verl.install()  # idempotent: nothing is wrapped twice
    losses = fake_verl["verl.workers.utils.losses"]
    assert losses.ppo_loss.__fusedrl_wrapped__ and not hasattr(losses.ppo_loss.__wrapped__, "__wrapped__")
    model = tiny_model(vocab_size=50, seed=0)
    fake_verl["verl.models.transformers.monkey_patch"].patch_forward_with_backends(model, True, "torch")
    out = model(input_ids=torch.randint(0, 50, (2, 5)))
    assert out.log_probs.shape == (2, 5) and out.entropy.shape == (2, 5)


@pytest.mark.parametrize("tied", [True, False])
def test_patched_forward_matches_the_models_logits(tied):
    model = tiny_model(vocab_size=61, seed=4, tie_word_embeddings=tied)
    input_ids = torch.randint(0, 61, (3, 7))
    attention_mask = torch.ones_like(input_ids)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double() / 0.7
    targets = torch.roll(input_ids, -1, dims=-1)
    logp = torch.log_softmax(logits, -1)
    expected_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    expected_h = -(logp.exp() * logp).sum(-1)
    (expected_grad,) = torch.autograd.grad((expected_lp + 0.5 * expected_h).sum(), model.lm_head.weight)

    fused_verl.patch_model_forward(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, temperature=0.7)
    (grad,) = torch.autograd.grad((out.log_probs + 0.5 * out.entropy).sum(), model.lm_head.weight)
    torch.testing.assert_close(out.log_probs.double(), expected_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), expected_h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def _rank_loss(mode, old, lp, adv, mask, entropy, *, process_group):
    """One rank's token-sum loss on its part of the batch, through verl's (stand-in) ppo_loss. Spawned
    ranks import nothing of the parent's, so the stand-ins are installed here."""
    install_fake_verl()
    fused_verl.install()
    ppo_loss = sys.modules["verl.workers.utils.losses"].ppo_loss
    config = actor_config(mode, "token-sum", kl_cov_ratio=0.05, top_entropy_fraction=0.25)
    data = {"old_log_probs": old, "advantages": adv, "response_mask": mask}
    loss, _ = ppo_loss(config, {"log_probs": lp, "entropy": entropy}, data, dp_group=process_group)
    return loss.detach()


@pytest.mark.distributed
def test_statistics_span_all_ranks(fake_verl):
    """Two gloo ranks, each with half the batch: their token-sum losses add up to the loss of one
    process on the whole batch, so centring, top-k and the entropy quantile were batch-wide."""
    g = torch.Generator().manual_seed(5)
    old, lp, adv, mask = batch(8, 10, g)
    entropy = torch.rand(8, 10, generator=g, dtype=torch.float64)
    tensors = (old, lp.detach(), adv, mask, entropy)
    halves = [tuple(t[rows] for t in tensors) for rows in (slice(0, 4), slice(4, 8))]
    modes = ("fusedrl_kl_cov", "fusedrl_top_entropy")
    results = run_ranks(2, [(_rank_loss, [(mode, *half) for half in halves], {}) for mode in modes])

    for mode, per_rank in zip(modes, results, strict=True):
        whole = _rank_loss(mode, *tensors, process_group=None)
        torch.testing.assert_close(sum(per_rank), whole, rtol=1e-12, atol=1e-12, msg=mode)
        # Alone, the halves select differently: the test tells local from batch-wide statistics.
        local = sum(_rank_loss(mode, *half, process_group=None) for half in halves)
        assert not torch.allclose(local, whole, rtol=1e-9), mode
