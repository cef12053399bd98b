"""FusedPolicyLoss on hostile values: what padding holds never matters, wrong values at valid positions
are refused by name, and an empty batch is an ordinary (zero) loss."""

import pytest
import torch

from fusedrl import FusedPolicyLoss
from fusedrl.kernels import covariance_mask, linear_logprobs_and_entropy, logprobs_and_entropy, top_entropy_mask

B, T, H, V = 3, 6, 8, 11
LENGTHS = torch.tensor([6, 2, 4])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T) < LENGTHS[:, None]
    return dict(ids=torch.randint(0, V, (B, T), generator=g), mask=mask, hidden=torch.randn(B, T, H, generator=g),
                weight=torch.randn(V, H, generator=g) * 0.5, bias=torch.randn(V, generator=g) * 0.5,
                adv=torch.randn(B, T, generator=g), old=-torch.rand(B, T, generator=g) * 3,
                ref=-torch.rand(B, T, generator=g) * 3)


def _loss_and_grads(loss_fn, b):
    leaves = [b["hidden"].clone().requires_grad_(), b["weight"].clone().requires_grad_(),
              b["bias"].clone().requires_grad_()]
    loss, metrics = loss_fn(b["ids"], b["mask"], b["adv"], hidden=leaves[0], weight=leaves[1], bias=leaves[2],
                            old_logprobs=b["old"], ref_logprobs=b["ref"])
    loss.backward()
    return loss.detach(), metrics, [x.grad for x in leaves]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("options", [dict(loss_type="dapo", beta=0.1, entropy_coef=0.01),
                                     dict(loss_type="grpo", top_entropy_fraction=0.5, cov_mode="kl_cov", beta=0.1)],
                         ids=["dapo_kl_entropy", "grpo_top_entropy_kl_cov"])
