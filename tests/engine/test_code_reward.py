"""The code-execution reward: extraction, scoring modes, and an adversarial batch that must be contained."""

import os
import shutil
import signal
import socket
import sys
import textwrap

import pytest

from fusedrl.engine.rewards.assert_cases import plan_assert
from fusedrl.engine.rewards.program_tests import NOT_TEXT, CaseResult, CodeExecutionReward, extract_code, outputs_match

SUM_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"}]
ADD_TESTS = [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(-5, 5) == 0"}]


@pytest.fixture
def reward(work_root):
    fn = CodeExecutionReward(workers=4, timeout_s=2.0, memory_bytes=256 * 2**20, max_output_bytes=2**16)
    yield fn
    fn.close()


def test_extract_code_prefers_the_last_python_block():
    text = "Idea:\n```text\nnot code\n```\n```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)"
    assert extract_code("```\nprint(3)\n```") == "print(3)"
    assert extract_code("print(4)\n") == "print(4)"
    assert extract_code("cut off:\n```python\nprint(5)\nprint(") == "print(5)\nprint("
    assert extract_code("```text\nonly prose\n```") is None
    assert extract_code("  \n") is None


def test_outputs_match_ignores_trailing_whitespace_only():
    assert outputs_match("1 2  \n3\n\n", "1 2\n3")
    assert not outputs_match(" 1 2\n3", "1 2\n3")
    assert not outputs_match("1\n2", "1 2")


def test_correct_wrong_and_half_right_programs(reward):
    completions = [
        "```python\na, b = map(int, input().split())\nprint(a + b)\n```",
        "a, b = map(int, input().split())\nprint(a - b)",
        "a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)",
        "def add(a, b):\n    return a + b",
        "def add(a, b):\n    return a * b",
        "def add(a, b):\n    return 0",
        "I do not know.\n```text\nsorry\n```",
    ]
    tests = [SUM_TESTS] * 3 + [ADD_TESTS] * 3 + [SUM_TESTS]
    assert reward([""] * 7, completions, tests=tests) == [1.0, 0.0, 0.5, 1.0, 0.0, 0.5, 0.0]
    reasons = [r.reason for r in reward.last_results]
    assert reasons[0] == reasons[3] == ""
    assert reasons[1].startswith("wrong output: expected '3\\n', got '-1\\n'")
    assert reasons[4] == "assertion failed: assert add(1, 2) == 3"
    assert reasons[6] == "no code in the response"
    stats = reward.stats()
    assert {k: stats[f"code/{k}"] for k in ("passed", "failed", "crashed", "timed_out", "refused", "no_code")} == {
        "passed": 6.0, "failed": 6.0, "crashed": 0.0, "timed_out": 0.0, "refused": 0.0, "no_code": 1.0,
    }
    assert stats["code/programs"] == 12.0 and stats["code/programs_per_s"] > 0
    assert reward.stats()["code/programs"] == 0.0  # counts restart after each stats() call


def test_all_mode_needs_every_case_and_stops_at_the_first_failure(work_root):
    fn = CodeExecutionReward(workers=2, timeout_s=1.0, mode="all")
    try:
        half = "a, b = map(int, input().split())\nprint(a + b if a > 5 else 0)"
        assert fn(["", ""], [half, "a, b = map(int, input().split())\nprint(a + b)"], tests=[SUM_TESTS] * 2) == [0, 1]
        assert len(fn.last_results[0].cases) == 1  # the second case never ran
    finally:
        fn.close()


def test_an_early_clean_exit_does_not_pass_asserts(reward):
    hacks = ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "def add(a, b):\n    return a + b\nexit()"]
    assert reward([""] * 3, hacks, tests=[ADD_TESTS] * 3) == [0.0, 0.0, 0.0]
    assert all(r.reason.startswith("exited before the test ran") for r in reward.last_results)


# Each is a wrong add (it subtracts, so no case of ADD_TESTS holds), and each scored 1.0 when the
# asserts ran in the program's own interpreter after it (checked on commit 07ae710).
GAMED_ASSERTS = {
    "__eq__ always true": """
class Anything:
    def __eq__(self, other):
        return True
    __hash__ = object.__hash__

def add(a, b):
    return Anything()
""",
    "success token from the code object's constants": """
import sys
def add(a, b):
    return a - b
for const in sys._getframe().f_code.co_consts:
    if isinstance(const, str) and len(const) == 32 and set(const) <= set("0123456789abcdef"):
        print(const)
        sys.exit(0)
""",
    "settrace jumps over the assert": """
import sys
def add(a, b):
    return a - b
SOURCE = open(sys.argv[0]).read().splitlines()
def tracer(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "<module>":
        if SOURCE[frame.f_lineno - 1].lstrip().startswith("assert"):
            frame.f_lineno += 3  # past `except AssertionError: raise SystemExit(86)` to the success print
    return tracer
sys._getframe().f_trace = tracer
sys.settrace(tracer)
""",
    "reads the harness source": """
import re, sys
def add(a, b):
    return a - b
print(re.findall(r"[0-9a-f]{32}", open(sys.argv[0]).read())[-1])
sys.exit(0)
""",
}


