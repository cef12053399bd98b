"""PPO's advantage machinery: per-token rewards, GAE, whitening, the clipped value loss, value normalisation.

Everything here works on right-padded response tensors [B, T] with a mask [B, T] (1 = a valid response
token; every row's valid tokens come first, then padding). Token t of a response is the action taken in
state s_t = prompt + response[:t]; `values[:, t]` is the critic's V(s_t). The state after the last valid
token is terminal: its value is 0 and nothing is bootstrapped from padding.

The choices follow Xu et al. 2024 ("Is DPO superior to PPO for LLM alignment?", docs/algorithms.md section 4):
the sequence reward sits on the last valid token, the KL to the reference is folded into every token's
reward (k1 = olp - rlp, coefficient beta), rewards are clipped, advantages are whitened over the valid
tokens of the whole batch, and the critic may learn normalised returns.

Statistics over "the batch" take an optional `process_group`: sums and counts are all-reduced so that every
rank uses the statistics of the global batch, never its own shard's.
"""

import torch
import torch.distributed as dist


def _check_pair(name: str, x: torch.Tensor, mask: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(x.shape)}")
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of {name} {tuple(x.shape)}, got {tuple(mask.shape)}")


def _all_reduce_sum(t: torch.Tensor, process_group) -> torch.Tensor:
    if process_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=process_group)
    return t


