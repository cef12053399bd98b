"""vLLM as the engine's sampler, in this process, next to the trainer (rollout.engine=vllm; docs/vllm.md).

Start-up: vLLM is built from the policy's config and tokenizer written to a temporary directory, with
dummy weights (load_format="dummy"); the session then pushes the policy's weights through
`sync_weights`, the same call that follows every optimizer step. So a fresh, warm-started or resumed
policy reaches vLLM one way, and no weights are ever written for it. The engine runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so a sync hands vLLM's loader the policy's tensors by reference,
one at a time, converted to vLLM's dtype (`reload_weights`, vLLM's in-place reload, checked on 0.32).

Sampling: one request per response, each seeded (from the prompt's seed as the HF sampler derives its
streams, or else from torch's generator), so that a run and its resume sample the same tokens; vLLM
returns each sampled token's log-prob after temperature (logprobs_mode="processed_logprobs"), the
quantity the trainer's fused log-probs recompute. With rollout.top_k / top_p those are log-probs of
vLLM's kept set, renormalised; the loss then computes its own over the same set (rollout.train_on=sampler,
which the config requires here; docs/vllm.md states where vLLM's set and the kernels' can differ).

Memory: the KV cache has a fixed size (rollout.vllm.kv_cache_gib, vLLM's kv_cache_memory_bytes). On a
GPU with rollout.vllm.sleep, vLLM sleeps between rollouts (level 1: weights offloaded to host memory,
KV cache freed) so that the trainer has the memory while it updates.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time

import torch

from fusedrl.engine.checkpoint import rng_state, set_rng_state
from fusedrl.engine.config import Config, sampler_kept_set
from fusedrl.engine.model import DTYPES
from fusedrl.engine.rollout import Batch, derive_seed, make_batch

_GIB = 1 << 30


class VLLMSampler:
    def __init__(self, cfg: Config, model, tokenizer):
        # In-process engine: weight syncs pass tensors by reference instead of pickling them to a worker.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        self.tokenizer = tokenizer
        self.top_k, self.top_p = sampler_kept_set(cfg.rollout)  # None where off
        self.device = next(model.parameters()).device
        self.dtype = DTYPES[cfg.model.dtype]
        settings = cfg.rollout.vllm
        self.sleeps = settings.sleep and self.device.type == "cuda"
        self._asleep = False
        self._dir = tempfile.TemporaryDirectory(prefix="fusedrl-vllm-")
        model.config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        # In this process vLLM seeds python's, numpy's and torch's global generators with its seed; the
        # run's own states are put back, so that starting vLLM leaves the run's random streams as they were.
        rng = rng_state()
        self.llm = LLM(model=self._dir.name, dtype=self.dtype, load_format="dummy", seed=cfg.run.seed,
                       max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                       kv_cache_memory_bytes=int(settings.kv_cache_gib * _GIB), enforce_eager=settings.enforce_eager,
                       logprobs_mode="processed_logprobs", generation_config="vllm",
                       enable_sleep_mode=self.sleeps)
        set_rng_state(rng)

    def generate(self, prompt_ids: list[list[int]], n: int, *, temperature: float, max_new_tokens: int,
                 seeds: list[int] | None = None) -> Batch:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._wake()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        prompts = [p for p in prompt_ids for _ in range(n)]
        if seeds is None:
            request_seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        else:  # the HF sampler's per-response streams; vLLM takes seeds below 2**63
            request_seeds = [derive_seed(seed, j) % 2**63 for seed in seeds for j in range(n)]
        # vLLM's own "off" values: top_k 0, top_p 1 (and greedy requests ignore both).
        kept = dict(top_k=self.top_k or 0, top_p=self.top_p or 1.0)
        params = [SamplingParams(temperature=temperature, **kept, max_tokens=max_new_tokens, logprobs=0, seed=seed,
                                 stop_token_ids=[eos], detokenize=False) for seed in request_seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            responses.append(ids)
            logprobs.append([step[token].logprob for token, step in zip(ids, sample.logprobs)])
        if self.sleeps:
            self.llm.sleep(level=1)
            self._asleep = True
        return make_batch(prompts, responses, [not r or r[-1] != eos for r in responses], pad, self.device,
                          logprobs)

    def sync_weights(self, policy) -> float:
        """Copies the policy's weights into vLLM's model in place; returns the seconds it took."""
        start = time.perf_counter()
        self._wake()
        weights = ((name, tensor.detach().to(self.dtype)) for name, tensor in policy.state_dict().items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # vLLM's prefix cache holds keys and values of the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Frees vLLM's engine and its memory, so that another can start in this process."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        del self.llm
        destroy_model_parallel()
        destroy_distributed_environment()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._dir.cleanup()
