"""The HF sampler's top-k / top-p against the fused ops' kept set: the sampler draws from exactly the
renormalised distribution whose log-probs the trainer computes (rollout.kept_logits, KeyedSampler),
and the loops train on it (rollout.train_on=sampler, the default)."""

import json
import math

import pytest
import torch
from _tiny_run import REWARD_MODULE, TINY

from fusedrl.cli import main
from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.model import demo_model, demo_tokenizer, token_logprobs
from fusedrl.engine.rollout import KeyedSampler, generate, kept_logits
from fusedrl.engine.update import make_loss
from fusedrl.kernels import logprobs_and_entropy


def kernel_logprobs(logits: torch.Tensor, temperature: float, top_k, top_p, backend="torch") -> torch.Tensor:
    """[N, V] log-probs of every token of each row, from the fused op (-inf outside its kept set)."""
    n, v = logits.shape
    every = logits[:, None, :].expand(n, v, v)
    targets = torch.arange(v).expand(n, v)
    return logprobs_and_entropy(every, targets, temperature=temperature, top_k=top_k, top_p=top_p, backend=backend)[0]


@pytest.mark.parametrize("logits, temperature, top_k, top_p, expected", [
    # Ties at the top-p boundary are kept whole: p = [.42, .42, .16, .0...], 0.3 of the mass is reached
    # inside the tied pair, and both stay (vLLM's sort may keep one of them).
    ([2.0, 2.0, 1.0, 0.0], 1.0, None, 0.3, [0.5, 0.5, 0.0, 0.0]),
    # Ties at the k-th value are all kept: four tokens for top_k = 2.
    ([3.0, 1.0, 1.0, 1.0, 0.0], 1.0, 2, None, "softmax of the first four"),
    # top-k first, then top-p on the renormalised top-k set: p = [.4, .3, .2, .1]; the top 3 renormalise
    # to [4/9, 3/9, 2/9]; token 2 has 7/9 > 0.5 above it.
    ([math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], 1.0, 3, 0.5, [4 / 7, 3 / 7, 0.0, 0.0]),
    # Temperature before both: at T = 0.5 the masses are squared, [.16, .09, .04, .01] / .3.
    ([math.log(0.4), math.log(0.3), math.log(0.2), math.log(0.1)], 0.5, None, 0.6, [16 / 25, 9 / 25, 0.0, 0.0]),
])
def test_hand_worked_kept_sets(logits, temperature, top_k, top_p, expected):
    x = torch.tensor([logits])
    probs = torch.softmax(kept_logits(x, temperature, top_k, top_p), -1)[0]
    if expected == "softmax of the first four":
        expected = torch.cat([torch.softmax(x[0, :4], 0), torch.zeros(1)]).tolist()
    torch.testing.assert_close(probs, torch.tensor(expected), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.log(), kernel_logprobs(x, temperature, top_k, top_p)[0], rtol=1e-6, atol=1e-6)


def rows_with_ties(n: int, v: int, seed: int) -> torch.Tensor:
    """Rows of few distinct values (heavy ties), peaked rows and plain Gaussian rows."""
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(-3, 4, (n, v), generator=g).float() * 0.75
    peaked = torch.randn(n, v, generator=g) * 6.0
    plain = torch.randn(n, v, generator=g)
    return torch.cat([ties, peaked, plain])


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 1, None), (1.0, 5, None), (0.7, None, 0.9), (1.3, None, 0.5), (0.7, 8, 0.8), (1.0, 64, 0.95), (1.0, 3, 1.0),
])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sampler_distribution_is_the_kernels(temperature, top_k, top_p, backend):
    """softmax(kept_logits) equals exp of the fused op's log-probs for every token of every row: the same
    kept set (the same -inf entries) and the same renormalised probabilities."""
    x = rows_with_ties(20, 50, seed=7)
    mine = torch.log_softmax(kept_logits(x, temperature, top_k, top_p), -1)
    theirs = kernel_logprobs(x, temperature, top_k, top_p, backend)
    assert torch.equal(mine == -torch.inf, theirs == -torch.inf)
    kept = mine > -torch.inf
    assert (kept.sum(1) < 50).any() or (top_k is None and top_p in (None, 1.0))  # the sets cut something
    torch.testing.assert_close(mine[kept], theirs[kept], rtol=1e-5, atol=1e-5)


