"""Code-execution reward: run the program in each response against its row's test cases.

Test cases come in the `tests` column, one list per row; each case is one of

    {"input": "3 4\\n", "output": "7\\n"}    stdin/stdout: the program reads `input`; it passes when
                                            its stdout equals `output` up to trailing whitespace on
                                            each line and trailing blank lines (APPS-style).
    {"assert": "assert add(3, 4) == 7"}     call-and-assert: the statement runs after the program;
                                            it passes when it completes without an exception.

Every case runs as its own program in the sandbox (fusedrl.engine.rewards.sandbox), so one case's
crash or timeout cannot affect another. The reward of a response is the fraction of its cases that
pass (mode "fraction") or 1 only if all pass (mode "all", which stops at the first case that does
not pass). Xu et al. 2024 (ALGORITHMS.md section 4) trained PPO on APPS with exactly this signal.

A call-and-assert case passes only if the harness prints a fresh random token after the statement,
so a program that exits early with status 0 (sys.exit(0), os._exit(0)) does not pass. A program
that reads its own source file can still find the token; the sandbox contains such a program but
this check does not claim to defeat it.
"""

import re
import secrets
import signal
import textwrap
import time
from collections import Counter
from dataclasses import dataclass

from fusedrl.engine.rewards.sandbox import Limits, RunResult, Sandbox, SandboxPool

OUTCOMES = ("passed", "failed", "timed_out", "crashed", "refused")
_ASSERT_FAILED = 86  # exit status the harness uses for an AssertionError; any other failure is a crash
NO_CODE = "no code in the response"
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str | None:
    """The program in a response: the last ```python (or ```py) block, else the last unlabelled fenced
    block, else the whole response when it has no fence at all. None when there is nothing to run.

    An unclosed fence (a response cut at the length limit) counts up to the end of the text.
    """
    blocks = _FENCE.findall(response)
    if not blocks:
        return response.strip() or None
    for wanted in ({"python", "py", "python3"}, {""}):
        bodies = [body for lang, body in blocks if lang.lower() in wanted]
        if bodies:
            return bodies[-1].strip() or None
    return None


