"""Checkpoints: what a GPU run writes loads on any machine; a save is all or nothing; damage is named."""

import pytest
import torch

from fusedrl.engine import checkpoint
from fusedrl.engine.errors import UsageError


def test_state_written_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """A GPU run's optimizer states are CUDA tensors; without map_location torch.load puts them back on
    CUDA (here: refuses, having none). load_state hands them to optimizer.load_state_dict on the CPU."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"step": 1, "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state()}
    # Every storage saved as if it lived on cuda:0, as on the GPU that ran the loop.
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, tmp_path / checkpoint.STATE_FILE)
    loaded = checkpoint.load_state(tmp_path)
    exp_avg = loaded["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.device.type == "cpu"
    assert torch.equal(exp_avg, optimizer.state_dict()["state"][0]["exp_avg"])
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(loaded["optimizer"])
    checkpoint.set_rng_state(loaded["rng"])


def _parts():
    """What save_checkpoint needs, from a tiny demo model."""
    from fusedrl.engine.config import load_config
    from fusedrl.engine.data import PromptSampler
    from fusedrl.engine.model import load_policy

    cfg = load_config(None, ["model.demo.hidden_size=16", "model.demo.num_layers=1", "model.demo.num_heads=2",
                             "model.demo.intermediate_size=32"])
    model, tokenizer = load_policy(cfg.model, "builtin:demo", torch.device("cpu"))
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return dict(model=model, tokenizer=tokenizer, reference=None, optimizer=optimizer, scheduler=scheduler,
                sampler=PromptSampler(8, 0), extra={})


def _save(out, step, state, **kwargs):
    return checkpoint.save_checkpoint(out / f"checkpoint-{step}", step=step, **state, **kwargs)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (BaseException, so no `except Exception` stops it)."""


def test_a_save_killed_midway_leaves_no_checkpoint(tmp_path):
    """A save that dies before its marker (here: the loop's own parts raise, as a kill would stop it)
    leaves only its hidden temporary directory: `latest` still finds the last whole checkpoint, and the
    next save of that step clears the leftover."""
    parts = _parts()
    _save(tmp_path, 1, parts)

    def dies(directory):
        (directory / "critic").mkdir()
        raise Killed

    with pytest.raises(Killed):
        _save(tmp_path, 2, parts, parts=dies)
    assert not (tmp_path / "checkpoint-2").exists() and (tmp_path / ".checkpoint-2.partial").is_dir()
    assert checkpoint.find_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"
    _save(tmp_path, 2, parts)
    assert checkpoint.find_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]


def test_latest_skips_incomplete_checkpoints_with_a_warning(tmp_path):
    parts = _parts()
    for step in (1, 2, 3):
        _save(tmp_path, step, parts)
    (tmp_path / "checkpoint-3" / checkpoint.MARKER).unlink()  # as written in place by an older fusedrl, killed
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning) as caught:
        assert checkpoint.find_checkpoint("latest", tmp_path) == tmp_path / "checkpoint-1"
    messages = [str(w.message) for w in caught]
    assert any("checkpoint-3" in m and "no complete.json" in m for m in messages)
    assert any("checkpoint-2" in m and "model.safetensors is 100 bytes" in m for m in messages)


def test_a_damaged_checkpoint_named_explicitly_is_one_line(tmp_path):
    parts = _parts()
    good = _save(tmp_path, 1, parts)
    assert checkpoint.find_checkpoint(str(good), tmp_path) == good
    truncated = _save(tmp_path, 2, parts)
    state = truncated / checkpoint.STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(UsageError, match=r"damaged checkpoint \(trainer_state.pt is \d+ bytes, \d+ were written\)"):
        checkpoint.find_checkpoint(str(truncated), tmp_path)
    unmarked = _save(tmp_path, 3, parts)
    (unmarked / checkpoint.MARKER).unlink()
    with pytest.raises(UsageError, match="damaged checkpoint .no complete.json: its save did not finish"):
        checkpoint.find_checkpoint(str(unmarked), tmp_path)
    # Bytes changed, size kept: the size check passes, the load fails, on one line.
    scrambled = _save(tmp_path, 4, parts)
    data = bytearray((scrambled / checkpoint.STATE_FILE).read_bytes())
    data[: len(data) // 2] = bytes(len(data) // 2)
    (scrambled / checkpoint.STATE_FILE).write_bytes(bytes(data))
    with pytest.raises(UsageError) as error:
        checkpoint.load_state(scrambled)
    assert "damaged checkpoint (trainer_state.pt:" in str(error.value) and "\n" not in str(error.value)


def test_keep_only_the_newest_checkpoints(tmp_path):
    parts = _parts()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, parts)
        checkpoint.remove_old_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    checkpoint.remove_old_checkpoints(tmp_path, keep=0)  # 0: keep all
    assert len(list(tmp_path.iterdir())) == 2