def test_draws_follow_the_kept_set_distribution():
    """40,000 draws of one row at T = 0.8, top_p = 0.8: each token's frequency is its kernel probability
    (p = softmax(logits / 0.8) = [.647, .185, .099, .015, .053]: the kept set is {0, 1}), never outside."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    temperature, top_p, rows = 0.8, 0.8, 40000
    uniforms = torch.rand(rows, 1, generator=torch.Generator().manual_seed(3))
    sampler = KeyedSampler(uniforms, prompt_length=4, temperature=temperature, top_p=top_p)
    scores = sampler(torch.zeros(rows, 4, dtype=torch.long), logits.expand(rows, -1).clone())
    assert torch.equal((scores == 0).sum(1), torch.ones(rows, dtype=torch.long))
    expected = kernel_logprobs(logits[None], temperature, None, top_p)[0].exp().double()
    assert torch.equal(expected > 0, torch.tensor([True, True, False, False, False]))
    observed = torch.bincount(scores.argmax(1), minlength=5).double() / rows
    assert torch.equal(observed > 0, expected > 0)
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)


def test_generate_draws_inside_the_trainers_kept_set_with_its_log_probs(monkeypatch):
    """Through transformers' generate on the demo model: every sampled token is in the kept set the
    trainer's fused op computes, and the sampler's own log-prob of it (recorded at each step) equals
    the trainer's kept-set log-prob to fp32 rounding; the full-softmax log-prob differs."""
    recorded = []

    class Recording(KeyedSampler):
        def __call__(self, input_ids, scores):
            drawn = super().__call__(input_ids, scores)
            logp = torch.log_softmax(kept_logits(scores, self.temperature, self.top_k, self.top_p), -1)
            recorded.append(logp.gather(1, drawn.argmax(1, keepdim=True))[:, 0])
            return drawn

    monkeypatch.setattr(rollout, "KeyedSampler", Recording)
    tokenizer = demo_tokenizer()
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1", "model.demo.num_heads=2",
                             "model.demo.intermediate_size=64"])
    torch.manual_seed(0)
    model = demo_model(cfg.model, tokenizer)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # a spread of probabilities, so that top-k and top-p both cut
    prompts = [tokenizer(text)["input_ids"] for text in ("12+34=", "7+8=")]
    temperature, top_k, top_p = 0.9, 20, 0.9
    batch = generate(model, tokenizer, prompts, group_size=4, temperature=temperature, top_p=top_p, top_k=top_k,
                     max_new_tokens=16, batch_size=8, seeds=[1, 2])
    sampler_lp = torch.stack(recorded, 1)[:, : batch.completion_ids.shape[1]]
    mask = batch.completion_mask
    trainer_lp, _ = token_logprobs(model, batch, temperature, top_k=top_k, top_p=top_p)
    assert torch.isfinite(trainer_lp[mask]).all()
    diff = (trainer_lp - sampler_lp).abs()[mask]
    assert diff.max() < 1e-5, diff.max()
    full_lp, _ = token_logprobs(model, batch, temperature)
    assert (sampler_lp - full_lp)[mask].mean() > 0.05  # the kept set's renormalisation, which full omits
    assert mask.sum() > 30


def test_train_on_picks_the_losses_distribution():
    sampler = make_loss(load_config(None, ["rollout.top_k=20", "rollout.top_p=0.9"]))
    assert (sampler.top_k, sampler.top_p) == (20, 0.9)
    full = make_loss(load_config(None, ["rollout.top_k=20", "rollout.top_p=0.9", "rollout.train_on=full"]))
    off = make_loss(load_config(None, ["rollout.top_k=0", "rollout.top_p=1.0"]))
    assert not full.kept_set and not off.kept_set


@pytest.mark.parametrize("loop", [
    ["run.steps=2"],
    ["run.steps=1", "run.algorithm=ppo", "rollout.max_new_tokens=24", "ppo.critic_lr=1e-3"],
], ids=["grpo", "ppo"])
def test_a_run_on_the_kept_set(tmp_path, monkeypatch, loop):
    """GRPO (two steps) and PPO (one) sampling with top_p = 0.9 and top_k = 20, a KL to the reference on
    the kept set too: finite losses, and not one sampled token outside the trainer's kept set (the loss
    sees the rollout policy: one optimizer step per batch)."""
    (tmp_path / "toy_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "configs/demo.yaml", f"run.output_dir={out}", *TINY, "rollout.group_size=4",
                 "rollout.top_p=0.9", "rollout.top_k=20", "model.reference=policy", "loss.beta=0.1",
                 "ppo.kl_penalty=loss", *loop]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss/policy" in m]
    assert len(steps) == int(loop[0].split("=")[1])
    for m in steps:
        assert math.isfinite(m["loss/policy"]) and math.isfinite(m["kl"]) and m["grad_norm"] > 0
        assert m["mask/outside_kept_set"] == 0  # on-policy: the sampler's set is the trainer's
    # The reference is the policy at step 1; later a few sampled tokens may fall outside its kept set
    # (2.6% at step 2 here), which leave the KL term (FusedPolicyLoss).
    assert steps[0]["kl/outside_kept_set"] == 0 and all(m["kl/outside_kept_set"] < 0.2 for m in steps)
