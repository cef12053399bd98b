"""Packed against padded micro-batches in what GRPO, PPO and SPO run: the same step (SGD, so that the
weight change is the gradient) and the same metrics, to float32 rounding. Prompts of 2 to 30 tokens,
responses of 1 to 40; micro-batches of one sequence and of several."""

from types import SimpleNamespace

import pytest
import torch

from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.distributed import World
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.critic import ValueModel
from fusedrl.engine.model import demo_model, demo_tokenizer
from fusedrl.engine.packing import use_packing
from fusedrl.engine.ppo import predict_values, update_critic
from fusedrl.engine.update import make_loss, micro_batches, per_token, update

PROMPTS, RESPONSES = (2, 30, 9, 5, 17, 3), (40, 1, 14, 25, 8, 33)
# Budgets: 42 holds the longest sequence but no two (one per micro-batch); 90 packs two or three.
BUDGETS = {"one_sequence": 42, "several": 90}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=2", "model.demo.intermediate_size=64"])
    tokenizer = demo_tokenizer()
    model = demo_model(cfg.model, tokenizer)
    assert use_packing(model, "auto", "builtin:demo")  # the engine's default: the demo model packs
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(4, len(tokenizer), (p + r,), generator=gen).tolist() for p, r in zip(PROMPTS, RESPONSES)]
    batch = rollout.make_batch([s[:p] for s, p in zip(ids, PROMPTS)], [s[p:] for s, p in zip(ids, PROMPTS)],
                               [False] * len(ids), tokenizer.pad_token_id, "cpu")
    return model, batch


def _config(budget, *extra):
    return load_config(None, ["optim.max_grad_norm=0", f"optim.micro_batch_tokens={budget}", "data.max_prompt_length=2",
                              "rollout.max_new_tokens=40", "rollout.temperature=0.7", *extra])


def _sgd_step(module, run):
    """(parameter change of one SGD step of lr 1 taken inside `run(optimizer, scheduler)`, its result);
    the module is restored afterwards."""
    start = {k: v.clone() for k, v in module.state_dict().items()}
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(5)
    result = run(optimizer, scheduler)
    delta = {k: start[k] - v for k, v in module.state_dict().items()}
    module.load_state_dict(start)
    return delta, result


def _assert_same(padded, packed, metric_keys):
    (d_pad, m_pad), (d_pack, m_pack) = padded, packed
    assert any(d.abs().max() > 0 for d in d_pad.values())
    for key in d_pad:
        # float32 rounding of sums whose order differs: relative to the tensor's largest entry.
        scale = float(d_pad[key].abs().max())
        torch.testing.assert_close(d_pack[key], d_pad[key], rtol=1e-4, atol=1e-5 * scale + 1e-7)
    for key in metric_keys:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-5, abs=1e-7), key


def _policy_step(model, batch, cfg, packed, advantages, **kwargs):
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, packed=packed, step_guard=StepGuard(1), world=World())
    return _sgd_step(model, lambda opt, sched: update(session, make_loss(cfg), opt, sched, batch, advantages, **kwargs))


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
def test_grpo_step(setup, budget):
    """Sequence advantages, the grpo aggregation (a mean of per-response means), two passes: the
    second is off-policy, so old log-probs come from a packed no-grad pass too."""
    model, batch = setup
    cfg = _config(budget, "loss.loss_type=grpo", "optim.updates_per_batch=2", "loss.top_entropy_fraction=0.5")
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    if budget == BUDGETS["one_sequence"]:
        assert all(len(r) == 1 for r in micro_batches(batch, torch.arange(6), budget, packed=True))
    results = [_policy_step(model, batch, cfg, packed, adv) for packed in (False, True)]
    _assert_same(*results, ["loss/policy", "loss/pg", "entropy/mean", "mask/top_entropy", "clip_ratio/region_mean"])


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
def test_ppo_policy_and_critic_steps(setup, budget):
    """PPO: per-token advantages, the reference's log-probs and a KL term, two mini-batches; the critic's
    values and its clipped value-loss step, packed as padded."""
    model, batch = setup
    cfg = _config(budget, "run.algorithm=ppo", "loss.loss_type=dapo", "loss.beta=0.1", "model.reference=policy",
                  "optim.mini_batches=2")
    adv = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(2))
    plan = {p: micro_batches(batch, torch.arange(6), budget, p) for p in (False, True)}
    reference = {p: per_token(model, batch, [plan[p]], make_loss(cfg), p) for p in (False, True)}
    valid = batch.completion_mask  # (padded rows also hold the log-probs of their pad ids, never read)
    torch.testing.assert_close(reference[True][valid], reference[False][valid], rtol=1e-5, atol=1e-6)
    results = [_policy_step(model, batch, cfg, p, adv, ref_logprobs=reference[False] - 0.1) for p in (False, True)]
    _assert_same(*results, ["loss/policy", "loss/pg", "loss/kl", "kl", "entropy/mean"])

    critic = ValueModel.from_policy(model)
    torch.nn.init.normal_(critic.head.weight, std=0.5)  # a zero head would give zero values and no backbone gradient
    values = {p: predict_values(critic, batch, plan[p], p) for p in (False, True)}
    torch.testing.assert_close(values[True][valid], values[False][valid], rtol=1e-5, atol=1e-6)
    returns = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(3))
    steps = [_sgd_step(critic, lambda opt, _: update_critic(critic, opt, StepGuard(1), cfg, batch, values[False], returns,
                                                             packed=p))
             for p in (False, True)]
    _assert_same(*steps, ["loss/value", "value/clip_frac"])


@pytest.mark.parametrize("budget", list(BUDGETS.values()), ids=list(BUDGETS))
def test_spo_step(setup, budget):
    """SPO's objective: per-token (segment) advantages, a loss mask with holes (SPO-tree's zero-advantage
    segments), the probability mask and normalize_by=selected."""
    model, batch = setup
    cfg = _config(budget, "loss.loss_type=bnpo", "loss.normalize_by=selected", "loss.prob_mask_threshold=0.02",
                  "optim.updates_per_batch=2")
    gen = torch.Generator().manual_seed(4)
    adv = torch.randn(batch.completion_ids.shape, generator=gen)
    loss_mask = torch.rand(batch.completion_ids.shape, generator=gen) > 0.3
    results = [_policy_step(model, batch, cfg, p, adv, loss_mask=loss_mask) for p in (False, True)]
    _assert_same(*results, ["loss/policy", "loss/pg", "entropy/mean", "mask/probability", "mask/selected"])
