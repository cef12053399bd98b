"""Packed micro-batches (engine/packing.py): the bin packing, a packed row's log-probs against each
sequence run alone, the attention of the packing path, and what the update allocates."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.distributed import World
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.errors import UsageError
from fusedrl.engine.model import packed_hidden, packed_token_logprobs, token_logprobs
from fusedrl.engine.packing import SequenceLengths, balanced_bins, pack, packing_refusal, use_packing
from fusedrl.engine.update import make_loss, micro_batches, update
from fusedrl.kernels import torch_backend


@pytest.mark.parametrize("lengths, budget, expected", [
    # LPT by hand: 7 -> row 0, 5 -> row 1, 4 -> row 1 (9), 4 -> row 0 (11), 3 -> row 1 (12), 1 -> row 0 (12).
    ([7, 5, 4, 4, 3, 1], 12, [[0, 3, 5], [1, 2, 4]]),
    # 20 tokens need 3 rows of 9 by the count, but three 5s cannot share: LPT retries with 4.
    ([5, 5, 5, 5], 9, [[0], [1], [2], [3]]),
    # Longer than the budget: a row of its own; the rest packs as usual.
    ([3, 20, 3, 4], 10, [[1], [0, 2, 3]]),
    ([2, 2, 2], 100, [[0, 1, 2]]),
])
def test_balanced_bins_by_hand(lengths, budget, expected):
    assert balanced_bins(lengths, budget) == expected


def test_balanced_bins_cover_every_sequence_within_the_budget():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(200, generator=gen) * 0.8 + 5).long().clamp(min=1).tolist()
    budget = 2 * max(lengths)
    rows = balanced_bins(lengths, budget)
    assert sorted(i for row in rows for i in row) == list(range(200))
    loads = [sum(lengths[i] for i in row) for row in rows]
    assert max(loads) <= budget
    # Balanced: no row is less than half as full as the fullest (first-fit-decreasing leaves a near-empty one).
    assert min(loads) > max(loads) / 2
    assert len(rows) <= -(-sum(lengths) * 4 // (3 * budget)) + 1


def test_balanced_bins_reject_a_bad_budget():
    with pytest.raises(ValueError, match="budget"):
        balanced_bins([1, 2], 0)


def _qwen2(vocab=1000, hidden=16, intermediate=24):
    """A tiny Qwen2 with grouped-query attention (4 query heads, 2 key-value heads) and q/k/v biases."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def _ragged(vocab, prompts=(3, 30, 11, 7), responses=(40, 2, 17, 1), pad=0):
    """A batch of very different prompt and response lengths in the engine's padded layout."""
    gen = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, vocab, (p + r,), generator=gen).tolist() for p, r in zip(prompts, responses)]
    return rollout.make_batch([s[:p] for s, p in zip(ids, prompts)], [s[p:] for s, p in zip(ids, prompts)],
                              [False] * len(prompts), pad, "cpu")


