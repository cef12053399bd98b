"""FusedPolicyLoss's importance-sampling levels (GSPO), loss types beyond the PPO clip (CISPO, SAPO,
VESPO, LUSPO), rollout importance weights and their metrics, against float64 written here.

The reference takes lp and H from log_softmax in float64 (test_loss.make_batch's batch, logits or
hidden path), builds each weight and term from the papers' formulas (fusedrl/loss/objectives.py cites
them) and aggregates by hand; tests/integrations/test_trl.py checks the same options against TRL's
own implementation.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_policy_loss import B, SEED, T, V, assert_matches_float64, float64_leaves, make_batch

from fusedrl import FusedPolicyLoss

CASES = {
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "gspo_dapo_kl": dict(loss_type="dapo", importance_sampling_level="sequence", beta=0.3, kl_importance_weighted=True),
    "gspo_top_entropy": dict(loss_type="grpo", importance_sampling_level="sequence", top_entropy_fraction=0.3),
    "gspo_dual_clip": dict(loss_type="bnpo", importance_sampling_level="sequence", dual_clip=1.3, epsilon_low=0.5),
    "gspo_token_top_entropy": dict(loss_type="grpo", importance_sampling_level="sequence_token",
                                   top_entropy_fraction=0.3),
    "gspo_token_probability": dict(loss_type="bnpo", importance_sampling_level="sequence_token",
                                   prob_mask_threshold=0.6, normalize_by="selected"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "luspo_token_kl": dict(loss_type="luspo", beta=0.2),
    "cispo": dict(loss_type="cispo", cispo_max_weight=1.2),
    "cispo_sequence_top_entropy": dict(loss_type="cispo", cispo_max_weight=1.05, importance_sampling_level="sequence",
                                       top_entropy_fraction=0.3),
    "sapo": dict(loss_type="sapo"),
    "sapo_sequence_kl": dict(loss_type="sapo", importance_sampling_level="sequence", sapo_temperature_pos=2.0,
                             sapo_temperature_neg=0.5, beta=0.1, kl_importance_weighted=True),
    "vespo": dict(loss_type="vespo"),
    "off_policy": dict(loss_type="dapo", off_policy_mask_threshold=0.1),
    "off_policy_gspo_selected": dict(loss_type="grpo", importance_sampling_level="sequence",
                                     off_policy_mask_threshold=0.1, normalize_by="selected"),
    "vespo_shaped": dict(loss_type="vespo", vespo_k_pos=1.0, vespo_lambda_pos=0.5, vespo_k_neg=0.5,
                         vespo_lambda_neg=4.0),
}
# Each response's sequence-level weight in the sequence cases (advantages +1.1, -0.7, -1.6): the first
# is clipped high, the second low (below 1 - 0.2), the third is above the dual clip's 1.3.
SEQUENCE_WEIGHTS = (1.4, 0.6, 1.5)
# Cases whose advantages are per token: GSPO-token's reason to exist, and VESPO's per-token (k, lambda).
TOKEN_ADVANTAGES = {"gspo_token_top_entropy", "vespo_shaped"}
# Loss type -> aggregation (TRL's pairings): mean of response means, token means, token sum / B.
AGGREGATION = {"grpo": "responses", "sapo": "responses", "bnpo": "tokens", "dapo": "tokens", "cispo": "tokens",
               "vespo": "tokens", "luspo": "per_response_sum"}


def oracle(cfg, logits64, ids, mask, adv, old, ref, weights=None, num_items=None, sampling=None):
    """(loss, metrics) in float64 from the formulas; `weights` are rollout importance weights [B, T],
    `sampling` the sampler's log-probs for the off-policy mask (default: old)."""
    valid = mask.bool()
    logp = (logits64 / cfg.get("temperature", 1.0)).log_softmax(-1)
    lp = torch.where(valid, logp.gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1), 0.0)
    h = -(logp.exp() * logp).sum(-1)
    a = (adv[:, None].expand(B, T) if adv.dim() == 1 else adv).double()
    log_ratio = torch.where(valid, lp - old.double(), 0.0)
    level = cfg.get("importance_sampling_level", "token")
    s = torch.exp(log_ratio.sum(1, keepdim=True) / valid.sum(1, keepdim=True))  # GSPO
    if level == "sequence":
        w = s.expand(B, T)
    elif level == "sequence_token":
        w = s.detach() * torch.exp(lp - lp.detach())  # GSPO-token
    else:
        w = log_ratio.exp()
    kind = cfg["loss_type"]
    metrics = {}
    if kind == "cispo":
        cap = cfg["cispo_max_weight"]
        pg = -torch.minimum(w, torch.tensor(cap, dtype=torch.float64)).detach() * a * lp
        metrics["clip_ratio/cispo_mean"] = ((w > cap) & (a > 0)).double()
    elif kind == "sapo":
        tau = torch.where(a > 0, cfg.get("sapo_temperature_pos", 1.0), cfg.get("sapo_temperature_neg", 1.05))
        pg = -a * torch.sigmoid(tau * (w - 1)) * 4 / tau
    elif kind == "vespo":
        phi = vespo_phi(cfg, log_ratio, valid, a, weights)
        pg = -phi.detach() * a * lp
        metrics["vespo/phi_mean"] = phi
    else:
        el, eh = cfg.get("epsilon_low", 0.2), cfg.get("epsilon_high", 0.2)
        pg = torch.maximum(-a * w, -a * w.clamp(1 - el, 1 + eh))
        if cfg.get("dual_clip") is not None:
            pg = torch.where(a < 0, torch.minimum(pg, -a * cfg["dual_clip"]), pg)
        metrics["low"] = ((w < 1 - el) & (a < 0)).double()
        metrics["high"] = ((w > 1 + eh) & (a > 0)).double()
    if weights is not None and kind != "vespo":
        pg = pg * weights.double()
    keep = valid.clone()
    if cfg.get("top_entropy_fraction", 1.0) < 1.0:
        keep &= h.detach() >= torch.quantile(h.detach()[valid], 1 - cfg["top_entropy_fraction"])
    if cfg.get("prob_mask_threshold") is not None:
        keep &= old.double().exp() < cfg["prob_mask_threshold"]
    if cfg.get("off_policy_mask_threshold") is not None:  # DeepSeek-V3.2 eq. 9, NaN sampler log-probs as 0
        gap = torch.where(valid, ((old if sampling is None else sampling).double() - lp.detach()).nan_to_num(0.0), 0.0)
        keep &= (a >= 0) | (gap.sum(1, keepdim=True) / valid.sum(1, keepdim=True) <= cfg["off_policy_mask_threshold"])
        metrics["keep"] = keep
    counted = keep if cfg.get("normalize_by") == "selected" else valid
    loss = aggregate(kind, pg * keep, counted, num_items)
    k3 = torch.exp(ref.double() - lp) - (ref.double() - lp) - 1
    if cfg.get("kl_importance_weighted", False):
        k3 = w * k3
    loss = loss + aggregate(kind, cfg.get("beta", 0.0) * k3 * valid, valid, num_items)
    return loss, h, metrics


