"""The entropy-law fit R = -a exp(H) + b and the end-of-run plots."""

import math

import pytest

from fusedrl.engine.plots import describe_fit, fit_entropy_law, write_plots


def test_fit_recovers_exact_law():
    entropy = [1.2, 0.9, 0.7, 0.4, 0.2]
    reward = [-0.5 * math.exp(h) + 2.0 for h in entropy]
    fit = fit_entropy_law(entropy, reward)
    assert fit["a"] == pytest.approx(0.5, abs=1e-9)
    assert fit["b"] == pytest.approx(2.0, abs=1e-9)
    assert fit["ceiling"] == pytest.approx(1.5, abs=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12) and fit["steps"] == 5
    assert describe_fit(fit).endswith("predicted reward ceiling b - a = 1.5000")


def test_fit_is_least_squares():
    # Two points on the law and one off it: the fit minimises the squared residuals in exp(H).
    x = [math.exp(h) for h in (0.0, 1.0, 2.0)]
    reward = [1.0, 0.0, -1.5]
    fit = fit_entropy_law([0.0, 1.0, 2.0], reward)
    mean_x, mean_r = sum(x) / 3, sum(reward) / 3
    slope = sum((xi - mean_x) * (ri - mean_r) for xi, ri in zip(x, reward)) / sum((xi - mean_x) ** 2 for xi in x)
    assert fit["a"] == pytest.approx(-slope, rel=1e-9)
    assert fit["b"] == pytest.approx(mean_r - slope * mean_x, rel=1e-9)


@pytest.mark.parametrize("entropy, reward, words", [
    ([0.5, 0.5, 0.5], [0.1, 0.2, 0.3], "entropy varied by 0.0000 nats"),
    ([0.4, 0.9], [0.1, 0.2], "needs 3"),
    ([1.0, 0.8, 0.5, 0.3], [0.0, 0.0, 0.0, 0.0], "reward did not change"),
    # Reward rising with entropy: a < 0, which once printed "R = --4.8251 exp(H) + ...".
    ([0.2, 0.5, 0.9, 1.4], [0.1, 0.3, 0.5, 0.9], "does not fall as entropy rises"),
])
def test_no_fit_without_meaning(entropy, reward, words):
    fit = fit_entropy_law(entropy, reward)
    assert set(fit) == {"reason"} and words in fit["reason"]
    line = describe_fit(fit)
    assert "no fit" in line and "--" not in line


def test_write_plots(tmp_path):
    history = [{"step": s, "reward/mean": 0.1 * s, "entropy/mean": 1.0 / s} for s in range(1, 6)]
    history[-1]["eval/accuracy"] = 0.4
    paths, fit = write_plots(history, tmp_path)
    assert [p.name for p in paths] == ["reward_entropy.png", "entropy_law.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert fit["a"] > 0 and 0 <= fit["r2"] <= 1
    flat = [{"step": s, "reward/mean": 0.0, "entropy/mean": 1.0 / s} for s in range(1, 6)]
    paths, fit = write_plots(flat, tmp_path / "flat")
    assert len(paths) == 2 and "reward did not change" in fit["reason"]