@pytest.mark.parametrize("attack", GAMED_ASSERTS)
def test_a_wrong_program_cannot_game_assert_cases(reward, attack):
    assert reward([""], [GAMED_ASSERTS[attack]], tests=[ADD_TESTS]) == [0.0]
    assert all(case.outcome in ("failed", "crashed") for case in reward.last_results[0].cases)


def test_only_the_calls_reach_the_program():
    """What runs after the program holds the calls of the asserts, never what they are compared with."""
    plan = plan_assert("assert add(1, 2) == 31337\nassert math.isclose(area(7), 153.938, rel_tol=1e-4)")
    assert "(add(1, 2)), (area(7))" in plan.harness
    assert not any(secret in plan.harness for secret in ("31337", "153.938", "isclose", "assert"))
    assert plan.checks == ("assert _fusedrl_values[0] == 31337",
                           "assert math.isclose(_fusedrl_values[1], 153.938, rel_tol=0.0001)")
    assert plan.modules == ("math",) and plan.local is None


def test_asserts_the_parent_cannot_check_alone_go_to_a_judge(reward):
    tests = [[{"assert": "assert math.isclose(area(2), 12.566, rel_tol=1e-3)"},
              {"assert": "assert sorted(evens(6)) == [0, 2, 4]\nassert len(evens(3)) == 2"},
              {"assert": "assert abs(area(1) - 3.1416) < 1e-3"}]]
    right = "import math\ndef area(r):\n    return math.pi * r * r\n"
    right += "def evens(n):\n    return {i for i in range(0, n, 2)}"
    wrong = "def area(r):\n    return 3 * r * r\ndef evens(n):\n    return [i for i in range(n) if i % 2]"
    anything = GAMED_ASSERTS["__eq__ always true"].replace("def add(a, b)", "def area(r)") + "evens = area"
    assert reward([""] * 3, [right, wrong, anything], tests=tests * 3) == [1.0, 0.0, 0.0]
    assert reward.last_results[1].cases[1].reason == (
        "assertion failed: assert sorted(evens(6)) == [0, 2, 4]\nassert len(evens(3)) == 2"
    )
    assert "not plain data" in reward.last_results[2].cases[0].reason


def test_a_completion_with_a_lone_surrogate_scores_zero(reward):
    """A decoder may emit one; the call goes on and only that sample scores 0."""
    completions = ["def add(a, b):\n    return a + b  # \ud800", "def add(a, b):\n    return a + b"]
    assert reward(["", ""], completions, tests=[ADD_TESTS] * 2) == [0.0, 1.0]
    assert reward.last_results[0].reason == NOT_TEXT
    assert reward.stats()["code/no_code"] == 1.0
    # Outside the code block it does no harm.
    assert reward([""], ["\ud800 here:\n```python\ndef add(a, b):\n    return a + b\n```"], tests=[ADD_TESTS]) == [1.0]


