"""SPO sampling logic (budgets, truncation, value means, tree growth, training rows) with a scripted sampler.

The sampler is a stand-in that returns prescribed continuations for each prefix, so every value below
is worked out by hand.
"""

import pytest
import torch

from fusedrl.engine.rollout import make_batch
from fusedrl.engine.segments import tree_values_and_advantages
from fusedrl.engine.spo_rollout import (Sampling, chain_values, continuation_values, sample_trees, score_leaves,
                                        tree_training_rows)

EOS, PAD = 0, 9


class DigitTokenizer:
    """Token id d decodes to the digit d; the end token 0 is special and dropped."""

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(str(t) for t in row if t != EOS) for row in ids]


class ScriptedSampler:
    """A stand-in for the engine's sampler: continuation j of prefix p is script[tuple(p)][j], cut at
    max_new_tokens; truncated when no end token is within the cut. With `logprobs`, token t of every
    response gets the sampler log-prob -t (as samplers other than hf keep them)."""

    def __init__(self, script, calls, logprobs=False):
        self.script, self.calls, self.logprobs = script, calls, logprobs

    def generate(self, prompt_ids, n, *, temperature, max_new_tokens, seeds=None):
        self.calls.append(([tuple(p) for p in prompt_ids], n, max_new_tokens))
        responses = [self.script[tuple(p)][j][:max_new_tokens] for p in prompt_ids for j in range(n)]
        prompts = [p for p in prompt_ids for _ in range(n)]
        lp = [[-float(t) for t in r] for r in responses] if self.logprobs else None
        return make_batch(prompts, responses, [EOS not in r for r in responses], PAD, "cpu", lp)


def length_scorer(record):
    """Reward = text length, times 10 for prompt 1: shows which prompt and text were scored."""

    def score(prompt_index, completions):
        record.extend(zip(prompt_index, completions))
        return [len(text) * (10 if p == 1 else 1) for p, text in zip(prompt_index, completions)]

    return score


SAMPLING = Sampling(temperature=1.0, max_new_tokens=6, batch_size=4)


def test_continuation_values_budget_truncation_and_means():
    script = {
        (5, 5): [[1, EOS], [2, 2, 2, 2, 2, 2]],  # the second never ends within 6 tokens: scores 0
        (5, 5, 1, 2): [[4, EOS], [4, 4, 4, 4, EOS]],  # the second needs 5 > 6 - 2 tokens: scores 0
        (6, 3, 3, 3, 3, 3): [[EOS], [4, EOS]],  # budget 1: only the immediate end scores
    }
    calls = []
    record = []
    prefixes = [(0, [5, 5], []), (0, [5, 5], [1, 2]), (1, [6], [3, 3, 3, 3, 3])]
    values, generated = continuation_values(ScriptedSampler(script, calls), DigitTokenizer(), prefixes, k=2, sampling=SAMPLING,
                                            scorer=length_scorer(record))
    # V = mean over the 2 continuations: (1 + 0) / 2; ("124" scores 3, + 0) / 2; (10 * 5 + 0) / 2.
    assert values == [0.5, 1.5, 25.0]
    # Tokens counted up to each prefix's own budget: 2 + 6, 2 + 4, 1 + 1.
    assert generated == 16
    # Two prefixes per call (batch_size 4 // k 2), largest budgets first, each call at its largest budget.
    assert [(len(p), n) for p, _, n in calls] == [(2, 6), (1, 1)]
    assert (1, "33333") in record and (0, "124") in record


