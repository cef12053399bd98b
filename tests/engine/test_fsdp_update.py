"""The pieces under FSDP2 on two gloo ranks, each against one process on the same rows: the fused
path's gradients (the output embedding gathered for the loss call, tied or not), and the shared update
when one rank holds no rows at all or the ranks hold rows of uneven lengths (engine/distributed.py)."""

from types import SimpleNamespace

import pytest
import torch
from spawn_helpers import run_ranks
from torch.distributed.tensor import DTensor
from transformers import LlamaConfig, LlamaForCausalLM

from fusedrl import FusedPolicyLoss
from fusedrl.engine import distributed
from fusedrl.engine.config import load_config
from fusedrl.engine.model import completion_hidden, output_projection
from fusedrl.engine.optim import StepGuard, make_optimizer
from fusedrl.engine.rollout import make_batch
from fusedrl.engine.update import make_loss, update

VOCAB, PAD = 37, 0
# Eight responses of uneven lengths; the first rows are the longest, so a split 5 / 3 gives one rank long
# rows and the other short ones.
RESPONSES = [[(7 * i + 3 * t) % (VOCAB - 1) + 1 for t in range(n)] for i, n in enumerate([11, 9, 8, 8, 6, 3, 2, 1])]
PROMPTS = [[(5 * i + t) % (VOCAB - 1) + 1 for t in range(2 + i % 3)] for i in range(8)]
ADVANTAGES = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5, -0.75])


def _model(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied, pad_token_id=PAD))


def _world(process_group) -> distributed.World:
    if process_group is None:
        return distributed.World()
    from torch.distributed.device_mesh import init_device_mesh

    rank, size = torch.distributed.get_rank(process_group), torch.distributed.get_world_size(process_group)
    return distributed.World(rank=rank, size=size, group=process_group, mesh=init_device_mesh("cpu", (size,)))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def fused_gradients(rows: list[int], tied: bool, process_group=None):
    """Gradients of every parameter (full tensors) after one dapo loss on `rows`, divided by the token
    count of all eight rows; and whether the loss saw the full, plain output embedding."""
    model, world = _model(tied), _world(process_group)
    if world.sharded:
        distributed.shard(model, world, torch.float32)
    batch = make_batch(PROMPTS, RESPONSES, [False] * 8, PAD, "cpu").rows(rows)
    hidden = completion_hidden(model, batch.input_ids, batch.attention_mask, batch.prompt_length,
                               batch.completion_ids.shape[1])
    weight, bias = output_projection(model)
    saw_full = not isinstance(weight, DTensor) and tuple(weight.shape) == (VOCAB, 16) and bias is None
    loss_fn = FusedPolicyLoss(loss_type="dapo", process_group=process_group)
    loss, _ = loss_fn(batch.completion_ids, batch.completion_mask, ADVANTAGES[rows], hidden=hidden, weight=weight,
                      num_items_in_batch=sum(map(len, RESPONSES)))
    loss.backward()
    return {name: _full(p.grad) for name, p in model.named_parameters()}, saw_full


SPLITS = {"one_rank_empty": [list(range(8)), []], "uneven": [[0, 1, 2, 3, 4], [5, 6, 7]]}


@pytest.fixture(scope="module")
def ranks():
    """Every two-rank job of this file, in one spawn (its imports are most of the cost)."""
    jobs = [(fused_gradients, [([0, 1, 2, 3, 4], tied), ([5, 6, 7], tied)], {}) for tied in (True, False)]
    jobs += [(updated, [(split[0],), (split[1],)], {}) for split in SPLITS.values()]
    results = run_ranks(2, jobs)
    return {"tied": results[0], "untied": results[1]} | dict(zip(SPLITS, results[2:]))


@pytest.mark.parametrize("tied", [True, False])
def test_fused_path_gradients_under_fsdp_equal_unsharded(ranks, tied):
    expected, saw_full = fused_gradients(list(range(8)), tied)
    assert saw_full and ("lm_head.weight" in expected) != tied  # a tied head is the embedding
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert expected[head].abs().sum() > 0
    for grads, saw_full in ranks["tied" if tied else "untied"]:
        assert saw_full and grads.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-5, atol=1e-7, msg=name)


OVERRIDES = ["data.max_prompt_length=8", "rollout.max_new_tokens=12", "loss.top_entropy_fraction=0.5", "loss.cov_mode=clip_cov", "loss.cov_ratio=0.3", "loss.cov_lower=-10",
             "loss.cov_upper=10", "optim.mini_batches=2", "optim.updates_per_batch=2", "optim.micro_batch_tokens=24",
             "optim.max_grad_norm=0.5"]


def updated(rows: list[int], process_group=None):
    """The update's metrics and the weights after it, on `rows` of the batch (none: batch=None)."""
    model, world = _model(tied=True), _world(process_group)
    if world.sharded:
        distributed.shard(model, world, torch.float32)
    cfg = load_config(None, OVERRIDES)
    session = SimpleNamespace(cfg=cfg, model=model, reference=None, world=world, device=torch.device("cpu"),
                              tokenizer=SimpleNamespace(pad_token_id=PAD), step_guard=StepGuard(1), packed=False)
    optimizer = make_optimizer(model.parameters(), sharded=world.sharded, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    batch = make_batch(PROMPTS, RESPONSES, [False] * 8, PAD, "cpu").rows(rows) if rows else None
    torch.manual_seed(1)  # the mini-batch permutation and Clip-Cov's draw: the same on every rank
    metrics = update(session, make_loss(cfg, process_group), optimizer, scheduler, batch,
                     ADVANTAGES[rows] if rows else None)
    return metrics, {name: _full(p).detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("split", list(SPLITS))
def test_update_on_two_ranks_equals_one_process(ranks, split):
    metrics, weights = updated(list(range(8)))
    assert metrics["mask/top_entropy"] < 1 and metrics["mask/cov"] > 0 and metrics["grad_norm"] > 0
    for metrics_2, weights_2 in ranks[split]:
        assert metrics_2.keys() == metrics.keys()
        for key, value in metrics.items():
            assert metrics_2[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
        for name, value in weights.items():
            torch.testing.assert_close(weights_2[name], value, rtol=1e-5, atol=1e-6, msg=name)
