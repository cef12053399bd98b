"""End-of-run plots: reward and entropy against step, and the entropy law R = -a exp(H) + b.

Cui et al. (docs/algorithms.md section 3) found validation reward R and policy entropy H related by
R = -a exp(H) + b over training, so the reward at zero entropy, b - a, is the run's predicted ceiling.
The fit is linear least squares in exp(H) over the steps' (entropy/mean, reward/mean) pairs. It is
reported only where it means something: at least MIN_STEPS steps, entropy spread over at least
MIN_ENTROPY_RANGE nats, a reward that changed, and a > 0 (reward falling as entropy rises; otherwise
there is no ceiling to predict); with its R^2. Otherwise the result says why there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


MIN_STEPS = 3
MIN_ENTROPY_RANGE = 0.01  # nats: below this, exp(H) is nearly constant and a and b are noise


def fit_entropy_law(entropy, reward) -> dict:
    """{"a", "b", "ceiling", "r2", "steps"} of R = -a exp(H) + b by least squares, or {"reason": why
    there is no meaningful fit} (too few steps, too little entropy range, a constant reward, a <= 0)."""
    h, r = np.asarray(entropy, dtype=np.float64), np.asarray(reward, dtype=np.float64)
    if len(h) < MIN_STEPS:
        return {"reason": f"{len(h)} step(s) with reward and entropy; the fit needs {MIN_STEPS}"}
    if np.ptp(h) < MIN_ENTROPY_RANGE:
        return {"reason": f"entropy varied by {np.ptp(h):.4f} nats only (under {MIN_ENTROPY_RANGE}): nothing to fit"}
    if np.ptp(r) == 0:
        return {"reason": f"reward did not change (always {r[0]:g}): nothing to fit"}
    design = np.stack([-np.exp(h), np.ones_like(h)], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, r, rcond=None)
    if a <= 0:
        return {"reason": f"reward does not fall as entropy rises (fitted a = {a:.4g} <= 0): no ceiling to predict"}
    residual = r - design @ np.array([a, b])
    r2 = 1.0 - float(residual @ residual) / float(((r - r.mean()) ** 2).sum())
    return {"a": float(a), "b": float(b), "ceiling": float(b - a), "r2": r2, "steps": int(len(h))}


def describe_fit(fit: dict) -> str:
    """One line for the console and the report."""
    if "reason" in fit:
        return f"entropy law R = -a exp(H) + b: no fit ({fit['reason']})"
    return (f"entropy law R = -a exp(H) + b: a = {fit['a']:.4f}, b = {fit['b']:.4f}, R^2 = {fit['r2']:.2f} over "
            f"{fit['steps']} steps; predicted reward ceiling b - a = {fit['ceiling']:.4f}")


def write_plots(history: list[dict], output_dir: Path) -> tuple[list[Path], dict | None]:
    """PNG plots of the run's metrics under output_dir/plots; returns their paths and the fit (see
    fit_entropy_law; None when no step has reward and entropy)."""
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
    title = "R = -a exp(H) + b" + (": no fit" if "reason" in fit else f" (R^2 = {fit['r2']:.2f})")
    if "reason" in fit:
        ax.text(0.02, 0.02, fit["reason"], transform=ax.transAxes, fontsize=7, wrap=True)
    else:
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