def masked_mean(x: torch.Tensor, mask: torch.Tensor, process_group=None) -> torch.Tensor:
    """Mean of x over the valid tokens (mask = 1) of the batch; 0 when there are none."""
    m = mask.to(torch.float64)
    stats = torch.stack([(x.to(torch.float64) * m).sum(), m.sum()])
    total, count = _all_reduce_sum(stats, process_group)
    return (total / count.clamp(min=1)).to(x.dtype)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8,
                  process_group=None) -> torch.Tensor:
    """Whiten x with the mean and standard deviation of its valid tokens; padding stays 0.

    The variance is the unbiased (n - 1) one over all valid tokens of the batch (of every rank given a
    process group); padding enters neither statistic. With `shift_mean=False` the mean is added back,
    which keeps the sign structure of x while rescaling it.
    """
    _check_pair("x", x, mask)
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    # Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2: exact enough in float64
    # even when the mean is large against the spread.
    stats = _all_reduce_sum(torch.stack([(x64 * m).sum(), m.sum()]), process_group)
    count = stats[1]
    if count < 2:
        raise ValueError(f"masked_whiten needs at least 2 valid tokens in mask, got {int(count.item())}")
    mean = stats[0] / count
    sq = _all_reduce_sum(((x64 - mean) ** 2 * m).sum(), process_group)
    var = sq / (count - 1)
    out = (x64 - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * m).to(x.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last valid token [B] (rows need at least one valid token)."""
    lengths = mask.sum(-1).long()
    if (lengths == 0).any():
        raise ValueError("every row of mask needs at least one valid token")
    return lengths - 1


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, *, reward_clip: float | None = None,
                  kl: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """Per-token rewards [B, T]: -beta * kl_t on every valid token, plus the (clipped) score on the last.

    scores: [B] sequence rewards. reward_clip: clamp scores to [-reward_clip, reward_clip] first.
    kl: [B, T] per-token KL estimate to the reference, usually k1 = olp - rlp at rollout time.
    """
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must be [B] with B = {mask.shape[0]}, got shape {tuple(scores.shape)}")
    if reward_clip is not None:
        if reward_clip <= 0:
            raise ValueError(f"reward_clip must be > 0, got {reward_clip}")
        scores = scores.clamp(-reward_clip, reward_clip)
    m = mask.to(torch.float32)
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None and beta != 0.0:
        _check_pair("kl", kl, mask)
        rewards = rewards - beta * kl.to(torch.float32) * m
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last_token_index(mask)] += scores.to(torch.float32)
    return rewards


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                   lam: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over masked response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V_{t+1} = 0 after the last valid token;
    A_t = delta_t + gamma * lam * A_{t+1}, i.e. A_t = sum over k >= t of (gamma lam)^(k - t) delta_k:
    a reverse cumulative sum when gamma * lam = 1, else log2(T) doubling steps, vectorised over the
    batch and the tokens (a loop over T launched tens of thousands of small kernels per long-CoT step).
    Returns (advantages, returns = advantages + values), both [B, T] float32, 0 on padding.
    """
    _check_pair("rewards", rewards, mask)
    _check_pair("values", values, mask)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    m = mask.to(torch.float32)
    r = rewards.to(torch.float32) * m
    v = values.to(torch.float32) * m
    # V(s_{t+1}): the next column, 0 past the last valid token (padding holds 0) and past the end.
    next_v = torch.nn.functional.pad(v[:, 1:], (0, 1))
    delta = (r + gamma * next_v - v) * m
    # Padding has delta = 0 and only padding follows it, so its advantage comes out 0.
    advantages = discounted_reverse_sum(delta, gamma * lam)
    return advantages, (advantages + v) * m


def discounted_reverse_sum(x: torch.Tensor, c: float) -> torch.Tensor:
    """y_t = sum over k >= t of c^(k - t) x_k along the last axis, for 0 <= c <= 1.

    The recurrence y_t = x_t + c y_{t+1} is a linear scan: after the step with shift s, each entry holds
    the sum over its next 2s entries, so ceil(log2 T) steps finish it (Hillis-Steele)."""
    if c == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    y, shift, factor = x.flip(-1), 1, c
    while shift < y.shape[-1]:
        y = y + factor * torch.nn.functional.pad(y[..., :-shift], (shift, 0))
        shift, factor = 2 * shift, factor * factor
    return y.flip(-1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, *, value_clip: float | None = 0.2,
                       process_group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss 0.5 * mean_valid max((V - R)^2, (V_clip - R)^2).

    V_clip = V_old + clamp(V - V_old, -value_clip, value_clip); `value_clip=None` is the plain squared
    error. Returns (loss, fraction of valid tokens where the clipped term was the larger one).
    """
    _check_pair("values", values, mask)
    _check_pair("old_values", old_values, mask)
    _check_pair("returns", returns, mask)
    err = (values - returns) ** 2
    if value_clip is None:
        return 0.5 * masked_mean(err, mask, process_group), torch.zeros((), device=values.device)
    if value_clip <= 0:
        raise ValueError(f"value_clip must be > 0 or None, got {value_clip}")
    clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    err_clipped = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask, process_group)
    # Only where the clip acts: elsewhere V_clip equals V up to rounding, and comparing the two squared
    # errors would count rounding noise.
    acting = (values - old_values).abs() > value_clip
    clip_frac = masked_mean((acting & (err_clipped > err)).to(values.dtype), mask, process_group)
    return loss, clip_frac.detach()


class RunningMeanStd:
    """Running mean and variance of the returns, for a critic that learns normalised values.

    `update` merges a batch's valid tokens into the running moments with Chan et al.'s parallel formula
    (exact for any split of the same data). `normalize` / `denormalize` map returns to the critic's scale
    and back. Kept in float64; `state_dict` makes it checkpointable.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0
        self.eps = eps

    def update(self, x: torch.Tensor, mask: torch.Tensor, process_group=None) -> None:
        _check_pair("x", x, mask)
        m = mask.to(torch.float64)
        x64 = x.to(torch.float64)
        stats = _all_reduce_sum(torch.stack([(x64 * m).sum(), m.sum()]), process_group)
        n = stats[1].item()
        if n == 0:
            return
        batch_mean = (stats[0] / n).item()
        batch_m2 = _all_reduce_sum(((x64 - batch_mean) ** 2 * m).sum(), process_group).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.var + self.eps) ** 0.5

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
