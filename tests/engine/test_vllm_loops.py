"""The training loops with vLLM sampling (real vLLM CPU build, run by scripts/test_vllm.sh): a 2-step GRPO
run and its exact resume, vLLM re-synced from the checkpoint; PPO and both SPO variants for a step."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("vllm")

from _tiny_run import REWARD_MODULE, TINY  # noqa: E402

from fusedrl.cli import main  # noqa: E402

# vLLM's CPU attention takes head sizes of 32 and up: 64 wide, 2 heads.
VLLM = ["rollout.engine=vllm", "model.demo.hidden_size=64", "model.demo.num_heads=2",
        "model.demo.intermediate_size=128", "data.max_prompt_length=16", "rollout.vllm.kv_cache_gib=0.05", "rollout.group_size=4", "run.save_every=1"]
UNTIMED = ("time/", "tokens_per_second", "memory/")


def _run(tmp_path, monkeypatch, name, *overrides) -> list[dict]:
    (tmp_path / "toy_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / name
    assert main(["train", "configs/demo.yaml", f"run.output_dir={out}", *TINY, *VLLM, *overrides]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if any(k != "step" and not k.startswith("eval/") for k in m)]


def test_grpo_two_steps_and_an_exact_resume(tmp_path, monkeypatch):
    full = _run(tmp_path, monkeypatch, "full")
    assert [m["step"] for m in full] == [1, 2]
    for m in full:
        assert math.isfinite(m["loss/policy"]) and m["grad_norm"] > 0
        assert m["time/weight_sync_s"] > 0
        # fp32 on both sides: the mismatch is float rounding, and no token's ratio leaves [0.5, 2].
        assert m["mismatch/abs_lp_diff"] < 1e-4 and m["mismatch/kl"] < 1e-6 and m["mismatch/ratio_outside"] == 0
        assert m["mismatch/is_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    # Resumed at step 1, vLLM starts from the checkpoint's weights and the seeds from its torch RNG state:
    # step 2 repeats exactly, metrics and weights.
    resumed = _run(tmp_path, monkeypatch, "resumed", f"run.resume={tmp_path / 'full' / 'checkpoint-1'}")
    assert [m["step"] for m in resumed] == [2]
    untimed = [{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in (full[1], resumed[0])]
    assert untimed[0] == untimed[1]
    weights, again = (load_file(tmp_path / d / "checkpoint-2" / "model.safetensors") for d in ("full", "resumed"))
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_grpo_on_the_kept_set(tmp_path, monkeypatch):
    """vLLM samples with top_k and top_p, the loss trains on the same kept set: the sampler's and the
    trainer's log-probs agree as without them, and no sampled token falls outside the trainer's set."""
    [m] = _run(tmp_path, monkeypatch, "kept", "rollout.top_k=20", "rollout.top_p=0.9", "run.steps=1")
    assert math.isfinite(m["loss/policy"]) and m["grad_norm"] > 0
    assert m["mismatch/abs_lp_diff"] < 1e-4 and m["mismatch/kl"] < 1e-6 and m["mismatch/ratio_outside"] == 0
    assert m["mismatch/outside_kept_set"] == 0 and m["mask/outside_kept_set"] == 0


@pytest.mark.parametrize("algorithm", [
    ["run.algorithm=ppo", "ppo.critic_lr=1e-3"],
    ["run.algorithm=spo_chain", "spo.num_continuations=2", "spo.cutpoint_interval=8"],
    # Parity rewards can tie on all of a tree's leaves (then no row trains); seven levels do not.
    ["run.algorithm=spo_tree", "spo.tree_branching=[2,2]", "spo.tree_level_tokens=[12]", "reward.function=toy_reward:spread"],
], ids=["ppo", "spo_chain", "spo_tree"])
def test_every_loop_samples_with_vllm(tmp_path, monkeypatch, algorithm):
    """The loops never know which sampler runs: each trains a step, with the mismatch measured on its rows
    (SPO-tree's rows are leaf paths pieced together from its segments' log-probs)."""
    [m] = _run(tmp_path, monkeypatch, "run", *algorithm, "run.steps=1")
    assert math.isfinite(m["loss/policy"]) and m["time/weight_sync_s"] > 0
    assert m["mismatch/abs_lp_diff"] < 1e-4 and m["mismatch/ratio_outside"] == 0
