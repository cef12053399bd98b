"""Multi-digit addition with worked steps: the demo task (2 digits; engine/tasks/arithmetic3.py binds 3).

Operands are written with `digits` digits (DIGITS by default), zero-padded, and the response works
column by column from the right, each step "digit+digit+carry=column sum" with the sum in two digits,
then the answer after "#" in digits + 1 digits:

    prompt   "07+38="
    response "7+8+0=15 0+3+1=04 #045"

Every character of a response has a fixed role, which lets a model of a million parameters pick up
the format from a short supervised warm start; it still makes carry and digit mistakes that the exact
verifier ("#" followed by the right sum) gives GRPO a clean binary reward to fix.

A prompt belongs to the eval split when a hash of it falls in the EVAL_PERCENT bucket, so train and
eval never share a prompt whatever the seed.
"""

from __future__ import annotations

import random
import zlib

DIGITS = 2
EVAL_PERCENT = 10


def _is_eval(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 100 < EVAL_PERCENT


def make_dataset(split: str, size: int, seed: int, digits: int = DIGITS) -> list[dict]:
    """`size` distinct rows {"prompt", "answer", "a", "b"} of the split "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    if size > 0.9 * 10 ** (2 * digits) * (EVAL_PERCENT / 100 if split == "eval" else 1 - EVAL_PERCENT / 100):
        raise ValueError(f"size: {size} distinct {split} prompts is too many for {digits}-digit operands")
    rng = random.Random(f"arithmetic/{split}/{seed}")
    rows, seen = [], set()
    while len(rows) < size:
        a, b = rng.randrange(10**digits), rng.randrange(10**digits)
        prompt = f"{a:0{digits}d}+{b:0{digits}d}="
        if prompt in seen or _is_eval(prompt) != (split == "eval"):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": f"{a + b:0{digits + 1}d}", "a": a, "b": b})
    return rows


def reference_completion(row: dict, digits: int = DIGITS) -> str:
    """The worked column-by-column addition of row["a"] and row["b"], ending in "#<sum>"."""
    a, b = f"{row['a']:0{digits}d}"[::-1], f"{row['b']:0{digits}d}"[::-1]
    steps, carry = [], 0
    for x, y in zip(a, b):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return " ".join(steps) + f" #{row['a'] + row['b']:0{digits + 1}d}"


def extract_answer(completion: str) -> str | None:
    """The text after the last "#", stripped; None when there is no "#"."""
    if "#" not in completion:
        return None
    return completion.rsplit("#", 1)[1].strip()


def reward(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 when the response ends in "#<the right sum>", else 0.0."""
    return [float(extract_answer(c) == str(ref)) for c, ref in zip(completions, answer)]