def vespo_phi(cfg, log_ratio, valid, a, weights):
    """VESPO's W^k exp(lambda (1 - W)) with log W the response's summed log-ratio (and log weights)."""
    log_w = (log_ratio.clamp(-20, 20) * valid).sum(1, keepdim=True)
    if weights is not None:
        log_w = log_w + (torch.log(weights.double()).clamp(math.log(1e-8), 20) * valid).sum(1, keepdim=True)
    log_w = log_w.clamp(math.log(1e-8), 20)
    positive = a >= 0
    k = torch.where(positive, cfg.get("vespo_k_pos", 2.0), cfg.get("vespo_k_neg", 3.0))
    lam = torch.where(positive, cfg.get("vespo_lambda_pos", 3.0), cfg.get("vespo_lambda_neg", 2.0))
    return log_w.exp() ** k * torch.exp(lam * (1 - log_w.exp()))


def aggregate(kind, x, counted, num_items):
    how = AGGREGATION[kind]
    if how == "responses":
        return (x.sum(1) / counted.sum(1).clamp(min=1)).mean()
    if how == "per_response_sum":
        return x.sum() / B
    return x.sum() / (num_items if num_items is not None and kind != "bnpo" else counted.sum())


def steer(old, logits64, ids, mask, targets):
    """old log-probs shifted per response so that its sequence-level weight is `targets` (the batch's
    noise alone averages out to weights near 1, which no clip reaches)."""
    valid = mask.bool()
    lp = logits64.detach().log_softmax(-1).gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    current = torch.where(valid, lp - old.double(), 0.0).sum(1) / valid.sum(1)
    shift = current - torch.tensor(targets, dtype=torch.float64).log()
    return (old.double() + shift[:, None]).float()


