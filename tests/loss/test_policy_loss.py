"""FusedPolicyLoss against a float64 implementation of docs/algorithms.md sections 2 to 5 written here.

The reference recomputes lp and H with log_softmax in float64 from the same logits (or from hidden @
weight^T + bias), builds every mask from its own definition (torch.quantile for the entropy threshold,
exp(old_lp) < rho, its own covariance and torch.topk for KL-Cov) and aggregates by hand. The one
exception is Clip-Cov's random draw, which the reference takes from covariance_mask under the same
seed: that op's sampling is tested on its own in tests/kernels/test_covariance_mask.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from spawn_helpers import run_ranks

from fusedrl import FusedPolicyLoss
from fusedrl.loss import metrics_to_floats
from fusedrl.kernels import covariance_mask

B, T, V, HID = 3, 9, 37, 16
SEED = 1234

CASES = {
    "grpo": (dict(loss_type="grpo"), {}),
    "bnpo": (dict(loss_type="bnpo", epsilon_high=0.28), {}),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=12), {}),
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28, temperature=0.7), {}),
    "dapo_num_items": (dict(loss_type="dapo"), dict(num_items_in_batch=40)),
    "dual_clip": (dict(loss_type="bnpo", dual_clip=1.3, epsilon_low=0.1), {}),
    "kl_k1": (dict(loss_type="bnpo", beta=0.3, kl_estimator="k1"), {}),
    "kl_k2": (dict(loss_type="grpo", beta=0.3, kl_estimator="k2"), {}),
    "kl_k3": (dict(loss_type="dapo", beta=0.3, kl_estimator="k3"), {}),
    "kl_k3_importance_weighted": (dict(loss_type="grpo", beta=0.3, kl_estimator="k3", kl_importance_weighted=True), {}),
    "kl_k2_importance_weighted": (dict(loss_type="bnpo", beta=0.3, kl_estimator="k2", kl_importance_weighted=True), {}),
    "entropy_bonus": (dict(loss_type="bnpo", entropy_coef=0.05), {}),
    "top_entropy": (dict(loss_type="dapo", top_entropy_fraction=0.2), {}),
    "top_entropy_selected": (dict(loss_type="grpo", top_entropy_fraction=0.3, normalize_by="selected"), {}),
    # The 80/20 paper's ablation: the 80% lowest-entropy tokens, the complement of the top 20%.
    "low_entropy": (dict(loss_type="dapo", top_entropy_fraction=0.2, entropy_tokens="low"), {}),
    "low_entropy_selected": (dict(loss_type="bnpo", top_entropy_fraction=0.4, entropy_tokens="low",
                                  normalize_by="selected"), {}),
    "probability": (dict(loss_type="bnpo", prob_mask_threshold=0.6, normalize_by="selected"), {}),
    "clip_cov": (dict(loss_type="dapo", cov_mode="clip_cov", cov_ratio=0.1, cov_lower=0.02, cov_upper=4.0), {}),
    "kl_cov": (dict(loss_type="bnpo", cov_mode="kl_cov", cov_ratio=0.1, kl_cov_coef=0.7), {}),
    "combined": (
        dict(loss_type="grpo", top_entropy_fraction=0.5, prob_mask_threshold=0.8, cov_mode="clip_cov", cov_ratio=0.2,
             cov_lower=0.0, beta=0.1, entropy_coef=0.02, dual_clip=2.0, normalize_by="selected"),
        {},
    ),
    "combined_kl_cov": (
        dict(loss_type="dapo", top_entropy_fraction=0.4, cov_mode="kl_cov", cov_ratio=0.15, beta=0.05),
        dict(num_items_in_batch=30),
    ),
}


def make_batch(hidden_path: bool, token_advantages: bool = False):
    """A batch with peaked rows (so the probability mask and clipping both bite) and ragged padding."""
    g = torch.Generator().manual_seed(SEED)
    if hidden_path:
        hidden = torch.randn(B, T, HID, generator=g)
        weight = torch.randn(V, HID, generator=g) * 0.6
        bias = torch.randn(V, generator=g) * 0.5
        logits64 = hidden.double() @ weight.double().T + bias.double()
        inputs = dict(hidden=hidden, weight=weight, bias=bias)
    else:
        logits = torch.randn(B, T, V, generator=g) * 3.0
        logits64 = logits.double()
        inputs = dict(logits=logits)
    ids = torch.distributions.Categorical(logits=logits64.float()).sample()
    lengths = torch.tensor([T, 5, 7])
    mask = (torch.arange(T) < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, 10**6)  # padding ids out of the vocabulary must not matter
    lp = logits64.log_softmax(-1).gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    old = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    # Mixed signs, so that both sides of the clip and the dual clip (A < 0) are reached.
    adv = torch.randn(B, T, generator=g) if token_advantages else torch.tensor([1.1, -0.7, -1.6])
    return inputs, logits64, ids, mask, adv, old, ref


def oracle_loss(cfg, logits64, ids, mask, adv, old, ref, num_items=None):
    """The loss in float64, straight from the formulas."""
    t = cfg.get("temperature", 1.0)
    el, eh = cfg.get("epsilon_low", 0.2), cfg.get("epsilon_high", 0.2)
    valid = mask.bool()
    logp = (logits64 / t).log_softmax(-1)
    lp = logp.gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    a = (adv[:, None].expand(B, T) if adv.dim() == 1 else adv).double()
    olp = lp.detach() if old is None else old.double()
    ratio = torch.exp(lp - olp)
    unclipped, clipped = -a * ratio, -a * ratio.clamp(1 - el, 1 + eh)
    n = int(valid.sum())
    k = max(1, int(cfg.get("cov_ratio", 2e-4) * n))
    if cfg.get("cov_mode") == "kl_cov":
        lpd = lp.detach()
        cov = (lpd - lpd[valid].mean()) * (a - a[valid].mean())
        top = cov[valid].topk(k).indices
        chosen = torch.zeros(n, dtype=torch.bool)
        chosen[top] = True
        selected = torch.zeros_like(valid)
        selected[valid] = chosen
        pg = unclipped + cfg.get("kl_cov_coef", 1.0) * (lp - olp).abs() * selected
    else:
        pg = torch.maximum(unclipped, clipped)
        if cfg.get("dual_clip") is not None:
            pg = torch.where(a < 0, torch.minimum(pg, -a * cfg["dual_clip"]), pg)
    keep = valid.clone()
    if cfg.get("cov_mode") == "clip_cov":
        drawn = covariance_mask(
            lp.detach().float(), a.float(), mask, mode="clip_cov", ratio=cfg["cov_ratio"], lower=cfg.get("cov_lower", 1.0),
            upper=cfg.get("cov_upper", 5.0), exclude=clipped > unclipped, generator=torch.Generator().manual_seed(SEED),
        )
        keep &= ~drawn
    if cfg.get("top_entropy_fraction", 1.0) < 1.0:
        tau = torch.quantile(h.detach()[valid], 1 - cfg["top_entropy_fraction"])
        keep &= (h.detach() >= tau) if cfg.get("entropy_tokens", "high") == "high" else (h.detach() < tau)
    if cfg.get("prob_mask_threshold") is not None:
        keep &= olp.exp() < cfg["prob_mask_threshold"]
    per_token = pg * keep
    denominator = keep if cfg.get("normalize_by") == "selected" else valid
    loss = aggregate(cfg, per_token, denominator, num_items)
    kl = {"k1": lp - ref.double(), "k2": 0.5 * (lp - ref.double()) ** 2,
          "k3": torch.exp(ref.double() - lp) - (ref.double() - lp) - 1}[cfg.get("kl_estimator", "k3")]
    if cfg.get("kl_importance_weighted", False):
        kl = ratio * kl
    loss = loss + aggregate(cfg, cfg.get("beta", 0.0) * kl * valid, valid, num_items)
    loss = loss + aggregate(cfg, -cfg.get("entropy_coef", 0.0) * h * valid, valid, num_items)
    return loss, lp, h, keep


def aggregate(cfg, x, counted, num_items):
    kind = cfg["loss_type"]
    if kind == "grpo":
        return (x.sum(1) / counted.sum(1).clamp(min=1)).mean()
    if kind == "dr_grpo":
        return x.sum() / (B * cfg["max_completion_length"])
    if kind == "dapo" and num_items is not None:
        return x.sum() / num_items
    return x.sum() / counted.sum().clamp(min=1)


def float64_leaves(inputs):
    """float64 copies of the inputs that require grad, and the logits they give (hidden @ weight^T + bias)."""
    leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    if "hidden" in leaves:
        return leaves, leaves["hidden"] @ leaves["weight"].T + leaves["bias"]
    return leaves, leaves["logits"]


def assert_matches_float64(loss, expected, leaves, ref_leaves, loss_tol=2e-6):
    """The loss, and the gradient of every leaf (on any device), equal the float64 reference's on the CPU
    (run backward first)."""
    torch.testing.assert_close(loss.detach().double().cpu(), expected.detach(), rtol=loss_tol, atol=loss_tol)
    for name, leaf in leaves.items():
        want = ref_leaves[name].grad
        scale = want.abs().max().item()
        assert scale > 0, f"reference gradient of {name} is all zero: the case tests nothing"
        torch.testing.assert_close(
            leaf.grad.double().cpu(), want, rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_float64(case, path, backend):
    check_against_float64(case, path, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("case", ["dapo_num_items", "clip_cov", "kl_cov", "combined", "combined_kl_cov"])
def test_gpu_loss_and_gradients_match_float64(case, path):
    """GPU twin on the cases whose masks take the selection ops' device paths (one sort instead of topk,
    every token hashed, Clip-Cov seeded from the same CPU generator): compiled kernels, same reference."""
    check_against_float64(case, path, "triton", "cuda")


def check_against_float64(case, path, backend, device):
    """The loss on `device` against the float64 reference on the CPU: value, gradients, two metrics."""
    cfg, call = CASES[case]
    inputs, logits64, ids, mask, adv, old, ref = make_batch(path == "hidden", token_advantages=case == "kl_cov")
    leaves = {k: v.to(device, copy=True).requires_grad_(True) for k, v in inputs.items()}
    loss_fn = FusedPolicyLoss(**cfg, generator=torch.Generator().manual_seed(SEED), backend=backend)
    moved = [t.to(device) for t in (ids, mask, adv, old, ref)]
    loss, metrics = loss_fn(*moved[:3], **leaves, old_logprobs=moved[3], ref_logprobs=moved[4], **call)
    loss.backward()
    metrics = {k: v.cpu() for k, v in metrics.items()}

    ref_leaves, logits64 = float64_leaves(inputs)
    expected, _, h, keep = oracle_loss(cfg, logits64, ids, mask, adv, old, ref, call.get("num_items_in_batch"))
    expected.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_matches_float64(loss, expected, leaves, ref_leaves)
    valid = mask.bool()
    assert metrics["mask/selected"].item() == pytest.approx(keep.sum().item() / valid.sum().item())
    assert metrics["entropy/mean"].item() == pytest.approx(h[valid].mean().item(), rel=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_input_matches_float64(case):
    """lp and H computed by the caller (verl's path): given in float64, the loss stays in float64 and
    equals the reference to float64 rounding, gradients included (through lp and H to the logits)."""
    cfg, call = CASES[case]
    _, logits64, ids, mask, adv, old, ref = make_batch(False, token_advantages=case == "kl_cov")
    leaf = logits64.clone().requires_grad_(True)
    logp = (leaf / cfg.get("temperature", 1.0)).log_softmax(-1)
    lp = logp.gather(-1, ids.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    options = {k: v for k, v in cfg.items() if k != "temperature"}
    loss_fn = FusedPolicyLoss(**options, generator=torch.Generator().manual_seed(SEED))
    loss, metrics = loss_fn(None, mask, adv.double(), logprobs=lp, entropy=h, old_logprobs=old.double(),
                            ref_logprobs=ref.double(), **call)
    loss.backward()

    ref_leaf = logits64.clone().requires_grad_(True)
    expected, _, _, keep = oracle_loss(cfg, ref_leaf, ids, mask, adv, old, ref, call.get("num_items_in_batch"))
    expected.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol=1e-12)
    assert metrics["mask/selected"].item() == pytest.approx(keep.sum().item() / mask.sum().item())


def test_logprobs_input_errors_name_the_argument():
    loss_fn = FusedPolicyLoss(top_entropy_fraction=0.5)
    mask, lp = torch.ones(2, 3), torch.zeros(2, 3)
    with pytest.raises(ValueError, match="entropy must be given with logprobs"):
        loss_fn(None, mask, torch.zeros(2), logprobs=lp)
    with pytest.raises(ValueError, match="logprobs must be a float tensor of shape"):
        loss_fn(torch.zeros(2, 3, dtype=torch.long), mask, torch.zeros(2), logprobs=torch.zeros(2, 4), entropy=lp)
    with pytest.raises(ValueError, match="entropy is an input only with logprobs"):
        loss_fn(torch.zeros(2, 3, dtype=torch.long), mask, torch.zeros(2), logits=torch.zeros(2, 3, 4), entropy=lp)
    with pytest.raises(ValueError, match="completion_ids must be a"):
        loss_fn(None, mask, torch.zeros(2), logits=torch.zeros(2, 3, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bfloat16_logits(backend):
    """bf16 logits: lp, H and the loss in fp32 match float64 on the rounded logits; the bf16 gradient
    is within bf16 rounding of the float64 one."""
    cfg = dict(loss_type="dapo", epsilon_high=0.28, top_entropy_fraction=0.3, beta=0.1)
    inputs, _, ids, mask, adv, old, ref = make_batch(False)
    logits = inputs["logits"].to(torch.bfloat16).requires_grad_(True)
    loss, _ = FusedPolicyLoss(**cfg, backend=backend)(ids, mask, adv, logits=logits, old_logprobs=old, ref_logprobs=ref)
    loss.backward()
    logits64 = logits.detach().double().requires_grad_(True)
    expected = oracle_loss(cfg, logits64, ids, mask, adv, old, ref)[0]
    expected.backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=2e-6, atol=2e-6)
    scale = logits64.grad.abs().max().item()
    torch.testing.assert_close(logits.grad.double(), logits64.grad, rtol=2**-8, atol=1e-3 * scale)


DISTRIBUTED_CASES = (
    dict(top_entropy_fraction=0.3, cov_mode="kl_cov", cov_ratio=0.1),
    dict(top_entropy_fraction=0.5, cov_mode="clip_cov", cov_ratio=0.1, cov_lower=0.0),
    # dapo over the selected tokens divides by their count on every rank (num_items_in_batch is the KL's).
    dict(top_entropy_fraction=0.3, prob_mask_threshold=0.8, normalize_by="selected"),
)


def loss_on_rank(hidden, weight, bias, ids, mask, adv, old, case, num_items, *, generator=None, process_group=None):
    """One rank's DAPO loss (global token count given) and its gradients, masks from the global batch."""
    loss_fn = FusedPolicyLoss(**DISTRIBUTED_CASES[case], generator=generator, process_group=process_group, backend="torch")
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss, metrics = loss_fn(ids, mask, adv, hidden=leaves[0], weight=leaves[1], bias=leaves[2], old_logprobs=old,
                            num_items_in_batch=num_items)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves], metrics["mask/selected"]


