"""Sampling seeded per prompt (rollout.generate with seeds, rollout.KeyedSampler): a response does not
depend on the batch it is drawn in, and the draws follow the tempered, top-p-cut softmax."""

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from fusedrl.engine.config import load_config
from fusedrl.engine.model import demo_model, demo_tokenizer
from fusedrl.engine.rollout import KeyedSampler, generate


def test_a_response_does_not_depend_on_its_batch():
    tokenizer = demo_tokenizer()
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1", "model.demo.num_heads=2",
                             "model.demo.intermediate_size=64"])
    model = demo_model(cfg.model, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in ("12+34=", "7+8=", "100+1=")]
    options = dict(group_size=3, temperature=1.0, top_p=0.9, max_new_tokens=12)
    together = generate(model, tokenizer, prompts, batch_size=9, seeds=[11, 12, 13], **options)
    alone = generate(model, tokenizer, prompts[1:2], batch_size=2, seeds=[12], **options)
    torch.manual_seed(0)  # the torch RNG plays no part
    again = generate(model, tokenizer, prompts[1:2], batch_size=1, seeds=[12], **options)
    lengths = together.lengths()[3:6]
    assert torch.equal(alone.lengths(), lengths) and torch.equal(again.lengths(), lengths)
    width = int(lengths.max())
    assert torch.equal(alone.completion_ids[:, :width], together.completion_ids[3:6, :width])
    assert torch.equal(again.completion_ids[:, :width], together.completion_ids[3:6, :width])
    # The three responses to one prompt are three different draws.
    assert len({tuple(r) for r in alone.completion_ids.tolist()}) > 1


def test_draws_follow_the_tempered_top_p_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    temperature, top_p, rows = 0.8, 0.8, 40000
    uniforms = torch.rand(rows, 1, generator=torch.Generator().manual_seed(3))
    sampler = KeyedSampler(uniforms, prompt_length=4, temperature=temperature, top_p=top_p)
    scores = sampler(torch.zeros(rows, 4, dtype=torch.long), logits.expand(rows, -1).clone())
    assert torch.equal((scores == 0).sum(1), torch.ones(rows, dtype=torch.long))
    drawn = scores.argmax(1)
    # The reference: transformers' own temperature and top-p warpers (what do_sample=True would draw from).
    # Here p = softmax(logits / 0.8) = [.647, .185, .099, .015, .053]: the top-p set is {0, 1} (0.832).
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits[None].double()))
    expected = torch.softmax(warped[0], 0)
    assert torch.equal(expected > 0, torch.tensor([True, True, False, False, False]))
    observed = torch.bincount(drawn, minlength=5).double() / rows
    assert torch.equal(observed > 0, expected > 0)
    assert torch.allclose(observed, expected, atol=0.01), (observed, expected)
