"""The batch layout and the micro-batched policy update: trimming keeps every token's position,
the token budget holds, and accumulating over micro-batches equals one big batch."""

from types import SimpleNamespace

import pytest
import torch

from fusedrl.engine.distributed import World
from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.update import make_loss, micro_batches, update
from fusedrl.engine.model import demo_tokenizer, load_policy, token_logprobs
from fusedrl.engine.packing import use_packing


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=2",
                             "model.demo.intermediate_size=64"])
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    assert use_packing(model, "packed", "demo")  # padded micro-batches run transformers' SDPA unchanged
    return model, tokenizer


def _batch(policy):
    model, tokenizer = policy
    torch.manual_seed(1)
    prompts = tokenizer(["1+2=", "345+6=", "78+901="])["input_ids"]
    return rollout.generate(model, tokenizer, prompts, group_size=2, temperature=1.0, top_p=1.0,
                            max_new_tokens=10, batch_size=4)


def test_layout_and_masks(policy):
    _, tokenizer = policy
    batch = _batch(policy)
    assert batch.input_ids.shape == (6, batch.prompt_length + batch.completion_ids.shape[1])
    for i in range(6):
        n = int(batch.completion_mask[i].sum())
        ends = (batch.completion_ids[i, :n] == tokenizer.eos_token_id).nonzero()
        # The mask ends at the first end token (inclusive), or the row is truncated at max_new_tokens.
        assert (ends.numel() == 1 and ends[0] == n - 1) or (batch.truncated[i] and n == 10)
        assert (batch.completion_ids[i, n:] == tokenizer.pad_token_id).all()
    # Rows 0-1 share prompt 0, rows 2-3 prompt 1: 2x group size.
    assert (batch.input_ids[0, : batch.prompt_length] == batch.input_ids[1, : batch.prompt_length]).all()


def test_trimmed_rows_give_the_same_logprobs(policy):
    model, _ = policy
    batch = _batch(policy)
    full, _ = token_logprobs(model, batch, temperature=0.7)
    sub = batch.rows(torch.tensor([0, 1]))  # the shortest prompt: left padding trimmed away
    assert sub.prompt_length < batch.prompt_length
    part, _ = token_logprobs(model, sub, temperature=0.7)
    mask = sub.completion_mask
    torch.testing.assert_close(part[mask], full[:2, : part.shape[1]][mask], rtol=1e-5, atol=1e-5)


def test_micro_batches_respect_the_budget_and_cover_all_rows(policy):
    batch = _batch(policy)
    rows = torch.arange(len(batch))
    budget = batch.prompt_length + batch.completion_ids.shape[1] + 5
    groups = micro_batches(batch, rows, budget)
    assert sorted(torch.cat(groups).tolist()) == rows.tolist()
    for g in groups:
        sub = batch.rows(g)
        assert sub.input_ids.numel() <= budget
    assert len(micro_batches(batch, rows, 10_000)) == 1


def _ragged_batch(policy):
    """The sampled batch with its responses cut to lengths 2 to 10: an untrained policy rarely stops, and
    responses of equal length cannot tell a per-token from a per-response aggregation."""
    _, tokenizer = policy
    batch = _batch(policy)
    lengths = [3, 10, 2, 7, 5, 9]
    prompts = [row[mask.bool()].tolist() for row, mask in zip(batch.input_ids[:, : batch.prompt_length],
                                                                batch.attention_mask[:, : batch.prompt_length])]
    responses = [row[:n].tolist() for row, n in zip(batch.completion_ids, lengths)]
    return rollout.make_batch(prompts, responses, [n == 10 for n in lengths], tokenizer.pad_token_id, "cpu")