@pytest.mark.distributed
def test_distributed_loss_equals_concatenated_batch():
    """With dapo and the global token count, the ranks' losses sum to the single-process loss of the
    concatenated batch and their hidden gradients are its slices: the masks were global."""
    inputs, _, ids, mask, adv, old, _ = make_batch(True)
    hidden, weight, bias = inputs["hidden"], inputs["weight"], inputs["bias"]
    n = int(mask.sum())
    rows = (slice(0, 1), slice(1, B))
    parts = [(hidden[r], weight, bias, ids[r], mask[r], adv[r], old[r]) for r in rows]
    jobs = [(loss_on_rank, [p + (case, n) for p in parts], dict(generator_seed=SEED)) for case in range(len(DISTRIBUTED_CASES))]
    for case, per_rank in enumerate(run_ranks(2, jobs)):
        loss, grads, selected = loss_on_rank(hidden, weight, bias, ids, mask, adv, old, case, n,
                                             generator=torch.Generator().manual_seed(SEED))
        torch.testing.assert_close(sum(r[0] for r in per_rank), loss, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.cat([r[1][0] for r in per_rank]), grads[0], rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(sum(r[1][1] for r in per_rank), grads[1], rtol=1e-5, atol=1e-7)
        local_valid = [int(mask[r].sum()) for r in rows]
        assert sum(r[2].item() * c for r, c in zip(per_rank, local_valid)) == pytest.approx(selected.item() * n)
        assert 0 < selected.item() < 1


@pytest.mark.parametrize("hidden_path", [False, True])
def test_clip_cases_bite(hidden_path):
    """The batches used above really exercise clipping, dual clipping and every mask."""
    _, logits64, ids, mask, adv, old, ref = make_batch(hidden_path)
    _, lp, h, _ = oracle_loss(CASES["grpo"][0], logits64, ids, mask, adv, old, ref)
    valid = mask.bool()
    ratio = (lp - old.double()).exp()[valid]
    assert (ratio > 1.2).any() and (ratio < 0.8).any()
    assert ((old.double().exp() >= 0.6) & valid).any() and ((old.double().exp() < 0.6) & valid).any()
    a = adv[:, None].expand(B, T)[valid]
    assert ((ratio > CASES["dual_clip"][0]["dual_clip"]) & (a < 0)).any()
    for case in ("top_entropy", "probability", "clip_cov"):
        _, _, _, keep = oracle_loss(CASES[case][0], logits64, ids, mask, adv, old, ref)
        assert 0 < keep.sum() < valid.sum(), case


@pytest.mark.parametrize(
    "advantage, ratio, dual_clip, expected_loss, expected_dloss_dlp",
    [
        (1.0, 1.5, None, -1.2, 0.0),  # A > 0, ratio above 1 + eps: clipped at 1.2, no gradient
        (1.0, 0.5, None, -0.5, -0.5),  # A > 0, ratio below 1 - eps: the unclipped term is the max
        (-1.0, 0.5, None, 0.8, 0.0),  # A < 0, ratio below 1 - eps: clipped at 0.8
        (-1.0, 1.5, None, 1.5, 1.5),  # A < 0, ratio above 1 + eps: unclipped
        (-1.0, 1.5, 1.4, 1.4, 0.0),  # dual clip caps the A < 0 loss at -A c = 1.4
        (-2.0, 1.1, 1.4, 2.2, 2.2),  # inside the clip range and under the cap: -A ratio
    ],
)
def test_hand_worked_clip(advantage, ratio, dual_clip, expected_loss, expected_dloss_dlp):
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    old = torch.full((1, 1), math.log(0.5) - math.log(ratio))
    loss_fn = FusedPolicyLoss(loss_type="bnpo", epsilon_low=0.2, epsilon_high=0.2, dual_clip=dual_clip, backend="torch")
    loss, _ = loss_fn(ids, mask, torch.tensor([advantage]), logits=logits, old_logprobs=old)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss, abs=1e-6)
    # d lp / d logits = onehot(0) - p = [0.5, -0.5]
    torch.testing.assert_close(logits.grad, torch.tensor([[[0.5, -0.5]]]) * expected_dloss_dlp, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "estimator, expected",
    [("k1", math.log(2)), ("k2", math.log(2) ** 2 / 2), ("k3", 0.5 + math.log(0.5) * -1 - 1)],
)
def test_hand_worked_kl_estimators(estimator, expected):
    """lp = log 1/2, rlp = log 1/4: k1 = ln 2, k2 = (ln 2)^2 / 2, k3 = 1/2 + ln 2 - 1; A = 0 leaves only beta KL."""
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    ref = torch.full((1, 1), math.log(0.25))
    loss_fn = FusedPolicyLoss(loss_type="bnpo", beta=2.0, kl_estimator=estimator, backend="torch")
    loss, metrics = loss_fn(ids, mask, torch.zeros(1), logits=logits, ref_logprobs=ref)
    assert loss.item() == pytest.approx(2.0 * expected, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("weighted, expected_grad", [(False, 0.5), (True, math.log(2))])
def test_hand_worked_importance_weighted_kl_on_policy(weighted, expected_grad):
    """On-policy the ratio is 1 but keeps its gradient. lp = log 1/2, rlp = log 1/4, beta = 2, A = 0:
    d k3 / d lp = 1 - exp(rlp - lp) = 1/2, so d(beta k3)/d lp = 1, while d(beta ratio k3)/d lp =
    beta (k3 + 1/2) = 2 ln 2 (d ratio / d lp = ratio = 1); d lp / d logits = (1/2, -1/2). The loss
    and the "kl" metric are k3 = ln 2 - 1/2 either way."""
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    ids, mask = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    ref = torch.full((1, 1), math.log(0.25))
    loss_fn = FusedPolicyLoss(loss_type="bnpo", beta=2.0, backend="torch", kl_importance_weighted=weighted)
    loss, metrics = loss_fn(ids, mask, torch.zeros(1), logits=logits, ref_logprobs=ref)
    loss.backward()
    k3 = math.log(2) - 0.5
    assert loss.item() == pytest.approx(2.0 * k3, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(k3, abs=1e-6)
    torch.testing.assert_close(logits.grad, torch.tensor([[[expected_grad, -expected_grad]]]), atol=1e-6, rtol=0)


def test_importance_weighted_kl_metric_is_the_weighted_estimate():
    """Off-policy (ratio 2 on one token of two), the "kl" metric is the mean of ratio * k3, as TRL logs it."""
    logits = torch.zeros(1, 2, 2)
    ids, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # lp = log 1/2: ratios 2 and 1
    ref = torch.full((1, 2), math.log(0.25))
    loss_fn = FusedPolicyLoss(loss_type="bnpo", beta=1.0, backend="torch", kl_importance_weighted=True)
    loss, metrics = loss_fn(ids, mask, torch.zeros(1), logits=logits, old_logprobs=old, ref_logprobs=ref)
    k3 = math.log(2) - 0.5
    assert metrics["kl"].item() == pytest.approx((2 * k3 + k3) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((2 * k3 + k3) / 2, abs=1e-6)


@pytest.mark.parametrize(
    "loss_type, extra, call, expected",
    [
        ("grpo", {}, {}, (-1 + -2) / 2),  # mean of per-response means
        ("bnpo", {}, {}, (-1 - 2 * 3) / 4),  # local token mean
        ("dr_grpo", dict(max_completion_length=5), {}, (-1 - 6) / (2 * 5)),
        ("dapo", {}, {}, (-1 - 6) / 4),
        ("dapo", {}, dict(num_items_in_batch=10), (-1 - 6) / 10),
    ],
)
def test_hand_worked_aggregation(loss_type, extra, call, expected):
    """On-policy (ratio 1) every valid token contributes -A; responses of 1 and 3 valid tokens."""
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 1, 2, 3]])
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    loss_fn = FusedPolicyLoss(loss_type=loss_type, backend="torch", **extra)
    loss, _ = loss_fn(ids, mask, torch.tensor([1.0, 2.0]), logits=logits, **call)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_metrics_names_values_and_floats():
    logits = torch.zeros(1, 4, 2)
    ids, mask = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4)
    # ratios 1.5, 0.5, 1.0, 1.0 with A = +1: one high clip, no low clip (A > 0)
    old = torch.log(torch.tensor([[0.5 / 1.5, 1.0, 0.5, 0.5]]))
    loss_fn = FusedPolicyLoss(loss_type="bnpo", top_entropy_fraction=0.5, prob_mask_threshold=0.9, cov_mode="kl_cov",
                              cov_ratio=0.5, backend="torch")
    _, metrics = loss_fn(ids, mask, torch.ones(1), logits=logits, old_logprobs=old, ref_logprobs=old)
    for v in metrics.values():
        assert v.dim() == 0 and not v.requires_grad
    assert set(metrics) == {
        "loss/pg", "entropy/mean", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl",
        "mask/top_entropy", "mask/probability", "mask/cov", "mask/selected", "cov/mean", "cov/max",
        "clip_ratio/low_min", "clip_ratio/high_max",
    }
    floats = metrics_to_floats(metrics)
    assert all(isinstance(v, float) for v in floats.values())
    assert floats["clip_ratio/high_mean"] == 0.25 and floats["clip_ratio/low_mean"] == 0.0
    assert floats["clip_ratio/region_mean"] == 0.25
    assert floats["clip_ratio/high_max"] == 0.25 and floats["clip_ratio/low_min"] == 0.0  # the one response
    assert floats["entropy/mean"] == pytest.approx(math.log(2))
    assert floats["mask/top_entropy"] == 1.0  # all entropies tie at ln 2: all are >= tau
    assert floats["mask/probability"] == 0.75  # exp(old) = 1/3, 1, 1/2, 1/2
    assert floats["mask/cov"] == 0.5  # k = int(0.5 * 4)