def test_a_run_whose_isolation_fails_is_refused_and_unscored(reward, tmp_path):
    """If isolation breaks after construction, nothing runs and the sample gets None (not a 0)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shutil.copy(os.path.realpath(sys.executable), private / "python3")
    reward.pool.sandbox.python = str(private / "python3")  # not executable by the sandbox uid
    assert reward([""], ["print(1)"], tests=[[{"input": "", "output": "1\n"}] * 2]) == [None]
    assert reward.last_results[0].reason.startswith("isolation failed")
    assert reward.stats()["code/refused"] == 2.0


def test_the_cpu_time_limit_counts_as_a_timeout(work_root):
    fn = CodeExecutionReward(workers=1, timeout_s=10.0)
    busy = "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, resource.getrlimit(resource.RLIMIT_CPU)[1]))\n"
    try:
        assert fn([""], [busy + "while True:\n    pass"], tests=[[{"input": "", "output": "ok\n"}]]) == [0.0]
        assert fn.last_results[0].cases[0] == CaseResult("timed_out", "killed by signal 24 (CPU time limit exceeded)")
    finally:
        fn.close()


def test_adversarial_programs_are_contained(reward, tmp_path, monkeypatch):
    """Each case scores 0 for the stated reason; afterwards no process, file or signal has escaped."""
    monkeypatch.setenv("FUSEDRL_TEST_SECRET", "hunter2")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    target = tmp_path / "open-to-all"
    target.mkdir(mode=0o777)
    os.chmod(target, 0o777)  # writable by any uid: only the mount namespace keeps the program out
    escape = f"/tmp/fusedrl-escape-{os.getpid()}"
    repo_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"pwned-{os.getpid()}")
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    me = os.getpid()
    cases = {
        "fork bomb": (
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
            "timeout",
        ),
        "infinite loop": ("while True:\n    pass", "timeout"),
        "memory hog": ("hog = bytearray(2**30)\nprint('ok')", "MemoryError"),  # past RLIMIT_AS at once
        "gigabyte of output": (
            "import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * 2**20)",
            "output exceeded",
        ),
        "network": (
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5).sendall(b'hi')\nprint('ok')",
            "Network is unreachable",
        ),
        "write outside": (  # /tmp exists, read-only, in the program's root; the test's directory does not
            f"open({str(target / 'pwned')!r}, 'a')\nopen({escape!r}, 'w').write('x')\nprint('ok')",
            "No such file",
        ),
        "write to /tmp": (f"open({escape!r}, 'w').write('x')\nprint('ok')", "Read-only file system"),
        "write into the repository": (f"open({repo_file!r}, 'w').write('x')\nprint('ok')", "No such file"),
        "parent environment": (
            textwrap.dedent(
                """
                import glob, os
                seen = os.environ.get("FUSEDRL_TEST_SECRET", "")
                for path in glob.glob("/proc/*/environ"):
                    try:
                        seen += "hunter2" if b"hunter2" in open(path, "rb").read() else ""
                    except OSError:
                        pass
                print("ok" if "hunter2" in seen else "absent")
                """
            ),
            "wrong output: expected 'ok\\n', got 'absent\\n'",
        ),
        "signal the test process": (
            f"import os, signal\nos.kill({me}, signal.SIGUSR1)\nprint('ok')",
            "ProcessLookupError",  # the test's pid does not exist in the program's pid namespace
        ),
        "signal the parent": (
            "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('ok')",
            "PermissionError",  # the parent is the namespace's init, owned by root
        ),
        "sleep": ("import time\ntime.sleep(30)\nprint('ok')", "timeout"),
    }
    try:
        tests = [[{"input": "", "output": "ok\n"}]] * len(cases)
        rewards = reward([""] * len(cases), [src for src, _ in cases.values()], tests=tests)
        for name, result, (_, expected_reason) in zip(cases, reward.last_results, cases.values()):
            assert result.reward == 0.0, name
            assert expected_reason in result.reason, f"{name}: {result.reason}"
        assert rewards == [0.0] * len(cases)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection ever reached the host's loopback
        assert not target.joinpath("pwned").exists() and not os.path.exists(escape) and not os.path.exists(repo_file)
        assert received == []
        # Other tests in this worker may own long-lived helpers (compile pools): look at ours only.
        assert [pid for pid in _descendants(me) if "sandbox_child.py" in _cmdline(pid)] == []
        assert all(_processes_of_uid(reward.pool.sandbox.first_uid + k) == [] for k in range(reward.pool.workers))
        counts = reward.stats()
        assert (counts["code/timed_out"], counts["code/crashed"], counts["code/failed"]) == (3.0, 8.0, 1.0)
        # The trainer is unharmed and the pool still works.
        assert reward([""], ["print(input())"], tests=[[{"input": "fine\n", "output": "fine\n"}]]) == [1.0]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        listener.close()


def test_bad_test_columns_are_rejected_before_running(reward):
    with pytest.raises(ValueError, match="'tests'"):
        reward([""], ["print(1)"], answer=["1"])
    with pytest.raises(ValueError, match="non-empty list"):
        reward([""], ["print(1)"], tests=[[]])
    with pytest.raises(ValueError, match="each test case"):
        reward([""], ["print(1)"], tests=[[{"input": "1"}]])
    with pytest.raises(ValueError, match="lone surrogate"):
        reward([""], ["print(1)"], tests=[[{"input": "\udc80", "output": ""}]])
    with pytest.raises(ValueError, match="assert statements only"):
        reward([""], ["print(1)"], tests=[[{"assert": "x = add(1, 2)\nassert x == 3"}]])
    with pytest.raises(ValueError, match="call something the program defines"):
        reward([""], ["print(1)"], tests=[[{"assert": "assert max(3, 4) == 4"}]])
    with pytest.raises(ValueError, match="GeneratorExp outside a call"):
        reward([""], ["print(1)"], tests=[[{"assert": "assert all(add(i, 0) == i for i in range(3))"}]])
    with pytest.raises(ValueError, match="mode"):
        CodeExecutionReward(mode="best")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_of_uid(uid: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                if int(next(line for line in f if line.startswith("Uid:")).split()[1]) == uid:
                    found.append(int(entry))
        except (OSError, StopIteration):
            continue
    return found
