"""The study: every arm of configs/study/arms.yaml for every seed, then docs/study.md (engine/study_report.py).

    python -m fusedrl.engine.study [--small] [--plan configs/study/arms.yaml] [--output runs/study] [--jobs 2]

Each seed is warm-started once (the warm_start section of the plan's warm_start config, in a process
of its own) and saved; every arm of that seed starts from the saved model (model.path, with
warm_start.steps=0), so arms differ only in what the plan says. Every run is a `fusedrl train`
subprocess with one thread; `--jobs` of them run at a time. A run whose summary.json exists is not run
again, so an interrupted study continues where it stopped. `--small` runs the plan's small section
(one seed, a few steps), writes its report under the output folder and exists to check that every arm
trains; docs/study.md comes from the full study only. Runs start question by question (every seed of an
arm before the next arm), so that a study cut short answers its first questions fully.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from fusedrl.engine import checkpoint

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Job:
    name: str
    argv: list[str]
    output_dir: Path
    after: "Job | None" = None  # the warm start an arm starts from

    @property
    def done(self) -> bool:
        return (self.output_dir / "summary.json").is_file()

    def continuation(self) -> list[str]:
        """The overrides that start this job over what an interrupted study left in its output_dir: resume
        from the newest complete checkpoint (the resumed run logs what the uninterrupted one would), or
        replace a run that died before its first one; none for a fresh directory or a warm start (which
        starts again on its own)."""
        if self.after is None:
            return []
        if checkpoint.complete_checkpoints(self.output_dir):
            return ["run.resume=latest"]
        return ["run.overwrite=true"] if (self.output_dir / "metrics.jsonl").exists() else []


def load_plan(path: Path, small: bool) -> dict:
    """The plan as a dict, with the small section applied when `small`."""
    plan = OmegaConf.to_container(OmegaConf.load(path))
    plan["folder"] = path.parent
    if small:
        plan["seeds"] = plan["small"]["seeds"]
    plan["extra_overrides"] = plan["small"]["overrides"] if small else []
    plan["warm_start_overrides"] = ([f"warm_start.steps={plan['small']['warm_start_steps']}",
                                     *plan["small"]["overrides"]] if small else [])
    return plan


def warm_start_dir(output: Path, seed: int) -> Path:
    return output / f"seed{seed}" / "warm_start"


def jobs(plan: dict, output: Path) -> tuple[list[Job], list[Job]]:
    """(the warm starts, one per seed; the arm runs)."""
    python = sys.executable
    starts, runs = [], []
    for seed in plan["seeds"]:
        start = warm_start_dir(output, seed)
        starts.append(Job(f"seed{seed}/warm_start", [
            python, "-m", "fusedrl.engine.study", f"--warm-start-target={plan['warm_start_target']}",
            "--warm-start", str(plan["folder"] / plan["warm_start"]),
            f"run.seed={seed}", f"run.output_dir={start}", *plan["warm_start_overrides"]], start))
        for arm, spec in plan["arms"].items():
            out = output / f"seed{seed}" / arm
            runs.append(Job(f"seed{seed}/{arm}", [
                python, "-m", "fusedrl.cli", "train", str(plan["folder"] / spec["config"]), *spec["overrides"],
                *plan["extra_overrides"], f"run.seed={seed}", f"run.output_dir={out}",
                f"model.path={start / 'model'}", "warm_start.steps=0"], out, after=starts[-1]))
    return starts, runs


def schedule(plan: dict, starts: list[Job], runs: list[Job]) -> list[Job]:
    """The order to start them in: the warm starts, then question by question each arm for every seed, so
    that a study cut short has its first questions answered with all their seeds."""
    arms = list(dict.fromkeys([arm for q in plan["questions"] for arm in q["arms"]] + list(plan["arms"])))
    return starts + sorted(runs, key=lambda r: arms.index(r.name.split("/", 1)[1]))


class Clock:
    """The study's wall time over all its invocations (an interrupted study continues in another), kept
    in output/wall_seconds.json up to the last finished run, so that a study stopped early has it too."""

    def __init__(self, output: Path):
        self.path = output / "wall_seconds.json"
        self.before = json.loads(self.path.read_text())["wall_seconds"] if self.path.is_file() else 0.0
        self.began = time.time()

    def seconds(self) -> float:
        return self.before + time.time() - self.began

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"wall_seconds": self.seconds()}))


def run_all(todo: list[Job], parallel: int, clock: Clock) -> list[str]:
    """Runs the jobs not yet done in order, `parallel` at a time, each once its warm start is done;
    returns the names of those that failed (an arm whose warm start failed among them)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, failed = [j for j in todo if not j.done], [], []
    try:
        _run(pending, running, failed, parallel, clock, env)
    finally:  # stopped early (an exception, a test's timeout): no run outlives the study
        for _, process, log, _ in running:
            process.terminate()
            process.wait()
            log.close()
    return failed