def test_on_policy_when_old_logprobs_missing():
    logits = torch.randn(2, 3, 6, requires_grad=True)
    ids = torch.randint(0, 6, (2, 3))
    mask = torch.ones(2, 3)
    adv = torch.tensor([0.5, -1.5])
    loss_fn = FusedPolicyLoss(loss_type="bnpo", backend="torch")
    loss, _ = loss_fn(ids, mask, adv, logits=logits)
    loss.backward()
    lp = logits.detach().double().requires_grad_(True)
    picked = lp.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    (-(adv.double()[:, None] * torch.exp(picked - picked.detach())).mean()).backward()
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    torch.testing.assert_close(logits.grad.double(), lp.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(loss_type="ppo"), "loss_type"),
        (dict(kl_estimator="k4"), "kl_estimator"),
        (dict(cov_mode="clip"), "cov_mode"),
        (dict(normalize_by="tokens"), "normalize_by"),
        (dict(top_entropy_fraction=0.0), "top_entropy_fraction"),
        (dict(top_entropy_fraction=1.5), "top_entropy_fraction"),
        (dict(entropy_tokens="middle", top_entropy_fraction=0.2), "entropy_tokens"),
        (dict(entropy_tokens="low"), "entropy_tokens"),
        (dict(prob_mask_threshold=1.2), "prob_mask_threshold"),
        (dict(cov_ratio=0.0), "cov_ratio"),
        (dict(cov_mode="clip_cov", cov_lower=5.0, cov_upper=1.0), "cov_lower"),
        (dict(cov_mode="kl_cov", dual_clip=3.0), "dual_clip"),
        (dict(dual_clip=0.5), "dual_clip"),
        (dict(epsilon_low=1.0), "epsilon_low"),
        (dict(epsilon_high=-0.1), "epsilon_high"),
        (dict(beta=-1.0), "beta"),
        (dict(loss_type="dr_grpo"), "max_completion_length"),
        (dict(loss_type="dr_grpo", max_completion_length=8, normalize_by="selected"), "normalize_by"),
        (dict(temperature=0.0), "temperature"),
        (dict(backend="cuda"), "backend"),
        (dict(kl_importance_weighted=1), "kl_importance_weighted"),
    ],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FusedPolicyLoss(**kwargs)