def test_chain_values_share_the_prompt_state_across_a_group():
    # Two responses to prompt 0. Row 0: token 2 has probability 0.5, a cutpoint; row 1 has none.
    probs = torch.tensor([[0.99, 0.95, 0.5, 0.99], [0.99, 0.99, 0.99, 0.5]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    batch = make_batch([[5, 5], [5, 5]], [[1, 2, 3, EOS], [4, 4, EOS]], [False, False], PAD, "cpu")
    script = {(5, 5): [[1, EOS], [2, 2, EOS]], (5, 5, 1, 2): [[EOS], [7, 7, 7, EOS]]}
    calls = []
    boundaries, values, generated = chain_values(
        ScriptedSampler(script, calls), DigitTokenizer(), [[5, 5]], [0, 0], batch, probs.log().masked_fill(~mask, 0.0), k=2,
        threshold=0.9, interval=1, sampling=SAMPLING, scorer=length_scorer([]))
    assert boundaries == [[0, 2], [0]]
    # The prompt's value, sampled once for both rows: ("1": 1, "22": 2) -> 1.5; after "12": (2, 5) -> 3.5.
    assert values == [[1.5, 3.5], [1.5]]
    assert sorted(p for call in calls for p in call[0]) == [(5, 5), (5, 5, 1, 2)]
    assert generated == (2 + 3) + (1 + 4)


def test_tree_growth_leaf_rewards_and_training_rows():
    # Branching 2-2, 2 tokens at level 1, the remaining 3 at level 2 (max_new_tokens 5).
    script = {(7,): [[1, 2], [3, EOS]], (7, 1, 2): [[4, EOS], [5, 5, 5]]}
    calls = []
    sampling = Sampling(temperature=1.0, max_new_tokens=5, batch_size=8)
    trees, generated = sample_trees(ScriptedSampler(script, calls), DigitTokenizer(), [[7]], [0], branching=[2, 2], level_tokens=[2],
                                    sampling=sampling)
    tree = trees[0]
    assert tree.parents == [-1, 0, 0, 1, 1]
    assert tree.tokens == [[], [1, 2], [3, EOS], [4, EOS], [5, 5, 5]]
    assert tree.finished == [False, False, True, True, False]
    assert [n for _, _, n in calls] == [2, 3]
    assert generated == 2 + 2 + 2 + 3
    rewards = score_leaves(DigitTokenizer(), trees, length_scorer([]))
    assert rewards == [{2: 1.0, 3: 3.0, 4: 0.0}]  # "3", "124", and node 4 truncated
    values, adv = tree_values_and_advantages(tree.parents, rewards[0])
    # V1 = (3 + 0) / 2 = 1.5, V0 = (1.5 + 1) / 2 = 1.25.
    assert adv == pytest.approx([0.0, 0.25, -0.25, 1.5, -1.5])
    rows = tree_training_rows(trees, [adv])
    assert [(leaf, ids, token_mask) for _, leaf, ids, _, token_mask in rows] == [
        (2, [3, EOS], [True, True]),
        (3, [1, 2, 4, EOS], [True, True, True, True]),
        (4, [1, 2, 5, 5, 5], [False, False, True, True, True]),
    ]
    assert rows[2][3] == pytest.approx([0.25, 0.25, -1.5, -1.5, -1.5])
    assert tree.response_logprobs(4) is None  # this sampler keeps no log-probs


def test_tree_paths_carry_the_samplers_logprobs():
    """A sampler's log-probs follow each node's tokens, so a leaf path's row has them token by token."""
    script = {(7,): [[1, 2], [3, EOS]], (7, 1, 2): [[4, EOS], [5, 5, 5]]}
    sampling = Sampling(temperature=1.0, max_new_tokens=5, batch_size=8)
    trees, _ = sample_trees(ScriptedSampler(script, [], logprobs=True), DigitTokenizer(), [[7]], [0],
                            branching=[2, 2], level_tokens=[2], sampling=sampling)
    tree = trees[0]
    assert [tree.response(n) for n in (2, 3, 4)] == [[3, EOS], [1, 2, 4, EOS], [1, 2, 5, 5, 5]]
    assert [tree.response_logprobs(n) for n in (2, 3, 4)] == [[-3.0, 0.0], [-1.0, -2.0, -4.0, 0.0],
                                                            [-1.0, -2.0, -5.0, -5.0, -5.0]]


def test_rows_whose_segments_all_have_zero_advantage_are_dropped():
    script = {(7,): [[1, EOS], [2, EOS]]}
    sampling = Sampling(temperature=1.0, max_new_tokens=4, batch_size=8)
    trees, _ = sample_trees(ScriptedSampler(script, []), DigitTokenizer(), [[7]], [0], branching=[2], level_tokens=[],
                            sampling=sampling)
    rewards = score_leaves(DigitTokenizer(), trees, lambda p, texts: [1.0] * len(texts))
    _, adv = tree_values_and_advantages(trees[0].parents, rewards[0])
    assert tree_training_rows(trees, [adv]) == []


def test_make_batch_layout():
    batch = make_batch([[5, 5, 5], [6]], [[1, EOS], [2, 3, 4]], [False, True], PAD, "cpu")
    assert batch.prompt_length == 3
    assert batch.input_ids.tolist() == [[5, 5, 5, 1, EOS, PAD], [PAD, PAD, 6, 2, 3, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.completion_mask.tolist() == [[True, True, False], [True, True, True]]
    assert batch.truncated.tolist() == [False, True]
    assert batch.lengths().tolist() == [2, 3]


@pytest.mark.parametrize("rows", [2, 8])
def test_sampling_reads_each_generated_batch_once(rows, fake_gpu):
    """On a GPU every read of a device value waits for the GPU. chain_values reads the old log-probs and
    the responses once, and each generated batch once (lengths, truncation, ids), whatever the rows;
    sample_trees each level's batch once."""
    calls = []

    class Sampler:
        def generate(self, prompt_ids, n, *, temperature, max_new_tokens, seeds=None):
            calls.append(max_new_tokens)
            prompts = [p for p in prompt_ids for _ in range(n)]
            responses = [[1, 2, EOS][:max_new_tokens] for _ in prompts]
            return make_batch(prompts, responses, [EOS not in r for r in responses], PAD, fake_gpu.DEVICE)

    batch = make_batch([[5, 5]] * rows, [[1, 2, 3, 4, EOS]] * rows, [False] * rows, PAD, fake_gpu.DEVICE)
    old_lp = torch.full((rows, 5), -2.0, device=fake_gpu.DEVICE)  # every token a cutpoint
    before = fake_gpu.host_reads
    boundaries, _, _ = chain_values(Sampler(), DigitTokenizer(), [[5, 5]], [0] * rows, batch, old_lp, k=2, threshold=0.9,
                                    interval=2, sampling=SAMPLING, scorer=length_scorer([]))
    assert boundaries == [[0, 2, 4]] * rows and len(calls) > 1
    assert fake_gpu.host_reads - before == 3 + 3 * len(calls)
    calls.clear()
    before = fake_gpu.host_reads
    sample_trees(Sampler(), DigitTokenizer(), [[7]] * rows, list(range(rows)), branching=[2, 2], level_tokens=[2],
                 sampling=SAMPLING)
    assert len(calls) == 2 and fake_gpu.host_reads - before == 3 * len(calls)


def test_seeded_trees_do_not_depend_on_the_trees_grown_beside_them():
    """With a seed per prompt, each node's children draw from a stream keyed by (prompt seed, node): a
    prompt's tree grown alone equals the one grown beside other prompts (as one rank of several would),
    whatever the torch RNG."""
    from fusedrl.engine.config import load_config
    from fusedrl.engine.model import demo_model, demo_tokenizer
    from fusedrl.engine.samplers import HFSampler

    tokenizer = demo_tokenizer()
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1", "model.demo.num_heads=2",
                             "model.demo.intermediate_size=64"])
    torch.manual_seed(0)
    model = demo_model(cfg.model, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in ("12+34=", "7+8=", "100+1=")]
    options = dict(branching=[2, 3], level_tokens=[3],
                   sampling=Sampling(temperature=1.0, max_new_tokens=8, batch_size=4))
    together, _ = sample_trees(HFSampler(model, tokenizer, top_p=1.0, batch_size=4), tokenizer, prompts, [0, 1, 2],
                               seeds=[11, 12, 13], **options)
    torch.manual_seed(1)
    alone, _ = sample_trees(HFSampler(model, tokenizer, top_p=1.0, batch_size=1), tokenizer, prompts[1:2], [0],
                            seeds=[12], **options)
    assert (alone[0].parents, alone[0].tokens) == (together[1].parents, together[1].tokens)
    # The draws are random: the root's two children differ, and so do two prompts' first segments.
    tree = together[1]
    assert len(tree.parents) > 3 and tree.tokens[1] != tree.tokens[2]
    assert together[0].tokens[1:3] != together[1].tokens[1:3]
