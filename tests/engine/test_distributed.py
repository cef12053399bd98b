"""The engine on two gloo ranks (FSDP2, engine/distributed.py) against one process on the same global batch.

Every run here is a real `train(cfg)`: the one-process runs in this process, the two-rank runs in two
spawned processes that join a gloo group the way torchrun's do (RANK, WORLD_SIZE, ... in the
environment), all of them in one spawn to keep the import cost to one. Three prompts per step on two
ranks give uneven shares (two prompts and one), and responses of uneven lengths; mini-batches of a few
rows leave one rank without rows in some of them (it runs idle micro-batches). Runs killed after a
checkpoint and resumed on two ranks are compared with the uninterrupted two-rank runs.
"""

import json
import os
import socket
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fusedrl.engine.config import load_config
from fusedrl.engine.data import PromptSampler, load_task
from fusedrl.engine.train import train

REWARD = '''
import zlib


def parity(prompts, completions, **columns):
    """1 for an even number of characters: varied rewards from an untrained model."""
    return [float(len(c) % 2 == 0) for c in completions]


def _designed(case, prompts, completions):
    """Unequal rewards in (0, 1) (a hash of the text) for the prompts of INFORMATIVE[case], 0 for the others:
    which groups and trees carry signal is set by the test (texts alike would be needed to break it)."""
    return [(zlib.crc32(c.encode()) % 997 + 1) / 999 if p in INFORMATIVE[case] else 0.0
            for p, c in zip(prompts, completions)]


def dynamic_sampling_design(prompts, completions, **columns):
    return _designed("grpo_dynamic_sampling", prompts, completions)


def spo_tree_design(prompts, completions, **columns):
    return _designed("spo_tree", prompts, completions)
'''

TINY = ["run.progress=false", "run.tensorboard=false", "run.plots=false", "run.num_threads=1", "run.device=cpu",
        "warm_start.steps=0", "data.train_size=32", "data.eval_size=3", "model.demo.hidden_size=32",
        "model.demo.num_layers=2", "model.demo.num_heads=2", "model.demo.intermediate_size=64",
        "rollout.prompts_per_step=3", "rollout.group_size=4", "rollout.max_new_tokens=24", "optim.lr=1e-3",
        "optim.micro_batch_tokens=120", "reward.function=distributed_reward:parity", "run.steps=2"]
