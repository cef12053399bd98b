"""The configuration reference: every key with its default and its one-line docstring, as YAML.

`fusedrl config` prints it. The docstrings are read from the dataclasses' source (the string under
each field), so the reference cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

from fusedrl.engine.config import Config


def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring under it} of a dataclass."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def reference_yaml(cls=Config, indent: int = 0) -> str:
    """The defaults of `cls` as commented YAML, sections first-level keys."""
    docs, lines, pad = field_docs(cls), [], " " * indent
    instance = cls()
    for field in dataclasses.fields(cls):
        value = getattr(instance, field.name)
        if docs.get(field.name):
            lines.append(f"{pad}# {docs[field.name]}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{field.name}:")
            lines.append(reference_yaml(type(value), indent + 2))
        else:
            lines.append(f"{pad}{field.name}: {_yaml_scalar(value)}")
    return "\n".join(lines)


def _yaml_scalar(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value) if any(c in value for c in ":#{}[],&*!|>'\"%@`") or not value else value
    return json.dumps(value)
