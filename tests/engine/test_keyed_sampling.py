"""Sampling seeded per prompt (rollout.generate with seeds, rollout.KeyedSampler): a response does not
depend on the batch it is drawn in. The draws' distribution (the kept set of top_k / top_p) is tested in
test_kept_set_sampling.py."""

import torch

from fusedrl.engine.config import load_config
from fusedrl.engine.model import demo_model, demo_tokenizer
from fusedrl.engine.rollout import generate


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
