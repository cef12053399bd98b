"""The entropy-law fit R = -a exp(H) + b and the end-of-run plots."""

import math

import pytest

from fusedrl.engine.plots import fit_entropy_law, write_plots


def test_fit_recovers_exact_law():
    entropy = [1.2, 0.9, 0.7, 0.4, 0.2]
    reward = [-0.5 * math.exp(h) + 2.0 for h in entropy]
    fit = fit_entropy_law(entropy, reward)
    assert fit["a"] == pytest.approx(0.5, abs=1e-9)
    assert fit["b"] == pytest.approx(2.0, abs=1e-9)
    assert fit["ceiling"] == pytest.approx(1.5, abs=1e-9)


def test_fit_is_least_squares():
    # Two points on the law and one off it: the fit minimises the squared residuals in exp(H).
    x = [math.exp(h) for h in (0.0, 1.0, 2.0)]
    reward = [1.0, 0.0, -1.5]
    fit = fit_entropy_law([0.0, 1.0, 2.0], reward)
    mean_x, mean_r = sum(x) / 3, sum(reward) / 3
    slope = sum((xi - mean_x) * (ri - mean_r) for xi, ri in zip(x, reward)) / sum((xi - mean_x) ** 2 for xi in x)
    assert fit["a"] == pytest.approx(-slope, rel=1e-9)
    assert fit["b"] == pytest.approx(mean_r - slope * mean_x, rel=1e-9)


def test_fit_needs_two_entropies():
    assert fit_entropy_law([0.5, 0.5], [0.1, 0.2]) is None


def test_write_plots(tmp_path):
    history = [{"step": s, "reward/mean": 0.1 * s, "entropy/mean": 1.0 / s} for s in range(1, 6)]
    history[-1]["eval/accuracy"] = 0.4
    paths, fit = write_plots(history, tmp_path)
    assert [p.name for p in paths] == ["reward_entropy.png", "entropy_law.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert fit is not None
