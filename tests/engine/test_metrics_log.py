"""engine/metrics_log.py: metrics.jsonl across a resume (and a kill), and console lines printed whole."""

import pytest

from fusedrl.engine.config import RunConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.metrics_log import MetricLogger


def _logger(tmp_path, start_step=0):
    return MetricLogger(RunConfig(progress=False, tensorboard=False), tmp_path, start_step, config={})


def test_long_console_lines_are_not_broken(tmp_path, capsys):
    path = "/a/long/run/directory/" * 8 + "plots/reward_and_entropy.png"
    logger = _logger(tmp_path)
    logger.print(f"plots: {path}")
    logger.close()
    assert f"plots: {path}\n" in capsys.readouterr().out  # not cut at 80 columns


def test_a_resumed_run_drops_the_lines_past_its_checkpoint(tmp_path):
    logger = _logger(tmp_path)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": step / 10})
    logger.close()
    resumed = _logger(tmp_path, start_step=2)
    resumed.log(3, {"reward/mean": 0.9})
    assert [(m["step"], m["reward/mean"]) for m in resumed.history()] == [(1, 0.1), (2, 0.2), (3, 0.9)]


def test_a_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path, capsys):
    """A run killed while appending step 3 leaves '{"step": 3, "rew' without a newline: the resumed run
    drops it, says so, and the file reads like one uninterrupted run."""
    logger = _logger(tmp_path)
    for step in (1, 2):
        logger.log(step, {"reward/mean": step / 10})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "rew')
    resumed = _logger(tmp_path, start_step=2)
    assert "dropped its last line, cut short by an interrupted write" in capsys.readouterr().out
    resumed.log(3, {"reward/mean": 0.3})
    assert [(m["step"], m["reward/mean"]) for m in resumed.history()] == [(1, 0.1), (2, 0.2), (3, 0.3)]


def test_a_damaged_line_inside_the_file_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl, line 2: not a metrics record: 'not json'"):
        _logger(tmp_path, start_step=2)
