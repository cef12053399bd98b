"""engine/metrics_log.py: metrics.jsonl across a resume, and console lines printed whole."""

from fusedrl.engine.config import RunConfig
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
