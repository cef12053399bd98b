"""PPO's advantage machinery against hand-worked cases and independent brute-force references."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedrl.engine.gae import (RunningMeanStd, clipped_value_loss, discounted_reverse_sum, gae_advantages, masked_mean,
                                masked_whiten, token_rewards)

PAD = 99.0  # junk in padded slots: a result that reads padding shows it


def test_gae_hand_worked():
    # Row 0: three valid tokens, reward 1 at the end. Row 1: two valid tokens and one padded slot.
    # gamma = 0.9, lam = 0.8 so gamma * lam = 0.72:
    # row 0: delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 1-0.7] = [0.04, 0.03, 0.3]
    #        A_2 = 0.3, A_1 = 0.03 + 0.72*0.3 = 0.246, A_0 = 0.04 + 0.72*0.246 = 0.21712
    # row 1: delta = [0.5 + 0.9*0.4 - 0.2, -1 - 0.4] = [0.66, -1.4]
    #        A_1 = -1.4, A_0 = 0.66 + 0.72*(-1.4) = -0.348
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, -1.0, PAD]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 0.4, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3], [-0.348, -1.4, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0], [-0.148, -1.0, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = torch.tensor([[1.2, 1.1, 1.3, 1.0]])
    torch.testing.assert_close(adv, to_go - values)
    torch.testing.assert_close(ret, to_go)


def test_gae_matches_explicit_sum_of_discounted_deltas():
    B, T, gamma, lam = 5, 9, 0.95, 0.7
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    rewards, values = torch.randn(B, T, dtype=torch.float64), torch.randn(B, T, dtype=torch.float64)
    adv, _ = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    expected = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        n = int(lengths[i])
        v = torch.cat([values[i, :n], torch.zeros(1, dtype=torch.float64)])
        delta = rewards[i, :n] + gamma * v[1:] - v[:-1]
        for t in range(n):
            expected[i, t] = sum((gamma * lam) ** k * delta[t + k] for k in range(n - t))
    torch.testing.assert_close(adv, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c", [0.0, 0.5, 0.99, 1.0])
def test_discounted_reverse_sum_matches_the_recurrence_over_long_rows(c):
    """The doubling scan against y_t = x_t + c y_{t+1} run step by step in float64, at a length that
    is no power of two (1000: ten doubling steps, the last one partial)."""
    x = torch.randn(3, 1000, dtype=torch.float64)
    expected = torch.zeros_like(x)
    running = torch.zeros(3, dtype=torch.float64)
    for t in reversed(range(1000)):
        running = x[:, t] + c * running
        expected[:, t] = running
    torch.testing.assert_close(discounted_reverse_sum(x, c), expected, rtol=1e-10, atol=1e-9)


def test_token_rewards_clip_and_kl_in_reward():
    scores = torch.tensor([2.0, -3.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards = token_rewards(scores, mask, reward_clip=1.0, kl=kl, beta=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.01, -0.02, 0.97], [-0.04, -1.05, 0.0]]))


def test_masked_whiten_hand_worked_and_padding_excluded():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, PAD, -PAD]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Valid tokens 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5 / 3.
    std = (5 / 3) ** 0.5
    expected = torch.tensor([[-1.5 / std, -0.5 / std, 0.5 / std], [1.5 / std, 0.0, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 2.5) * mask)
    assert masked_mean(x, mask).item() == pytest.approx(2.5)


def test_masked_whiten_needs_two_valid_tokens():
    with pytest.raises(ValueError, match="mask"):
        masked_whiten(torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]))


def test_clipped_value_loss_hand_worked_with_gradient():
    # Token 0: V = 1 moved 0.5 from V_old = 0.5, clipped to 0.7; (0.7 - 2)^2 = 1.69 > (1 - 2)^2 = 1.
    # Token 1: inside the clip range, (0.3 - 0)^2 = 0.09 either way. Token 2 is padding.
    values = torch.tensor([[1.0, 0.3, PAD]], requires_grad=True)
    old = torch.tensor([[0.5, 0.2, 0.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, clip_frac = clipped_value_loss(values, old, returns, mask, value_clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.09) / 2)
    assert clip_frac.item() == pytest.approx(0.5)
    loss.backward()
    # The clipped term is flat in V, so token 0 gets no gradient; token 1 gets 0.5 * 2 * 0.3 / 2.
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.15, 0.0]]))
    plain, _ = clipped_value_loss(values.detach(), old, returns, mask, value_clip=None)
    assert plain.item() == pytest.approx(0.5 * (1.0 + 0.09) / 2)


def test_running_mean_std_merges_batches_exactly():
    a, b = torch.randn(3, 5, dtype=torch.float64) * 3 + 1, torch.randn(2, 4, dtype=torch.float64)
    ma, mb = torch.rand(3, 5) > 0.3, torch.ones(2, 4, dtype=torch.bool)
    rms = RunningMeanStd()
    rms.update(a, ma)
    rms.update(b, mb)
    allv = torch.cat([a[ma], b[mb]])
    assert rms.count == allv.numel()
    assert rms.mean == pytest.approx(allv.mean().item(), rel=1e-12)
    assert rms.var == pytest.approx(allv.var(correction=0).item(), rel=1e-12)
    x = torch.randn(4)
    torch.testing.assert_close(rms.denormalize(rms.normalize(x)), x)
    restored = RunningMeanStd()
    restored.load_state_dict(rms.state_dict())
    assert restored.state_dict() == rms.state_dict()


def _distributed_worker(rank, world, tmp, x, mask):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    rows = slice(rank * 2, rank * 2 + 2)
    out = masked_whiten(x[rows], mask[rows], process_group=dist.group.WORLD)
    rms = RunningMeanStd()
    rms.update(x[rows], mask[rows], process_group=dist.group.WORLD)
    torch.save((out, rms.mean, rms.var), f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.distributed
def test_whiten_and_running_stats_across_two_ranks_equal_the_whole_batch(tmp_path):
    x = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 5 + [0], [1] + [0] * 5])
    mp.spawn(_distributed_worker, args=(2, str(tmp_path), x, mask), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), masked_whiten(x, mask))
    valid = x[mask.bool()]
    for _, mean, var in results:
        assert mean == pytest.approx(valid.mean().item(), rel=1e-12)
        assert var == pytest.approx(valid.var(correction=0).item(), rel=1e-12)
