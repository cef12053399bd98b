"""Assert cases split into calls (run with the program) and checks (run outside it), and the plain data between."""

import json
import math
import operator

import pytest

from fusedrl.engine.rewards.assert_cases import check_locally, plan_assert, read_values
from fusedrl.engine.rewards.plain_values import _fusedrl_encode as encode
from fusedrl.engine.rewards.plain_values import decode, judge


def round_trip(value):
    return decode(json.loads(json.dumps(encode(value))))


def test_plain_values_survive_the_trip_with_their_types():
    value = [None, True, 3, -2.5, "é\n", b"\x00\xff", 1 + 2j, (1, (2,)), {3, 4}, frozenset({5}),
             {1: "a", (2, 3): [4], "k": {"n": None}}, [], ()]
    back = round_trip(value)
    assert back == value
    assert [type(item) for item in back] == [type(item) for item in value]
    assert type(back[-3][(2, 3)]) is list and back[2] is not True  # an int stays an int
    assert math.isnan(round_trip(float("nan"))) and round_trip([-math.inf]) == [-math.inf]


def test_anything_else_is_opaque_and_fails():
    class Sneaky(int):
        def __eq__(self, other):
            return True

    assert encode(Sneaky(3)) == {"opaque": f"{__name__}.test_anything_else_is_opaque_and_fails.<locals>.Sneaky"}
    assert encode([1, {2: object()}]) == [1, {"dict": [[2, {"opaque": "builtins.object"}]]}]
    with pytest.raises(ValueError, match="Sneaky, not plain data"):
        round_trip([Sneaky(3)])
    for bad in ({"tuple": 3}, {"a": 1, "b": 2}, {"eval": "1"}, {"set": [[1]]}):
        with pytest.raises((ValueError, TypeError)):
            decode(bad)


def test_calls_into_the_program_are_cut_whole():
    cases = {
        "assert add(3, 4) == 7": ("(add(3, 4))", "assert _fusedrl_values[0] == 7"),
        "assert Solution().solve([1, 2])[0] != 'x'": (
            "(Solution().solve([1, 2])[0])", "assert _fusedrl_values[0] != 'x'"),
        "assert sorted(f(x), key=len) == []": ("(f(x))", "assert sorted(_fusedrl_values[0], key=len) == []"),
        "assert abs(f(3) - 2.5) < 1e-6": ("(f(3))", "assert abs(_fusedrl_values[0] - 2.5) < 1e-06"),
        "assert (g(1) + 2).real == 3": ("(g(1))", "assert (_fusedrl_values[0] + 2).real == 3"),
        "assert not is_prime(8)": ("(is_prime(8))", "assert not _fusedrl_values[0]"),
    }
    for text, (calls, check) in cases.items():
        plan = plan_assert(text)
        assert f"[{calls}]" in plan.harness and plan.checks == (check,), text
    assert plan_assert("assert add(3, 4) == 7").local == ((0, operator.eq, 7),)
    assert plan_assert("assert abs(f(3) - 2.5) < 1e-6").local is None  # needs the judge
    assert plan_assert("assert f(1) is 1").local is None  # `is` compares with None, True, False only here


def test_local_checks_on_hand_worked_values():
    plan = plan_assert("assert f(1) == [1, 2]\nassert g(2) is None\nassert h(3)")
    assert check_locally(plan, "[[1, 2], null, 5]") == (True, "")
    assert check_locally(plan, "[[1, 2.0], null, [0]]") == (True, "")  # Python's == and truth, on plain data
    assert check_locally(plan, "[[1, 2], 0, 5]") == (False, "")
    assert check_locally(plan, "[[1, 2], null, []]") == (False, "")
    assert check_locally(plan, '[{"opaque": "m.T"}, null, 1]') == (False, "a call returned a m.T, not plain data")
    assert check_locally(plan, "[" * 100_000 + "]" * 100_000)[0] is False  # too deep: fails, does not raise


def test_the_judge_runs_the_check_on_decoded_values():
    request = {"values": json.dumps([2.0]), "checks": ["assert math.isclose(_fusedrl_values[0] ** 2, 4)"],
               "modules": ["math"]}
    assert judge(request) == {"outcome": "passed", "why": ""}
    assert judge({**request, "values": "[3]"}) == {"outcome": "failed", "why": ""}
    assert judge({**request, "values": '["3"]'})["why"].startswith("TypeError")


def test_values_are_read_after_the_last_marker_line():
    marker = "\x1efusedrl-values "
    assert read_values(f"hello\n{marker}[1]\n") == "[1]"
    assert read_values(f"\n{marker}[1]\n\n{marker}[2]\n") == "[2]"
    assert read_values("no marker\n") is None
    assert read_values(f"{marker}[1]\n") is None  # the harness always starts a line of its own