def run_case(case, path, weights=None, num_items=None, sampling_gap=None, device="cpu"):
    """`sampling_gap`: per response, the mean of sampling lp - lp that the sampler's log-probs are given
    (with one NaN), for the off-policy mask. The loss runs on `device`, the reference on the CPU."""
    cfg = CASES[case]
    inputs, logits64, ids, mask, adv, old, ref = make_batch(path == "hidden", token_advantages=case in TOKEN_ADVANTAGES)
    if cfg.get("importance_sampling_level", "token") != "token":
        old = steer(old, logits64, ids, mask, SEQUENCE_WEIGHTS)
    sampling = None
    if sampling_gap is not None:
        sampling = steer(old, logits64, ids, mask, [math.exp(-g) for g in sampling_gap])
        sampling[2, 1] = torch.nan
    leaves = {k: v.to(device, copy=True).requires_grad_(True) for k, v in inputs.items()}
    loss_fn = FusedPolicyLoss(**cfg, backend="torch")
    moved = [None if t is None else t.to(device) for t in (ids, mask, adv, old, ref, weights, sampling)]
    loss, metrics = loss_fn(*moved[:3], **leaves, old_logprobs=moved[3], ref_logprobs=moved[4],
                            rollout_is_weights=moved[5], num_items_in_batch=num_items, sampling_logprobs=moved[6])
    loss.backward()
    metrics = {k: v.cpu() for k, v in metrics.items()}
    ref_leaves, logits64 = float64_leaves(inputs)
    full_weights = None if weights is None else (weights[:, None].expand(B, T) if weights.dim() == 1 else weights)
    expected, h, ref_metrics = oracle(cfg, logits64, ids, mask, adv, old, ref, full_weights, num_items, sampling)
    expected.backward()
    # VESPO's weight W^k exp(lambda (1 - W)) multiplies the float32 rounding of log W (a sum over the
    # response) by up to k + lambda W: on these batches, over several seeds, the loss was off by up to
    # 4e-6 (a plain float32 PyTorch evaluation by up to 1.6e-6), so its value gets 1e-5; the gradients
    # keep the common tolerance.
    assert_matches_float64(loss, expected, leaves, ref_leaves, loss_tol=1e-5 if cfg["loss_type"] == "vespo" else 2e-6)
    sequence_weight = cfg.get("importance_sampling_level", "token") != "token"
    check_metrics(metrics, ref_metrics, mask.bool(), adv.dim() == 1, sequence_weight)
    if "keep" in ref_metrics:
        assert metrics["mask/selected"].item() == pytest.approx(ref_metrics["keep"].sum().item() / mask.sum().item())
    return metrics


def check_metrics(metrics, ref_metrics, valid, response_advantages, sequence_weight):
    """Means over valid tokens, or over the B rows for a per-response quantity: VESPO's phi with
    advantages [B], the clip flags of a sequence-level weight with advantages [B]."""
    def mean(x, per_response):
        return x[:, 0].mean().item() if per_response else x[valid].mean().item()

    def response_shares(x, per_response):
        if per_response:
            return x[:, 0]
        return torch.stack([x[i][valid[i]].mean() for i in range(B) if valid[i].any()])

    per_response = response_advantages and sequence_weight
    if "vespo/phi_mean" in ref_metrics:
        want = mean(ref_metrics["vespo/phi_mean"], response_advantages)
        assert metrics["vespo/phi_mean"].item() == pytest.approx(want, rel=1e-5)
    if "clip_ratio/cispo_mean" in ref_metrics:
        want = mean(ref_metrics["clip_ratio/cispo_mean"], per_response)
        assert metrics["clip_ratio/cispo_mean"].item() == pytest.approx(want)
    if "low" in ref_metrics:
        low, high = ref_metrics["low"], ref_metrics["high"]
        assert metrics["clip_ratio/low_mean"].item() == pytest.approx(mean(low, per_response))
        assert metrics["clip_ratio/high_mean"].item() == pytest.approx(mean(high, per_response))
        assert metrics["clip_ratio/region_mean"].item() == pytest.approx(mean(torch.maximum(low, high), per_response))
        assert metrics["clip_ratio/low_min"].item() == pytest.approx(response_shares(low, per_response).min().item())
        assert metrics["clip_ratio/high_max"].item() == pytest.approx(response_shares(high, per_response).max().item())


