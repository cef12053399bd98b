"""Write a one-line Python program from a description: the built-in code task.

Two forms, both checked by running the response in the sandbox (fusedrl.engine.rewards.program_tests):

    prompt "function g(x) returns x times 7\\n"     reference "def g(x):\\n    return x * 7"
        tested by call-and-assert cases: assert g(3) == 21, ...
    prompt "program reads n, prints max of n and 12\\n"
                                                   reference "n = int(input())\\nprint(max(n, 12))"
        tested by stdin/stdout cases: "3\\n" -> "12\\n", ...

The model must map words to Python (plus -> +, div -> //, max of -> max(...)) and copy the name
and the constant; a tiny model learns the layout from the supervised warm start and RL sharpens the
mapping. The reward is the fraction of the row's TESTS_PER_ROW cases that pass, so a program with
the right shape but the wrong operator can still earn partial credit on inputs where they agree.

A prompt belongs to the eval split when a hash of it falls in the EVAL_PERCENT bucket, so train and
eval never share a prompt whatever the seed.
"""

import functools
import os
import random
import zlib

from fusedrl.engine.rewards.program_tests import CodeExecutionReward

EVAL_PERCENT = 10
CONSTANTS = range(1, 100)
FUNCTION_NAMES = ("f", "g", "h")
TEST_INPUTS = (-5, 0, 3, 17, 58)
TESTS_PER_ROW = len(TEST_INPUTS)
# word phrase and Python expression for each operation, written for a variable v and a constant k
OPERATIONS = {
    "plus": ("{v} plus {k}", "{v} + {k}"),
    "minus": ("{v} minus {k}", "{v} - {k}"),
    "times": ("{v} times {k}", "{v} * {k}"),
    "mod": ("{v} mod {k}", "{v} % {k}"),
    "div": ("{v} div {k}", "{v} // {k}"),
    "max": ("max of {v} and {k}", "max({v}, {k})"),
    "min": ("min of {v} and {k}", "min({v}, {k})"),
    "square": ("{v} squared plus {k}", "{v} * {v} + {k}"),
}


def _is_eval(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 100 < EVAL_PERCENT


def _prompt(form: str, name: str, op: str, k: int) -> str:
    phrase = OPERATIONS[op][0]
    if form == "function":
        return f"function {name}(x) returns {phrase.format(v='x', k=k)}\n"
    return f"program reads n, prints {phrase.format(v='n', k=k)}\n"


def _row(form: str, name: str, op: str, k: int) -> dict:
    var = "x" if form == "function" else "n"
    expr = OPERATIONS[op][1].format(v=var, k=k)
    fn = eval(f"lambda {var}: {expr}")  # noqa: S307 - our own template, not model output
    if form == "function":
        tests = [{"assert": f"assert {name}({x}) == {fn(x)}"} for x in TEST_INPUTS]
    else:
        tests = [{"input": f"{n}\n", "output": f"{fn(n)}\n"} for n in TEST_INPUTS]
    return {"prompt": _prompt(form, name, op, k), "tests": tests, "form": form, "name": name, "expr": expr}


@functools.cache
def _prompts(split: str) -> tuple[tuple[str, str, str, int], ...]:
    """Every (form, name, op, k) of the split, in a fixed order."""
    keys = [("function", name, op, k) for name in FUNCTION_NAMES for op in OPERATIONS for k in CONSTANTS]
    keys += [("program", "", op, k) for op in OPERATIONS for k in CONSTANTS]
    return tuple(key for key in keys if _is_eval(_prompt(*key)) == (split == "eval"))


def make_dataset(split: str, size: int, seed: int) -> list[dict]:
    """`size` distinct rows {"prompt", "tests", "form", "name", "expr"} of the split "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    keys = _prompts(split)
    if not (isinstance(size, int) and 0 <= size <= len(keys)):
        raise ValueError(f"size must be an int in [0, {len(keys)}] for the {split} split; got {size!r}")
    rng = random.Random(f"code/{split}/{seed}")
    return [_row(*key) for key in rng.sample(keys, size)]


def reference_completion(row: dict) -> str:
    """The one-line solution: a function for the "function" form, a stdin program otherwise."""
    if row["form"] == "function":
        return f"def {row['name']}(x):\n    return {row['expr']}"
    return f"n = int(input())\nprint({row['expr']})"


@functools.cache
def _reward_fn() -> CodeExecutionReward:
    # Built on first use: constructing it probes the sandbox and fails closed without isolation.
    return CodeExecutionReward(workers=max(1, min(8, os.cpu_count() or 1)), timeout_s=2.0, mode="fraction")


def reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """The fraction of the row's test cases that the response's program passes, run in the sandbox."""
    return _reward_fn()(prompts, completions, **columns)


def stats() -> dict[str, float]:
    """The reward's outcome counts and programs per second since the previous call (for the logs)."""
    return _reward_fn().stats()
