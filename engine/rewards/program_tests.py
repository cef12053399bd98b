"""Code-execution reward: run the program in each response against its row's test cases.

Test cases come in the `tests` column, one list per row; each case is one of

    {"input": "3 4\\n", "output": "7\\n"}    stdin/stdout: the program reads `input`; it passes when
                                            its stdout equals `output` up to trailing whitespace on
                                            each line and trailing blank lines (APPS-style).
    {"assert": "assert add(3, 4) == 7"}     call-and-assert: one or more assert statements, judged
                                            outside the program's reach (assert_cases.py): only the
                                            program's return values, as plain data, leave its sandbox.

Every case runs as its own program in the sandbox (fusedrl.engine.rewards.sandbox), so one case's
crash or timeout cannot affect another. The reward of a response is the fraction of its cases that
pass (mode "fraction") or 1 only if all pass (mode "all", which stops at the first case that does
not pass). Xu et al. 2024 (docs/algorithms.md section 4) trained PPO on APPS with exactly this signal.
"""

import re
import signal
import time
from collections import Counter
from dataclasses import dataclass

from fusedrl.engine.rewards import assert_cases
from fusedrl.engine.rewards.sandbox import Limits, RunResult, Sandbox, SandboxPool

OUTCOMES = ("passed", "failed", "timed_out", "crashed", "refused")
NO_CODE = "no code in the response"
NOT_TEXT = "the response's code is not valid Unicode (a lone surrogate)"
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


def _is_text(text: str) -> bool:
    """False for a string holding a lone surrogate, which no UTF-8 file or pipe can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_case(case) -> None:
    if isinstance(case, dict) and any(isinstance(v, str) and not _is_text(v) for v in case.values()):
        raise ValueError(f"a test case holds a lone surrogate, not valid text: {repr(case)[:200]}")
    if isinstance(case, dict) and set(case) == {"input", "output"}:
        if isinstance(case["input"], str) and isinstance(case["output"], str):
            return
    if isinstance(case, dict) and set(case) == {"assert"} and isinstance(case["assert"], str):
        assert_cases.plan_assert(case["assert"])  # raises ValueError for what it cannot judge
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
    if run.returncode == 0:
        return CaseResult("failed", failed_reason)
    return CaseResult("crashed", run.reason)


def _assert_case(run, program: str, text: str) -> CaseResult:
    """The program and the calls the asserts make, in the sandbox; the asserts themselves outside it."""
    plan = assert_cases.plan_assert(text)
    result = run(program + plan.harness, "")
    values = assert_cases.read_values(result.stdout) if result.status == "exited" else None
    if values is None:
        return _judge(result, False, f"exited before the test ran: {text[:200]}")
    if plan.local is not None:
        passed, why = assert_cases.check_locally(plan, values)
    else:
        verdict = run(assert_cases.JUDGE_SOURCE, assert_cases.judge_request(plan, values))
        if verdict.status != "exited" or verdict.returncode != 0:
            judged = _judge(verdict, False, "")
            return CaseResult(judged.outcome, f"the judge of the values did not finish: {judged.reason}")
        outcome = assert_cases.read_verdict(verdict.stdout)
        passed, why = outcome["outcome"] == "passed", outcome["why"]
    return _judge(result, passed, f"assertion failed: {text[:200]}" + (f" ({why})" if why else ""))


def run_case(run, program: str, case: dict) -> CaseResult:
    """Run one test case; `run(source, stdin)` executes a program in the sandbox."""
    if "assert" in case:
        return _assert_case(run, program, case["assert"])
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
            self._counts["no_code"] += sample.reason in (NO_CODE, NOT_TEXT)
        return [sample.reward for sample in self.last_results]

    def _score(self, run, item) -> SampleResult:
        completion, cases = item
        program = extract_code(completion)
        if program is None:
            return SampleResult(0.0, (), NO_CODE)
        if not _is_text(program):  # a decoder can emit lone surrogates
            return SampleResult(0.0, (), NOT_TEXT)
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
