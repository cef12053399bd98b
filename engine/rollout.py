"""Sampling responses with transformers' generate, and the batch layout the losses read.

Every sequence is [left-padded prompt | response right-padded], with one prompt length P for the
whole batch, so that the hidden state at column P - 1 + t predicts response token t for every row.
A response's mask covers its tokens up to and including the first end-of-sequence token; a response
that reaches max_new_tokens without one is marked truncated.

Sampling draws from the kept set of rollout.top_k / top_p (kept_logits: the fused ops' own rules), and
the loss recomputes log-probs of that distribution (or, with rollout.train_on=full, of the full softmax
at the sampling temperature), so the rollout keeps token ids; a sampler that is not the trained model itself
(vLLM, engine/samplers.py) also keeps its own log-probs of them, to measure and correct the mismatch
(engine/mismatch.py).

With `seeds` (one per prompt) each response draws its tokens from its own uniform stream, seeded by
its prompt's seed and its index in the group (the way vLLM takes a seed per request): a response then
does not depend on which other prompts share its batch, so one process and any number of ranks, each
sampling its share of the prompts, draw the same responses (engine/distributed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from fusedrl.kernels._kept_set import mass_units


@dataclass
class Batch:
    """Token tensors of a batch of (prompt, response) sequences, all on one device."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    prompt_length: int  # P: padded prompt length
    completion_ids: torch.Tensor  # [B, T], pad after the end
    completion_mask: torch.Tensor  # [B, T] bool, response tokens including the end token
    truncated: torch.Tensor  # [B] bool, no end token within max_new_tokens
    sampler_logprobs: torch.Tensor | None = None  # [B, T] fp32, the sampler's own (0 after the end)

    def __len__(self):
        return self.input_ids.shape[0]

    def rows(self, index) -> "Batch":
        """The rows `index` with all-padding columns trimmed on both sides (same positions, less work)."""
        index = torch.as_tensor(index, device=self.input_ids.device)
        mask = self.attention_mask[index]
        # The longest prompt and response among the rows, read from the device in one copy.
        prompt, response = torch.stack([mask[:, : self.prompt_length].sum(1).max(),
                                        self.completion_mask[index].sum(1).max()]).tolist()
        first = self.prompt_length - prompt  # leftmost column with a prompt token
        length = max(1, response)
        sampler_lp = None if self.sampler_logprobs is None else self.sampler_logprobs[index][:, :length]
        return Batch(self.input_ids[index][:, first: self.prompt_length + length],
                     mask[:, first: self.prompt_length + length], self.prompt_length - first,
                     self.completion_ids[index][:, :length], self.completion_mask[index][:, :length],
                     self.truncated[index], sampler_lp)

    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)


def concat(batches: list[Batch], pad_id: int) -> Batch:
    """One batch from several: prompts left-padded to the longest, responses right-padded to the longest
    (positions follow the attention mask, so extra left padding changes no row's result)."""
    prompt = max(b.prompt_length for b in batches)
    length = max(b.completion_ids.shape[1] for b in batches)
    parts = [(b, prompt - b.prompt_length, length - b.completion_ids.shape[1]) for b in batches]

    def pad(t, value, left, right):
        return torch.nn.functional.pad(t, (left, right), value=value)

    sampler_lp = None
    if all(b.sampler_logprobs is not None for b in batches):
        sampler_lp = torch.cat([pad(b.sampler_logprobs, 0.0, 0, right) for b, _, right in parts])

    return Batch(torch.cat([pad(b.input_ids, pad_id, left, right) for b, left, right in parts]),
                 torch.cat([pad(b.attention_mask, 0, left, right) for b, left, right in parts]), prompt,
                 torch.cat([pad(b.completion_ids, pad_id, 0, right) for b, _, right in parts]),
                 torch.cat([pad(b.completion_mask, False, 0, right) for b, _, right in parts]),
                 torch.cat([b.truncated for b in batches]), sampler_lp)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), length), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p):] = 1
    return ids.to(device), mask.to(device)


