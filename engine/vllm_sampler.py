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

Under torchrun (engine/distributed.py) every rank runs its own engine on its share of the prompts, in
vLLM's torchrun mode over the trainer's process group, and a sync gathers the FSDP2 policy one parameter
at a time as vLLM consumes them (docs/vllm.md, "Under torchrun with FSDP2").

Memory: the KV cache has a fixed size (rollout.vllm.kv_cache_gib, vLLM's kv_cache_memory_bytes). On a
GPU with rollout.vllm.sleep, vLLM sleeps between rollouts (level 1: weights offloaded to host memory,
KV cache freed) so that the trainer has the memory while it updates.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from unittest import mock

import torch
import torch.distributed as dist

from fusedrl.engine import distributed
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
        # Under torchrun the trainer's process group exists already: vLLM's torchrun mode takes it as its
        # world (rank and device from RANK and LOCAL_RANK) and makes its own one-rank tensor-parallel groups
        # in it, so every rank runs an engine of its own on its own prompts (docs/vllm.md).
        self._in_trainer_group = dist.is_initialized()
        launcher = {"distributed_executor_backend": "external_launcher"} if self._in_trainer_group else {}
        self.llm = LLM(model=self._dir.name, dtype=self.dtype, load_format="dummy", seed=cfg.run.seed,
                       max_model_len=cfg.data.max_prompt_length + cfg.rollout.max_new_tokens,
                       kv_cache_memory_bytes=int(settings.kv_cache_gib * _GIB), enforce_eager=settings.enforce_eager,
                       logprobs_mode="processed_logprobs", generation_config="vllm",
                       enable_sleep_mode=self.sleeps, **launcher)
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
        # One parameter at a time, in module order: vLLM buffers a layer's tensors only until that layer is
        # complete, so an FSDP2 policy is never gathered whole (docs/vllm.md, "Under torchrun with FSDP2").
        # A tied output embedding goes under its own name too: without it vLLM 0.32's in-place reload kept
        # the old output embedding (greedy output then differed from the policy's).
        weights = distributed.full_parameters(policy, self.dtype, self.device)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # vLLM's prefix cache holds keys and values of the old weights.
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start

    def generating(self) -> AbstractContextManager:
        return nullcontext()

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Frees vLLM's engine and its memory, so that another can start in this process."""
        # Shut down now, not whenever the garbage collector finds the engine: vLLM's in-process shutdown
        # tears down torch.distributed state, which must not hit a later engine of this process.
        with _keeping_default_group() if self._in_trainer_group else nullcontext():
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._dir.cleanup()


@contextmanager
def _keeping_default_group():
    """vLLM's in-process shutdown ends by destroying torch's default process group (vllm 0.32:
    EngineCore.shutdown -> cleanup_dist_env_and_memory -> destroy_distributed_environment,
    vllm/distributed/parallel_state.py), which under torchrun is the trainer's. Meanwhile only the calls
    that name a group, those of the groups vLLM made over it, go through."""
    destroy = dist.destroy_process_group
    with mock.patch.object(dist, "destroy_process_group", lambda group=None: None if group is None else destroy(group)):
        yield
