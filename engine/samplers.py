"""Samplers: where the responses come from (rollout.engine), behind one seam the loops share.

A sampler answers two calls:
- `generate(prompt_ids, n, *, temperature, max_new_tokens)`: n responses to each prompt (rows
  i*n .. i*n+n-1 share prompt i) as a rollout.Batch; temperature 0 is greedy. A sampler that is not
  the trained model itself also returns its own log-probs of the sampled tokens (Batch.sampler_logprobs).
- `sync_weights(policy)`: make the sampler's weights the policy's; the seconds it took, or None for a
  sampler that samples from the policy object itself.

hf (the default, no extra dependency) runs transformers' generate on the policy: nothing to sync and
no mismatch to measure, so it keeps no log-probs. vllm (engine/vllm_sampler.py, the `vllm` extra) runs
vLLM in this process; the session syncs it after every optimizer step, and the update measures and
corrects the mismatch from its log-probs (engine/mismatch.py). The loops never know which runs.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import GenerationConfig

from fusedrl.engine.config import Config
from fusedrl.engine.rollout import Batch, concat, left_pad


class Sampler(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, *, temperature: float, max_new_tokens: int) -> Batch:
        ...

    def sync_weights(self, policy) -> float | None:
        ...

    def close(self) -> None:
        ...


def make_sampler(cfg: Config, model, tokenizer) -> Sampler:
    """The sampler that rollout.engine names, for `model` and its tokenizer."""
    if cfg.rollout.engine == "vllm":
        from fusedrl.engine.vllm_sampler import VLLMSampler  # the optional extra, imported only when used

        return VLLMSampler(cfg, model, tokenizer)
    return HFSampler(model, tokenizer, top_p=cfg.rollout.top_p, batch_size=cfg.rollout.batch_size)


class HFSampler:
    """transformers' generate on the policy, `batch_size` sequences per call, prompts left-padded."""

    def __init__(self, model, tokenizer, *, top_p: float, batch_size: int):
        self.model, self.tokenizer, self.top_p, self.batch_size = model, tokenizer, top_p, batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, *, temperature: float, max_new_tokens: int) -> Batch:
        model, tokenizer = self.model, self.tokenizer
        device = next(model.parameters()).device
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        greedy = temperature == 0
        config = GenerationConfig(do_sample=not greedy, temperature=None if greedy else temperature,
                                  top_p=None if greedy else self.top_p, top_k=0, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos, pad_token_id=pad, bos_token_id=tokenizer.bos_token_id)
        repeated = [p for p in prompt_ids for _ in range(n)]
        ids, mask = left_pad(repeated, pad, device)
        prompt_length = ids.shape[1]
        was_training = model.training
        model.eval()
        parts = []
        for start in range(0, len(repeated), self.batch_size):
            chunk_ids, chunk_mask = ids[start: start + self.batch_size], mask[start: start + self.batch_size]
            out = model.generate(input_ids=chunk_ids, attention_mask=chunk_mask, generation_config=config)
            parts.append(_split_response(out, chunk_mask, prompt_length, eos, pad))
        model.train(was_training)
        return concat(parts, pad)

    def sync_weights(self, policy) -> None:
        """Nothing to do: generate runs on the policy itself."""
        if policy is not self.model:
            raise ValueError("policy must be the model this sampler generates with")

    def close(self) -> None:
        pass


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