def make_batch(prompts: list[list[int]], responses: list[list[int]], truncated: list[bool], pad_id: int,
               device, logprobs: list[list[float]] | None = None) -> Batch:
    """A Batch in the engine's layout from token lists: left-padded prompts, right-padded responses;
    `logprobs` (one per response token) become its sampler_logprobs."""
    prompt, prompt_mask = left_pad(prompts, pad_id, device)
    length = max(1, max(len(r) for r in responses))
    completion = torch.full((len(responses), length), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(responses), length), dtype=torch.bool)
    for i, r in enumerate(responses):
        completion[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        completion_mask[i, :len(r)] = True
    sampler_lp = None
    if logprobs is not None:
        sampler_lp = torch.zeros((len(responses), length), dtype=torch.float32)
        for i, lp in enumerate(logprobs):
            sampler_lp[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        sampler_lp = sampler_lp.to(device)
    completion, completion_mask = completion.to(device), completion_mask.to(device)
    return Batch(torch.cat([prompt, completion], 1), torch.cat([prompt_mask, completion_mask.long()], 1),
                 prompt.shape[1], completion, completion_mask,
                 torch.tensor(truncated, dtype=torch.bool, device=device), sampler_lp)


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from non-negative integer keys (numpy's SeedSequence: distinct keys, independent streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


def kept_logits(scores: torch.Tensor, temperature: float, top_k: int | None = None,
                top_p: float | None = None) -> torch.Tensor:
    """scores / temperature in fp32, -inf outside the sampler's kept set: the set the fused ops' top_k /
    top_p compute lp and H over (fusedrl/kernels/_kept_set.py, docs/logprobs_and_entropy.md), found here
    by sorting. In vLLM's order: top-k keeps every logit >= the k-th largest (ties all kept); top-p then
    keeps every token with less than top_p of the top-k set's mass strictly above it, so tied logits are
    kept or dropped together. The masses are the kernels' own (exp((x - max) / T) in integer units of
    2^-40, rounded down, summed exactly), so that on the same logits the two sets are the same."""
    x = scores.float()
    z = x / temperature
    vocab = x.shape[-1]
    top_k, top_p = (None if top_k is None or top_k >= vocab else top_k), (None if top_p is None or top_p >= 1 else top_p)
    if top_k is None and top_p is None:
        return z
    ordered, order = x.sort(-1, descending=True)
    keep = torch.ones_like(ordered, dtype=torch.bool)
    if top_k is not None:
        keep = ordered >= ordered[:, top_k - 1: top_k]
    if top_p is not None:
        units = mass_units(ordered, ordered[:, :1], 1.0 / temperature).masked_fill_(~keep, 0)
        before = units.cumsum(-1) - units
        # A tie group's mass strictly above is that before its first member (sorted: ties are adjacent).
        positions = torch.arange(vocab, device=x.device).expand_as(ordered)
        starts = torch.ones_like(keep)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        first = torch.where(starts, positions, 0).cummax(-1).values
        keep &= before.gather(-1, first).double() < top_p * units.sum(-1, keepdim=True).double()
    return z.masked_fill(~torch.zeros_like(keep).scatter_(-1, order, keep), -torch.inf)


class KeyedSampler(LogitsProcessor):
    """Samples each row's next token from softmax(kept_logits(scores)) - the distribution the trainer's
    kept-set log-probs describe - by inverting its CDF (tokens by decreasing probability) at the row's
    next uniform; returns scores that are 0 at the drawn token and -inf elsewhere, so that greedy
    decoding emits it."""

    def __init__(self, uniforms: torch.Tensor, prompt_length: int, temperature: float, top_p: float | None = None,
                 top_k: int | None = None):
        self.uniforms, self.prompt_length = uniforms, prompt_length  # uniforms [rows, max_new_tokens]
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = self.uniforms[:, input_ids.shape[1] - self.prompt_length].to(scores.device)
        probs = torch.softmax(kept_logits(scores, self.temperature, self.top_k, self.top_p), dim=-1)
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        cdf = probs.cumsum(-1)
        # u < 1, so the search never passes the last kept token (those after it add exactly 0 to the cdf).
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp(max=cdf.shape[1] - 1)
        drawn = torch.full_like(scores, -torch.inf)
        return drawn.scatter_(1, order.gather(1, pick), 0.0)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, group_size: int, temperature: float,
             top_p: float | None, max_new_tokens: int, batch_size: int, seeds: list[int] | None = None,
             top_k: int | None = None) -> Batch:
    """group_size responses per prompt (rows i*G .. i*G+G-1 share prompt i); temperature 0 is greedy.
    Sampling draws from the kept set of top_k / top_p (None, top_k 0 and top_p 1: off; kept_logits).

    seeds: one per prompt; response j of prompt i then samples from derive_seed(seeds[i], j) alone.
    Without them, the uniforms come from the torch RNG (and depend on the batch's composition)."""
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    greedy = temperature == 0
    if seeds is not None and len(seeds) != len(prompt_ids):
        raise ValueError(f"seeds must hold one seed per prompt ({len(prompt_ids)}), got {len(seeds)}")
    # Sampling is KeyedSampler's, seeded or not, so that every draw follows the kept set's rules;
    # transformers then decodes greedily the one token it leaves.
    # synced_gpus=False: under FSDP, transformers would otherwise keep every rank generating until all
    # are done; the engine generates with the parameters gathered instead (distributed.gathered).
    config = GenerationConfig(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
    repeated = [p for p in prompt_ids for _ in range(group_size)]
    uniforms = None
    if not greedy and seeds is not None:
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(
            derive_seed(s, j))) for s in seeds for j in range(group_size)])
    elif not greedy:
        uniforms = torch.rand(len(repeated), max_new_tokens)
    ids, mask = left_pad(repeated, pad, device)
    prompt_length = ids.shape[1]
    was_training = model.training
    model.eval()
    parts = []
    for start in range(0, len(repeated), batch_size):
        chunk_ids, chunk_mask = ids[start: start + batch_size], mask[start: start + batch_size]
        processors = LogitsProcessorList()
        if not greedy:
            processors.append(KeyedSampler(uniforms[start: start + batch_size], prompt_length, temperature,
                                           top_p, top_k or None))
        out = model.generate(input_ids=chunk_ids, attention_mask=chunk_mask, generation_config=config,
                             logits_processor=processors, synced_gpus=False)
        parts.append(_split_response(out, chunk_mask, prompt_length, eos, pad))
    model.train(was_training)
    return concat(parts, pad)


def _split_response(out, prompt_mask, prompt_length, eos, pad) -> Batch:
    completion = out[:, prompt_length:]
    is_end = completion == eos
    # Tokens after the first end token are not part of the response (generate pads them, but a
    # model whose pad id equals its eos id would otherwise be ambiguous).
    after_end = (is_end.long().cumsum(1) - is_end.long()) > 0
    completion_mask = ~after_end
    completion = completion.masked_fill(after_end, pad)
    truncated = ~is_end.any(1)
    attention_mask = torch.cat([prompt_mask, completion_mask.long()], dim=1)
    return Batch(torch.cat([out[:, :prompt_length], completion], 1), attention_mask, prompt_length,
                 completion, completion_mask, truncated)


def decode(tokenizer, batch: Batch) -> list[str]:
    """Response texts without special tokens."""
    ids = batch.completion_ids.masked_fill(~batch.completion_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

