"""Reward functions: the interface every reward in fusedrl follows.

A reward function is a plain callable

    reward_fn(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]

- `prompts[i]` is the prompt text of sample i, `completions[i]` the generated response text
  (special tokens removed).
- `columns` carries every other field of the dataset row, one list per field, aligned with the
  samples (for example `answer=[...]` or `tests=[...]`).
- It returns one float per sample. `None` means "could not be scored" and counts as 0 with the
  sample reported in the logs, exactly like a reward function that raises or runs past its timeout.

User rewards are given in the config by import path, `module.sub:function`.

`score` calls a reward function on a batch with a timeout. A call that raises, runs past its timeout,
returns the wrong number of values, or returns None / a non-finite value for a sample does not end
the run: the batch is retried sample by sample, and each sample that still fails scores 0 and is
counted (the `reward/failures` metric).
"""

import importlib
from math import isfinite
import signal
import threading
from typing import Callable

from fusedrl.engine.errors import UsageError

RewardFn = Callable[..., list]


class RewardTimeout(Exception):
    """A reward call ran past its timeout."""


def load_reward(spec: str) -> RewardFn:
    """The reward function named by `module.sub:function` (reward.function in the config)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"reward.function {spec!r}: expected an import path module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"reward.function {spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"reward.function {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def call_with_timeout(fn: Callable, timeout_s: float, *args, **kwargs):
    """fn(*args, **kwargs), raising RewardTimeout after timeout_s seconds.

    In the main thread a SIGALRM timer interrupts the call, so a runaway Python reward is stopped,
    not left running. Elsewhere (signals only reach the main thread) the call runs in a daemon
    thread that is abandoned on timeout.
    """
    if threading.current_thread() is threading.main_thread():
        def on_alarm(signum, frame):
            raise RewardTimeout(f"reward call exceeded {timeout_s} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    result = {}

    def target():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller's thread below
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(f"reward call exceeded {timeout_s} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def score(reward_fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list],
          timeout_s: float) -> tuple[list[float], int]:
    """(rewards, failures): one float per sample, failed samples scored 0 and counted."""
    try:
        values = call_with_timeout(reward_fn, timeout_s, prompts, completions, **columns)
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} samples")
    except Exception:
        values = [_score_one(reward_fn, prompts, completions, columns, timeout_s, i)
                  for i in range(len(completions))]
    rewards = [_valid(v) for v in values]
    failures = sum(r is None for r in rewards)
    return [0.0 if r is None else r for r in rewards], failures


def _score_one(reward_fn, prompts, completions, columns, timeout_s, i):
    try:
        values = call_with_timeout(reward_fn, timeout_s, prompts[i: i + 1], completions[i: i + 1],
                                   **{k: v[i: i + 1] for k, v in columns.items()})
        values = list(values)
        return values[0] if len(values) == 1 else None
    except Exception:
        return None


def _valid(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if isfinite(value) else None
