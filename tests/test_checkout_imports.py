"""Python run from the repository root sees the checkout's folders on sys.path, and `kernels/` is
also the import name of Hugging Face's kernel-hub package, which transformers imports. Each command a
user runs in the checkout must still work (fusedrl/_checkout.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_in_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_trl_and_the_trl_drop_in_import_from_the_root():
    _ok(_run_in_root("-c", "import transformers, trl; from fusedrl.integrations.trl import FusedGRPOTrainer"))


def test_a_transformers_model_builds_and_runs_from_the_root():
    code = (
        "import torch, kernels, transformers\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
        "                  num_attention_heads=2, num_key_value_heads=1)\n"
        "out = Qwen2ForCausalLM(cfg)(torch.tensor([[1, 2, 3]]))\n"
        "assert out.logits.shape == (1, 3, 64)\n"
        "from kernels import get_kernel\n"  # Hugging Face's package, not the checkout's folder
        "print(kernels.__file__)\n"
    )
    result = _run_in_root("-c", code)
    _ok(result)
    assert not Path(result.stdout.strip()).is_relative_to(ROOT / "kernels")


def test_the_command_line_runs_from_the_root():
    result = _run_in_root("-m", "fusedrl.cli", "--help")
    _ok(result)
    assert "train" in result.stdout


def test_pytest_runs_from_the_root():
    # Runs the kernels' small tests and collects the TRL tests (collecting imports transformers and TRL).
    result = _run_in_root("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "tests/kernels/test_probability_mask.py")
    _ok(result)
    assert " passed" in result.stdout
    result = _run_in_root("-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--collect-only",
                          "tests/integrations/test_trl.py")
    _ok(result)


def test_bare_names_without_an_installed_package_are_empty_namespaces():
    # `engine` is installed by nothing: from the root it must not be the checkout's folder either.
    result = _run_in_root("-c", "import engine; print(getattr(engine, '__file__', None), list(engine.__path__))")
    _ok(result)
    assert result.stdout.split() == ["None", "[]"]


@pytest.mark.parametrize("name", ["fusedrl.kernels", "fusedrl.engine"])
def test_the_namespaced_packages_are_the_checkout_folders(name):
    result = _run_in_root("-c", f"import {name} as m; print(m.__file__)")
    _ok(result)
    assert Path(result.stdout.strip()).parent.parent == ROOT
