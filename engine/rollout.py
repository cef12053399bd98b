"""The batch layout the losses read, whichever sampler (engine/samplers.py) made the responses.

Every sequence is [left-padded prompt | response right-padded], with one prompt length P for the
whole batch, so that the hidden state at column P - 1 + t predicts response token t for every row.
A response's mask covers its tokens up to and including the first end-of-sequence token; a response
that reaches max_new_tokens without one is marked truncated.

The loss recomputes log-probs from the full softmax at the sampling temperature (top_p only shapes
what is sampled), so the rollout keeps token ids; a sampler that is not the trained model itself
(vLLM) also keeps its own log-probs of them, to measure and correct the mismatch (engine/mismatch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
    (positions follow the attention mask, so extra left padding changes no row's result). The sampler's
    log-probs are kept when every batch has them."""
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


def decode(tokenizer, batch: Batch) -> list[str]:
    """Response texts without special tokens."""
    ids = batch.completion_ids.masked_fill(~batch.completion_mask, tokenizer.pad_token_id)
    return tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)

