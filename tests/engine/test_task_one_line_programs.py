"""The built-in code task: its data, and its reward on reference and wrong programs in the sandbox."""

import pytest

from fusedrl.engine.tasks import one_line_programs as task


def test_dataset_is_deterministic_distinct_and_split():
    train = task.make_dataset("train", 300, seed=1)
    assert train == task.make_dataset("train", 300, seed=1)
    assert train != task.make_dataset("train", 300, seed=2)
    evals = task.make_dataset("eval", 100, seed=1)
    assert len({r["prompt"] for r in train}) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    assert {r["form"] for r in train} == {"function", "program"}
    with pytest.raises(ValueError, match="size"):
        task.make_dataset("eval", 10**6, seed=0)
    with pytest.raises(ValueError, match="split"):
        task.make_dataset("test", 1, seed=0)


def test_rows_are_hand_checkable():
    row = task._row("function", "g", "div", 7)
    assert row["prompt"] == "function g(x) returns x div 7\n"
    assert task.reference_completion(row) == "def g(x):\n    return x // 7"
    assert [t["assert"] for t in row["tests"]] == [
        "assert g(-5) == -1", "assert g(0) == 0", "assert g(3) == 0", "assert g(17) == 2", "assert g(58) == 8",
    ]
    row = task._row("program", "", "max", 12)
    assert row["prompt"] == "program reads n, prints max of n and 12\n"
    assert task.reference_completion(row) == "n = int(input())\nprint(max(n, 12))"
    assert row["tests"][0] == {"input": "-5\n", "output": "12\n"}
    assert row["tests"][4] == {"input": "58\n", "output": "58\n"}


def test_reward_runs_the_programs():
    rows = [task._row("function", "h", "square", 3), task._row("program", "", "minus", 4)]
    rows += task.make_dataset("train", 4, seed=0)
    completions = [task.reference_completion(r) for r in rows]
    completions[0] = "def h(x):\n    return x * 3 + 3"  # right at x = 0 and x = 3 only: 2 of 5
    completions[1] = "n = int(input())\nprint(n + 4)"  # never right
    columns = {"tests": [r["tests"] for r in rows]}
    task.stats()  # start the counts here
    assert task.reward([r["prompt"] for r in rows], completions, **columns) == [0.4, 0.0, 1.0, 1.0, 1.0, 1.0]
    counts = task.stats()
    assert (counts["code/passed"], counts["code/failed"], counts["code/programs"]) == (22.0, 8.0, 30.0)
