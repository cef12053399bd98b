"""Assert test cases, judged where the program under test cannot reach.

A case {"assert": "assert add(3, 4) == 7"} used to run after the program in one interpreter, so the
program could win without computing anything: return an object whose `__eq__` always says yes,
jump over the failing assert with a trace function, or find the harness's success token in its
code object or its source. Now the assert never enters the program's sandbox:

1. The assert statements (trusted dataset text) are parsed here. Each *call into the program*, a
   maximal chain of calls, attribute accesses and subscripts rooted at a name the program defines,
   is cut out: `add(3, 4)` above, `Solution().solve([1, 2])`, the `area(2)` of
   `math.isclose(area(2), 12.57, rel_tol=1e-3)`. A name is the program's unless it is a builtin, or
   a standard-library module used as `module.attribute`.
2. The program runs in the sandbox followed by those calls and nothing else; their values leave it
   as plain data only (fusedrl.engine.rewards.plain_values), after a marker line on stdout. The
   expected values never enter that sandbox, so tampering with the encoder, forging the marker or
   exiting early gains nothing: to pass, the program must still produce the right values.
3. What remains of the assert is checked on the decoded values: here, when it is a plain comparison
   of one call with a literal (`==`, `!=`, `is`, `is not`, or the call's truth); otherwise by the
   judge program (plain_values.py run in a sandbox of its own, where no code of the candidate's runs).

Statements other than assert, lambdas, comprehensions or `:=` outside the cut calls, and an assert
that calls nothing of the program's, are refused with a ValueError before anything runs.
"""

import ast
import builtins
import functools
import inspect
import json
import operator
import sys
from dataclasses import dataclass

from fusedrl.engine.rewards import plain_values

MARKER = "\x1efusedrl-values "
"""Starts the line that carries the call values (a fixed string: knowing it does not help to pass)."""
_VALUES = "_fusedrl_values"
_BUILTINS = frozenset(dir(builtins))
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Is: operator.is_, ast.IsNot: operator.is_not}
_ENCODER = inspect.getsource(plain_values._fusedrl_encode)


@dataclass(frozen=True)
class AssertPlan:
    text: str
    """The case's assert source, for reasons."""
    harness: str
    """Appended to the program: evaluates the calls and prints their values after MARKER."""
    checks: tuple[str, ...]
    """Each assert with its calls replaced by `_fusedrl_values[i]`, for the judge."""
    modules: tuple[str, ...]
    """Standard-library modules the checks name."""
    local: tuple | None
    """(index, op, literal) when every check is one call compared with a literal; op None for truth."""


class _CutCalls(ast.NodeTransformer):
    """Replaces each call into the program by `_fusedrl_values[i]`, collecting the calls and modules."""

    def __init__(self):
        self.calls: list[str] = []
        self.modules: set[str] = set()

    def _chain(self, node):
        links, root = [], node
        while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
            links.append(root)
            root = root.func if isinstance(root, ast.Call) else root.value
        base = links[-1] if links else None
        if isinstance(root, ast.Name):
            if root.id in sys.stdlib_module_names and isinstance(base, ast.Attribute):
                self.modules.add(root.id)
            elif root.id not in _BUILTINS:
                self.calls.append(ast.unparse(node))
                value = ast.Subscript(ast.Name(_VALUES, ast.Load()), ast.Constant(len(self.calls) - 1), ast.Load())
                return ast.copy_location(value, node)
        elif base is not None:  # a chain on a computed value, e.g. (f(1) + 2).real: cut inside it
            setattr(base, "func" if isinstance(base, ast.Call) else "value", self.visit(root))
        for link in links:  # a trusted root: arguments and subscripts may still call the program
            if isinstance(link, ast.Call):
                link.args = [self.visit(arg) for arg in link.args]
                link.keywords = [self.visit(keyword) for keyword in link.keywords]
            elif isinstance(link, ast.Subscript):
                link.slice = self.visit(link.slice)
        return node

    visit_Name = visit_Attribute = visit_Subscript = visit_Call = _chain

    def _refuse(self, node):
        raise ValueError(f"{type(node).__name__} outside a call into the program is not supported")

    visit_Lambda = visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _refuse
    visit_NamedExpr = _refuse


