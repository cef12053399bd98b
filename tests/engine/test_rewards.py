"""Reward parsing (the demo task, math-verify) and the robust reward call: import paths, failures
and timeouts scored 0 and counted."""

import textwrap
import threading
import time

import pytest

from fusedrl.engine.errors import UsageError
from fusedrl.engine.rewards import load_reward, score
from fusedrl.engine.rewards.math_answer import extract_answer, last_boxed, reward as math_reward
from fusedrl.engine.tasks import arithmetic


def test_arithmetic_reference_is_worked_and_correct():
    assert arithmetic.DIGITS == 2
    assert arithmetic.reference_completion({"a": 7, "b": 38}) == "7+8+0=15 0+3+1=04 #045"
    assert arithmetic.reference_completion({"a": 99, "b": 1}) == "9+1+0=10 9+0+1=10 #100"
    assert arithmetic.reference_completion({"a": 52, "b": 31}) == "2+1+0=03 5+3+0=08 #083"


def test_arithmetic_reward():
    completions = ["7+8+0=15 0+3+1=04 #045", "#046", "no answer", "x # 045 ", "#0450", "#45"]
    assert arithmetic.reward([""] * 6, completions, answer=["045"] * 6) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_arithmetic_splits_disjoint_and_deterministic():
    train = arithmetic.make_dataset("train", 500, seed=3)
    held_out = arithmetic.make_dataset("eval", 200, seed=3)
    assert len({r["prompt"] for r in train}) == 500 and len({r["prompt"] for r in held_out}) == 200
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert train == arithmetic.make_dataset("train", 500, seed=3)
    assert all(int(r["answer"]) == r["a"] + r["b"] for r in train)
    # Every held-out prompt also differs from the training prompts of other seeds.
    other = arithmetic.make_dataset("train", 500, seed=4)
    assert not {r["prompt"] for r in other} & {r["prompt"] for r in held_out}
    with pytest.raises(ValueError, match="size"):
        arithmetic.make_dataset("eval", 5000, seed=0)


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{x^{2}+1}", "x^{2}+1"),
    ("we get 12, then 1,234 apples", "1234"),
    ("-3.5 is it", "-3.5"),
    ("ratio 3/4", "3/4"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_unbalanced():
    assert last_boxed(r"\boxed{1 + {2}") is None


@pytest.mark.parametrize("completion, answer, expected", [
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", 1.0),
    (r"\boxed{x+1}", "1+x", 1.0),
    ("so 40 + 2 = 42", "42", 1.0),
    ("the total is 1,234", "1234", 1.0),
    ("first 3 then 7", "3", 0.0),  # the last number counts, not the first
    (r"\boxed{3} although 7", "3", 1.0),  # a boxed answer wins over later numbers
    ("nothing", "1", 0.0),
])
def test_math_reward(completion, answer, expected):
    assert math_reward(["q"], [completion], answer=[answer]) == [expected]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import time

        def length(prompts, completions, **columns):
            return [float(len(c)) for c in completions]

        def raising(prompts, completions, **columns):
            if any("bad" in c for c in completions):
                raise RuntimeError("boom")
            return [1.0] * len(completions)

        def sleepy(prompts, completions, **columns):
            if any("slow" in c for c in completions):
                time.sleep(30)
            return [1.0] * len(completions)

        def spinning(prompts, completions, **columns):
            while any("spin" in c for c in completions):
                pass
            return [1.0] * len(completions)

        def sloppy(prompts, completions, **columns):
            return [None if c == "none" else float("nan") if c == "nan" else 1.0 for c in completions]

        def short(prompts, completions, **columns):
            return [1.0]

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_load_user_reward(user_module):
    fn = load_reward(f"{user_module}:length")
    assert score(fn, ["p", "p"], ["ab", "abcd"], {}, timeout_s=5) == ([2.0, 4.0], 0)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("my_rewards:missing", "has no function 'missing'"),
    ("my_rewards:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
    ("my_rewards:", "expected an import path"),
])
def test_load_user_reward_errors(user_module, spec, message):
    with pytest.raises(UsageError, match=message):
        load_reward(spec)


def test_raising_reward_scores_failing_samples_zero(user_module):
    fn = load_reward(f"{user_module}:raising")
    assert score(fn, ["p"] * 3, ["good", "bad", "fine"], {}, timeout_s=5) == ([1.0, 0.0, 1.0], 1)


@pytest.mark.parametrize("name, marker", [("sleepy", "slow"), ("spinning", "spin")])
def test_timed_out_reward_scores_zero_and_is_stopped(user_module, name, marker):
    fn = load_reward(f"{user_module}:{name}")
    start = time.perf_counter()
    rewards, failures = score(fn, ["p"] * 3, ["ok", marker, "ok"], {}, timeout_s=0.3)
    # One batch call and one single-sample call time out; the others return at once.
    assert time.perf_counter() - start < 3
    assert (rewards, failures) == ([1.0, 0.0, 1.0], 1)


def test_timeout_outside_the_main_thread(user_module):
    fn = load_reward(f"{user_module}:sleepy")
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=score(fn, ["p"] * 2, ["slow", "ok"], {}, 0.3)))
    worker.start()
    worker.join(10)
    assert result["out"] == ([0.0, 1.0], 1)


def test_none_nan_and_wrong_length_are_failures(user_module):
    sloppy = load_reward(f"{user_module}:sloppy")
    assert score(sloppy, ["p"] * 3, ["none", "ok", "nan"], {}, timeout_s=5) == ([0.0, 1.0, 0.0], 2)
    short = load_reward(f"{user_module}:short")
    # The batch answer has the wrong length; sample by sample each call returns its one value.
    assert score(short, ["p"] * 3, ["a", "b", "c"], {}, timeout_s=5) == ([1.0, 1.0, 1.0], 0)


def test_columns_reach_the_reward():
    rewards, failures = score(arithmetic.reward, ["01+02=", "03+04="], ["#003", "#008"],
                              {"answer": ["003", "007"]}, 5)
    assert (rewards, failures) == ([1.0, 0.0], 0)
