"""SPO's sampling: Monte-Carlo values at chain boundaries, and segment trees (docs/algorithms.md section 5).

Both sample through the session's sampler (engine/samplers.py: hf or vllm). A boundary's
value is the mean reward of K continuations sampled from prompt + response[:b]; all boundaries of all
responses of a step, across prompts, go through the sampler together, sorted by remaining budget so that
a call's rows need similar numbers of new tokens. A continuation shares the response's length limit:
it may add max_new_tokens - b tokens, and one that ends without an end token scores 0 (truncated).
The prompt itself is the first boundary of every response to it, so its value is sampled once per prompt.

A tree grows level by level: every open node of level l - 1 gets b_l children of at most M_l new tokens
each (the last level gets whatever remains of max_new_tokens); a child whose segment ends with the end
token is a leaf, one that reaches the last level's limit without it is truncated and scores 0.

With seeds (one per prompt, the rollout's), every draw is keyed by what it continues: a boundary's
continuations by (prompt, response, boundary), a tree node's children by (prompt, node); a node's number
depends only on its own tree's growth. So the values and trees of a prompt do not depend on which
prompts share a call, and one process and any number of ranks draw the same ones.

The scorer passed in is the loop's reward: `scorer(prompt_index, completions) -> list[float]`, which
reads the dataset row of each prompt index and applies the configured reward with its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from fusedrl.engine.rollout import Batch, derive_seed
from fusedrl.engine.segments import chain_boundaries, tree_paths

Scorer = Callable[[list[int], list[str]], list[float]]
# derive_seed's tags: they keep these streams apart from each other and from the responses' own
# (derive_seed(prompt seed, j)).
_CONTINUATIONS = 2
_TREE_NODES = 3


@dataclass
class Sampling:
    """How continuations are sampled: the rollout's settings (top_k and top_p are the sampler's own)."""

    temperature: float
    max_new_tokens: int
    batch_size: int


def _to_host(batch: Batch) -> tuple[list[int], list[bool], list[list[int]]]:
    """Response lengths, truncation flags and token ids of a generated batch, read from the device once
    (the loops over rows then never wait on it)."""
    return batch.lengths().tolist(), batch.truncated.tolist(), batch.completion_ids.tolist()


def continuation_values(sampler, tokenizer, prefixes: list[tuple[int, list[int], list[int]]], *, k: int,
                        sampling: Sampling, scorer: Scorer, seeds: list[int] | None = None) -> tuple[list[float], int]:
    """(V of each prefix, tokens generated): V = mean reward of k sampled continuations.

    prefixes: (prompt_index, prompt_ids, response_prefix_ids); a continuation may add
    max_new_tokens - len(response_prefix_ids) tokens and scores 0 unless it ends within them.
    seeds: one per prefix (rollout.generate's), so that a prefix's continuations do not depend on the
    call it is batched in.
    """
    budgets = [sampling.max_new_tokens - len(p[2]) for p in prefixes]
    if any(b < 1 for b in budgets):
        raise ValueError(f"every response prefix must be shorter than max_new_tokens ({sampling.max_new_tokens})")
    order = sorted(range(len(prefixes)), key=lambda i: -budgets[i])
    per_call = max(1, sampling.batch_size // k)
    owners, texts, finished = [], [], []
    generated = 0
    for start in range(0, len(order), per_call):
        chunk = order[start: start + per_call]
        out = sampler.generate([prefixes[i][1] + prefixes[i][2] for i in chunk], k,
                               temperature=sampling.temperature, max_new_tokens=budgets[chunk[0]],
                               seeds=None if seeds is None else [seeds[i] for i in chunk])
        lengths, truncated, ids = _to_host(out)
        for row, length in enumerate(lengths):
            i = chunk[row // k]
            used = min(length, budgets[i])
            generated += used
            owners.append(i)
            finished.append(not truncated[row] and length <= budgets[i])
            texts.append(prefixes[i][2] + ids[row][:used])
    completions = tokenizer.batch_decode(texts, skip_special_tokens=True)
    rewards = scorer([prefixes[i][0] for i in owners], completions)
    totals = [0.0] * len(prefixes)
    for i, reward, done in zip(owners, rewards, finished):
        totals[i] += reward if done else 0.0
    return [t / k for t in totals], generated


def chain_values(sampler, tokenizer, prompt_ids: list[list[int]], prompt_index: list[int], batch: Batch,
                 old_logprobs: torch.Tensor, *, k: int, threshold: float, interval: int,
                 sampling: Sampling, scorer: Scorer,
                 seeds: list[int] | None = None) -> tuple[list[list[int]], list[list[float]], int]:
    """(boundaries, their values, tokens generated) for every response of `batch`.

    prompt_ids[p] are the token ids of prompt p; prompt_index[i] is the prompt of batch row i.
    seeds: one per prompt (the responses'); a prefix's continuations are then seeded by its prompt's
    seed, its response's place in the group and its boundary.
    """
    boundaries = chain_boundaries(old_logprobs, batch.completion_mask, threshold=threshold, interval=interval)
    root_slot = {p: slot for slot, p in enumerate(sorted(set(prompt_index)))}
    prefixes = [(p, prompt_ids[p], []) for p in root_slot]
    keys = [(p, 0, 0) for p in root_slot]  # (prompt, 1 + response's place in its group, boundary)
    slots, place = [], {}
    responses = batch.completion_ids.tolist()
    for i, starts in enumerate(boundaries):
        response, p = responses[i], prompt_index[i]
        place[p] = place.get(p, 0) + 1
        row = [root_slot[p]]
        for b in starts[1:]:
            row.append(len(prefixes))
            prefixes.append((p, prompt_ids[p], response[:b]))
            keys.append((p, place[p], b))
        slots.append(row)
    prefix_seeds = None if seeds is None else [derive_seed(_CONTINUATIONS, seeds[p], j, b) for p, j, b in keys]
    values, generated = continuation_values(sampler, tokenizer, prefixes, k=k, sampling=sampling, scorer=scorer,
                                            seeds=prefix_seeds)
    return boundaries, [[values[s] for s in row] for row in slots], generated


@dataclass
class Tree:
    """One prompt's tree; node 0 is the prompt, every parent precedes its children."""

    prompt_index: int
    parents: list[int] = field(default_factory=lambda: [-1])
    tokens: list[list[int]] = field(default_factory=lambda: [[]])  # each node's segment
    finished: list[bool] = field(default_factory=lambda: [False])  # segment ended with the end token
    logprobs: list[list[float]] = field(default_factory=lambda: [[]])  # the sampler's, when it keeps them

    def path(self, node: int) -> list[int]:
        """Nodes from the root's first child down to `node`."""
        nodes = []
        while node > 0:
            nodes.append(node)
            node = self.parents[node]
        return nodes[::-1]

    def response(self, node: int) -> list[int]:
        return [t for n in self.path(node) for t in self.tokens[n]]

    def response_logprobs(self, node: int) -> list[float] | None:
        """The sampler's log-probs of `response(node)`; None when the sampler keeps none."""
        if len(self.logprobs) != len(self.tokens):
            return None
        return [lp for n in self.path(node) for lp in self.logprobs[n]]

    def leaves(self) -> list[int]:
        inner = set(self.parents[1:])
        return [n for n in range(1, len(self.parents)) if n not in inner]


def sample_trees(sampler, tokenizer, prompt_ids: list[list[int]], prompt_index: list[int], *,
                 branching: list[int], level_tokens: list[int], sampling: Sampling,
                 seeds: list[int] | None = None) -> tuple[list[Tree], int]:
    """(one tree per prompt index, tokens generated); level l has branching[l] children per open node.

    seeds: one per prompt (seeds[p] for prompt p, the rollout's); a node's children are then seeded by
    its prompt's seed and its node number, so that a tree does not depend on the trees grown beside it.
    Without them the branches draw from the torch RNG.
    """
    trees = [Tree(p) for p in prompt_index]
    frontier = [(tree, 0) for tree in trees]
    generated = 0
    for level, width in enumerate(branching):
        last = level == len(branching) - 1
        budget = sampling.max_new_tokens - sum(level_tokens) if last else level_tokens[level]
        if not frontier:
            break
        prefixes = [prompt_ids[tree.prompt_index] + tree.response(node) for tree, node in frontier]
        node_seeds = None if seeds is None else [derive_seed(_TREE_NODES, seeds[tree.prompt_index], node)
                                                 for tree, node in frontier]
        out = sampler.generate(prefixes, width, temperature=sampling.temperature, max_new_tokens=budget,
                               seeds=node_seeds)
        next_frontier = []
        lengths, truncated, ids = _to_host(out)
        logprobs = None if out.sampler_logprobs is None else out.sampler_logprobs.tolist()
        for row, length in enumerate(lengths):
            tree, parent = frontier[row // width]
            tree.parents.append(parent)
            tree.tokens.append(ids[row][:length])
            if logprobs is not None:
                tree.logprobs.append(logprobs[row][:length])
            tree.finished.append(not truncated[row])
            generated += length
            if not tree.finished[-1] and not last:
                next_frontier.append((tree, len(tree.parents) - 1))
        frontier = next_frontier
    return trees, generated


def score_leaves(tokenizer, trees: list[Tree], scorer: Scorer) -> list[dict[int, float]]:
    """Each tree's leaf rewards; a leaf that never produced the end token (truncated) scores 0."""
    leaves = [(t, n) for t, tree in enumerate(trees) for n in tree.leaves()]
    texts = tokenizer.batch_decode([trees[t].response(n) for t, n in leaves], skip_special_tokens=True)
    rewards = scorer([trees[t].prompt_index for t, _ in leaves], texts)
    out: list[dict[int, float]] = [{} for _ in trees]
    for (t, n), reward in zip(leaves, rewards):
        out[t][n] = reward if trees[t].finished[n] else 0.0
    return out


def tree_training_rows(trees: list[Tree], advantages: list[list[float]]):
    """Training rows from trees: (tree, leaf, response ids, per-token advantage, per-token loss mask).

    One row per leaf path; a token gets loss where its node is trained on this path (each segment once,
    see `tree_paths`) and its node's advantage is not zero. Rows with no such token are dropped.
    """
    rows = []
    for tree, adv in zip(trees, advantages):
        for path, trained in tree_paths(tree.parents):
            ids, token_adv, token_mask = [], [], []
            for node, train in zip(path, trained):
                seg = tree.tokens[node]
                ids += seg
                token_adv += [adv[node]] * len(seg)
                token_mask += [train and adv[node] != 0.0] * len(seg)
            if any(token_mask):
                rows.append((tree, path[-1], ids, token_adv, token_mask))
    return rows


def pad_rows(rows: list[list], width: int, value, dtype, device) -> torch.Tensor:
    """[len(rows), width] tensor of right-padded rows."""
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=dtype)
    return out.to(device)
