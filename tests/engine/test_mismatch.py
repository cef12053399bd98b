"""The sampler-to-trainer mismatch: metrics and corrections on hand-worked ratios, and their effect on the
shared update (the same parameter change as the equivalent advantages or loss mask). Needs no vLLM: the
sampler's log-probs are constructed from the trainer's own."""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from fusedrl.engine.config import load_config
from fusedrl.engine.distributed import World
from fusedrl.engine.mismatch import correct
from fusedrl.engine.model import load_policy, token_logprobs
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.samplers import HFSampler
from fusedrl.engine.update import make_loss, update

LN4, LN15 = math.log(4.0), math.log(1.5)
# Ratios pi_train / pi_sampler of five response tokens: row 0 is 4, 1, 1/4 (then padding), row 1 is 1.5, 1.5.
LOG_R = torch.tensor([[LN4, 0.0, -LN4, 0.0], [LN15, LN15, 0.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def _case():
    train = torch.tensor([[-0.1, -2.0, -1.0, 5.0], [-0.3, -0.7, 9.0, -9.0]], dtype=torch.float64)
    # Padding's log-probs are arbitrary (here +-9 apart): they must enter no metric.
    return train.float(), (train - LOG_R).float()


def test_metrics_of_a_hand_worked_case():
    train, sampler = _case()
    m = correct(train, sampler, MASK, "none", 2.0).metrics
    assert m["mismatch/abs_lp_diff"] == pytest.approx((2 * LN4 + 2 * LN15) / 5, rel=1e-6)
    # k3 = r - 1 - ln r per token: (3 - ln4) + 0 + (-0.75 + ln4) + 2 (0.5 - ln1.5), over 5 tokens.
    assert m["mismatch/kl"] == pytest.approx((3.25 - 2 * LN15) / 5, rel=1e-5)
    assert m["mismatch/ratio_outside"] == pytest.approx(2 / 5)  # 4 and 1/4 lie outside [0.5, 2]


def test_truncated_importance_weights():
    train, sampler = _case()
    fix = correct(train, sampler, MASK, "tis", 2.0)
    torch.testing.assert_close(fix.weights, torch.tensor([[2.0, 1.0, 0.25, 0.0], [1.5, 1.5, 0.0, 0.0]]))
    assert fix.keep.equal(MASK)
    assert fix.metrics["mismatch/is_weight_mean"] == pytest.approx(6.25 / 5, rel=1e-6)


def test_token_and_sequence_masks():
    train, sampler = _case()
    token = correct(train, sampler, MASK, "token_mask", 2.0)
    assert token.weights is None
    assert token.keep.tolist() == [[False, True, False, False], [True, True, False, False]]
    assert token.metrics["mismatch/masked"] == pytest.approx(2 / 5)
    # Row 0's geometric-mean ratio is exactly 1 (4 * 1 * 1/4), row 1's is 1.5: C = 1.4 drops row 1 only.
    sequence = correct(train, sampler, MASK, "sequence_mask", 1.4)
    assert sequence.keep.tolist() == [[True, True, True, False], [False, False, False, False]]
    assert sequence.metrics["mismatch/masked"] == pytest.approx(2 / 5)
    assert correct(train, sampler, MASK, "sequence_mask", 2.0).keep.equal(MASK)


@pytest.mark.parametrize("mode", ["none", "tis", "token_mask", "sequence_mask"])
def test_a_token_outside_the_trainers_kept_set_leaves_the_loss(mode):
    """The trainer's lp of row 1's first token is -inf (vLLM kept it, the trainer's kept set does not):
    it leaves the loss whatever the correction, is counted (1 of 5 tokens), and the metrics are those of
    the other four tokens, finite."""
    train, sampler = _case()
    train[1, 0] = -torch.inf
    fix = correct(train, sampler, MASK, mode, 2.0)
    assert not fix.keep[1, 0] and fix.metrics["mismatch/outside_kept_set"] == pytest.approx(1 / 5)
    assert fix.metrics["mismatch/abs_lp_diff"] == pytest.approx((2 * LN4 + LN15) / 4, rel=1e-6)
    assert all(math.isfinite(v) for v in fix.metrics.values())
    if mode == "tis":
        torch.testing.assert_close(fix.weights, torch.tensor([[2.0, 1.0, 0.25, 0.0], [0.0, 1.5, 0.0, 0.0]]))


def test_bad_arguments_are_refused_by_name():
    train, sampler = _case()
    with pytest.raises(ValueError, match="mode must be one of"):
        correct(train, sampler, MASK, "clip", 2.0)
    with pytest.raises(ValueError, match="cap must be > 1"):
        correct(train, sampler, MASK, "tis", 1.0)
    with pytest.raises(ValueError, match="share one shape"):
        correct(train, sampler[:, :3], MASK, "tis", 2.0)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1",
                             "model.demo.intermediate_size=64"])
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    torch.manual_seed(1)
    prompts = tokenizer(["1+2=", "345+6=", "78+901="])["input_ids"]
    batch = HFSampler(model, tokenizer, top_p=1.0, batch_size=6).generate(prompts, 2, temperature=1.0,
                                                                          max_new_tokens=10)
    train_lp, _ = token_logprobs(model, batch, 1.0)
    return model, batch, train_lp


def _step(model, batch, advantages, correction, loss_mask=None):
    """Parameter change of one SGD update (lr 1, no clipping), the model restored afterwards."""
    cfg = load_config(None, ["optim.max_grad_norm=0", "data.max_prompt_length=8", "rollout.max_new_tokens=10",
                             "optim.micro_batch_tokens=40", f"rollout.correction={correction}"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, step_guard=StepGuard(1), world=World(),
                              packed=False)
    metrics = update(session, make_loss(cfg), optimizer, scheduler, batch, advantages, loss_mask=loss_mask)
    delta = {k: start[k] - v for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    return delta, metrics


def _assert_same(a, b):
    assert any(d.abs().max() > 0 for d in a.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)


def test_tis_weights_act_as_scaled_advantages(setup):
    """On-policy the PPO clip is inactive, so weighing token t's term by w_t = min(r_t, 2) is an update with
    advantages A * w_t; the ratios here are 4, 1.5 and 0.5 on alternate tokens."""
    model, batch, train_lp = setup
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    log_r = torch.tensor([LN4, LN15, math.log(0.5), 0.0]).repeat(batch.completion_ids.shape[1])[
        : batch.completion_ids.shape[1]]
    log_r = log_r.expand_as(train_lp) * batch.completion_mask
    weights = log_r.exp().clamp(max=2.0)
    corrected, metrics = _step(model, dataclasses.replace(batch, sampler_logprobs=train_lp - log_r), adv, "tis")
    expected, _ = _step(model, batch, adv[:, None] * weights, "tis")
    _assert_same(corrected, expected)
    mask = batch.completion_mask
    assert metrics["mismatch/is_weight_mean"] == pytest.approx(float((weights * mask).sum() / mask.sum()), rel=1e-4)


def test_token_mask_drops_tokens_like_a_loss_mask(setup):
    """Tokens whose ratio is 10 leave the loss as if the loss mask had dropped them; the rest (ratio 1)
    train as without a sampler."""
    model, batch, train_lp = setup
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    far = torch.zeros_like(batch.completion_mask)
    far[:, 1::3] = True
    far &= batch.completion_mask
    sampler_lp = train_lp - far * math.log(10.0)
    corrected, metrics = _step(model, dataclasses.replace(batch, sampler_logprobs=sampler_lp), adv, "token_mask")
    expected, _ = _step(model, batch, adv, "none", loss_mask=~far)
    _assert_same(corrected, expected)
    assert metrics["mismatch/masked"] == pytest.approx(float(far.sum() / batch.completion_mask.sum()))
    assert metrics["mismatch/ratio_outside"] == pytest.approx(metrics["mismatch/masked"])
