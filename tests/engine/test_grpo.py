"""GRPO's rollout with DAPO's dynamic sampling: rounds of scripted rewards go in, and the step's
training groups come out (the right rows, in order, the surplus cut, the round cap honoured)."""

import pytest
import torch

from fusedrl.engine.grpo import Round, collect_groups, rollout_metrics
from fusedrl.engine.spo_rollout import make_batch

PAD, G = 0, 4


def make_round(number: int, rewards: list[float], prompt_length: int) -> Round:
    """A round of len(rewards) // G prompts whose row i answers [100 * number + i] (so every row can be
    identified); prompts of `prompt_length` tokens, different per round, so that rounds must be padded."""
    prompts = [[50 + p] * prompt_length for p in range(len(rewards) // G) for _ in range(G)]
    responses = [[100 * number + i] * (1 + i % 3) for i in range(len(rewards))]
    batch = make_batch(prompts, responses, [i % 2 == 1 for i in range(len(rewards))], PAD, "cpu")
    r = torch.tensor(rewards)
    return Round(batch, r, r - 0.5, failures=number)


class Scripted:
    """A fake rollout: each call returns the next scripted round, and counts the calls."""

    def __init__(self, *rounds: Round):
        self.rounds, self.calls = rounds, 0

    def __call__(self) -> Round:
        self.calls += 1
        return self.rounds[self.calls - 1]


FLAT_1, FLAT_0 = [1.0] * G, [0.0] * G
# Round 1: only its middle group is informative; round 2: all three are.
ROUND_1 = make_round(1, FLAT_1 + [0.0, 1.0, 0.0, 0.0] + FLAT_0, prompt_length=2)
ROUND_2 = make_round(2, [1.0, 0.0, 0.0, 0.0] + [0.5, 0.5, 0.25, 0.5] + [0.0, 0.0, 1.0, 1.0], prompt_length=3)


def collect(sample, dynamic_sampling=True, max_rounds=5, groups=3):
    return collect_groups(sample, group_size=G, groups=groups, dynamic_sampling=dynamic_sampling,
                          max_rounds=max_rounds, pad_id=PAD)


def assert_rows(out, expected):
    """The training batch holds exactly the rows `expected` [(round, row), ...], in this order."""
    assert len(out.batch) == len(expected) and out.shaped.shape == (len(expected),)
    for i, (source, row) in enumerate(expected):
        got, want = out.batch.rows([i]), source.batch.rows([row])
        for name in ("input_ids", "attention_mask", "completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (i, name)
        assert got.prompt_length == want.prompt_length
        assert out.shaped[i] == source.shaped[row]


def test_rounds_fill_the_batch_and_the_surplus_is_cut():
    sample = Scripted(ROUND_1, ROUND_2)
    out = collect(sample)
    assert sample.calls == 2 and len(out.rounds) == 2
    # Round 1's group 1, then round 2's groups 0 and 1; round 2's group 2 is informative but cut.
    assert_rows(out, [(ROUND_1, i) for i in range(4, 8)] + [(ROUND_2, i) for i in range(8)])
    assert out.kept == 4
    # Rows of one batch share one prompt length: round 1's prompts are left-padded by one more token.
    assert out.batch.prompt_length == 3
    assert out.batch.input_ids[0].tolist()[:3] == [PAD, 51, 51] and out.batch.attention_mask[0, 0] == 0
    metrics = rollout_metrics(out, G, dynamic_sampling=True)
    # Over all 24 sampled responses: rewards sum to 5 + 4.75, and 5 + 3 of them are >= 1.
    assert metrics["reward/mean"] == pytest.approx(9.75 / 24)
    assert metrics["accuracy"] == pytest.approx(8 / 24)
    assert metrics["reward/failures"] == 1 + 2
    assert metrics["completions/mean_length"] == 2 and metrics["completions/truncated"] == 0.5
    assert metrics["groups/kept"] == pytest.approx(4 / 6)
    assert metrics["dynamic_sampling/rounds"] == 2 and metrics["groups/trained"] == 3


def test_a_full_first_round_needs_no_second():
    sample = Scripted(ROUND_2, ROUND_1)
    out = collect(sample)
    assert sample.calls == 1
    assert_rows(out, [(ROUND_2, i) for i in range(12)])


def test_the_round_cap_trains_on_what_was_collected():
    flat = make_round(3, FLAT_0 + FLAT_1 + FLAT_0, prompt_length=1)
    sample = Scripted(ROUND_1, flat, ROUND_2)
    out = collect(sample, max_rounds=2)
    assert sample.calls == 2
    assert_rows(out, [(ROUND_1, i) for i in range(4, 8)])
    metrics = rollout_metrics(out, G, dynamic_sampling=True)
    assert metrics["dynamic_sampling/rounds"] == 2 and metrics["groups/trained"] == 1
    assert metrics["groups/kept"] == pytest.approx(1 / 6)


def test_no_informative_group_within_the_cap_gives_no_batch():
    flat = make_round(3, FLAT_0 + FLAT_1 + FLAT_0, prompt_length=1)
    out = collect(Scripted(flat), max_rounds=1)
    assert out.batch is None and out.shaped.numel() == 0 and out.kept == 0
    assert rollout_metrics(out, G, dynamic_sampling=True)["groups/trained"] == 0


def test_without_dynamic_sampling_one_round_trains_every_group():
    sample = Scripted(ROUND_1, ROUND_2)
    out = collect(sample, dynamic_sampling=False)
    assert sample.calls == 1
    assert_rows(out, [(ROUND_1, i) for i in range(12)])
    metrics = rollout_metrics(out, G, dynamic_sampling=False)
    assert metrics["groups/kept"] == 1.0 and "dynamic_sampling/rounds" not in metrics