def test_nan_and_inf_in_padding_change_nothing(backend, options):
    """NaN / inf hidden states, advantages, old and reference log-probs and out-of-vocabulary ids at padded
    positions: loss, metrics and every gradient equal those of finite padding, bitwise."""
    clean = _batch()
    dirty = {k: v.clone() for k, v in clean.items()}
    pad = ~clean["mask"]
    dirty["hidden"][pad] = float("nan")
    dirty["hidden"][1, 3] = float("inf")
    for key in ("adv", "old", "ref"):
        dirty[key][pad] = float("nan")
    dirty["ids"][pad] = -100
    loss_fn = FusedPolicyLoss(backend=backend, **options)
    want, got = _loss_and_grads(loss_fn, clean), _loss_and_grads(loss_fn, dirty)
    assert torch.isfinite(got[0]) and torch.equal(want[0], got[0])
    assert want[1].keys() == got[1].keys()
    for key in want[1]:
        assert torch.equal(want[1][key], got[1][key]), key
    for name, a, b in zip(("hidden", "weight", "bias"), want[2], got[2]):
        assert torch.isfinite(b).all() and torch.equal(a, b), name
    assert torch.all(got[2][0][pad] == 0)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_ignore_index_at_a_valid_position_is_refused(path):
    """-100 at a valid position would get lp = H = 0 silently (the fused op skips it)."""
    b = _batch()
    b["ids"][0, 2] = -100
    inputs = (dict(hidden=b["hidden"], weight=b["weight"]) if path == "hidden"
              else dict(logits=b["hidden"] @ b["weight"].T))
    with pytest.raises(ValueError, match=r"completion_ids holds ignore_index \(-100\) at a valid position"):
        FusedPolicyLoss()(b["ids"], b["mask"], b["adv"], **inputs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("argument", ["advantages", "advantages [B]", "old_logprobs", "ref_logprobs"])
def test_non_finite_values_at_valid_positions_are_refused(argument, value):
    b = _batch()
    adv = b["adv"][:, 0].clone() if argument == "advantages [B]" else b["adv"]
    target = {"advantages": adv, "advantages [B]": adv, "old_logprobs": b["old"], "ref_logprobs": b["ref"]}[argument]
    target.view(-1)[1] = value  # row 0, a valid position
    loss_fn = FusedPolicyLoss(beta=0.1)
    name = argument.split()[0]
    with pytest.raises(ValueError, match=f"{name} must be finite at valid positions"):
        loss_fn(b["ids"], b["mask"], adv, hidden=b["hidden"], weight=b["weight"], old_logprobs=b["old"],
                ref_logprobs=b["ref"])
    if name != "ref_logprobs":  # select() takes no reference log-probs
        with pytest.raises(ValueError, match=f"{name} must be finite at valid positions"):
            FusedPolicyLoss(top_entropy_fraction=0.5).select(b["mask"], adv, entropy=torch.rand(B, T),
                                                             logprobs=b["old"], old_logprobs=b["old"])


def test_check_values_false_skips_the_checks():
    """The opt-out for a trainer that checks its inputs itself: the NaN then reaches the loss."""
    b = _batch()
    b["adv"][0, 0] = float("nan")
    loss, _ = FusedPolicyLoss(check_values=False)(b["ids"], b["mask"], b["adv"], hidden=b["hidden"], weight=b["weight"])
    assert loss.isnan()


EMPTY_OPTIONS = [dict(loss_type=t) for t in ("grpo", "dapo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo")] + [
    dict(cov_mode="clip_cov"), dict(cov_mode="kl_cov"), dict(top_entropy_fraction=0.2, normalize_by="selected"),
    dict(prob_mask_threshold=0.5, beta=0.1, entropy_coef=0.01), dict(importance_sampling_level="sequence")]


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("options", EMPTY_OPTIONS, ids=str)
def test_an_empty_batch_is_a_zero_loss(options, path, per_token):
    """B = 0 (a rank or micro-batch with no responses): loss 0 with zero gradients, metrics as documented."""
    ids, mask = torch.zeros(0, T, dtype=torch.long), torch.zeros(0, T)
    adv = torch.zeros(0, T) if per_token else torch.zeros(0)
    if path == "logits":
        leaves = [torch.randn(0, T, V, requires_grad=True)]
        inputs = dict(logits=leaves[0])
    else:
        leaves = [torch.randn(0, T, H, requires_grad=True), torch.randn(V, H, requires_grad=True)]
        inputs = dict(hidden=leaves[0], weight=leaves[1])
    loss_fn = FusedPolicyLoss(max_completion_length=T, **options)
    loss, metrics = loss_fn(ids, mask, adv, old_logprobs=torch.zeros(0, T), ref_logprobs=torch.zeros(0, T), **inputs)
    loss.backward()
    assert loss.shape == () and loss.item() == 0.0
    for leaf in leaves:
        assert leaf.grad is not None and not leaf.grad.any()
    for key, value in metrics.items():
        if key in ("clip_ratio/low_min", "clip_ratio/high_max"):
            assert value.isnan(), key
        elif key == "cov/max":
            assert value == -float("inf")
        else:
            assert value == 0, key


def test_empty_top_entropy_mask_is_empty():
    for shape in [(0,), (0, 4)]:
        out = top_entropy_mask(torch.zeros(shape), torch.zeros(shape), top_fraction=0.2)
        assert out.dtype == torch.bool and out.shape == shape


@pytest.mark.parametrize("mode", ["clip_cov", "kl_cov"])
def test_covariance_mask_refuses_a_non_finite_advantage(mode):
    """A NaN advantage makes every covariance of its row NaN, which orders arbitrarily: refused."""
    lp, mask = -torch.rand(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="advantages must be finite"):
        covariance_mask(lp, torch.tensor([float("nan"), 1.0]), mask, mode=mode, ratio=0.5)
    with pytest.raises(ValueError, match="logprobs must be finite"):
        covariance_mask(lp.masked_fill(mask.bool(), float("nan")), torch.ones(2), mask, mode=mode, ratio=0.5)
    mask[0] = 0  # a padded row may hold anything
    covariance_mask(lp, torch.tensor([float("nan"), 1.0]), mask, mode=mode, ratio=0.5)


def test_meta_tensors_are_refused_by_name():
    meta = torch.device("meta")
    ids, mask = torch.zeros(2, 3, dtype=torch.long, device=meta), torch.ones(2, 3, device=meta)
    hidden, weight = torch.zeros(2, 3, 4, device=meta), torch.zeros(5, 4)
    with pytest.raises(ValueError, match="completion_ids is on the meta device"):
        FusedPolicyLoss()(ids, mask, torch.zeros(2, device=meta), hidden=hidden, weight=weight.to(meta))
    with pytest.raises(ValueError, match="hidden is on the meta device"):
        linear_logprobs_and_entropy(hidden, weight.to(meta), ids)
    with pytest.raises(ValueError, match="logits is on the meta device"):
        logprobs_and_entropy(torch.zeros(2, 3, 5, device=meta), ids)
    with pytest.raises(ValueError, match="entropy is on the meta device"):
        top_entropy_mask(torch.zeros(2, 3, device=meta), mask)
