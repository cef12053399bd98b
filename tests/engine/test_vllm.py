"""vLLM as the sampler, against transformers' generate and the trainer's fused log-probs, on a tiny fp32
Llama (real vLLM CPU build; run by scripts/test_vllm.sh, skipped only where vllm is not installed)."""

import pytest
import torch

pytest.importorskip("vllm")

from fusedrl.engine.config import load_config  # noqa: E402
from fusedrl.engine.model import load_policy, token_logprobs  # noqa: E402
from fusedrl.engine.samplers import HFSampler, make_sampler  # noqa: E402

# vLLM's CPU attention takes head sizes of 32 and up: 64 wide, 2 heads.
TINY = ["rollout.engine=vllm", "model.demo.hidden_size=64", "model.demo.num_layers=2", "model.demo.num_heads=2",
        "model.demo.intermediate_size=128", "data.max_prompt_length=16", "rollout.max_new_tokens=24",
        "rollout.vllm.kv_cache_gib=0.05"]
PROMPTS = ["1+2=", "345+6=", "78+901=", "5+5=", "12+34="]


@pytest.fixture(scope="module")
def engines():
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    with torch.no_grad():
        # Peaked distributions: a freshly initialised model's near-uniform logits leave greedy decoding
        # to ties that float rounding decides.
        for p in model.parameters():
            p.mul_(8.0)
    before = torch.get_rng_state()
    sampler = make_sampler(cfg, model, tokenizer)
    started_unseeded = torch.equal(torch.get_rng_state(), before)
    sampler.sync_weights(model)
    yield model, tokenizer, sampler, started_unseeded
    sampler.close()


def _hf(model, tokenizer, prompts, n, **kwargs):
    return HFSampler(model, tokenizer, top_p=1.0, batch_size=64).generate(prompts, n, **kwargs)


def _assert_same_batch(a, b):
    assert a.prompt_length == b.prompt_length
    for key in ("input_ids", "attention_mask", "completion_ids", "completion_mask", "truncated"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def test_greedy_equals_hf_before_and_after_a_weight_sync(engines):
    """Same Batch tensors as transformers' greedy generate, responses that end and responses cut at
    max_new_tokens alike; after the policy changes, a sync makes vLLM follow it."""
    model, tokenizer, sampler, _ = engines
    prompts = tokenizer(PROMPTS)["input_ids"]
    before = sampler.generate(prompts, 2, temperature=0, max_new_tokens=24)
    _assert_same_batch(before, _hf(model, tokenizer, prompts, 2, temperature=0, max_new_tokens=24))
    assert before.truncated.any() and not before.truncated.all()  # both kinds of row are compared
    assert before.sampler_logprobs.shape == before.completion_ids.shape
    start = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        seconds = sampler.sync_weights(model)
        assert seconds > 0
        after = sampler.generate(prompts, 2, temperature=0, max_new_tokens=24)
        _assert_same_batch(after, _hf(model, tokenizer, prompts, 2, temperature=0, max_new_tokens=24))
        assert not torch.equal(after.completion_ids, before.completion_ids)  # the sync took effect
    finally:
        model.load_state_dict(start)
        sampler.sync_weights(model)


def test_sampled_layout_and_logprobs_agree_with_the_trainer(engines):
    """Sampled at temperature 0.7: groups adjacent, masks ending at the end token, and vLLM's log-probs
    of the sampled tokens equal the trainer's fused ones (same temperature) to fp32 rounding: at most
    1e-3 per token (logits here reach a few hundred, where fp32 spacing is ~3e-5) and 1e-4 on average."""
    model, tokenizer, sampler, _ = engines
    prompts = tokenizer(PROMPTS)["input_ids"]
    torch.manual_seed(1)
    batch = sampler.generate(prompts, 4, temperature=0.7, max_new_tokens=24)
    eos = tokenizer.eos_token_id
    assert len(batch) == 4 * len(PROMPTS)
    for i, ids in enumerate(batch.completion_ids.tolist()):
        n = int(batch.completion_mask[i].sum())
        prompt = prompts[i // 4]
        assert batch.input_ids[i, batch.prompt_length - len(prompt): batch.prompt_length].tolist() == prompt
        assert (ids[n - 1] == eos) != bool(batch.truncated[i]) and eos not in ids[: n - 1]
    trainer, _ = token_logprobs(model, batch, 0.7)
    diff = (trainer - batch.sampler_logprobs).abs()[batch.completion_mask]
    assert diff.max() <= 1e-3 and diff.mean() <= 1e-4, (diff.max(), diff.mean())
    assert (batch.sampler_logprobs[~batch.completion_mask] == 0).all()
    # Seeds come from torch's generator: the same state samples the same responses.
    torch.manual_seed(1)
    assert torch.equal(sampler.generate(prompts, 4, temperature=0.7, max_new_tokens=24).completion_ids,
                       batch.completion_ids)


def test_kept_set_logprobs_agree_with_the_trainers(engines, monkeypatch):
    """With top_k = 20 and top_p = 0.9, vLLM's log-probs (of its renormalised kept set) equal the trainer's
    fused kept-set log-probs of the sampled tokens: every sampled token is in the kernels' kept set, and
    the two agree to fp32 rounding, while the full softmax's differ by the mass the set dropped. On the
    unscaled model (near-uniform over 101 tokens at T = 1), so that both top-k and top-p cut."""
    model, tokenizer, sampler, _ = engines
    monkeypatch.setattr(sampler, "top_k", 20)
    monkeypatch.setattr(sampler, "top_p", 0.9)
    prompts = tokenizer(PROMPTS)["input_ids"]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.div_(8.0)
        sampler.sync_weights(model)
        torch.manual_seed(2)
        batch = sampler.generate(prompts, 4, temperature=1.0, max_new_tokens=24)
        mask = batch.completion_mask
        trainer, _ = token_logprobs(model, batch, 1.0, top_k=20, top_p=0.9)
        assert torch.isfinite(trainer[mask]).all()
        diff = (trainer - batch.sampler_logprobs).abs()[mask]
        assert diff.max() <= 1e-4 and diff.mean() <= 1e-5, (diff.max(), diff.mean())
        full, _ = token_logprobs(model, batch, 1.0)
        assert (batch.sampler_logprobs - full)[mask].mean() > 0.1
    finally:
        model.load_state_dict(start)
        sampler.sync_weights(model)


def test_starting_vllm_leaves_torchs_generator_alone(engines):
    """In-process vLLM seeds the global generators with its own seed; the sampler puts the run's back."""
    assert engines[3]
