"""End-of-run plots: reward and entropy against step, and the entropy law R = -a exp(H) + b.

Cui et al. (docs/algorithms.md section 3) found validation reward R and policy entropy H related by
R = -a exp(H) + b over training, so the reward at zero entropy, b - a, is the run's predicted ceiling.
The fit is linear least squares in exp(H) over the steps' (entropy/mean, reward/mean) pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def fit_entropy_law(entropy, reward) -> dict | None:
    """{"a", "b", "ceiling"} of R = -a exp(H) + b by least squares; None with fewer than 2 distinct H."""
    h, r = np.asarray(entropy, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    if len(np.unique(h)) < 2:
        return None
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    return {"a": float(a), "b": float(b), "ceiling": float(b - a)}


def write_plots(history: list[dict], output_dir: Path) -> tuple[list[Path], dict | None]:
    """PNG plots of the run's metrics under output_dir/plots; returns their paths and the fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [h for h in history if "reward/mean" in h and "entropy/mean" in h]
    if not rows:
        return [], None
    steps = np.array([h["step"] for h in rows])
    reward = np.array([h["reward/mean"] for h in rows])
    entropy = np.array([h["entropy/mean"] for h in rows])
    fit = fit_entropy_law(entropy, reward)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)

    fig, (ax_r, ax_h) = plt.subplots(1, 2, figsize=(10, 4))
    ax_r.plot(steps, reward, label="train reward/mean")
    evals = [h for h in history if "eval/accuracy" in h]
    if evals:
        ax_r.plot([h["step"] for h in evals], [h["eval/accuracy"] for h in evals], "o-", label="held-out accuracy")
    ax_r.set(xlabel="step", ylabel="reward", title="Reward")
    ax_r.legend()
    ax_h.plot(steps, entropy)
    ax_h.set(xlabel="step", ylabel="mean token entropy (nats)", title="Entropy")
    fig.tight_layout()
    curves = plots / "reward_entropy.png"
    fig.savefig(curves, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(entropy, reward, s=8, c=steps, cmap="viridis", label="steps")
    title = "R = -a exp(H) + b"
    if fit is not None:
        grid = np.linspace(0, entropy.max() * 1.05, 100)
        ax.plot(grid, -fit["a"] * np.exp(grid) + fit["b"], "r-",
                label=f"a={fit['a']:.3f} b={fit['b']:.3f}")
        ax.axhline(fit["ceiling"], color="gray", linestyle="--", label=f"ceiling b-a={fit['ceiling']:.3f}")
    ax.set(xlabel="entropy H", ylabel="reward R", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    law = plots / "entropy_law.png"
    fig.savefig(law, dpi=100)
    plt.close(fig)
    return [curves, law], fit