def _one_vs_many(policy, overrides, layout="padded"):
    """The update's weight change and metrics with one padded micro-batch, then with several: one row
    each (padded), or two to three sequences packed end to end in each (packed, engine/packing.py)."""
    model, _ = policy
    batch = _ragged_batch(policy)
    lengths = batch.completion_mask.sum(1)
    assert len(set(lengths.tolist())) > 2, "responses of unequal lengths are the case that tells aggregations apart"
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    results = []
    many = batch.prompt_length + batch.completion_ids.shape[1] if layout == "padded" else 36
    for packed, budget in ((False, 10_000), (layout == "packed", many)):
        cfg = load_config(None, overrides + ["optim.max_grad_norm=0", f"optim.micro_batch_tokens={budget}",
                                             "data.max_prompt_length=8", "rollout.max_new_tokens=10",
                                             "rollout.temperature=0.7"])
        start = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        torch.manual_seed(5)  # Clip-Cov's draw
        session = SimpleNamespace(cfg=cfg, model=model, reference=None, step_guard=StepGuard(1), world=World(),
                                  packed=packed)
        if packed:
            plan = micro_batches(batch, torch.arange(len(batch)), budget, packed=True)
            assert 1 < len(plan) < len(batch) and max(map(len, plan)) > 1, "rows of several sequences"
        metrics = update(session, make_loss(cfg), optimizer, scheduler, batch, advantages)
        results.append(({k: start[k] - v for k, v in model.state_dict().items()}, metrics))
        model.load_state_dict(start)
    return results


LOSS_TYPES = ["dapo", "grpo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo", "vespo"]


