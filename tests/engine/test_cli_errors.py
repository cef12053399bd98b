"""Bad input from the command line: one line naming the file or key, exit status 2, never a traceback,
and no empty output directory left behind."""

import json

import pytest

from fusedrl.cli import main

TINY = ["run.progress=false", "run.tensorboard=false", "run.plots=false", "warm_start.steps=0", "run.steps=1",
        "model.demo.hidden_size=16", "model.demo.num_layers=1", "model.demo.num_heads=2",
        "model.demo.intermediate_size=32", "data.train_size=8", "data.eval_size=2", "rollout.prompts_per_step=2",
        "rollout.group_size=2", "rollout.max_new_tokens=4"]


def _fails(capsys, args, *words):
    """main(args) exits 2 with one line on stderr holding each of `words`."""
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusedrl: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.mark.parametrize("text, words", [
    ("run:\n  steps: [1\n", ["line 3: not valid YAML"]),
    ("- run\n- model\n", ["top level must be a mapping", "got a list"]),
    ("7\n", ["top level must be a mapping", "got a scalar"]),
    (b"run:\n  steps: \xff\n", ["not UTF-8 text"]),
], ids=["syntax", "list", "scalar", "bytes"])
def test_config_file_errors(tmp_path, capsys, text, words):
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _fails(capsys, [str(path), f"run.output_dir={tmp_path / 'out'}"], repr(str(path)), *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, content, words", [
    ("d.jsonl", b'{"prompt": "1+1"}\n{"prompt": "caf\xe9"}\n', ["line 2: not UTF-8 text"]),
    ("d.parquet", b"PAR1 this is not a parquet file PAR1", ["not a readable Parquet file"]),
    ("d.parquet", b"", ["not a readable Parquet file"]),
], ids=["jsonl-latin1", "parquet-garbage", "parquet-empty"])
def test_data_file_errors(tmp_path, capsys, name, content, words):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    _fails(capsys, ["configs/demo.yaml", *TINY, "data.task=null", f"data.path={tmp_path / name}",
                    "reward.function=math", f"run.output_dir={out}"], "data.path", repr(str(tmp_path / name)), *words)
    assert not out.exists()  # the error came after the model loaded, but before anything was written


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    _fails(capsys, ["configs/demo.yaml", *TINY, f"run.output_dir={tmp_path / 'file'}"],
           f"run.output_dir {str(tmp_path / 'file')!r} is a file")
    _fails(capsys, ["configs/demo.yaml", *TINY, f"run.output_dir={tmp_path / 'file' / 'run'}"],
           f"{str(tmp_path / 'file')!r} is a file")


def test_usage_errors_leave_no_empty_output_directory(tmp_path, capsys):
    out = tmp_path / "a" / "new" / "run"
    _fails(capsys, ["configs/demo.yaml", *TINY, f"model.path={tmp_path / 'no-model'}", f"run.output_dir={out}"],
           "model.path")
    assert not (tmp_path / "a").exists()


def test_a_fresh_run_does_not_overwrite_a_run(tmp_path, capsys):
    """The second fresh run into the same directory is refused, naming the ways out; the first run's
    metrics and checkpoint are untouched. run.overwrite=true replaces it, old checkpoints included."""
    out = tmp_path / "run"
    assert main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.steps=2", "run.save_every=1"]) == 0
    before = (out / "metrics.jsonl").read_text()
    state = (out / "checkpoint-2" / "trainer_state.pt").read_bytes()
    capsys.readouterr()
    _fails(capsys, ["configs/demo.yaml", *TINY, f"run.output_dir={out}"],
           "holds a run (checkpoint-1, checkpoint-2, metrics.jsonl)", "run.resume=latest", "run.output_dir",
           "run.overwrite=true")
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "checkpoint-2" / "trainer_state.pt").read_bytes() == state
    assert main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.overwrite=true"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]


def test_resume_from_damaged_checkpoints(tmp_path, capsys):
    """latest skips a truncated checkpoint with a one-line warning and resumes from the one before; a
    damaged checkpoint named explicitly (bytes scrambled, size kept) is one error line."""
    out = tmp_path / "run"
    assert main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.steps=2", "run.save_every=1"]) == 0
    weights = out / "checkpoint-2" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.steps=2",
                 "run.resume=latest"]) == 0
    err = capsys.readouterr().err
    assert f"fusedrl: warning: run.resume 'latest': skipping {str(out / 'checkpoint-2')!r}: model.safetensors is" in err
    assert "Traceback" not in err
    # The resumed run redid step 2 and wrote a whole checkpoint-2 in place of the damaged one.
    assert (out / "checkpoint-2" / "model.safetensors").stat().st_size == len(data)
    weights.write_bytes(b"\xff" * 64 + data[64:])  # the safetensors header, scrambled
    assert main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.steps=2",
                 f"run.resume={out / 'checkpoint-2'}"]) == 2
    # A first line says which settings the resume changed (run.resume itself); the error is one line.
    *_, error = capsys.readouterr().err.splitlines()
    assert error.startswith(f"fusedrl: error: run.resume {str(out / 'checkpoint-2')!r}: damaged checkpoint (")


def test_a_diverged_run_stops_with_one_line(tmp_path, capsys, monkeypatch):
    """Every gradient non-finite (the norm is made NaN): the steps are skipped, counted, and the second in
    a row (optim.max_skipped_steps=2) stops the run: one line, exit status 1; the weights never moved."""
    import torch

    from fusedrl.engine import optim

    monkeypatch.setattr(optim, "clip_gradients", lambda optimizer, max_norm: torch.tensor(float("nan")))
    out = tmp_path / "run"
    code = main(["train", "configs/demo.yaml", *TINY, f"run.output_dir={out}", "run.steps=3", "run.save_every=1",
                 "optim.max_skipped_steps=2"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("fusedrl: error: 2 optimizer steps in a row had a non-finite gradient")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1] and rows[1]["optim/skipped_steps"] == 1
