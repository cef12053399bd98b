"""Checkpoint state files: what a GPU run writes loads on any machine."""

import torch

from fusedrl.engine import checkpoint


def test_state_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """A GPU run's optimizer states are CUDA tensors; without map_location torch.load puts them back on
    CUDA (here: refuses, having none). load_state hands them to optimizer.load_state_dict on the CPU."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}
    # Every storage saved as if it lived on cuda:0, as on the GPU that ran the loop.
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / checkpoint.STATE_FILE)
    loaded = checkpoint.load_state(tmp_path)
    exp_avg = loaded["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.device.type == "cpu"
    assert torch.equal(exp_avg, optimizer.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(loaded["optimizer"])
    checkpoint.set_rng_state(loaded["rng"])
