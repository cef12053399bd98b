"""SPO's segment-level advantages (Guo et al. 2025, docs/algorithms.md section 5): the pure parts.

A response is cut into segments; each segment's advantage is the change in Monte-Carlo value across it,
and every token of the segment gets that advantage. Two ways to cut:

Chain (short CoT). Cutpoints are the response positions t whose sampled token had probability below rho
(0.9) under the rollout policy: the places where the model was unsure. The SPO reference keeps the 1st,
(1 + interval)th, (1 + 2 interval)th... cutpoint (`cutpoints[::interval]`, interval 5), and a segment
boundary sits just before each kept cutpoint token, so the continuations sampled from that boundary
re-draw the uncertain token. Boundary 0 is the prompt itself. With boundaries 0 = b_0 < b_1 < ... < b_n
and response length L, segment k covers tokens [b_k, b_{k+1}) (the last one [b_n, L)). V_k is the mean
reward of K continuations sampled from prompt + response[:b_k]; V_{n+1} is the response's own reward;
A_k = V_{k+1} - V_k.

Tree (long CoT). Each prompt roots a tree: level l generates a fixed number of tokens M_l from every node
of the level above, with branching b_l; the last level runs to the end. A leaf's value is its reward, an
inner node's value the mean of its children's; A(n) = V(n) - V(parent(n)), optionally divided by the
standard deviation of the values of n and its siblings plus 1e-8. Segments whose advantage is zero carry no
signal and are dropped (mask 0).

Both are trained with the probability mask (only tokens with pi_old < 0.9 get loss), which the loss applies.
"""

import torch

#: |A| below this counts as zero: the mean of equal values can differ from them by rounding (~1e-16).
ZERO_ADVANTAGE = 1e-12


def cutpoints(logprobs: torch.Tensor, length: int, threshold: float = 0.9) -> list[int]:
    """Positions t < length whose sampled token had probability exp(logprobs[t]) < threshold."""
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be one response's [T] log-probs, got shape {tuple(logprobs.shape)}")
    if not 0 <= length <= logprobs.shape[0]:
        raise ValueError(f"length must lie in [0, {logprobs.shape[0]}], got {length}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    low = logprobs[:length].exp() < threshold
    return low.nonzero().flatten().tolist()


def chain_boundaries(logprobs: torch.Tensor, mask: torch.Tensor, *, threshold: float = 0.9,
                     interval: int = 5) -> list[list[int]]:
    """Segment boundaries of each response: 0 (the prompt), then every `interval`-th cutpoint from the first.

    logprobs, mask: [B, T] rollout log-probs of the sampled tokens and the response mask (right-padded).
    Returns, per row, the sorted start positions of its segments; boundary b means prefix response[:b].
    """
    if logprobs.dim() != 2 or mask.shape != logprobs.shape:
        raise ValueError(f"logprobs and mask must both be [B, T], got {tuple(logprobs.shape)} "
                         f"and {tuple(mask.shape)}")
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    lengths = mask.sum(-1).tolist()
    out = []
    # The search is per row and its result a Python list: one copy to the host, not two syncs per row.
    for row, length in zip(logprobs.detach().cpu(), lengths):
        kept = cutpoints(row, int(length), threshold)[::interval]
        out.append(sorted({0, *kept}))
    return out


def chain_advantages(boundaries: list[list[int]], values: list[list[float]], rewards: list[float],
                     mask: torch.Tensor) -> torch.Tensor:
    """Per-token advantages [B, T] (float32, 0 on padding) from each row's boundary values and reward.

    values[i][k] is V at boundaries[i][k]; the segment starting at boundary k gets V_{k+1} - V_k, where the
    value after the last boundary is rewards[i].
    """
    if not len(boundaries) == len(values) == len(rewards) == mask.shape[0]:
        raise ValueError(f"boundaries, values and rewards need one entry per row of mask ({mask.shape[0]}), "
                         f"got {len(boundaries)}, {len(values)}, {len(rewards)}")
    lengths = mask.sum(-1).tolist()
    # Filled on the host segment by segment, then moved at once (not a device kernel per segment).
    advantages = torch.zeros(mask.shape, dtype=torch.float32)
    for i, (starts, vals, reward, length) in enumerate(zip(boundaries, values, rewards, lengths)):
        if len(starts) != len(vals):
            raise ValueError(f"row {i}: {len(starts)} boundaries but {len(vals)} values")
        if not starts or starts[0] != 0 or any(a >= b for a, b in zip(starts, starts[1:])):
            raise ValueError(f"row {i}: boundaries must start at 0 and increase, got {starts}")
        if starts[-1] >= max(length, 1):
            raise ValueError(f"row {i}: boundary {starts[-1]} is past the response length {length}")
        chain = [*vals, reward]
        for k, start in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else int(length)
            advantages[i, start:end] = chain[k + 1] - chain[k]
    return advantages.to(mask.device)


def tree_values_and_advantages(parents: list[int], leaf_rewards: dict[int, float], *,
                               std_normalize: bool = False) -> tuple[list[float], list[float]]:
    """Node values and advantages of one tree given as a parent list in creation order.

    parents[n] is the parent of node n; node 0 is the root (parents[0] = -1) and every parent comes
    before its children. leaf_rewards holds the reward of every node without children. Returns
    (values, advantages), with the root's advantage 0. With std_normalize, A(n) is divided by the
    population standard deviation of the values of n and its siblings, plus 1e-8.
    """
    n_nodes = len(parents)
    if n_nodes == 0 or parents[0] != -1:
        raise ValueError("parents must start with the root, whose parent is -1")
    children: list[list[int]] = [[] for _ in range(n_nodes)]
    for node, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < node:
            raise ValueError(f"node {node}: parent {parent} must be an earlier node")
        children[parent].append(node)
    values = [0.0] * n_nodes
    for node in reversed(range(n_nodes)):
        if children[node]:
            values[node] = sum(values[c] for c in children[node]) / len(children[node])
        elif node in leaf_rewards:
            values[node] = float(leaf_rewards[node])
        else:
            raise ValueError(f"leaf node {node} has no reward in leaf_rewards")
    advantages = [0.0] * n_nodes
    for node in range(1, n_nodes):
        parent = parents[node]
        adv = values[node] - values[parent]
        if abs(adv) < ZERO_ADVANTAGE:
            adv = 0.0
        elif std_normalize:
            sib = torch.tensor([values[c] for c in children[parent]], dtype=torch.float64)
            adv = adv / (sib.std(correction=0).item() + 1e-8)
        advantages[node] = adv
    return values, advantages


def tree_paths(parents: list[int]) -> list[tuple[list[int], list[bool]]]:
    """One training row per leaf: its root-to-leaf path (root excluded) and which nodes it trains.

    Sibling subtrees share their ancestors' segments; each node's segment is trained once, on the path
    of its first leaf (in creation order), and masked out on the others, so no token counts twice.
    """
    n_nodes = len(parents)
    has_child = [False] * n_nodes
    for parent in parents[1:]:
        has_child[parent] = True
    trained: set[int] = set()
    rows = []
    for leaf in range(1, n_nodes):
        if has_child[leaf]:
            continue
        path = []
        node = leaf
        while node != 0:
            path.append(node)
            node = parents[node]
        path.reverse()
        rows.append((path, [n not in trained for n in path]))
        trained.update(path)
    return rows