# Mean sampler-to-current log-prob gap of each response for the off-policy cases (advantages +, -, -):
# the first is far off-policy but has A > 0 and stays, the second is dropped, the third stays.
SAMPLING_GAP = (0.3, 0.2, 0.0)


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_match_float64(case, path):
    metrics = run_case(case, path, num_items=40 if CASES[case]["loss_type"] in ("dapo", "cispo") else None,
                       sampling_gap=SAMPLING_GAP if "off_policy_mask_threshold" in CASES[case] else None)
    # The batch reaches the branches each case is about.
    cfg = CASES[case]
    if cfg["loss_type"] in ("grpo", "bnpo", "dapo", "luspo"):
        assert metrics["clip_ratio/high_mean"] > 0
        # (the dual-clip case widens the low side, so that one response still has a gradient)
        assert metrics["clip_ratio/low_mean"] > 0 or "dual_clip" in cfg
    if "dual_clip" in cfg:
        assert metrics["clip_ratio/dual_mean"] > 0
    if cfg["loss_type"] == "cispo":
        assert 0 < metrics["clip_ratio/cispo_mean"] < 1
    if cfg["loss_type"] == "vespo":
        assert abs(metrics["vespo/phi_mean"] - 1) > 0.02
    if "off_policy_mask_threshold" in cfg:
        assert 0 < metrics["mask/off_policy"] < 1


@pytest.mark.parametrize("case", list(CASES))
def test_on_another_device(case, fake_gpu):
    """Every objective with its inputs on the fakegpu device (tests/fake_device.py): no tensor of its own
    lands on the CPU, and the values are the CPU ones."""
    weights = torch.linspace(0.5, 1.5, B) if case == "cispo" else None
    run_case(case, "hidden", weights=weights, num_items=40 if CASES[case]["loss_type"] in ("dapo", "cispo") else None,
             sampling_gap=SAMPLING_GAP if "off_policy_mask_threshold" in CASES[case] else None,
             device=fake_gpu.DEVICE)


@pytest.mark.parametrize(
    "case, shape",
    [("luspo_token_kl", "token"), ("gspo", "response"), ("cispo", "response"), ("sapo", "token"), ("vespo", "token")],
)
def test_rollout_importance_weights_match_float64(case, shape):
    """Constant weights on each token's (or response's) policy-gradient term; VESPO takes their logs into
    its sequence weight. One weight is 0, as a masking correction leaves it."""
    g = torch.Generator().manual_seed(SEED)
    weights = torch.empty((B, T) if shape == "token" else (B,)).uniform_(0.5, 1.5, generator=g)
    weights[1] = 0.0
    with_weights = run_case(case, "hidden", weights=weights)
    without = run_case(case, "hidden")
    assert with_weights["loss/pg"] != pytest.approx(without["loss/pg"].item(), abs=1e-4)


def one_token_batch(ratios, advantages):
    """Rows of two tokens over a vocabulary of 2 with zero logits (lp = log 1/2 each, d lp / d logits =
    (1/2, -1/2)), old log-probs giving each token the ratio asked for."""
    ratios = torch.tensor(ratios, dtype=torch.float32)
    logits = torch.zeros(*ratios.shape, 2, requires_grad=True)
    ids, mask = torch.zeros(ratios.shape, dtype=torch.long), torch.ones(ratios.shape)
    old = math.log(0.5) - ratios.log()
    return logits, ids, mask, torch.tensor(advantages), old


