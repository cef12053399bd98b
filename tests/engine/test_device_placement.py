"""Every training loop on a second device: the model, its batches and every tensor derived from them on
`fakegpu` (tests/fake_device.py), where combining them with CPU tensors fails as it would on CUDA.

The project was written on CPU-only machines, where a tensor created without `device=` is always on the
right device; these runs are where such a tensor shows up, on the line a GPU run would fail on.
"""

import dataclasses
import json
import math

import pytest
import torch

from _tiny_run import REWARD_MODULE, TINY

from fusedrl.engine.config import load_config
from fusedrl.engine.train import train

# The tiny runs of the loop tests, with the warm start, the demo's top-entropy loss (its batch-wide masks)
# and small micro-batches switched back on, so that every path meets the device.
DEVICE_RUN = [*TINY, "warm_start.steps=2", "warm_start.batch_size=4", "loss.top_entropy_fraction=0.2",
              "rollout.group_size=4", "rollout.max_new_tokens=16", "optim.micro_batch_tokens=64"]
# Each run switches on what its loop can do.
RUNS = {
    "grpo": ["model.reference=policy", "loss.beta=0.1", "optim.mini_batches=2", "optim.updates_per_batch=2",
             "loss.cov_mode=clip_cov", "loss.cov_ratio=0.2", "loss.cov_lower=-10", "loss.cov_upper=10",
             "loss.top_entropy_fraction=0.5", "advantage.overlong_buffer=4", "advantage.dynamic_sampling=true"],
    "grpo_kl_cov_bf16": ["model.dtype=bfloat16", "loss.cov_mode=kl_cov", "loss.cov_ratio=0.2", "loss.loss_type=bnpo",
                         "loss.normalize_by=selected", "loss.prob_mask_threshold=0.9"],
    "ppo_bf16": ["run.algorithm=ppo", "model.dtype=bfloat16", "optim.mini_batches=2", "model.reference=policy",
                 "loss.beta=0.1", "ppo.reference_ema=0.01", "ppo.normalize_values=true"],
    "spo_chain": ["run.algorithm=spo_chain", "spo.num_continuations=2", "spo.cutpoint_interval=8",
                  "loss.prob_mask_threshold=0.9", "loss.normalize_by=selected"],
    "spo_tree": ["run.algorithm=spo_tree", "spo.tree_branching=[2,2,2]", "spo.tree_level_tokens=[4,4]",
                 "optim.mini_batches=2"],
}


def _train(tmp_path, monkeypatch, overrides, device: str, output="run") -> list[dict]:
    """Trains as configured on `device`; returns the logged steps that trained."""
    (tmp_path / "toy_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config("configs/demo.yaml", [*DEVICE_RUN, *overrides, f"run.output_dir={tmp_path / output}"])
    # run.device accepts auto, cpu and cuda; the loops themselves take any torch device.
    train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, device=device)))
    steps = [json.loads(line) for line in (tmp_path / output / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in steps if "loss/policy" in m]
    assert trained and all(math.isfinite(m["loss/policy"]) for m in trained)
    return trained


@pytest.mark.parametrize("name", RUNS)
def test_training_runs_on_another_device(name, tmp_path, monkeypatch, fake_gpu):
    before = fake_gpu.dispatched
    _train(tmp_path, monkeypatch, RUNS[name], str(fake_gpu.DEVICE))
    assert fake_gpu.dispatched - before > 10_000, "the run did not compute on the device"


@pytest.mark.gpu
def test_gpu_training_runs_and_resumes(tmp_path, monkeypatch):
    """The bf16 PPO run on CUDA (Triton kernels, CUDA generation, the batch-wide masks of demo.yaml's
    top-entropy loss, memory statistics, RNG state, critic, EMA reference), then a resume from the step-1
    checkpoint. GPU runs need not repeat exactly (attention's backward may use atomics). One run: the GPU
    session has about two minutes for every gpu test, and the fakegpu runs above cover the other loops."""
    overrides = [*RUNS["ppo_bf16"], "run.save_every=1"]
    full = _train(tmp_path, monkeypatch, overrides, "cuda")
    assert all(m["memory/peak_bytes"] > 0 for m in full)
    resumed = _train(tmp_path, monkeypatch, [*overrides, f"run.resume={tmp_path / 'run' / 'checkpoint-1'}"], "cuda",
                     output="resumed")
    assert [m["step"] for m in resumed] == [2]


# What the device check must refuse and allow: CUDA's own rules (tests/fake_device.py).
X = torch.arange(3.0)


@pytest.mark.parametrize("op", [
    lambda d: d + X,
    lambda d: torch.cat([d, X]),
    lambda d: X[torch.tensor([0, 1], device=d.device)],
    lambda d: d.__setitem__(torch.tensor([0, 1]), X[:2]),
    lambda d: torch.randperm(3, device=d.device, generator=torch.Generator()),
], ids=["add", "cat", "cpu_tensor_device_index", "index_put_cpu_values", "cpu_generator"])
def test_mixing_devices_fails_as_on_cuda(op, fake_gpu):
    with pytest.raises(fake_gpu.DeviceMismatch):
        op(torch.zeros(3, device=fake_gpu.DEVICE))


@pytest.mark.parametrize("op", [
    lambda d: d + torch.tensor(2.0),
    lambda d: d[torch.tensor([0, 2])],
    lambda d: d.__setitem__(torch.tensor([1]), torch.tensor(5.0)),
    lambda d: d.__setitem__(slice(0, 2), X[:2]),
    lambda d: d.cpu() + X,
    lambda d: d + X.to(d.device),
], ids=["cpu_scalar", "cpu_index", "index_put_cpu_scalar", "copy", "to_cpu", "to_device"])
def test_what_cuda_allows_computes_the_cpu_values(op, fake_gpu):
    on_device, on_cpu = torch.zeros(3, device=fake_gpu.DEVICE), torch.zeros(3)
    got, expected = op(on_device), op(on_cpu)
    if got is None:
        got, expected = on_device, on_cpu
    assert torch.equal(got.cpu(), expected)
