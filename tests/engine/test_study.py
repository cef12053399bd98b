"""The study's small version (engine/study.py --small): every arm of configs/study/arms.yaml trains from
the shared warm start and the report is written. Numbers are not asserted: two steps say nothing."""

import json
import math
import sys

import pytest

from fusedrl.engine import study
from fusedrl.engine.study_report import spread, verdict
from fusedrl.engine.tasks import arithmetic, arithmetic3

PLAN = study.REPO / "configs/study/arms.yaml"


def test_arithmetic3_is_three_digit_addition_with_the_same_verifier():
    row = {"a": 107, "b": 938}
    assert arithmetic3.reference_completion(row) == "7+8+0=15 0+3+1=04 1+9+0=10 #1045"
    rows = arithmetic3.make_dataset("train", 300, seed=0)
    assert all(len(r["prompt"]) == 8 and int(r["answer"]) == r["a"] + r["b"] for r in rows)
    assert {r["prompt"] for r in rows}.isdisjoint(r["prompt"] for r in arithmetic3.make_dataset("eval", 100, seed=0))
    assert arithmetic3.reward(["", ""], ["... #1045", "... #045"], answer=["1045", "1045"]) == [1.0, 0.0]
    # The demo's 2-digit task is unchanged.
    assert arithmetic.reference_completion({"a": 7, "b": 38}) == "7+8+0=15 0+3+1=04 #045"


def test_spread_and_verdict_by_hand():
    assert spread([0.5, 0.6, 0.7], 100) == "60.0 ± 10.0"
    assert verdict([0.8, 0.85, 0.9], [0.5, 0.6, 0.7]) == "+25.0 points, beyond the seed spread"
    assert verdict([0.65, 0.75, 0.8], [0.5, 0.6, 0.7]) == "+13.3 points, within the seed spread"


def test_every_arm_runs_from_the_seed_warm_start():
    plan = study.load_plan(PLAN, small=False)
    starts, runs = study.jobs(plan, study.REPO / "runs/x")
    assert len(starts) == len(plan["seeds"]) >= 3
    assert len(runs) == len(plan["seeds"]) * len(plan["arms"])
    for job in runs:
        seed = job.name.split("/")[0]
        assert f"model.path={study.REPO}/runs/x/{seed}/warm_start/model" in job.argv
        assert "warm_start.steps=0" in job.argv and f"run.seed={seed[4:]}" in job.argv
    # The warm starts first, then question by question every seed of an arm (an arm already scheduled by
    # an earlier question is not run again).
    order = [job.name for job in study.schedule(plan, starts, runs)]
    arms = list(dict.fromkeys(arm for q in plan["questions"] for arm in q["arms"]))
    assert set(arms) == set(plan["arms"])
    assert order == [f"seed{s}/warm_start" for s in plan["seeds"]] + [f"seed{s}/{a}" for a in arms
                                                                        for s in plan["seeds"]]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 13 processes, each starting torch and transformers: minutes on a busy CI machine
def test_small_study_trains_every_arm_and_writes_the_report(tmp_path):
    assert study.main(["--small", "--output", str(tmp_path)]) == 0
    plan = study.load_plan(PLAN, small=True)
    for seed in plan["seeds"]:
        assert (tmp_path / f"seed{seed}/warm_start/model/config.json").is_file()
        for arm in plan["arms"]:
            rows = [json.loads(line) for line in (tmp_path / f"seed{seed}/{arm}/metrics.jsonl").read_text().splitlines()]
            steps = [r for r in rows if r["step"] > 0]
            assert len(steps) == 2 and all(r["tokens/sampled"] > 0 for r in steps), arm
            for r in steps:
                # After a 10-step warm start rewards are mostly 0: SPO-tree then has no segment with a
                # nonzero advantage and, by design, no update; every other step has a finite loss.
                if "loss/policy" in r or r.get("spo/rows_dropped") != r.get("spo/leaves"):
                    assert math.isfinite(r["loss/policy"]), arm
            assert "eval/accuracy" in rows[-1], arm
    report = (tmp_path / "study.md").read_text()
    assert "Small check run" in report and "PARTIAL" not in report
    for arm in plan["arms"]:
        assert f"| {arm} |" in report
    for number in range(1, len(plan["questions"]) + 1):
        assert (tmp_path / f"images/study_q{number}.png").stat().st_size > 0
    assert (tmp_path / "images/study_q2_entropy_law.png").stat().st_size > 0


def test_an_interrupted_arm_run_is_resumed_or_replaced(tmp_path):
    """What a killed study leaves: a run with a complete checkpoint resumes from it; one that died before
    its first checkpoint (its metrics.jsonl only, or a checkpoint whose save did not finish) starts again
    over it; a fresh directory and a warm start get nothing."""
    start = study.Job("seed0/warm_start", ["x"], tmp_path / "warm_start")
    arm = study.Job("seed0/grpo", ["x"], tmp_path / "grpo", after=start)
    assert arm.continuation() == [] and start.continuation() == []
    arm.output_dir.mkdir()
    (arm.output_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    (arm.output_dir / "checkpoint-2").mkdir()  # no completion marker: its save was cut
    assert arm.continuation() == ["run.overwrite=true"]
    (arm.output_dir / "checkpoint-1").mkdir()
    (arm.output_dir / "checkpoint-1" / "model.safetensors").write_bytes(b"12345")
    (arm.output_dir / "checkpoint-1" / "complete.json").write_text(json.dumps(
        {"step": 1, "files": {"model.safetensors": 5}}))
    assert arm.continuation() == ["run.resume=latest"]
    start.output_dir.mkdir()
    (start.output_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    assert start.continuation() == []