def _literal(node):
    try:
        return True, ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False, None


def _local_check(test: ast.expr) -> tuple | None:
    """(index, op, literal) when `test` compares one cut call with a literal, or is its truth."""
    negate = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    operand = test.operand if negate else test
    if isinstance(operand, ast.Subscript) and isinstance(operand.value, ast.Name) and operand.value.id == _VALUES:
        return (operand.slice.value, None, not negate)
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _COMPARE):
        return None
    for call, other in ((test.left, test.comparators[0]), (test.comparators[0], test.left)):
        is_call = isinstance(call, ast.Subscript) and isinstance(call.value, ast.Name) and call.value.id == _VALUES
        ok, literal = _literal(other)
        singleton = any(literal is constant for constant in (None, True, False))
        if is_call and ok and (isinstance(test.ops[0], (ast.Eq, ast.NotEq)) or singleton):
            return (call.slice.value, _COMPARE[type(test.ops[0])], literal)
    return None


@functools.lru_cache(maxsize=4096)
def plan_assert(text: str) -> AssertPlan:
    """The plan of one case; ValueError when it is not a list of assert statements we can split."""
    try:
        statements = ast.parse(text).body
    except SyntaxError as exc:
        raise ValueError(f"assert case is not valid Python ({exc.msg}): {text[:200]!r}") from None
    if not statements or not all(isinstance(s, ast.Assert) for s in statements):
        raise ValueError(f"an assert case must hold assert statements only: {text[:200]!r}")
    cutter = _CutCalls()
    tests = []
    for statement in statements:
        try:
            tests.append(cutter.visit(statement.test))
        except ValueError as exc:
            raise ValueError(f"{exc}: {text[:200]!r}") from None
    if not cutter.calls:  # `assert max(3, 4) == 4` tests a builtin, and would pass any program
        raise ValueError(f"an assert case must call something the program defines: {text[:200]!r}")
    local = [_local_check(test) for test in tests]
    calls = ", ".join(f"({call})" for call in cutter.calls)
    harness = (  # after the program, in its namespace: the calls, then their values on one line
        f"\n\n\n{_ENCODER}\n\nimport json as _fusedrl_json, sys as _fusedrl_sys\n"
        f"_fusedrl_line = _fusedrl_json.dumps([_fusedrl_encode(v) for v in [{calls}]])\n"
        f"_fusedrl_sys.__stdout__.write('\\n' + {MARKER!r} + _fusedrl_line + '\\n')\n"
    )
    return AssertPlan(
        text=text,
        harness=harness,
        checks=tuple(ast.unparse(ast.Assert(test)) for test in tests),
        modules=tuple(sorted(cutter.modules)),
        local=tuple(local) if all(local) else None,
    )


def read_values(stdout: str) -> str | None:
    """The JSON text after the last marker line; None when the program never got to print it."""
    start = stdout.rfind("\n" + MARKER)
    if start < 0:
        return None
    return stdout[start + 1 + len(MARKER):].split("\n", 1)[0]


def check_locally(plan: AssertPlan, values_json: str) -> tuple[bool, str]:
    """(passed, why not beyond the failed assert) for a plan with `local` set."""
    try:
        values = plain_values.decode(json.loads(values_json))
        for index, op, expected in plan.local:
            value = values[index]
            if not (bool(value) == expected if op is None else op(value, expected)):
                return False, ""
    except (ValueError, TypeError, IndexError, RecursionError) as exc:
        return False, str(exc)[:200]
    return True, ""


JUDGE_SOURCE = inspect.getsource(plain_values)


def judge_request(plan: AssertPlan, values_json: str) -> str:
    """The judge program's stdin for this plan and these values."""
    return json.dumps({"values": values_json, "checks": list(plan.checks), "modules": list(plan.modules)})


def read_verdict(stdout: str) -> dict:
    """The judge's {"outcome", "why"} (the judge runs none of the candidate's code, so its output is trusted)."""
    return json.loads(stdout.strip().splitlines()[-1])