CASES = {
    # Three steps with a checkpoint each: the resumed two-rank run starts from the second (RESUMED).
    "grpo_top_entropy": ["loss.top_entropy_fraction=0.5", "run.steps=3", "run.save_every=1"],
    "grpo_clip_cov": ["loss.top_entropy_fraction=1.0", "loss.cov_mode=clip_cov", "loss.cov_ratio=0.2",
                      "loss.cov_lower=-10", "loss.cov_upper=10", "optim.mini_batches=4", "optim.updates_per_batch=2"],
    # bnpo over the selected tokens: the normaliser is the whole mini-batch's selected count, on every rank.
    "grpo_bnpo_selected": ["loss.loss_type=bnpo", "loss.normalize_by=selected", "loss.top_entropy_fraction=0.5",
                           "optim.mini_batches=2"],
    # DAPO's dynamic sampling on designed rewards (DESIGNS): the count of informative groups and the cut
    # are global.
    "grpo_dynamic_sampling": ["advantage.dynamic_sampling=true", "advantage.max_generation_rounds=2",
                              "reward.function=distributed_reward:dynamic_sampling_design"],
    "ppo": ["run.algorithm=ppo", "model.reference=policy", "loss.beta=0.05", "ppo.normalize_values=true",
            "ppo.reference_ema=0.1", "ppo.critic_lr=1e-3", "optim.mini_batches=3", "run.save_every=1"],
    "spo_chain": ["run.algorithm=spo_chain", "rollout.max_new_tokens=48", "spo.num_continuations=2",
                  "spo.cutpoint_interval=12", "loss.loss_type=dapo", "loss.prob_mask_threshold=0.012",
                  "loss.normalize_by=selected", "run.save_every=1"],
    # On designed rewards too (DESIGNS): in step 2 one rank has no rows. A leaf without its end token scores
    # 0: 48 tokens give most trees a leaf that ends.
    "spo_tree": ["run.algorithm=spo_tree", "rollout.max_new_tokens=48", "spo.tree_branching=[2,2]",
                 "spo.tree_level_tokens=[8]", "spo.tree_std_normalize=true", "loss.top_entropy_fraction=0.5",
                 "optim.mini_batches=2", "reward.function=distributed_reward:spo_tree_design"],
}
# Killed after checkpoint N and resumed on two ranks: {case: N}.
RESUMED = {"grpo_top_entropy": 2, "ppo": 1, "spo_chain": 1}
# Designed rewards: {case: the draws whose prompts get unequal rewards (the others 0)}, numbered over the
# prompts the runs draw, in order: 3 per round (dynamic sampling has 2 rounds per step) or step, rank 0
# sampling the first two, rank 1 the third.
# Dynamic sampling. Step 1: round 1 keeps draws 0 and 2 (one on each rank); round 2's three are
# informative but one more group is needed: rank 0 keeps draw 3, and draws 4 and 5 are cut, draw 5
# although rank 1 alone counts only one informative group of its own. Step 2: round 1 keeps draw 8, round
# 2 none; the cap of two rounds ends the step with one group, on rank 1 (rank 0 joins the update without rows).
# SPO-tree. Step 1 trains on trees of both ranks (draws 0 and 2), step 2 on rank 1's only (draw 5): rank
# 0's trees have no leaf reward other than 0, all their rows are dropped, and it joins the update without rows.
DESIGNS = {"grpo_dynamic_sampling": {0, 2, 3, 4, 5, 8}, "spo_tree": {0, 2, 5}}
# Wall-clock and memory readings differ between any two runs.
UNCOMPARED = ("time/rollout_s", "time/step_s", "tokens_per_second", "memory/peak_bytes")