@pytest.mark.parametrize(
    "level, expected_dlp",
    [
        ("token", [-1 * 1.1 / 2, -3 / 1.1 / 2]),  # -A_t r_t / 2 for the token mean
        ("sequence", [-1.0, -1.0]),  # s = sqrt(1.1 / 1.1) = 1; d s / d lp_t = s / 2: -(A_1 + A_2) s / 2 / 2 each
        ("sequence_token", [-0.5, -1.5]),  # s in value, each token's own gradient: -A_t s / 2
    ],
)
def test_hand_worked_importance_sampling_levels(level, expected_dlp):
    """One response, ratios 1.1 and 1/1.1 (inside the clip), per-token advantages 1 and 3, bnpo."""
    logits, ids, mask, adv, old = one_token_batch([[1.1, 1 / 1.1]], [[1.0, 3.0]])
    loss_fn = FusedPolicyLoss(loss_type="bnpo", importance_sampling_level=level, backend="torch")
    loss, _ = loss_fn(ids, mask, adv, logits=logits, old_logprobs=old)
    loss.backward()
    if level != "token":
        assert loss.item() == pytest.approx(-(1 + 3) / 2, abs=1e-6)  # s = 1 in value
    expected = torch.tensor(expected_dlp)[None, :, None] * torch.tensor([0.5, -0.5])
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "ratio, advantage, expected_loss, expected_dlp",
    [
        (2.0, 1.0, 1.5 * math.log(2), -1.5),  # the weight is capped at 1.5, the gradient is not cut
        (0.5, 1.0, 0.5 * math.log(2), -0.5),  # below the cap: -sg(r) A grad lp
        (2.0, -1.0, -1.5 * math.log(2), 1.5),
    ],
)
def test_hand_worked_cispo(ratio, advantage, expected_loss, expected_dlp):
    """CISPO: -sg(min(r, 1.5)) A lp with lp = log 1/2 (one token, bnpo-like dapo mean)."""
    logits, ids, mask, adv, old = one_token_batch([[ratio]], [advantage])
    loss, _ = FusedPolicyLoss(loss_type="cispo", cispo_max_weight=1.5, backend="torch")(
        ids, mask, adv, logits=logits, old_logprobs=old)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.5, -0.5]]]) * expected_dlp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("advantage, tau", [(2.0, 0.5), (-2.0, 4.0)])
def test_hand_worked_sapo(advantage, tau):
    """SAPO on-policy (r = 1): loss -A (4 / tau) sigmoid(0) = -2 A / tau, with tau_pos = 0.5 for A > 0 and
    tau_neg = 4 for A < 0; its gradient is the plain policy gradient -A grad lp, whatever tau: d/dr of
    (4 / tau) sigmoid(tau (r - 1)) is 4 sigmoid'(0) = 1 at r = 1."""
    logits, ids, mask, adv, _ = one_token_batch([[1.0]], [advantage])
    loss_fn = FusedPolicyLoss(loss_type="sapo", sapo_temperature_pos=0.5, sapo_temperature_neg=4.0, backend="torch")
    loss, _ = loss_fn(ids, mask, adv, logits=logits)
    loss.backward()
    assert loss.item() == pytest.approx(-2 * advantage / tau, abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.5, -0.5]]]) * -advantage, atol=1e-6, rtol=0)


def test_hand_worked_vespo_weight():
    """Ratios 2 and 1 on one response: W = 2 (a product, not a mean); A = 1 takes k = 2, lambda = 3:
    phi = 2^2 e^(3 (1 - 2)) = 4 e^-3; the loss is -phi A (lp_1 + lp_2) / 2 with lp = log 1/2."""
    logits, ids, mask, adv, old = one_token_batch([[2.0, 1.0]], [1.0])
    loss, metrics = FusedPolicyLoss(loss_type="vespo", backend="torch")(ids, mask, adv, logits=logits, old_logprobs=old)
    phi = 4 * math.exp(-3)
    assert metrics["vespo/phi_mean"].item() == pytest.approx(phi, rel=1e-6)
    assert loss.item() == pytest.approx(phi * math.log(2), rel=1e-6)


def test_hand_worked_luspo_aggregation():
    """On-policy every valid token contributes -A; responses of 1 and 3 tokens: (-1 - 2 * 3) / B = -3.5,
    each response's mean weighted by its length (grpo would give -1.5)."""
    logits = torch.randn(2, 4, 5)
    ids, mask = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]]), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    loss, _ = FusedPolicyLoss(loss_type="luspo", backend="torch")(ids, mask, torch.tensor([1.0, 2.0]), logits=logits)
    assert loss.item() == pytest.approx(-3.5, abs=1e-6)


