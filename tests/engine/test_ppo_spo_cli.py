"""PPO, SPO-chain and SPO-tree end to end: 2 steps each on a tiny demo model through the command line,
and the config errors of their sections."""

import json
import math

import pytest

from _tiny_run import REWARD_MODULE, TINY

from fusedrl.cli import main
from fusedrl.engine.config import load_config
from fusedrl.engine.errors import ConfigError


def _run(tmp_path, monkeypatch, *overrides, steps=2) -> list[dict]:
    (tmp_path / "toy_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    assert main(["train", "configs/demo.yaml", f"run.output_dir={out}", *TINY, *overrides, f"run.steps={steps}"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The held-out evaluation before RL is logged as step 0; it carries eval/* metrics only.
    lines = [m for m in lines if any(k != "step" and not k.startswith("eval/") for k in m)]
    assert [m["step"] for m in lines] == list(range(1, steps + 1))
    assert (out / f"checkpoint-{steps}" / "model.safetensors").is_file()
    return lines


PPO = ["run.algorithm=ppo", "rollout.group_size=4", "rollout.max_new_tokens=24", "optim.mini_batches=2",
       "model.reference=policy", "loss.beta=0.1", "ppo.reference_ema=0.01", "ppo.normalize_values=true",
       "ppo.critic_lr=1e-3", "run.save_every=1"]
UNTIMED = ("time/", "tokens_per_second", "memory/")


# Clip-Cov with a wide candidate interval and r = 0.2, so that its random draw drops tokens every step.
CLIP_COV = ["loss.cov_mode=clip_cov", "loss.cov_ratio=0.2", "loss.cov_lower=-10", "loss.cov_upper=10"]


@pytest.mark.parametrize("extra", [[], CLIP_COV], ids=["plain", "clip_cov"])
def test_ppo_two_steps_and_an_exact_resume(tmp_path, monkeypatch, extra):
    lines = _run(tmp_path, monkeypatch, *PPO, *extra)
    for m in lines:
        for key in ("loss/policy", "loss/value", "value/clip_frac", "kl/rollout", "returns/mean"):
            assert math.isfinite(m[key]), key
        assert m["mask/cov"] > 0 if extra else "mask/cov" not in m
    assert any(m["loss/value"] > 0 for m in lines)
    out = tmp_path / "run"
    critic = out / "checkpoint-2" / "critic"
    assert (critic / "value_head.pt").is_file() and (critic / "model.safetensors").is_file()
    assert (out / "checkpoint-2" / "reference" / "model.safetensors").is_file()
    # Resuming at step 1 restores policy, EMA reference, critic, its optimizer, the value normaliser and
    # the torch generator Clip-Cov draws from: step 2 repeats exactly.
    resumed = _run(tmp_path, monkeypatch, *PPO, *extra, f"run.resume={out / 'checkpoint-1'}")
    untimed = [{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in (lines[1], resumed[1])]
    assert untimed[0] == untimed[1]


def test_bf16_ppo_resumes_from_its_fp32_copies(tmp_path, monkeypatch):
    """bf16 policy, critic and EMA reference: the optimizers' fp32 master weights and the reference's fp32
    average are in the checkpoint, so a run resumed at step 1 repeats steps 2 and 3 exactly (resumed
    from the rounded bf16 weights, step 3 differed)."""
    bf16 = [*PPO, "model.dtype=bfloat16", "ppo.reference_ema=0.5"]
    lines = _run(tmp_path, monkeypatch, *bf16, steps=3)
    resumed = _run(tmp_path, monkeypatch, *bf16, f"run.resume={tmp_path / 'run' / 'checkpoint-1'}", steps=3)
    untimed = [[{k: v for k, v in m.items() if not k.startswith(UNTIMED)} for m in run[1:]] for run in (lines, resumed)]
    assert untimed[0] == untimed[1]


def test_spo_chain_two_steps(tmp_path, monkeypatch):
    # An untrained model is unsure of every token: a long interval keeps the cuts (and the test) few.
    lines = _run(tmp_path, monkeypatch, "run.algorithm=spo_chain", "rollout.group_size=2", "rollout.max_new_tokens=16",
                 "spo.num_continuations=2", "spo.cutpoint_interval=8", "loss.prob_mask_threshold=0.9",
                 "loss.loss_type=bnpo", "loss.normalize_by=selected")
    for m in lines:
        assert math.isfinite(m["loss/policy"]) and "mask/probability" in m
        # Every cut samples 2 continuations of the remaining budget, on top of the response itself.
        assert m["spo/sampling_overhead"] > 1 and m["spo/segments_mean"] >= 1


def test_spo_tree_two_steps(tmp_path, monkeypatch):
    lines = _run(tmp_path, monkeypatch, "run.algorithm=spo_tree", "spo.tree_branching=[2,2,2]",
                 "spo.tree_level_tokens=[4,4]", "optim.mini_batches=2", "loss.prob_mask_threshold=0.9",
                 "loss.loss_type=bnpo", "loss.normalize_by=selected")
    for m in lines:
        # Per tree from 2 leaves (both of the root's children end at once) to 8 (none ends before the last level).
        assert 2 * 2 <= m["spo/leaves"] <= 2 * 8 and 0 <= m["spo/rows_dropped"] <= m["spo/leaves"]
    trained = [m for m in lines if "loss/policy" in m]
    assert trained and all(math.isfinite(m["loss/policy"]) for m in trained)
    # Every trained token was generated once; shared prefixes and dropped segments were generated too.
    assert all(m["spo/sampling_overhead"] >= 1 for m in trained)


@pytest.mark.parametrize("overrides, key", [
    (["run.algorithm=ppo", "ppo.lam=1.5"], "ppo.lam"),
    (["run.algorithm=ppo", "ppo.kl_penalty=value"], "ppo.kl_penalty"),
    (["run.algorithm=ppo", "ppo.value_clip=0"], "ppo.value_clip"),
    (["run.algorithm=ppo", "ppo.reference_ema=0.01"], "ppo.reference_ema"),
    (["run.algorithm=ppo", "advantage.dynamic_sampling=true"], "advantage.dynamic_sampling"),
    (["run.algorithm=spo_chain", "spo.cutpoint_threshold=0"], "spo.cutpoint_threshold"),
    (["run.algorithm=spo_chain", "spo.num_continuations=0"], "spo.num_continuations"),
    (["run.algorithm=spo_tree", "spo.tree_branching=[2,2]", "spo.tree_level_tokens=[4,4]"], "spo.tree_level_tokens"),
    (["run.algorithm=spo_tree", "spo.tree_branching=[2,0]", "spo.tree_level_tokens=[4]"], "spo.tree_branching"),
    (["run.algorithm=spo_tree", "rollout.max_new_tokens=8", "spo.tree_level_tokens=[4,4]"], "spo.tree_level_tokens"),
    (["ppo.unknown=1"], "ppo.unknown"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_group_of_one_is_fine_without_group_advantages():
    assert load_config(None, ["run.algorithm=ppo", "rollout.group_size=1"]).rollout.group_size == 1
