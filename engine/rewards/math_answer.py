"""Math answers checked with math-verify: the response's final \\boxed{...} answer, or its last number
when it boxes nothing, against the reference answer.

`reward.function: math` in the config; the dataset's answer field (data.answer_field) is the
reference. math-verify's own signal-based timeouts are turned off here: the engine's reward timeout
(reward.timeout_s) already bounds the whole call, and two SIGALRM timers would cancel each other.
"""

from __future__ import annotations

import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
# math-verify warns on every call that its timeouts are off; they are off on purpose (see above).
logging.getLogger("math_verify").setLevel(logging.ERROR)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def last_number(text: str) -> str | None:
    """The last number in the text (integers, decimals, fractions a/b, thousands separators dropped)."""
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(completion: str) -> str | None:
    """The final boxed answer, else the last number, else None."""
    boxed = last_boxed(completion)
    return boxed if boxed is not None else last_number(completion)


def is_equivalent(prediction: str, reference: str) -> bool:
    """math-verify's equivalence of two answers written as LaTeX or plain expressions."""
    gold = parse(f"${reference}$", _EXTRACTION, parsing_timeout=None)
    pred = parse(f"${prediction}$", _EXTRACTION, parsing_timeout=None)
    if not gold or not pred:
        return prediction.strip() == str(reference).strip()
    return verify(gold, pred, timeout_seconds=None)


def reward(prompts: list[str], completions: list[str], answer: list, **columns) -> list[float]:
    """1.0 when the response's final answer equals the reference, else 0.0."""
    out = []
    for completion, reference in zip(completions, answer):
        prediction = extract_answer(completion)
        out.append(float(prediction is not None and is_equivalent(prediction, str(reference))))
    return out