def _run(pending: list[Job], running: list, failed: list[str], parallel: int, clock: Clock, env: dict) -> None:
    while pending or running:
        for job in [j for j in pending if j.after is not None and j.after.name in failed]:
            pending.remove(job)
            failed.append(job.name)
        while len(running) < parallel:
            ready = [j for j in pending if j.after is None or j.after.done]
            if not ready:
                break
            job = ready[0]
            pending.remove(job)
            continuation = job.continuation()
            job.output_dir.mkdir(parents=True, exist_ok=True)
            log = open(job.output_dir / "log.txt", "a" if continuation else "w")
            print(f"study: start {job.name}{' (' + ' '.join(continuation) + ')' if continuation else ''}", flush=True)
            running.append((job, subprocess.Popen(job.argv + continuation, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env, cwd=REPO), log, time.time()))
        time.sleep(0.5)
        for item in list(running):
            job, process, log, started = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            clock.save()
            status = "done" if process.returncode == 0 else f"FAILED (exit {process.returncode})"
            print(f"study: {status} {job.name} in {time.time() - started:.0f} s", flush=True)
            if process.returncode != 0:
                failed.append(job.name)
                print((job.output_dir / "log.txt").read_text()[-2000:], file=sys.stderr)


class _TargetReached(Exception):
    pass


def warm_start_only(config: str, overrides: list[str], target: float, check_prompts: int) -> None:
    """The supervised warm start of `config`, stopped at the first of its progress reports (every tenth
    of warm_start.steps) where the accuracy on `check_prompts` training prompts, sampled at the rollout
    temperature, reaches `target`; then the model and tokenizer saved under output_dir/model.

    A fixed step count would not do: the tiny model learns the carries in a sudden drop of the loss
    whose step varies between runs (500 steps gave 80% and 88% held-out accuracy on two seeds, 200 steps
    0.5% on one), so seeds would start RL at very different accuracies. The held-out split is not looked
    at until the warm start is over."""
    import dataclasses

    from fusedrl.engine import rollout
    from fusedrl.engine.config import load_config
    from fusedrl.engine.session import Session
    from fusedrl.engine.warm_start import warm_start

    cfg = load_config(config, overrides)
    session = Session(dataclasses.replace(cfg, warm_start=dataclasses.replace(cfg.warm_start, steps=0)))
    train, r = session.train_split, cfg.rollout
    rows = [{"prompt": p, **{k: v[i] for k, v in train.columns.items()}} for i, p in enumerate(train.prompts)]
    check = train.select(range(min(check_prompts, len(train))))
    log = []

    def report(step: int, loss: float, seconds: float) -> None:
        batch = rollout.generate(session.model, session.tokenizer, check.prompt_ids, group_size=1,
                                 temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                                 max_new_tokens=r.max_new_tokens, batch_size=r.batch_size)
        rewards, _ = session.score(check.prompts, rollout.decode(session.tokenizer, batch), check.columns)
        log.append({"steps": step, "loss": loss, "train_accuracy": float((rewards >= 1).float().mean())})
        session.logger.print(f"warm start: step {step}, loss {loss:.3f}, accuracy on {len(check)} training "
                             f"prompts {log[-1]['train_accuracy']:.3f}, {seconds:.0f} s")
        if log[-1]["train_accuracy"] >= target:
            raise _TargetReached

    try:
        warm_start(session.model, session.tokenizer, session.task, rows, cfg.warm_start, report=report)
    except _TargetReached:
        pass
    session.prepare()  # the held-out accuracy before RL
    session.model.save_pretrained(session.output_dir / "model", safe_serialization=True)
    session.tokenizer.save_pretrained(session.output_dir / "model")
    session.logger.close()
    (session.output_dir / "summary.json").write_text(json.dumps(
        {"eval_before": session.extra["eval_before"], "steps": log[-1]["steps"] if log else 0, "checks": log}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedrl.engine.study", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="one seed, a few steps: checks every arm trains")
    parser.add_argument("--plan", default=str(REPO / "configs/study/arms.yaml"), help="the study's arms")
    parser.add_argument("--output", default=None, help="run folder (default runs/study, or runs/study_small)")
    parser.add_argument("--report", default=None, help="the report (default docs/study.md; with --small, "
                                                        "OUTPUT/study.md)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--machine", default=f"{os.cpu_count()}-core CPU",
                        help="the machine, as the report names it")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report from the runs there are (a study stopped early: marked partial)")
    parser.add_argument("--warm-start", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--warm-start-target", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warm_start:
        warm_start_only(args.warm_start[0], args.warm_start[1:], args.warm_start_target, check_prompts=200)
        return 0
    from fusedrl.engine.study_report import write_report

    output = Path(args.output or REPO / ("runs/study_small" if args.small else "runs/study")).resolve()
    plan = load_plan(Path(args.plan).resolve(), args.small)
    starts, runs = jobs(plan, output)
    clock = Clock(output)
    # `kill` of the study stops its runs too (run_all's finally), as an exception would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report_only:
        failed, wall = [], clock.before
    else:
        failed = run_all(schedule(plan, starts, runs), args.jobs, clock)
        clock.save()
        wall = clock.seconds()
    if args.small:
        report, images = output / "study.md", output / "images"
    else:
        report = Path(args.report) if args.report else REPO / "docs/study.md"
        images = report.parent / "images"
    write_report(plan, output, report, images, wall_seconds=wall, small=args.small,
                 machine=args.machine)
    print(f"study: {sum(j.done for j in starts + runs)} of {len(starts) + len(runs)} runs done, {len(failed)} failed; "
          f"{wall / 60:.1f} min; report {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
