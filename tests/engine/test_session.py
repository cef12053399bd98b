"""The run's set-up: the frozen reference is the policy RL starts from."""

import torch

from fusedrl.engine.config import load_config
from fusedrl.engine.session import Session


def test_reference_is_the_warm_started_policy(tmp_path):
    cfg = load_config(None, [
        f"run.output_dir={tmp_path}", "run.progress=false", "run.tensorboard=false", "run.plots=false",
        "model.reference=policy", "model.demo.hidden_size=32", "model.demo.num_layers=1",
        "model.demo.num_heads=2", "model.demo.intermediate_size=64", "data.train_size=32",
        "data.eval_size=4", "warm_start.steps=3", "warm_start.batch_size=8", "rollout.max_new_tokens=8",
    ])
    session = Session(cfg)
    initial = {k: v.clone() for k, v in session.model.state_dict().items()}
    session.prepare()
    policy, reference = session.model.state_dict(), session.reference.state_dict()
    # The warm start moved the policy, and the reference followed it: a copy of the untrained model
    # would charge a KL of several nats per token from the first RL step.
    assert any(not torch.equal(initial[k], policy[k]) for k in policy)
    for name, value in policy.items():
        assert torch.equal(reference[name], value), name
    assert not any(p.requires_grad for p in session.reference.parameters())