@pytest.mark.parametrize("overrides", [
    *[[f"loss.loss_type={name}"] for name in LOSS_TYPES],
    # Off-policy from the second optimizer step on: the ratios, CISPO's cap, SAPO's gate and VESPO's
    # weights differ from 1 there.
    *[[f"loss.loss_type={name}", "optim.updates_per_batch=2"] for name in ("cispo", "sapo", "vespo")],
    ["loss.loss_type=grpo", "loss.importance_sampling_level=sequence", "optim.updates_per_batch=2"],
    ["loss.loss_type=dapo", "loss.importance_sampling_level=sequence_token", "optim.updates_per_batch=2"],
    ["loss.loss_type=cispo", "loss.importance_sampling_level=sequence", "optim.updates_per_batch=2"],
], ids=[*LOSS_TYPES, "cispo_off_policy", "sapo_off_policy", "vespo_off_policy", "gspo_grpo", "gspo_token_dapo",
        "gspo_cispo"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_accumulated_micro_batches_equal_one_batch(policy, overrides, layout):
    """Every loss type's step is the same whether the batch is one micro-batch or several, padded or
    packed: the loss says how micro-batches weigh and what count it divides by."""
    (step_one, m_one), (step_many, m_many) = _one_vs_many(policy, overrides, layout)
    assert any(d.abs().max() > 0 for d in step_one.values())
    for key in step_one:
        torch.testing.assert_close(step_many[key], step_one[key], rtol=1e-4, atol=1e-6)
    assert m_many["loss/policy"] == pytest.approx(m_one["loss/policy"], rel=1e-4, abs=1e-7)
    assert m_many["entropy/mean"] == pytest.approx(m_one["entropy/mean"], rel=1e-5)


@pytest.mark.parametrize("overrides", [
    ["loss.loss_type=dapo", "loss.top_entropy_fraction=0.2"],
    ["loss.loss_type=bnpo", "loss.cov_mode=kl_cov", "loss.cov_ratio=0.1", "optim.updates_per_batch=2"],
    ["loss.loss_type=dapo", "loss.cov_mode=clip_cov", "loss.cov_ratio=0.2", "loss.cov_lower=0.0",
     "loss.top_entropy_fraction=0.5", "optim.mini_batches=2"],
    ["loss.loss_type=dapo", "loss.normalize_by=selected", "loss.top_entropy_fraction=0.2"],
    ["loss.loss_type=bnpo", "loss.normalize_by=selected", "loss.prob_mask_threshold=0.01"],
    ["loss.loss_type=grpo", "loss.normalize_by=selected", "loss.top_entropy_fraction=0.2", "loss.entropy_tokens=low"],
], ids=["top_entropy", "kl_cov", "clip_cov_top_entropy", "dapo_selected", "bnpo_selected_probability",
        "grpo_selected_low_entropy"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_batch_wide_masks_do_not_depend_on_micro_batches(policy, overrides, layout):
    """The top-entropy threshold, the covariance selection and the selected-token count (normalize_by
    selected) cover the whole mini-batch: several micro-batches, padded or packed, give the same step as
    one micro-batch (per-call statistics would not)."""
    (step_one, m_one), (step_many, m_many) = _one_vs_many(policy, overrides, layout)
    assert any(d.abs().max() > 0 for d in step_one.values())
    for key in step_one:
        torch.testing.assert_close(step_many[key], step_one[key], rtol=1e-4, atol=1e-6)
    assert m_many["loss/policy"] == pytest.approx(m_one["loss/policy"], rel=1e-4, abs=1e-7)
    assert m_many["cov/mean" if "cov/mean" in m_one else "entropy/mean"] == pytest.approx(
        m_one["cov/mean" if "cov/mean" in m_one else "entropy/mean"], rel=1e-5, abs=1e-7)
    # Extremes combine as extremes across micro-batches, not as token-weighted means.
    for key in ("cov/max", "clip_ratio/low_min", "clip_ratio/high_max"):
        if key in m_one:
            assert m_many[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key
    for key in ("mask/top_entropy", "mask/cov", "mask/probability"):
        if key in m_one:
            assert 0 < m_one[key] < 1  # the mask bites
            assert m_many[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7)


def test_demo_tokenizer_round_trip():
    tokenizer = demo_tokenizer()
    text = "472+389=2+9=11 #861\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_a_non_finite_gradient_is_skipped_and_counted(policy):
    """Two optimizer steps (mini_batches=2); the first one's gradient is made NaN by a hook: that step is
    skipped (the weights change by the second step alone) and counted in optim/skipped_steps;
    max_skipped_steps=1 stops the run instead."""
    import copy

    from fusedrl.engine.errors import RunError

    batch = _ragged_batch(policy)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])

    def run(poison_first: bool, limit: int = 3):
        model = copy.deepcopy(policy[0])
        cfg = load_config(None, ["optim.max_grad_norm=1", "optim.mini_batches=2", "data.max_prompt_length=8",
                                 "rollout.max_new_tokens=10", f"optim.max_skipped_steps={limit}"])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        backwards = []

        def hook(grad):  # each mini-batch is one micro-batch here: the first backward is the first step's
            backwards.append(1)
            return grad * float("nan") if poison_first and len(backwards) == 1 else grad

        model.get_output_embeddings().weight.register_hook(hook)
        torch.manual_seed(0)
        metrics = update(SimpleNamespace(cfg=cfg, model=model, reference=None, step_guard=StepGuard(limit), world=World(),
                                         packed=False),
                         make_loss(cfg), optimizer, scheduler, batch, advantages)
        assert len(backwards) == 2
        return model, metrics

    start = policy[0].state_dict()
    clean_model, clean = run(poison_first=False)
    assert clean["optim/skipped_steps"] == 0
    model, metrics = run(poison_first=True)
    assert metrics["optim/skipped_steps"] == 1
    state = model.state_dict()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], start[k]) for k in state)  # the second step did train
    assert any(not torch.equal(state[k], clean_model.state_dict()[k]) for k in state)  # the first did not
    with pytest.raises(RunError, match="optim.max_skipped_steps=1"):
        run(poison_first=True, limit=1)


@pytest.mark.parametrize("rows, says", [
    (range(6), "a micro-batch of 6 sequences, "),
    ([1], "one sequence of "),  # the longest response (10 tokens): as when it alone fills the budget
])
def test_out_of_device_memory_names_the_micro_batch_and_the_remedies(policy, monkeypatch, rows, says):
    """A device running out of memory in the update's forward (torch.OutOfMemoryError, raised here by a
    patched backbone) ends the run with one line: the micro-batch's size and what to change."""
    from fusedrl.engine import update as update_module
    from fusedrl.engine.errors import RunError

    model, _ = policy
    batch = _ragged_batch(policy).rows(torch.tensor(list(rows)))
    budget = 10_000
    cfg = load_config(None, [f"optim.micro_batch_tokens={budget}", "data.max_prompt_length=8",
                             "rollout.max_new_tokens=10"])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(update_module, "completion_hidden", out_of_memory)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, step_guard=StepGuard(1), world=World(),
                              packed=False)
    with pytest.raises(RunError) as caught:
        update(session, make_loss(cfg), optimizer, scheduler, batch, torch.ones(len(batch)))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("out of device memory") and says in message
    assert f"optim.micro_batch_tokens={budget}" in message and "model.gradient_checkpointing=true" in message
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
