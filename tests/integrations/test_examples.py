"""The examples run as a user would run them: as scripts, on the tiny default model."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_plain_pytorch_grpo_runs_and_logs_finite_metrics():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_pytorch_grpo.py"), "--steps", "2", "--device", "cpu",
         "--top-entropy-fraction", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step")]
    assert len(steps) == 2, result.stdout
    for line in steps:
        values = dict(re.findall(r"(\S+) (-?[\d.]+(?:e[-+]?\d+)?|nan|inf)", line.split(maxsplit=2)[2]))
        for name in ("loss/pg", "reward/mean", "completions/mean_length"):
            assert name in values and math.isfinite(float(values[name])), (name, line)
