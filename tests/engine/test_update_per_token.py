"""The shared policy update with per-token advantages [B, T] and a loss mask (PPO and SPO use both)."""

from types import SimpleNamespace

import pytest
import torch

from fusedrl.engine.distributed import World
from fusedrl.engine import rollout
from fusedrl.engine.config import load_config
from fusedrl.engine.optim import StepGuard
from fusedrl.engine.update import make_loss, update
from fusedrl.engine.model import load_policy


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.demo.hidden_size=32", "model.demo.num_layers=1",
                             "model.demo.intermediate_size=64"])
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    torch.manual_seed(1)
    prompts = tokenizer(["1+2=", "345+6=", "78+901="])["input_ids"]
    batch = rollout.generate(model, tokenizer, prompts, group_size=2, temperature=1.0, top_p=1.0,
                             max_new_tokens=10, batch_size=6)
    return model, batch


def _step(model, batch, advantages, loss_type, loss_mask=None, extra=()):
    """Parameter change of one SGD update (lr 1, no clipping), the model restored afterwards."""
    cfg = load_config(None, [f"loss.loss_type={loss_type}", "optim.max_grad_norm=0", "data.max_prompt_length=8",
                             "rollout.max_new_tokens=10", "optim.micro_batch_tokens=40", *extra])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    update(SimpleNamespace(cfg=cfg, model=model, reference=None, step_guard=StepGuard(1), world=World(), packed=False),
           make_loss(cfg), optimizer, scheduler, batch,
           advantages, loss_mask=loss_mask)
    delta = {k: start[k] - v for k, v in model.state_dict().items()}
    model.load_state_dict(start)
    return delta


def _assert_same(a, b):
    assert any(d.abs().max() > 0 for d in a.values())
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo"])
def test_per_token_advantages_equal_to_broadcast_sequence_advantages(setup, loss_type):
    model, batch = setup
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    per_token = adv[:, None].expand_as(batch.completion_ids).clone()
    _assert_same(_step(model, batch, adv, loss_type), _step(model, batch, per_token, loss_type))


@pytest.mark.parametrize("extra", [(), ("loss.top_entropy_fraction=0.3",)], ids=["all_tokens", "top_entropy"])
@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_loss_mask_removes_tokens_as_if_their_rows_were_absent(setup, loss_type, extra):
    """Masked tokens enter no statistic either: the top-entropy threshold is the kept tokens' quantile."""
    model, batch = setup
    adv = torch.randn(batch.completion_ids.shape)
    mask = torch.ones_like(batch.completion_mask)
    mask[4:] = False
    kept = torch.arange(4)
    _assert_same(_step(model, batch.rows(kept), adv[kept, : batch.rows(kept).completion_ids.shape[1]], loss_type,
                       extra=extra),
                 _step(model, batch, adv, loss_type, loss_mask=mask, extra=extra))