def _run(output_dir: Path, overrides: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Trains; returns the metric rows and the final policy's weights (the last checkpoint's export)."""
    cfg = load_config("configs/demo.yaml", [*TINY, *overrides, f"run.output_dir={output_dir}"])
    train(cfg)
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()] if (
        output_dir / "metrics.jsonl").is_file() else []
    weights = load_file(output_dir / f"checkpoint-{cfg.run.steps}" / "model.safetensors")
    return rows, weights


def _rank(rank: int, size: int, port: int, reward_dir: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(size))
    sys.path.insert(0, reward_dir)
    dist.init_process_group("gloo")
    try:
        out = Path(out_dir)
        results = {name: _run(out / name, overrides) for name, overrides in CASES.items()}
        for name, step in RESUMED.items():
            checkpoint = out / name / f"checkpoint-{step}"
            results[f"{name}/resumed"] = _run(out / f"{name}_resumed", [*CASES[name], f"run.resume={checkpoint}"])
        if rank == 0:
            torch.save(results, out / "results.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _informative_prompts() -> dict[str, set[str]]:
    """DESIGNS with the draws' texts: the prompts the runs' sampler draws, in its order."""
    cfg = load_config("configs/demo.yaml", TINY)
    rows = load_task(cfg.data.task).make_dataset("train", cfg.data.train_size, cfg.run.seed)
    draws = [rows[i]["prompt"] for i in PromptSampler(len(rows), cfg.run.seed).next_indices(12)]
    assert len(set(draws)) == len(draws)  # no text stands for two draws
    return {case: {draws[i] for i in design} for case, design in DESIGNS.items()}


@pytest.fixture(scope="module")
def runs():
    """{case: (one process, two ranks)} and {case/resumed: the resumed two-rank run}, each (metric rows,
    weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Its own module name: other tests import a `toy_reward` of their own, which sys.modules would keep.
        (tmp / "distributed_reward.py").write_text(textwrap.dedent(REWARD)
                                                   + f"\nINFORMATIVE = {_informative_prompts()!r}\n")
        sys.path.insert(0, str(tmp))
        try:
            single = {name: _run(tmp / "single" / name, overrides) for name, overrides in CASES.items()}
        finally:
            sys.path.remove(str(tmp))
        (tmp / "ranks").mkdir()
        mp.spawn(_rank, args=(2, _free_port(), str(tmp), str(tmp / "ranks")), nprocs=2, join=True)
        ranks = torch.load(tmp / "ranks" / "results.pt")
    return {name: (single[name], ranks[name]) for name in CASES} | {
        f"{name}/resumed": ranks[f"{name}/resumed"] for name in RESUMED}


def _assert_same(one, two):
    rows, rows_2 = one[0], two[0]
    assert [r["step"] for r in rows] == [r["step"] for r in rows_2]
    for row, row_2 in zip(rows, rows_2):
        keys = set(row) - set(UNCOMPARED)
        assert keys == set(row_2) - set(UNCOMPARED)
        for key in keys:
            assert row_2[key] == pytest.approx(row[key], rel=1e-5, abs=1e-6, nan_ok=True), (row["step"], key)
    assert one[1].keys() == two[1].keys()
    for name, value in one[1].items():
        torch.testing.assert_close(two[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(runs, case):
    one, two = runs[case]
    _assert_same(one, two)
    trained = [r for r in one[0] if "loss/policy" in r]
    assert len(trained) == len(one[0]) - 1 and all(r["grad_norm"] > 0 for r in trained)
    # The batch-wide statistics really select (a threshold, a draw, a probability mask); PPO's critic learns.
    if case == "ppo":
        assert all(r["value/grad_norm"] > 0 for r in trained)
    else:
        key = {"grpo_clip_cov": "mask/cov", "spo_chain": "mask/probability"}.get(case, "mask/top_entropy")
        assert any(0 < r[key] < 1 for r in trained)


def test_dynamic_sampling_ran_as_designed(runs):
    """The rounds and groups of DESIGNS happened (in one process; two ranks repeat its metrics): a cut that
    falls across the ranks, and a step that ends at the cap with groups on one rank only."""
    step_1, step_2 = runs["grpo_dynamic_sampling"][0][0][1:]
    assert (step_1["dynamic_sampling/rounds"], step_1["groups/trained"]) == (2, 3)
    assert step_1["groups/kept"] == pytest.approx(5 / 6)  # 5 informative groups of the 6 sampled
    assert (step_2["dynamic_sampling/rounds"], step_2["groups/trained"]) == (2, 1)
    assert step_2["groups/kept"] == pytest.approx(1 / 6)


def test_spo_tree_ran_as_designed(runs):
    """Both steps trained (one process; two ranks repeat its metrics), step 2 on one of its three trees:
    draw 5's, on rank 1."""
    step_1, step_2 = runs["spo_tree"][0][0][1:]
    assert step_1["spo/rows_dropped"] < step_1["spo/leaves"] and "loss/policy" in step_1
    assert step_2["spo/rows_dropped"] < step_2["spo/leaves"] and "loss/policy" in step_2


@pytest.mark.parametrize("case", list(RESUMED))
def test_two_ranks_resumed_equal_the_uninterrupted_run(runs, case):
    (_, uninterrupted), resumed = runs[case], runs[f"{case}/resumed"]
    assert resumed[0] and [r["step"] for r in resumed[0]] == [r["step"] for r in uninterrupted[0][RESUMED[case] + 1:]]
    for row, expected in zip(resumed[0], uninterrupted[0][RESUMED[case] + 1:]):
        assert {k: v for k, v in row.items() if k not in UNCOMPARED} == {
            k: v for k, v in expected.items() if k not in UNCOMPARED}
    assert all(torch.equal(resumed[1][k], v) for k, v in uninterrupted[1].items())
