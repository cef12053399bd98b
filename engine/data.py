"""Prompts: a built-in task or a local JSONL / Parquet file, a held-out split, and a resumable sampler.

Every row keeps all its fields: the prompt field becomes the prompt text, every other field reaches
the reward function as a column (the configured answer field under the name `answer`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fusedrl.engine.config import DataConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.tasks import TASKS


class DataError(UsageError):
    """A dataset the engine cannot use: missing file or field, prompt too long."""


@dataclass
class Split:
    """Prompts (text and token ids) and the reward columns of one split."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    columns: dict[str, list]

    def __len__(self):
        return len(self.prompts)

    def select(self, indices) -> "Split":
        return Split([self.prompts[i] for i in indices], [self.prompt_ids[i] for i in indices],
                     {k: [v[i] for i in indices] for k, v in self.columns.items()})


def load_task(name: str):
    """The built-in task module named in data.task."""
    return importlib.import_module(TASKS[name])


def read_rows(path: str, key: str) -> list[dict]:
    """Rows of a local .jsonl / .json (one object per line) or .parquet file."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{key} {path!r}: no such file")
    if file.suffix in (".jsonl", ".json"):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            line = file.read_bytes()[: e.start].count(b"\n") + 1
            raise DataError(f"{key} {path!r}, line {line}: not UTF-8 text (byte {e.object[e.start]:#04x})") from None
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{key} {path!r}, line {number}: not valid JSON ({e.msg})") from None
        return rows
    if file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            return pq.read_table(file).to_pylist()
        except (pa.ArrowException, OSError) as e:  # ArrowInvalid for a corrupt footer or page
            raise DataError(f"{key} {path!r}: not a readable Parquet file ({_first_line(e)})") from None
    raise DataError(f"{key} {path!r}: expected a .jsonl or .parquet file")


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_splits(cfg: DataConfig, tokenizer, seed: int) -> tuple[Split, Split]:
    """(train, eval) splits, tokenized and checked against data.max_prompt_length."""
    if cfg.task is not None:
        task = load_task(cfg.task)
        train_rows = task.make_dataset("train", cfg.train_size, seed)
        eval_rows = task.make_dataset("eval", cfg.eval_size, seed)
        prompt_field, answer_field = "prompt", "answer"
    else:
        prompt_field, answer_field = cfg.prompt_field, cfg.answer_field
        rows = read_rows(cfg.path, "data.path")
        if cfg.eval_path is not None:
            train_rows, eval_rows = rows, read_rows(cfg.eval_path, "data.eval_path")
        else:
            order = np.random.default_rng(seed).permutation(len(rows))
            held_out = max(1, int(round(cfg.eval_fraction * len(rows))))
            eval_rows = [rows[i] for i in order[:held_out]]
            train_rows = [rows[i] for i in order[held_out:]]
        eval_rows = eval_rows[: cfg.eval_size]
    train = _to_split(train_rows, "training", cfg, prompt_field, answer_field, tokenizer)
    held_out = _to_split(eval_rows, "held-out", cfg, prompt_field, answer_field, tokenizer)
    return train, held_out


def _to_split(rows, name, cfg: DataConfig, prompt_field, answer_field, tokenizer) -> Split:
    if not rows:
        raise DataError(f"the {name} data is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or prompt_field not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{name} row {i} has no prompt field {prompt_field!r} (data.prompt_field); "
                            f"its fields: {fields}")
        if not isinstance(row[prompt_field], str):
            raise DataError(f"{name} row {i}: field {prompt_field!r} must be a string")
    prompts = [row[prompt_field] for row in rows]
    prompt_ids = encode_prompts(tokenizer, prompts, cfg.chat_template)
    limit = cfg.max_prompt_length
    for i, ids in enumerate(prompt_ids):
        if len(ids) > limit:
            raise DataError(f"{name} prompt {i} is {len(ids)} tokens, longer than data.max_prompt_length="
                            f"{limit}: {prompts[i][:60]!r}")
    columns = {}
    for key in rows[0]:
        if key != prompt_field:
            columns["answer" if key == answer_field else key] = [row.get(key) for row in rows]
    return Split(prompts, prompt_ids, columns)


def encode_prompts(tokenizer, prompts: list[str], chat_template: bool) -> list[list[int]]:
    if chat_template:
        if tokenizer.chat_template is None:
            raise DataError("data.chat_template is true but the tokenizer has no chat template")
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False) for p in prompts]
    return tokenizer(prompts)["input_ids"]


class PromptSampler:
    """Draws prompts without replacement, epoch by epoch, in a seeded order; its position resumes."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.position = size, seed, 0

    def next_indices(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            epoch, offset = divmod(self.position, self.size)
            order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            take = min(count - len(out), self.size - offset)
            out.extend(int(i) for i in order[offset: offset + take])
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
