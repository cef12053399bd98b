"""SIGKILL a real `fusedrl train` at seeded random points, during a checkpoint save among them, then
resume it with run.resume=latest (or, killed before its first checkpoint, start it again with
run.overwrite=true): the run that finally completes logs exactly the metrics of an uninterrupted run
and ends with the same weights (CPU)."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from safetensors.torch import load_file

from fusedrl.engine import checkpoint

# Wall-clock and memory readings differ between any two runs; everything else must match exactly.
NONDETERMINISTIC = {"tokens_per_second", "time/rollout_s", "time/step_s", "memory/peak_bytes"}
STEPS = 4
ARGS = ["configs/demo.yaml", f"run.steps={STEPS}", "run.save_every=1", "run.progress=false", "run.tensorboard=false",
        "run.plots=false", "run.num_threads=1", "warm_start.steps=0", "model.demo.hidden_size=32",
        "model.demo.num_layers=1", "model.demo.num_heads=2", "model.demo.intermediate_size=64",
        "data.train_size=32", "data.eval_size=4", "rollout.prompts_per_step=2", "rollout.group_size=4",
        "rollout.max_new_tokens=12", "optim.lr=1e-3", "reward.function=digit_reward:digits"]


def _start(tmp_path, out, *extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "fusedrl.cli", "train", *ARGS, f"run.output_dir={out}", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _how_to_continue(out):
    """resume=latest when a complete checkpoint exists, overwrite=true when only a run's start does."""
    if _complete_step(out):
        return ["run.resume=latest"]
    return ["run.overwrite=true"] if out.exists() else []


def _complete_step(out):
    """The step of the newest checkpoint with its completion marker, 0 without one."""
    return max([int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / checkpoint.MARKER).is_file()],
               default=0)


def _saving(out):
    return any(out.glob(".checkpoint-*.partial"))


def _last_step(out):
    """The last step in metrics.jsonl (-1 before there is one); a line being written does not count."""
    try:
        lines = (out / "metrics.jsonl").read_text().split("\n")[:-1]
    except FileNotFoundError:
        return -1
    return json.loads(lines[-1])["step"] if lines else -1


def _records(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC} for r in rows]


@pytest.mark.slow
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path):
    # The reward takes 0.5 s, longer than any kill delay below: on a quiet machine the tiny run's steps
    # take milliseconds, and a kill meant for step 0 landed after step 3 (so no later kill point came).
    (tmp_path / "digit_reward.py").write_text(textwrap.dedent("""
        import time

        def digits(prompts, completions, **columns):
            time.sleep(0.5)
            return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]
    """))
    full = tmp_path / "full"
    proc = _start(tmp_path, full)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()

    # Kill points are events on disk plus a seeded delay, not wall times, so that they land alike on a
    # slow or busy machine, and every restart gets further: attempt 0 dies within 0.3 s of the held-out
    # metrics before RL (before any checkpoint: the run starts again with run.overwrite=true); attempts
    # 1 and 3 the moment the checkpoint two steps past the resumed one is half written; attempt 2
    # 0 to 0.3 s after the checkpoint one or two steps past the resumed one is complete.
    rng = random.Random(15)
    out, kills = tmp_path / "killed", []
    for attempt in range(4):
        resume_step = _complete_step(out)
        delay = rng.uniform(0.0, 0.3)
        if attempt == 0:
            reached = lambda: _last_step(out) >= 0  # noqa: E731
        elif attempt == 2:
            target = min(STEPS - 1, resume_step + rng.randint(1, 2))
            reached = lambda: _complete_step(out) >= target  # noqa: E731
        else:
            reached, delay = (lambda: (out / f".checkpoint-{resume_step + 2}.partial").exists()), 0.0
        proc = _start(tmp_path, out, *_how_to_continue(out))
        since = None
        while proc.poll() is None:
            if since is None and reached():
                since = time.perf_counter()
            if since is not None and time.perf_counter() >= since + delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills.append((attempt, _last_step(out), _complete_step(out), _saving(out)))
                break
            time.sleep(0.002)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    # At least: one kill before any checkpoint, one during a save, one after a resume.
    assert len(kills) >= 3 and any(k[3] for k in kills) and any(k[2] > 0 for k in kills), kills
    if proc.returncode != 0:
        proc = _start(tmp_path, out, *_how_to_continue(out))
        assert proc.wait(timeout=300) == 0, proc.stderr.read()

    assert _records(out) == _records(full)
    assert [r["step"] for r in _records(out)] == list(range(STEPS + 1))
    final, final_full = (load_file(d / f"checkpoint-{STEPS}" / "model.safetensors") for d in (out, full))
    assert final.keys() == final_full.keys() and all((final[k] == final_full[k]).all() for k in final)
    assert not list(out.glob(".checkpoint-*"))  # no temporary directory outlives the run
