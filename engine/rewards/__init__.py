"""Reward functions: the interface every reward in fusedrl follows.

A reward function is a plain callable

    reward_fn(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]

- `prompts[i]` is the prompt text of sample i, `completions[i]` the generated response text
  (special tokens removed).
- `columns` carries every other field of the dataset row, one list per field, aligned with the
  samples (for example `answer=[...]` or `tests=[...]`).
- It returns one float per sample. `None` means "could not be scored" and counts as 0 with the
  sample reported in the logs, exactly like a reward function that raises or runs past its timeout.

User rewards are given in the config by import path, `module.sub:function`.
"""