def test_sequence_level_metrics_count_responses():
    """Rows with ratios (2, 2), (0.5, 0.5) and none valid, advantages +1, -1, +1: with one weight per
    response the clip shares are over the 3 rows (an empty row's weight is 1: never clipped); token
    level, over the 4 valid tokens."""
    logits, ids, _, adv, old = one_token_batch([[2.0, 2.0], [0.5, 0.5], [1.0, 1.0]], [1.0, -1.0, 1.0])
    mask = torch.tensor([[1, 1], [1, 1], [0, 0]])
    for level, shares in (("sequence", (1 / 3, 1 / 3, 2 / 3)), ("token", (2 / 4, 2 / 4, 4 / 4))):
        _, m = FusedPolicyLoss(loss_type="grpo", importance_sampling_level=level, backend="torch")(
            ids, mask, adv, logits=logits, old_logprobs=old)
        got = (m["clip_ratio/high_mean"], m["clip_ratio/low_mean"], m["clip_ratio/region_mean"])
        assert [x.item() for x in got] == pytest.approx(shares)
        assert m["clip_ratio/high_max"].item() == 1.0 and m["clip_ratio/low_min"].item() == 0.0


@pytest.mark.parametrize("level, low_min", [("token", 1.0), ("sequence", 0.0)])
def test_extremes_with_an_empty_response(level, low_min):
    """Both non-empty responses are clipped low on every token. Token level the empty row has no share
    and is left out (low_min 1); with one weight per response it is an unclipped response (low_min 0),
    as TRL counts it. No valid token at all: NaN."""
    logits, ids, _, _, old = one_token_batch([[0.5, 0.5], [0.5, 0.5], [1.0, 1.0]], [0.0, 0.0, 0.0])
    mask, adv = torch.tensor([[1, 1], [1, 1], [0, 0]]), torch.tensor([-1.0, -1.0, 1.0])
    loss_fn = FusedPolicyLoss(loss_type="grpo", importance_sampling_level=level, backend="torch")
    _, m = loss_fn(ids, mask, adv, logits=logits, old_logprobs=old)
    assert m["clip_ratio/low_min"].item() == low_min and m["clip_ratio/high_max"].item() == 0.0
    _, m = FusedPolicyLoss(backend="torch")(ids, torch.zeros_like(mask), adv, logits=logits, old_logprobs=old)
    assert m["clip_ratio/low_min"].isnan() and m["clip_ratio/high_max"].isnan()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(importance_sampling_level="response"), "importance_sampling_level"),
        (dict(importance_sampling_level="sequence", cov_mode="clip_cov"), "importance_sampling_level"),
        (dict(importance_sampling_level="sequence_token", cov_mode="kl_cov"), "importance_sampling_level"),
        (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(loss_type="cispo", dual_clip=2.0), "dual_clip"),
        (dict(loss_type="sapo", cov_mode="kl_cov"), "cov_mode"),
        (dict(loss_type="luspo", normalize_by="selected"), "normalize_by"),
        (dict(loss_type="cispo", cispo_max_weight=0.0), "cispo_max_weight"),
        (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
        (dict(loss_type="vespo", vespo_k_pos=-1.0), "vespo_k_pos"),
        (dict(loss_type="vespo", vespo_lambda_neg=0.0), "vespo_lambda_neg"),
        (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
        (dict(loss_type="cispo", off_policy_mask_threshold=0.1, normalize_by="selected"), "off_policy_mask_threshold"),
    ],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedPolicyLoss(**kwargs)


@pytest.mark.parametrize("weights", [torch.ones(3), torch.ones(2, 4), torch.ones(2, 3, dtype=torch.long), [1.0, 1.0]])
def test_rollout_weights_errors_name_the_argument(weights):
    ids, mask, logits = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="rollout_is_weights"):
        FusedPolicyLoss(backend="torch")(ids, mask, torch.zeros(2), logits=logits, rollout_is_weights=weights)


def test_sampling_logprobs_need_the_off_policy_mask():
    ids, mask, logits = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        FusedPolicyLoss(backend="torch")(ids, mask, torch.zeros(2), logits=logits, sampling_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="sampling_logprobs"):
        FusedPolicyLoss(off_policy_mask_threshold=0.1, backend="torch")(
            ids, mask, torch.zeros(2), logits=logits, sampling_logprobs=torch.zeros(2, 4))
