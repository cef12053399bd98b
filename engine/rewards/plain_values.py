"""Values that cross the sandbox boundary as plain data, and the judge that checks them.

Used three ways, and so it imports only the standard library:

- `_fusedrl_encode` is appended, as source, to the program under test: it turns what the program's
  calls returned into JSON. Only exact built-in types survive: None, bool, int, float, complex, str, bytes,
  and list, tuple, set, frozenset and dict of those. Any other object (a subclass included, so an
  int whose `__eq__` always says yes) becomes {"opaque": its type name}, which fails the test.
  The program can tamper with it, but all it can then make is other plain data.
- `decode` turns that JSON back into Python values in the trusted parent or in the judge; it builds
  only built-in containers and scalars, so nothing of the program's survives the trip.
- Run as a program (in a sandbox of its own, with no code of the candidate's), it judges assert
  statements whose calls into the program were replaced by decoded values: stdin holds
  {"values": <the JSON text>, "checks": [assert source, ...], "modules": [standard modules named]};
  stdout gets one JSON line {"outcome": "passed" | "failed", "why": str}.
"""

import importlib
import json
import sys


def _fusedrl_encode(value):
    """`value` as JSON-ready data; containers and scalars of exact built-in types only.

    Its source is appended to the program under test, hence a name no program will define.
    """
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [_fusedrl_encode(item) for item in value]
    if kind in (tuple, set, frozenset):
        return {kind.__name__: [_fusedrl_encode(item) for item in value]}
    if kind is dict:
        return {"dict": [[_fusedrl_encode(k), _fusedrl_encode(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    return {"opaque": f"{kind.__module__}.{kind.__qualname__}"}


_CONTAINERS = {"tuple": tuple, "set": set, "frozenset": frozenset}


def decode(data):
    """The value that `_fusedrl_encode` described; ValueError or TypeError for an opaque value or bad data."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(item) for item in data]
    if type(data) is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag in _CONTAINERS and type(body) is list:
            return _CONTAINERS[tag](decode(item) for item in body)
        if tag == "dict" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
            return {decode(k): decode(v) for k, v in body}
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            return complex(*(float(part) for part in body))
        if tag == "opaque" and type(body) is str:
            raise ValueError(f"a call returned a {body[:100]}, not plain data")
    raise ValueError(f"not an encoded value: {str(data)[:100]}")


def judge(request: dict) -> dict:
    """Run each check with `_fusedrl_values` bound to the decoded values; the first failure decides."""
    scope = {name: importlib.import_module(name) for name in request["modules"]}
    try:
        scope["_fusedrl_values"] = decode(json.loads(request["values"]))
    except (ValueError, TypeError, RecursionError) as exc:
        return {"outcome": "failed", "why": str(exc)[:200]}
    for check in request["checks"]:
        try:
            exec(compile(check, "<test>", "exec"), scope)  # noqa: S102 - the dataset's assert, on plain data
        except AssertionError:
            return {"outcome": "failed", "why": ""}
        except Exception as exc:  # noqa: BLE001 - a value of the wrong type, for one
            return {"outcome": "failed", "why": f"{type(exc).__name__}: {exc}"[:200]}
    return {"outcome": "passed", "why": ""}


if __name__ == "__main__":
    print(json.dumps(judge(json.loads(sys.stdin.read()))))