def outputs_match(actual: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line and trailing blank lines."""
    norm = lambda text: [line.rstrip() for line in text.rstrip().splitlines()]  # noqa: E731
    return norm(actual) == norm(expected)


@dataclass(frozen=True)
class CaseResult:
    outcome: str
    """One of OUTCOMES."""
    reason: str
    """Empty when passed; otherwise why not (wrong output, the exception, the limit hit...)."""


@dataclass(frozen=True)
class SampleResult:
    reward: float | None
    cases: tuple[CaseResult, ...]
    reason: str
    """Empty when every case passed; otherwise the first reason a case did not pass."""


def _check_case(case) -> None:
    if isinstance(case, dict) and set(case) == {"input", "output"}:
        if isinstance(case["input"], str) and isinstance(case["output"], str):
            return
    if isinstance(case, dict) and set(case) == {"assert"} and isinstance(case["assert"], str):
        return
    raise ValueError(
        'each test case must be {"input": str, "output": str} or {"assert": str}, got ' + repr(case)[:200]
    )


def _judge(run: RunResult, passed: bool, failed_reason: str) -> CaseResult:
    if run.status == "refused":
        return CaseResult("refused", run.reason)
    if run.status == "timed_out" or run.returncode == 128 + signal.SIGXCPU:
        return CaseResult("timed_out", run.reason)
    if run.status == "output_limit":
        return CaseResult("crashed", run.reason)
    if passed:
        return CaseResult("passed", "")
    if run.returncode in (0, _ASSERT_FAILED):
        return CaseResult("failed", failed_reason)
    return CaseResult("crashed", run.reason)


def run_case(run, program: str, case: dict) -> CaseResult:
    """Run one test case; `run(source, stdin)` executes a program in the sandbox."""
    if "assert" in case:
        token = secrets.token_hex(16)
        harness = (
            f"{program}\n\n\ntry:\n{textwrap.indent(case['assert'], '    ')}\n"
            f"except AssertionError:\n    raise SystemExit({_ASSERT_FAILED})\nprint({token!r})\n"
        )
        result = run(harness, "")
        lines = result.stdout.rstrip().splitlines()
        passed = result.status == "exited" and result.returncode == 0 and lines[-1:] == [token]
        why = "assertion failed" if result.returncode == _ASSERT_FAILED else "exited before the test ran"
        return _judge(result, passed, f"{why}: {case['assert'][:200]}")
    result = run(program, case["input"])
    passed = result.status == "exited" and result.returncode == 0 and outputs_match(result.stdout, case["output"])
    return _judge(result, passed, f"wrong output: expected {case['output'][:100]!r}, got {result.stdout[:100]!r}")


class CodeExecutionReward:
    """Reward function (fusedrl.engine.rewards interface) that runs responses against test cases.

    Args:
        workers: programs run at once (threads, each driving one sandboxed process).
        timeout_s: wall-clock limit of one test case, Python start-up (~0.04 s) included.
        mode: "fraction" (share of passed cases) or "all" (1.0 only if every case passes).
        tests_column: the dataset column holding each row's list of test cases.
        memory_bytes, max_processes, max_output_bytes: the sandbox Limits of each program.
        allow_unisolated_execution_UNSAFE: see Sandbox; never needed as root, nor as another user
            where unprivileged user namespaces are available.

    Raises SandboxUnavailableError at construction when isolation cannot be set up.
    After each call, `last_results` holds one SampleResult per response; `stats()` returns the
    counts and throughput since its previous call, ready for logging.
    """

    __name__ = "code"

    def __init__(
        self,
        *,
        workers: int = 4,
        timeout_s: float = 2.0,
        mode: str = "fraction",
        tests_column: str = "tests",
        memory_bytes: int = Limits.memory_bytes,
        max_processes: int = Limits.max_processes,
        max_output_bytes: int = Limits.max_output_bytes,
        allow_unisolated_execution_UNSAFE: bool = False,
    ):
        if mode not in ("fraction", "all"):
            raise ValueError(f'mode must be "fraction" or "all", got {mode!r}')
        limits = Limits(
            timeout_s=timeout_s,
            memory_bytes=memory_bytes,
            max_processes=max_processes,
            max_output_bytes=max_output_bytes,
        )
        sandbox = Sandbox(limits, allow_unisolated_execution_UNSAFE=allow_unisolated_execution_UNSAFE)
        self.pool = SandboxPool(sandbox, workers)
        self.mode = mode
        self.tests_column = tests_column
        self.last_results: list[SampleResult] = []
        self._counts: Counter = Counter()
        self._busy_s = 0.0

    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        if self.tests_column not in columns:
            raise ValueError(f"column {self.tests_column!r} (the test cases) is missing; got {sorted(columns)}")
        tests = columns[self.tests_column]
        if len(tests) != len(completions):
            raise ValueError(f"{self.tests_column} has {len(tests)} rows for {len(completions)} completions")
        for row in tests:
            if not isinstance(row, (list, tuple)) or not row:
                raise ValueError(f"each row of {self.tests_column!r} must be a non-empty list of test cases")
            for case in row:
                _check_case(case)
        start = time.monotonic()
        self.last_results = self.pool.map(self._score, list(zip(completions, tests)))
        self._busy_s += time.monotonic() - start
        for sample in self.last_results:
            self._counts.update(case.outcome for case in sample.cases)
            self._counts["no_code"] += sample.reason == NO_CODE
        return [sample.reward for sample in self.last_results]

    def _score(self, run, item) -> SampleResult:
        completion, cases = item
        program = extract_code(completion)
        if program is None:
            return SampleResult(0.0, (), NO_CODE)
        results = []
        for case in cases:
            results.append(run_case(run, program, case))
            if self.mode == "all" and results[-1].outcome != "passed":
                break
        reasons = [r.reason for r in results if r.outcome != "passed"]
        if any(r.outcome == "refused" for r in results):
            return SampleResult(None, tuple(results), reasons[0])
        passed = sum(r.outcome == "passed" for r in results)
        reward = passed / len(cases) if self.mode == "fraction" else float(passed == len(cases))
        return SampleResult(reward, tuple(results), reasons[0] if reasons else "")

    def stats(self) -> dict[str, float]:
        """Outcome counts, programs run and programs per second since the previous call."""
        programs = sum(self._counts[o] for o in OUTCOMES)
        out = {f"code/{o}": float(self._counts[o]) for o in (*OUTCOMES, "no_code")}
        out["code/programs"] = float(programs)
        out["code/programs_per_s"] = programs / self._busy_s if self._busy_s > 0 else 0.0
        self._counts.clear()
        self._busy_s = 0.0
        return out

    def close(self) -> None:
        """Stop the worker threads."""
        self.pool.close()