@pytest.mark.parametrize("make", [_qwen2, lambda: _demo_llama()], ids=["qwen2_gqa", "llama_demo"])
def test_a_packed_row_gives_each_sequence_its_own_logprobs(make):
    """Every response token's lp and H from one packed row equal those of its sequence run alone (no
    padding, no neighbour): positions restart and attention stays inside each sequence."""
    model = make()
    assert use_packing(model, "packed", "tiny")
    batch = _ragged(model.config.vocab_size)
    micro = pack(batch, torch.tensor([2, 0, 3, 1]), SequenceLengths.of(batch))
    sizes = [11 + 17, 3 + 40, 7 + 1, 30 + 2]
    assert micro.position_ids[0].tolist() == [t for n in sizes for t in range(n)]
    lp, h, flat = packed_token_logprobs(model, micro, temperature=0.7)
    for i, row in enumerate(micro.rows.tolist()):
        alone = batch.rows(torch.tensor([row]))
        assert alone.attention_mask.all()  # trimmed to the sequence itself: nothing padded
        lp_alone, h_alone = token_logprobs(model, alone, temperature=0.7)
        n = int(alone.completion_mask.sum())
        mine = (flat // micro.width) == i
        assert (flat[mine] % micro.width).tolist() == list(range(n))
        torch.testing.assert_close(lp[mine], lp_alone[0, :n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[mine], h_alone[0, :n], rtol=1e-5, atol=1e-6)


def _demo_llama():
    from fusedrl.engine.model import demo_model, demo_tokenizer

    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=2", "model.demo.intermediate_size=64"])
    return demo_model(cfg.model, demo_tokenizer())


def test_generate_and_padded_rows_are_unchanged_by_the_packing_attention():
    """The packing attention hands every call without boundaries to transformers' SDPA: left-padded
    forwards and generate give what the model gave before."""
    model = _qwen2()
    batch = _ragged(model.config.vocab_size)
    before = token_logprobs(model, batch, temperature=1.0)
    torch.manual_seed(3)
    sampled = model.generate(batch.input_ids[:, : batch.prompt_length], attention_mask=batch.attention_mask[:, : batch.prompt_length],
                             max_new_tokens=5, do_sample=True, pad_token_id=0)
    use_packing(model, "packed", "tiny")
    after = token_logprobs(model, batch, temperature=1.0)
    torch.manual_seed(3)
    again = model.generate(batch.input_ids[:, : batch.prompt_length], attention_mask=batch.attention_mask[:, : batch.prompt_length],
                           max_new_tokens=5, do_sample=True, pad_token_id=0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert torch.equal(sampled, again)


def test_a_packed_forward_without_the_packing_attention_is_refused():
    model = _qwen2()
    batch = _ragged(model.config.vocab_size)
    with pytest.raises(ValueError, match="use_packing"):
        packed_hidden(model, pack(batch, torch.arange(4), SequenceLengths.of(batch)))


def test_models_that_cannot_pack_are_refused_by_name():
    sliding = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, sliding_window=8))
    assert "sliding" in packing_refusal(sliding)
    with pytest.raises(UsageError, match="'my/mistral' \\(MistralForCausalLM\\).*sliding.*micro_batch_layout=padded"):
        use_packing(sliding, "packed", "my/mistral")
    assert use_packing(sliding, "auto", "my/mistral") is False  # auto falls back to padded rows
    assert sliding.config._attn_implementation == "sdpa"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    assert packing_refusal(gpt2) is None and use_packing(gpt2, "auto", "gpt2")
    assert use_packing(_qwen2(), "padded", "tiny") is False


class _LargeTensors(TorchDispatchMode):
    """Records the shape of every tensor an op creates that has two dimensions of at least `size`:
    [tokens x vocab] logits and [tokens x tokens] attention scores or masks, but not [tokens x width]
    activations or [vocab x width] weights (every width of the test model is below `size`)."""

    def __init__(self, size):
        super().__init__()
        self.size, self.found = size, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and sum(d >= self.size for d in t.shape) >= 2:
                self.found.add((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_packed_update_allocates_nothing_of_tokens_by_vocab_or_tokens_by_tokens(layout, monkeypatch):
    """The whole update (old log-probs, the top-entropy selection pass, the loss, backward with gradient
    checkpointing, the optimizer step), recorded op by op. Padded, transformers' SDPA builds the
    [rows, 1, L, L] mask of the padded rows: the recorder finds it, so it would find one packed too."""
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_COLS", 128)  # the fused op's chunks: 16 tokens x 128 ids
    monkeypatch.setattr(torch_backend, "LINEAR_CHUNK_ELEMENTS", 128 * 16)
    model = _qwen2(vocab=1000, hidden=16, intermediate=24)
    use_packing(model, "packed", "tiny")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prompts, responses = (30, 45, 33, 40), (60, 35, 90, 31)
    batch = _ragged(model.config.vocab_size, prompts, responses)
    shortest = min(p + r for p, r in zip(prompts, responses))  # 71: above every width (16, 24, 16 chunk rows)
    cfg = load_config(None, ["loss.loss_type=grpo", "loss.top_entropy_fraction=0.5", "optim.updates_per_batch=2",
                             "optim.micro_batch_tokens=240", "data.max_prompt_length=45",
                             "rollout.max_new_tokens=90", "rollout.temperature=0.7"])
    packed = layout == "packed"
    plan = micro_batches(batch, torch.arange(4), 240, packed)
    assert max(map(len, plan)) == 2  # micro-batches of two sequences
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, packed=packed, step_guard=StepGuard(1), world=World())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    with _LargeTensors(shortest) as recorder:
        update(session, make_loss(cfg), optimizer, scheduler, batch, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    if packed:
        assert recorder.found == set()
    else:
        assert any(shape[-2:] == (shape[-1], shape[-1]) for _, shape in recorder.found)