def test_call_errors_name_the_argument():
    loss_fn = FusedPolicyLoss(beta=0.1, backend="torch")
    ids, mask, logits = torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="ref_logprobs"):
        loss_fn(ids, mask, torch.zeros(2), logits=logits)
    plain = FusedPolicyLoss(backend="torch")
    with pytest.raises(ValueError, match="advantages"):
        plain(ids, mask, torch.zeros(3), logits=logits)
    with pytest.raises(ValueError, match="completion_mask"):
        plain(ids, torch.ones(2, 4), torch.zeros(2), logits=logits)
    with pytest.raises(ValueError, match="logits or hidden"):
        plain(ids, mask, torch.zeros(2))
    with pytest.raises(ValueError, match="weight"):
        plain(ids, mask, torch.zeros(2), hidden=torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="old_logprobs"):
        plain(ids, mask, torch.zeros(2), logits=logits, old_logprobs=torch.zeros(2, 4))


def test_inputs_on_two_devices_name_the_argument(fake_gpu):
    """CPU advantages (rewards come from Python) with the batch on a GPU: a ValueError naming them, not a
    device error from deep inside the loss."""
    device = fake_gpu.DEVICE
    loss_fn = FusedPolicyLoss(top_entropy_fraction=0.5, backend="torch")
    ids, mask = torch.zeros(2, 3, dtype=torch.long, device=device), torch.ones(2, 3, device=device)
    hidden, weight = torch.zeros(2, 3, 5, device=device), torch.zeros(4, 5, device=device)
    with pytest.raises(ValueError, match="advantages on cpu"):
        loss_fn(ids, mask, torch.zeros(2), hidden=hidden, weight=weight)
    with pytest.raises(ValueError, match="old_logprobs on cpu"):
        loss_fn(ids, mask, torch.zeros(2, device=device), hidden=hidden, weight=weight, old_logprobs=torch.zeros(2, 3))
    lp = torch.zeros(2, 3, device=device)
    with pytest.raises(ValueError, match="advantages on cpu"):
        loss_fn.select(mask, torch.zeros(2), entropy=lp, logprobs=lp)
    loss, _ = loss_fn(ids, mask, torch.zeros(2, device=device), hidden=hidden, weight=weight)
    assert loss.device == device
