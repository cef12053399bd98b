"""SPO's cutpoints, chain boundaries and advantages, and tree values and advantages, on hand-built cases."""

import math

import pytest
import torch

from fusedrl.engine.segments import (chain_advantages, chain_boundaries, cutpoints, tree_paths,
                                tree_values_and_advantages)

# Probabilities of the sampled tokens of one response of 14 tokens; below 0.9 at 1, 3, 4, 6, 8, 9, 11, 12.
PROBS = [0.95, 0.50, 0.99, 0.80, 0.30, 0.92, 0.10, 0.97, 0.85, 0.89, 0.91, 0.20, 0.60, 0.93]
LOW = [1, 3, 4, 6, 8, 9, 11, 12]


def _logprobs(rows, width):
    """[B, width] log-probs and mask from lists of probabilities; padding holds low-probability junk."""
    lp = torch.full((len(rows), width), math.log(0.01))
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        lp[i, :len(row)] = torch.tensor(row).log()
        mask[i, :len(row)] = 1
    return lp, mask


def test_cutpoints_are_the_low_probability_tokens():
    lp, _ = _logprobs([PROBS], 14)
    assert cutpoints(lp[0], 14, 0.9) == LOW
    assert cutpoints(lp[0], 5, 0.9) == [1, 3, 4]
    assert cutpoints(lp[0], 14, 0.5) == [4, 6, 11]


def test_chain_boundaries_keep_every_interval_th_cutpoint_from_the_first():
    # Row 1 has a cutpoint at token 0: that boundary is the prompt, boundary 0, counted once.
    lp, mask = _logprobs([PROBS, [0.5, 0.95, 0.95, 0.7]], 16)
    assert chain_boundaries(lp, mask, threshold=0.9, interval=5) == [[0, 1, 9], [0]]
    assert chain_boundaries(lp, mask, threshold=0.9, interval=2) == [[0, 1, 4, 8, 11], [0]]
    assert chain_boundaries(lp, mask, threshold=0.9, interval=1) == [[0, *LOW], [0, 3]]
    # No cutpoint at all: the whole response is one segment.
    lp, mask = _logprobs([[0.99, 0.95]], 3)
    assert chain_boundaries(lp, mask) == [[0]]


def test_chain_advantages_from_hand_set_values():
    _, mask = _logprobs([PROBS, [0.5, 0.95, 0.95, 0.7]], 14)
    # Row 0: V = 0.4 at the prompt, 0.5 before token 1, 0.25 before token 9; reward 1.
    # Row 1: V = 0.5 at the prompt, 0.0 before token 3; reward 0.
    adv = chain_advantages([[0, 1, 9], [0, 3]], [[0.4, 0.5, 0.25], [0.5, 0.0]], [1.0, 0.0], mask)
    expected = torch.zeros(2, 14)
    expected[0, 0] = 0.5 - 0.4
    expected[0, 1:9] = 0.25 - 0.5
    expected[0, 9:14] = 1.0 - 0.25
    expected[1, 0:3] = 0.0 - 0.5
    expected[1, 3] = 0.0
    torch.testing.assert_close(adv, expected)


def test_chain_advantages_reject_bad_boundaries():
    mask = torch.ones(1, 5)
    with pytest.raises(ValueError, match="boundaries"):
        chain_advantages([[1, 3]], [[0.0, 0.0]], [1.0], mask)
    with pytest.raises(ValueError, match="values"):
        chain_advantages([[0, 3]], [[0.0]], [1.0], mask)
    with pytest.raises(ValueError, match="past the response length"):
        chain_advantages([[0, 5]], [[0.0, 0.0]], [1.0], mask)


# A hand-built tree, nodes in creation order:
#            0 (prompt)
#        1          2
#     3     4     5   6        <- 5 and 6 ended (EOS) at level 2: leaves
#    7 8   9 10
PARENTS = [-1, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
REWARDS = {5: 0.0, 6: 0.0, 7: 1.0, 8: 0.0, 9: 1.0, 10: 1.0}


def test_tree_values_and_advantages():
    values, adv = tree_values_and_advantages(PARENTS, REWARDS)
    # V3 = (1 + 0) / 2, V4 = 1, V1 = 0.75, V2 = 0, V0 = 0.375.
    assert values == pytest.approx([0.375, 0.75, 0.0, 0.5, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert adv == pytest.approx([0.0, 0.375, -0.375, -0.25, 0.25, 0.0, 0.0, 0.5, -0.5, 0.0, 0.0])


def test_tree_advantages_divided_by_sibling_std():
    _, adv = tree_values_and_advantages(PARENTS, REWARDS, std_normalize=True)
    # Population std of the sibling values: {1, 2}: 0.375; {3, 4}: 0.25; {7, 8}: 0.5; {5, 6}, {9, 10}: 0.
    expected = [0.0, 0.375 / (0.375 + 1e-8), -0.375 / (0.375 + 1e-8), -0.25 / (0.25 + 1e-8),
                0.25 / (0.25 + 1e-8), 0.0, 0.0, 0.5 / (0.5 + 1e-8), -0.5 / (0.5 + 1e-8), 0.0, 0.0]
    assert adv == pytest.approx(expected, rel=1e-12, abs=0)


def test_tree_paths_train_every_segment_once_and_zero_advantage_segments_drop():
    rows = tree_paths(PARENTS)
    assert rows == [
        ([2, 5], [True, True]),
        ([2, 6], [False, True]),
        ([1, 3, 7], [True, True, True]),
        ([1, 3, 8], [False, False, True]),
        ([1, 4, 9], [False, True, True]),
        ([1, 4, 10], [False, False, True]),
    ]
    _, adv = tree_values_and_advantages(PARENTS, REWARDS)
    kept = [n for path, train in rows for n, t in zip(path, train) if t and adv[n] != 0.0]
    assert sorted(kept) == [1, 2, 3, 4, 7, 8]


def test_tree_rejects_malformed_input():
    with pytest.raises(ValueError, match="root"):
        tree_values_and_advantages([0, 0], {1: 1.0})
    with pytest.raises(ValueError, match="earlier node"):
        tree_values_and_advantages([-1, 2, 0], {1: 1.0, 2: 0.0})
    with pytest.raises(ValueError, match="no reward"):
        tree_values_and_advantages([-1, 0, 0], {1: 1.0})
