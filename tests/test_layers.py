"""The layers import one way: command line -> engine | integrations -> loss -> kernels.

Every import statement of every module is read (function-local ones too), so that a layer cannot reach
back up through a lazy import either.
"""

import ast
from pathlib import Path

import pytest

import fusedrl

ROOT = Path(__file__).resolve().parents[1]
# Each layer's folder, its import name, and the fusedrl packages it may import besides its own.
LAYERS = {
    "kernels": (ROOT / "kernels", "fusedrl.kernels", ("fusedrl._checkout",)),
    "loss": (ROOT / "fusedrl" / "loss", "fusedrl.loss", ("fusedrl.kernels",)),
    "integrations": (ROOT / "fusedrl" / "integrations", "fusedrl.integrations", ("fusedrl.loss", "fusedrl.kernels")),
    "engine": (ROOT / "engine", "fusedrl.engine", ("fusedrl.loss", "fusedrl.kernels", "fusedrl._checkout")),
}


def _fusedrl_imports(path: Path, package: str) -> set[str]:
    """The fusedrl modules `path` imports, relative imports resolved against `package`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module == "fusedrl":
                # The public surface: each name resolves to the module that holds it.
                names.update(fusedrl._EXPORTS.get(alias.name, f"fusedrl.{alias.name}") for alias in node.names)
            elif node.module:
                names.add(node.module)
    return {n for n in names if n == "fusedrl" or n.startswith("fusedrl.")}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layers_import_one_way(layer):
    folder, own, allowed = LAYERS[layer]
    offending = []
    for path in sorted(folder.rglob("*.py")):
        package = own + "".join("." + part for part in path.relative_to(folder).parent.parts)
        for name in _fusedrl_imports(path, package):
            if not any(name == ok or name.startswith(ok + ".") for ok in (own, *allowed)):
                offending.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offending, "\n".join(offending)


def test_the_checker_sees_a_violation(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from fusedrl.engine import config\n")
    assert _fusedrl_imports(module, "fusedrl.loss") == {"fusedrl.engine"}
