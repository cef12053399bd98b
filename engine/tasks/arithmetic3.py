"""Three-digit addition with worked steps: the arithmetic task with harder prompts.

The study (docs/study.md) uses it because the tiny demo model nearly saturates 2-digit addition, which
leaves the arms of an ablation no room to differ. Same format and verifier as engine/tasks/arithmetic.py:

    prompt   "107+438="
    response "7+8+0=15 0+3+1=04 1+4+0=05 #0545"
"""

from __future__ import annotations

from fusedrl.engine.tasks import arithmetic

DIGITS = 3
reward = arithmetic.reward  # the same verifier: "#" followed by the right sum


def make_dataset(split: str, size: int, seed: int) -> list[dict]:
    """`size` distinct rows {"prompt", "answer", "a", "b"} of 3-digit sums, split "train" or "eval"."""
    return arithmetic.make_dataset(split, size, seed, digits=DIGITS)


def reference_completion(row: dict) -> str:
    """The worked column-by-column addition, ending in "#<sum>" of four digits."""
    return arithmetic.reference_completion(row, digits=DIGITS)
