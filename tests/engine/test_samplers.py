"""The sampler seam without vLLM: the hf sampler's layout and contract, and the rollout.engine keys
(vllm's own tests are tests/engine/test_vllm.py, run by scripts/test_vllm.sh)."""

import importlib.util

import pytest
import torch

from fusedrl.engine.config import load_config
from fusedrl.engine.errors import ConfigError
from fusedrl.engine.model import load_policy
from fusedrl.engine.rollout import concat, make_batch
from fusedrl.engine.samplers import HFSampler, make_sampler


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1",
                             "model.demo.intermediate_size=64"])
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    return cfg, model, tokenizer


def test_hf_is_the_default_and_shares_the_policy(policy):
    cfg, model, tokenizer = policy
    sampler = make_sampler(cfg, model, tokenizer)
    assert isinstance(sampler, HFSampler) and sampler.model is model
    assert sampler.sync_weights(model) is None  # nothing to copy, nothing logged
    with pytest.raises(ValueError, match="policy must be the model"):
        sampler.sync_weights(torch.nn.Linear(1, 1))


def test_hf_groups_are_adjacent_and_keep_no_logprobs(policy):
    cfg, model, tokenizer = policy
    prompts = tokenizer(["1+2=", "345+6="])["input_ids"]
    torch.manual_seed(3)
    batch = HFSampler(model, tokenizer, top_p=1.0, batch_size=3).generate(prompts, 3, temperature=0,
                                                                         max_new_tokens=5)
    assert batch.sampler_logprobs is None
    # Greedy: the 3 responses to one prompt are equal, and a group's rows are adjacent.
    rows = batch.completion_ids.tolist()
    assert rows[0] == rows[1] == rows[2] and rows[3] == rows[4] == rows[5]
    ids = batch.input_ids[:, : batch.prompt_length]
    assert ids[0, -len(prompts[0]):].tolist() == prompts[0] and ids[3, -len(prompts[1]):].tolist() == prompts[1]


def test_sampler_logprobs_follow_rows_and_concat(policy):
    """rows() and concat() carry the sampler's log-probs with their tokens; a batch without them makes the
    concatenation keep none."""
    a = make_batch([[5, 5], [6]], [[1, 2, 3], [4]], [True, False], 0, "cpu", [[-1.0, -2.0, -3.0], [-4.0]])
    b = make_batch([[7]], [[8, 9]], [True], 0, "cpu", [[-8.0, -9.0]])
    assert a.rows([1]).sampler_logprobs.tolist() == [[-4.0]]
    both = concat([a, b], 0)
    assert both.sampler_logprobs.tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0], [-8.0, -9.0, 0.0]]
    assert concat([a, make_batch([[7]], [[8]], [True], 0, "cpu")], 0).sampler_logprobs is None


def test_vllm_without_the_extra_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'rollout.engine'.*pip install 'fusedrl\[vllm\]'"):
        load_config(None, ["rollout.engine=vllm"])


@pytest.mark.parametrize("override, key", [
    ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.correction=clip", "rollout.correction"),
    ("rollout.correction_cap=1", "rollout.correction_cap"),
])
def test_bad_engine_keys(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


@pytest.mark.parametrize("kept", [["rollout.top_p=0.9"], ["rollout.top_k=20"]])
def test_vllm_with_a_kept_set_needs_train_on_sampler(monkeypatch, kept):
    """vLLM's log-probs are of its top-k / top-p kept set: the loss must be too (rollout.train_on=sampler,
    the default); full softmax log-probs against them are refused, with hf allowed (no sampler log-probs)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^config key 'rollout.train_on': must be sampler with rollout.engine=vllm"):
        load_config(None, ["rollout.engine=vllm", "rollout.train_on=full", *kept])
    assert load_config(None, ["rollout.engine=vllm", *kept]).rollout.train_on == "sampler"
    assert load_config(None, ["rollout.engine=vllm", "rollout.train_on=full"]).rollout.top_p == 1.0
    assert load_config(None, ["rollout.engine=hf", "rollout.train_on=full", *kept]).rollout.train_on == "full"


@pytest.mark.parametrize("override, key, message", [
    ("rollout.top_k=-1", "rollout.top_k", "must be >= 0; got -1"),
    ("rollout.top_k=2.5", "rollout.top_k", ""),
    ("rollout.top_p=0", "rollout.top_p", "must be in (0, 1]; got 0"),
    ("rollout.train_on=vllm", "rollout.train_on", "must be one of sampler, full; got 'vllm'"),
])
def test_bad_kept_set_keys(override, key, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert str(error.value).startswith(f"config key '{key}': {message}")
