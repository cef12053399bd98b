"""Multi-digit addition with worked steps: the demo task.

Prompt "472+389=", reference response "2+9=11 7+8+1=16 4+3+1=8 #861": one step per column from
the right (digit + digit + carry = column sum), then the answer after "#". A tiny model learns the
format from a short supervised warm start but makes carry and copying mistakes; the exact verifier
("#" followed by the right number) gives GRPO a clean binary reward to fix them with.

Operands have MIN_DIGITS to MAX_DIGITS digits. A prompt belongs to the eval split when a hash of it
falls in the EVAL_PERCENT bucket, so train and eval never share a prompt whatever the seed.
"""

from __future__ import annotations

import random
import zlib

MIN_DIGITS = 1
MAX_DIGITS = 2
EVAL_PERCENT = 10


def _is_eval(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 100 < EVAL_PERCENT


def _operand(rng: random.Random) -> int:
    digits = rng.randint(MIN_DIGITS, MAX_DIGITS)
    return rng.randrange(10 ** (digits - 1), 10**digits)


def make_dataset(split: str, size: int, seed: int) -> list[dict]:
    """`size` distinct rows {"prompt", "answer", "a", "b"} of the split "train" or "eval"."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    rng = random.Random(f"arithmetic/{split}/{seed}")
    rows, seen = [], set()
    while len(rows) < size:
        a, b = (_operand(rng) for _ in range(2))
        prompt = f"{a}+{b}="
        if prompt in seen or _is_eval(prompt) != (split == "eval"):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": str(a + b), "a": a, "b": b})
    return rows


def reference_completion(row: dict) -> str:
    """The worked column-by-column addition of row["a"] and row["b"], ending in "#<sum>"."""
    a, b = str(row["a"])[::-1], str(row["b"])[::-1]
    steps, carry = [], 0
    for i in range(max(len(a), len(b))):
        terms = [d[i] for d in (a, b) if i < len(d)] + (["1"] if carry else [])
        total = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={total}")
        carry = total // 10
    return " ".join(steps) + f" #{row['a'] + row['b']}"


def extract_answer(completion: str) -> str | None:
    """The text after the last "#", stripped; None when there is no "#"."""
    if "#" not in completion:
        return None
    return completion.rsplit("#", 1)[1].strip()


def reward(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    """1.0 when the response ends in "#<the right sum>", else 0.0."""
    return [float(extract_answer(c) == str(ref)) for c, ref in zip(completions, answer)]
