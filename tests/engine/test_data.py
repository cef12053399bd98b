"""Local datasets (JSONL, Parquet), held-out split, the clear errors, and the resumable sampler."""

import json

import pytest

from fusedrl.engine.config import load_config
from fusedrl.engine.data import DataError, PromptSampler, load_splits
from fusedrl.engine.model import demo_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return demo_tokenizer()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _data_cfg(path, *overrides):
    return load_config(None, ["data.task=null", f"data.path={path}", "reward.function=math", *overrides]).data


def test_jsonl_with_custom_fields_and_held_out_split(tmp_path, tokenizer):
    rows = [{"question": f"What is {i}+1?", "solution": str(i + 1), "level": i % 3} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    train, held_out = load_splits(_data_cfg(path, "data.prompt_field=question", "data.answer_field=solution",
                                            "data.eval_fraction=0.25"), tokenizer, seed=0)
    assert (len(train), len(held_out)) == (15, 5)
    assert not set(train.prompts) & set(held_out.prompts)
    assert set(train.prompts) | set(held_out.prompts) == {r["question"] for r in rows}
    # The answer field reaches the reward as `answer`; other fields keep their names.
    i = train.prompts.index("What is 7+1?")
    assert train.columns["answer"][i] == "8" and train.columns["level"][i] == 1
    assert train.prompt_ids[i] == tokenizer("What is 7+1?")["input_ids"]


def test_parquet_and_eval_path(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]),
                   tmp_path / "train.parquet")
    _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "q", "answer": "1"}])
    train, held_out = load_splits(_data_cfg(tmp_path / "train.parquet", f"data.eval_path={tmp_path / 'eval.jsonl'}"),
                                  tokenizer, seed=0)
    assert train.prompts == [f"p{i}" for i in range(6)] and held_out.prompts == ["q"]


def test_missing_prompt_field(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"question": "b", "answer": "1"}] * 5)
    with pytest.raises(DataError, match=r"has no prompt field 'prompt' \(data.prompt_field\); its fields: "
                                        r"\['answer', 'question'\]"):
        load_splits(_data_cfg(path), tokenizer, seed=0)


def test_prompt_longer_than_limit(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "short"}] * 5 + [{"prompt": "x" * 40}] * 5)
    with pytest.raises(DataError, match="is 41 tokens, longer than data.max_prompt_length=20"):
        load_splits(_data_cfg(path, "data.max_prompt_length=20"), tokenizer, seed=0)


@pytest.mark.parametrize("name, content, words", [
    ("missing.jsonl", None, "no such file"),
    ("d.csv", "prompt\nx\n", "expected a .jsonl or .parquet file"),
    ("d.jsonl", '{"prompt": "a"}\n{"prompt": \n', "line 2: not valid JSON"),
])
def test_bad_files(tmp_path, tokenizer, name, content, words):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=words):
        load_splits(_data_cfg(tmp_path / name), tokenizer, seed=0)


def test_builtin_task_splits(tokenizer):
    cfg = load_config(None, ["data.train_size=50", "data.eval_size=10"]).data
    train, held_out = load_splits(cfg, tokenizer, seed=1)
    assert (len(train), len(held_out)) == (50, 10)
    assert set(train.columns) == {"answer", "a", "b"}


def test_sampler_covers_each_epoch_and_resumes():
    sampler = PromptSampler(10, seed=5)
    first = sampler.next_indices(4) + sampler.next_indices(6)
    assert sorted(first) == list(range(10))
    state = sampler.state_dict()
    ahead = sampler.next_indices(7)
    resumed = PromptSampler(10, seed=5)
    resumed.load_state_dict(state)
    assert resumed.next_indices(7) == ahead
    assert ahead != first[:7]  # a new epoch has a new order
