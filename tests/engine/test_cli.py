"""End to end from the command line: 3 GRPO steps on a tiny model, then a resume from the step-2
checkpoint that must repeat step 3 exactly (CPU)."""

import json
import math
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fusedrl.cli import main

# Wall-clock and memory readings differ between any two runs; everything else must match exactly.
NONDETERMINISTIC = {"tokens_per_second", "time/rollout_s", "time/step_s", "memory/peak_bytes"}


@pytest.fixture
def digit_reward(tmp_path, monkeypatch):
    """A reward that varies within groups from the first step (a fresh model never solves the task),
    so the advantages, and hence the updates, are not zero."""
    (tmp_path / "digit_reward.py").write_text(textwrap.dedent("""
        def digits(prompts, completions, **columns):
            return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

        def half_flat(prompts, completions, a, **columns):
            # 0 for every response to a prompt with an even first operand: about half the groups are flat.
            return [0.0 if x % 2 == 0 else sum(ch.isdigit() for ch in c) / max(1, len(c))
                    for x, c in zip(a, completions)]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "digit_reward:digits"


def _args(output_dir, reward, *extra):
    return ["train", "configs/demo.yaml", f"run.output_dir={output_dir}", "run.steps=3", "run.save_every=1",
            "run.progress=false", "run.num_threads=1", "model.demo.hidden_size=32", "model.demo.num_layers=2",
            "model.demo.intermediate_size=64", "warm_start.steps=2", "warm_start.batch_size=4",
            "data.train_size=64", "data.eval_size=4", "rollout.prompts_per_step=3", "rollout.group_size=4",
            "rollout.max_new_tokens=12", "optim.lr=1e-3", "optim.micro_batch_tokens=96",
            f"reward.function={reward}", *extra]


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_three_steps_then_resume_repeats_step_three(tmp_path, digit_reward, capsys):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert main(_args(full, digit_reward)) == 0
    # The warm start says how it goes, also into a log or a pipe, where a progress bar shows nothing.
    assert "warm start: step 2/2, loss " in capsys.readouterr().out
    rows = _metrics(full / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert set(rows.pop(0)) == {"step", "eval/accuracy", "eval/reward_mean", "eval/mean_length",
                                "eval/reward_failures"}
    for r in rows:
        assert math.isfinite(r["loss/policy"]) and r["grad_norm"] > 0
        for key in ("reward/mean", "reward/std", "accuracy", "entropy/mean", "clip_ratio/high_mean", "mask/top_entropy",
                    "completions/mean_length", "tokens_per_second", "memory/peak_bytes", "reward/failures"):
            assert key in r, key
    assert rows[0]["mask/top_entropy"] == pytest.approx(0.2, abs=0.05)
    assert "eval/accuracy" in rows[-1]
    for step in (1, 2, 3):
        ckpt = full / f"checkpoint-{step}"
        assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    assert list((full / "tensorboard").iterdir())
    assert (full / "plots" / "reward_entropy.png").is_file()
    summary = json.loads((full / "summary.json").read_text())
    assert summary["accuracy_before_rl"] is not None and summary["accuracy_after_rl"] is not None

    # Micro-batches of 96 tokens force gradient accumulation; the run above exercised it.
    _assert_resume_repeats_step_three(full, resumed, digit_reward)

    # A resume that changes a setting the run depends on is refused, naming the change and the way out;
    # with run.allow_config_changes it goes on and says what changed.
    changed = [f"run.resume={full / 'checkpoint-2'}", "optim.lr=0.002"]
    capsys.readouterr()
    assert main(_args(tmp_path / "changed", digit_reward, *changed)) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.002" in err and "run.allow_config_changes=true" in err and len(err.splitlines()) == 1
    assert main(_args(tmp_path / "changed", digit_reward, *changed, "run.allow_config_changes=true")) == 0
    assert "resuming with changed settings: optim.lr: 0.001 -> 0.002" in capsys.readouterr().err


def _assert_resume_repeats_step_three(full, resumed, reward, *extra):
    """Resuming `full`'s run from its step-2 checkpoint repeats its step 3: metrics and weights."""
    rows = _metrics(full / "metrics.jsonl")[1:]
    assert main(_args(resumed, reward, *extra, f"run.resume={full / 'checkpoint-2'}")) == 0
    again = _metrics(resumed / "metrics.jsonl")
    assert [r["step"] for r in again] == [3]
    expected = {k: v for k, v in rows[2].items() if k not in NONDETERMINISTIC}
    assert {k: v for k, v in again[0].items() if k not in NONDETERMINISTIC} == expected
    weights, weights_again = (load_file(d / "checkpoint-3" / "model.safetensors") for d in (full, resumed))
    assert weights.keys() == weights_again.keys()
    assert all((weights[k] == weights_again[k]).all() for k in weights)
    # The step-2 weights differ from the step-3 ones: the resumed step really trained.
    before = load_file(full / "checkpoint-2" / "model.safetensors")
    assert any((before[k] != weights[k]).any() for k in weights)


# Clip-Cov with a wide candidate interval and r = 0.2, so that its random draw drops tokens every step.
CLIP_COV = ["loss.cov_mode=clip_cov", "loss.cov_ratio=0.2", "loss.cov_lower=-10", "loss.cov_upper=10"]


def test_clip_cov_resume_repeats_step_three(tmp_path, digit_reward):
    """Clip-Cov draws its dropped tokens from torch's generator, whose state the checkpoint keeps."""
    full = tmp_path / "full"
    assert main(_args(full, digit_reward, *CLIP_COV)) == 0
    rows = _metrics(full / "metrics.jsonl")[1:]
    assert all(r["mask/cov"] > 0 for r in rows)
    _assert_resume_repeats_step_three(full, tmp_path / "resumed", digit_reward, *CLIP_COV)


def test_missing_model_path_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "configs/demo.yaml", f"model.path={tmp_path / 'no-model'}",
                 f"run.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"fusedrl: error: model.path '{tmp_path / 'no-model'}': no such directory")


def test_resume_without_checkpoint_is_a_clean_error(tmp_path, capsys):
    code = main(["train", "configs/demo.yaml", "run.resume=latest", f"run.output_dir={tmp_path}"])
    assert code == 2
    assert "run.resume 'latest': no checkpoint-<step> directory" in capsys.readouterr().err


def test_prompt_and_response_longer_than_the_context(tmp_path, capsys):
    code = main(["train", "configs/demo.yaml", "data.max_prompt_length=500", "rollout.max_new_tokens=100",
                 "warm_start.steps=0", f"run.output_dir={tmp_path}"])
    assert code == 2
    assert ("data.max_prompt_length + rollout.max_new_tokens = 600 tokens exceeds the model's context of 512"
            in capsys.readouterr().err)


DYNAMIC = ["advantage.dynamic_sampling=true", "advantage.max_generation_rounds=4"]


def test_dynamic_sampling_refills_the_batch_and_resumes(tmp_path, digit_reward):
    """About half the groups are flat: steps sample further rounds until 3 groups carry signal (or 3
    rounds were sampled); the sampler advances by every round, and a resume repeats step 3."""
    reward, full = "digit_reward:half_flat", tmp_path / "full"
    assert main(_args(full, reward, *DYNAMIC)) == 0
    rows = _metrics(full / "metrics.jsonl")[1:]
    rounds = [r["dynamic_sampling/rounds"] for r in rows]
    assert max(rounds) > 1 and all(1 <= n <= 4 for n in rounds)
    for r, n in zip(rows, rounds):
        kept = round(r["groups/kept"] * 3 * n)  # informative groups among the 3 n sampled
        assert r["groups/trained"] == min(3, kept) and (kept >= 3 or n == 4)
        assert math.isfinite(r["loss/policy"]) and r["grad_norm"] > 0
    # The prompt sampler moved on by every round's 3 prompts, and a resume continues from there.
    state = torch.load(full / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert state["sampler"]["position"] == 3 * sum(rounds)
    _assert_resume_repeats_step_three(full, tmp_path / "resumed", reward, *DYNAMIC)


@pytest.mark.parametrize("objective", [
    ["loss.loss_type=dapo", "loss.importance_sampling_level=sequence"],  # GSPO
    ["loss.loss_type=cispo"],
    ["loss.loss_type=sapo", "loss.importance_sampling_level=sequence_token"],
])
def test_other_objectives_train_from_the_command_line(tmp_path, digit_reward, objective):
    """The loss types and importance-sampling levels beyond the PPO clip run through the engine's update
    (two updates per rollout, so the ratios leave 1) and log finite losses."""
    assert main(_args(tmp_path, digit_reward, "run.steps=2", "optim.updates_per_batch=2", *objective)) == 0
    rows = _metrics(tmp_path / "metrics.jsonl")[1:]  # after the step-0 evaluation
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss/policy"]) and r["grad_norm"] > 0, r
