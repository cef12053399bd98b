"""Built-in verifiable tasks: small, self-contained data that trains end to end on a CPU.

A task is a module in this package that exposes

    make_dataset(split: str, size: int, seed: int) -> list[dict]
        Rows for split "train" or "eval"; every row has a "prompt" field (str) and whatever fields
        its reward reads (for example "answer" or "tests"). Deterministic in (split, size, seed);
        train and eval never share a prompt.
    reward(prompts: list[str], completions: list[str], **columns: list) -> list[float | None]
        The task's verifier, with the reward interface of fusedrl.engine.rewards.
    reference_completion(row: dict) -> str
        A correct worked response, used for the supervised warm start that teaches the format.

TASKS maps the config's `data.task` names to those modules.
"""

TASKS = {
    "arithmetic": "fusedrl.engine.tasks.arithmetic",
    "arithmetic3": "fusedrl.engine.tasks.arithmetic3",
    "code": "fusedrl.engine.tasks.one_line_programs",
}
