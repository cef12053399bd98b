"""Keep a checkout's source folders from posing as top-level packages.

The repository keeps the sources of `fusedrl.kernels` and `fusedrl.engine` in the top-level folders
`kernels/` and `engine/`. When the repository root is on `sys.path` (`python -m pytest`, `python -c`,
a REPL or notebook started in the checkout), Python also finds those folders as the top-level modules
`kernels` and `engine`, and `kernels` is the import name of Hugging Face's kernel-hub package, which
transformers imports. Each folder's `__init__.py` calls `stand_aside` when it is imported under its
bare name, so that the import resolves as if the folder were not there.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def stand_aside(name: str, init_file: str) -> None:
    """Replace `sys.modules[name]` by what `import name` finds without the checkout root on sys.path.

    With no such module installed, `name` becomes an empty namespace package: what PEP 420 makes of a
    folder without `__init__.py`, and what transformers' availability checks read as "not installed".
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if spec.loader is not None:
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
