"""Samplers: where the responses come from (rollout.engine), behind one seam the loops share.

A sampler answers two calls:
- `generate(prompt_ids, n, *, temperature, max_new_tokens, seeds=None)`: n responses to each prompt
  (rows i*n .. i*n+n-1 share prompt i) as a rollout.Batch; temperature 0 is greedy; with `seeds` (one
  per prompt) response j of prompt i samples from its own stream, derive_seed(seeds[i], j). A sampler
  that is not the trained model itself also returns its own log-probs of the sampled tokens
  (Batch.sampler_logprobs).
- `sync_weights(policy)`: make the sampler's weights the policy's; the seconds it took, or None for a
  sampler that samples from the policy object itself.
- `generating()`: the context a run's generate calls sit in. Under FSDP2 the HF sampler gathers the
  policy for it (ranks may run different numbers of forwards); vLLM holds its own full weights and
  needs nothing, so the policy stays sharded while it samples.

hf (the default, no extra dependency) runs transformers' generate on the policy: nothing to sync and
no mismatch to measure, so it keeps no log-probs. vllm (engine/vllm_sampler.py, the `vllm` extra) runs
vLLM in this process; the session syncs it after every optimizer step, and the update measures and
corrects the mismatch from its log-probs (engine/mismatch.py). The loops never know which runs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

from fusedrl.engine import distributed, rollout
from fusedrl.engine.config import Config
from fusedrl.engine.rollout import Batch


class Sampler(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, *, temperature: float, max_new_tokens: int,
                 seeds: list[int] | None = None) -> Batch:
        ...

    def sync_weights(self, policy) -> float | None:
        ...

    def generating(self) -> AbstractContextManager:
        ...

    def close(self) -> None:
        ...


def make_sampler(cfg: Config, model, tokenizer) -> Sampler:
    """The sampler that rollout.engine names, for `model` and its tokenizer."""
    if cfg.rollout.engine == "vllm":
        from fusedrl.engine.vllm_sampler import VLLMSampler  # the optional extra, imported only when used

        return VLLMSampler(cfg, model, tokenizer)
    return HFSampler(model, tokenizer, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                     batch_size=cfg.rollout.batch_size)


class HFSampler:
    """transformers' generate on the policy (rollout.generate), `batch_size` sequences per call, drawing
    from the kept set of top_k / top_p (rollout.kept_logits: the fused ops' rules)."""

    def __init__(self, model, tokenizer, *, top_p: float, batch_size: int, top_k: int | None = None):
        self.model, self.tokenizer, self.top_p, self.top_k, self.batch_size = model, tokenizer, top_p, top_k, batch_size

    def generate(self, prompt_ids: list[list[int]], n: int, *, temperature: float, max_new_tokens: int,
                 seeds: list[int] | None = None) -> Batch:
        return rollout.generate(self.model, self.tokenizer, prompt_ids, group_size=n, temperature=temperature,
                                top_p=self.top_p, top_k=self.top_k, max_new_tokens=max_new_tokens,
                                batch_size=self.batch_size, seeds=seeds)

    def sync_weights(self, policy) -> None:
        """Nothing to do: generate runs on the policy itself."""
        if policy is not self.model:
            raise ValueError("policy must be the model this sampler generates with")

    def generating(self) -> AbstractContextManager:
        return distributed.gathered(self.model)

    def close(self) -> None:
        pass
