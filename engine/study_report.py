"""docs/study.md from the study's runs (engine/study.py): tables of mean and spread over seeds, PNG plots,
the entropy-law fits, and a verdict per arm that says whether it differs from the baseline beyond the
seed spread.

An arm's result is its held-out accuracy at the last evaluation; mean and sample standard deviation
over seeds, and every seed's value. "Beyond the seed spread" means the seeds' ranges [min, max] of
the arm and of the baseline do not overlap: with 3 seeds a coarse test, stated as such in the report.
Curves are drawn against sampled tokens (continuations and tree branches included), the budget every
arm gets the same amount of.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fusedrl.engine.plots import fit_entropy_law

TAIL_STEPS = 5  # the "final reward" of a run: its mean training reward over its last TAIL_STEPS steps


def load_run(output_dir: Path) -> dict | None:
    """{"history", "summary", "config"} of a finished run, None if it did not finish."""
    if not (output_dir / "summary.json").is_file():
        return None
    history = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = OmegaConf.to_container(OmegaConf.load(output_dir / "config.yaml"))
    return {"history": history, "summary": json.loads((output_dir / "summary.json").read_text()), "config": config}


def run_curves(run: dict) -> dict:
    """Per-run series: cumulative sampled tokens per step, accuracy at the evaluations, entropy, reward."""
    steps = [h for h in run["history"] if h["step"] > 0]
    sampled = np.cumsum([h.get("tokens/sampled", 0) for h in steps])
    at = dict(zip([h["step"] for h in steps], sampled))
    at[0] = 0
    evals = [(at[h["step"]], h["eval/accuracy"]) for h in run["history"] if "eval/accuracy" in h]
    cfg = run["config"]
    responses = cfg["rollout"]["prompts_per_step"] * (cfg["rollout"]["group_size"]
                                                     if cfg["run"]["algorithm"] != "spo_tree" else 1)
    # Tokens through the update's forward and backward: every response of the batch (SPO-tree: the leaf
    # rows it keeps).
    trained = sum(h.get("completions/mean_length", 0.0) * (h["spo/leaves"] - h["spo/rows_dropped"]
                                                        if "spo/leaves" in h else responses) for h in steps)
    return {"responses": sum(h.get("spo/leaves", responses) for h in steps),"tokens": sampled, "entropy": np.array([h.get("entropy/mean", np.nan) for h in steps]),
            "reward": np.array([h["reward/mean"] for h in steps]), "evals": evals,
            "step_seconds": float(sum(h["time/step_s"] for h in steps)),
            "wall_seconds": run["summary"]["wall_seconds"], "cpu_seconds": run["summary"]["cpu_seconds"],
            "steps": len(steps), "trained": trained}


def spread(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "n/a"
    values = [float(v) for v in values]  # statistics.stdev fails on numpy integers
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def beyond_spread(arm: list[float], base: list[float]) -> bool:
    """The seeds' ranges do not overlap (both with at least 2 seeds)."""
    return len(arm) >= 2 and len(base) >= 2 and (max(arm) < min(base) or min(arm) > max(base))


def verdict(arm: list[float], base: list[float], scale: float = 100, unit: str = "points", digits: int = 1) -> str:
    if len(arm) < 2 or len(base) < 2:
        return "too few seeds to compare"
    diff = scale * (statistics.fmean(arm) - statistics.fmean(base))
    return f"{diff:+.{digits}f} {unit}, {'beyond' if beyond_spread(arm, base) else 'within'} the seed spread"


def summary_line(question: dict, final: dict, entropy: dict) -> str:
    """Which arms differ from the baseline beyond the seed spread, in accuracy and in entropy."""
    base, others = question["baseline"], [a for a in question["arms"] if a != question["baseline"]]
    if any(len(final[a]) < 2 for a in question["arms"]):
        return "Too few seeds finished for some arms to compare them with the baseline."
    parts = []
    for name, values in (("held-out accuracy", final), ("final entropy", entropy)):
        differ = [a for a in others if beyond_spread(values[a], values[base])]
        parts.append(f"in {name}, {', '.join(differ)} {'differs' if len(differ) == 1 else 'differ'} from {base} "
                     "beyond the seed spread" if differ else
                     f"in {name}, no arm differs from {base} beyond the seed spread")
    return "Verdict: " + "; ".join(parts) + ". Everything else is within the spread of the seeds, where this " \
           "study cannot tell the arms apart."


def law_row(curves: dict) -> dict:
    """The fit over the whole run, and an early fit (first third of the steps) against the final reward."""
    h, r = curves["entropy"], curves["reward"]
    third = max(1, len(h) // 3)
    return {"full": fit_entropy_law(h, r), "early": fit_entropy_law(h[:third], r[:third]),
            "final_reward": float(np.mean(r[-TAIL_STEPS:])), "final_entropy": float(np.mean(h[-TAIL_STEPS:]))}


def law_cells(rows: list[dict]) -> list[str]:
    """Table cells: a, b, ceiling and R^2 of the full fits; the early fit's prediction against the final reward."""
    full = [x["full"] for x in rows if "reason" not in x["full"]]
    early = [x for x in rows if "reason" not in x["early"]]
    reasons = sorted({x["full"]["reason"] for x in rows if "reason" in x["full"]})
    cells = [f"{len(full)}/{len(rows)}" + (f" ({'; '.join(reasons)})" if reasons else ""),
             spread([f["a"] for f in full], digits=3), spread([f["b"] for f in full], digits=3),
             spread([f["ceiling"] for f in full], digits=3), spread([f["r2"] for f in full], digits=2)]
    predicted = [-x["early"]["a"] * np.exp(x["final_entropy"]) + x["early"]["b"] for x in early]
    errors = [p - x["final_reward"] for p, x in zip(predicted, early)]
    ceilings = [x["early"]["ceiling"] for x in early]
    cells += [f"{len(early)}/{len(rows)}", spread(ceilings, digits=3), spread(errors, digits=3),
              spread([x["final_reward"] for x in rows], digits=3)]
    return cells


def plot_question(question: dict, curves: dict[str, list[dict]], path: Path, with_time: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 if with_time else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    for arm in question["arms"]:
        runs = curves.get(arm, [])
        if not runs:
            continue
        n = min(len(c["evals"]) for c in runs)
        x = np.mean([[e[0] for e in c["evals"][:n]] for c in runs], axis=0) / 1000
        acc = np.array([[e[1] for e in c["evals"][:n]] for c in runs]) * 100
        line, = axes[0].plot(x, acc.mean(0), "o-", label=f"{arm} (n={len(runs)})")
        axes[0].fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.15)
        m = min(c["steps"] for c in runs)
        tokens = np.mean([c["tokens"][:m] for c in runs], axis=0) / 1000
        entropy = np.array([c["entropy"][:m] for c in runs])
        axes[1].plot(tokens, entropy.mean(0), color=line.get_color())
        axes[1].fill_between(tokens, entropy.min(0), entropy.max(0), color=line.get_color(), alpha=0.15)
        if with_time:
            axes[2].scatter([c["step_seconds"] for c in runs], acc[:, -1], color=line.get_color(), label=arm)
    axes[0].set(xlabel="sampled tokens (thousands)", ylabel="held-out accuracy (%)", title="Accuracy")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="sampled tokens (thousands)", ylabel="mean token entropy (nats)", title="Entropy")
    if with_time:
        axes[2].set(xlabel="RL step time, summed (s)", ylabel="final held-out accuracy (%)",
                    title="Accuracy against time, one dot per seed")
    fig.suptitle(question["title"] + " — mean over seeds, band: min to max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_entropy_law(question: dict, curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for arm in question["arms"]:
        runs = curves.get(arm, [])
        if not runs:
            continue
        h = np.concatenate([c["entropy"] for c in runs])
        r = np.concatenate([c["reward"] for c in runs])
        dots = ax.scatter(h, r, s=6, alpha=0.5, label=arm)
        fit = fit_entropy_law(h, r)
        if "reason" not in fit:
            grid = np.linspace(h.min(), h.max(), 50)
            ax.plot(grid, -fit["a"] * np.exp(grid) + fit["b"], color=dots.get_facecolor()[0][:3])
    ax.set(xlabel="mean token entropy H (nats)", ylabel="training reward R",
           title="R = -a exp(H) + b, fitted per arm over all its seeds' steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def final_entropy(curves: list[dict]) -> list[float]:
    """Each run's mean token entropy over its last TAIL_STEPS trained steps (an SPO-tree step whose rows
    all had zero advantage trains nothing and has none)."""
    tails = [c["entropy"][~np.isnan(c["entropy"])][-TAIL_STEPS:] for c in curves]
    return [float(t.mean()) for t in tails if len(t)]


def arm_config(plan: dict, arm: str) -> str:
    spec = plan["arms"][arm]
    return f"`configs/study/{spec['config']}`" + "".join(f" `{o}`" for o in spec["overrides"])


def write_report(plan: dict, output: Path, report: Path, images: Path, *, wall_seconds: float, small: bool,
                 machine: str) -> None:
    """Writes `report` and its plots under `images` from the runs under `output`."""
    images.mkdir(parents=True, exist_ok=True)
    seeds = plan["seeds"]
    runs = {arm: {s: load_run(output / f"seed{s}" / arm) for s in seeds} for arm in plan["arms"]}
    curves = {arm: [run_curves(r) for r in by_seed.values() if r is not None] for arm, by_seed in runs.items()}
    missing = {arm: [s for s, r in by_seed.items() if r is None] for arm, by_seed in runs.items()}
    missing = {arm: seeds_left for arm, seeds_left in missing.items() if seeds_left}
    starts = [json.loads((output / f"seed{s}" / "warm_start" / "summary.json").read_text())
              for s in seeds if (output / f"seed{s}" / "warm_start" / "summary.json").is_file()]
    before = [w["eval_before"] for w in starts]
    final = {arm: [c["evals"][-1][1] for c in cs] for arm, cs in curves.items()}
    entropy = {arm: final_entropy(cs) for arm, cs in curves.items()}
    base_cfg = OmegaConf.to_container(OmegaConf.load(plan["folder"] / plan["warm_start"]))
    demo, ws, data = base_cfg["model"].get("demo", {}), base_cfg["warm_start"], base_cfg["data"]
    warm_steps = ", ".join(str(w.get("steps", ws["steps"])) for w in starts)

    before_seeds = ", ".join(f"{100 * b['eval/accuracy']:.1f}" for b in before)
    lines = ["# Study: the papers' mechanisms on the built-in task", ""]
    if small:
        lines += ["**Small check run** (`--small`): one seed, a few steps; it shows that every arm trains and "
                  "that this report is written. Its numbers mean nothing.", ""]
    if missing:
        left = "; ".join(f"{arm} (seed{'s' if len(v) > 1 else ''} {', '.join(map(str, v))})" for arm, v in missing.items())
        lines += [f"**PARTIAL RESULTS**: {sum(map(len, missing.values()))} of {len(seeds) * len(runs)} arm runs did "
                  f"not finish in the time this study had: {left}. "
                  "Tables use the seeds that finished (n per arm is given); `bash scripts/study.sh` runs the rest, "
                  "keeping the finished runs, and rewrites this report.", ""]
    lines += [
        "Reproduce: `bash scripts/study.sh` (all arms, seeds "
        f"{', '.join(map(str, seeds))}; `--small` for the few-minute check that CI runs). Every arm is a "
        "config of `configs/study/` plus the overrides shown, from `configs/study/arms.yaml`.", "",
        f"Machine: {machine}. Wall time of the whole study: {wall_seconds / 60:.1f} min "
        f"({len(starts)} warm starts and {sum(len(c) for c in curves.values())} arm runs finished, two one-thread "
        "processes at a time).",
        "", "## Design", "",
        f"Task: `{data['task']}`, 3-digit addition with worked steps (`engine/tasks/arithmetic3.py`). The demo's "
        "2-digit addition saturates near 90% held-out accuracy within the demo's budget, which leaves arms no "
        "room to differ; three digits make responses longer (about 33 tokens) with one more carry to get right, "
        f"and the warm start (up to {ws['steps']} supervised steps of {ws['batch_size']} reference responses) "
        f"stops at the first check, every {ws['steps'] // 10} steps, where the accuracy on 200 training prompts "
        f"reaches {plan.get('warm_start_target')}, leaving the model knowing the format but not the carries. A fixed "
        "step count would not do: the model learns the carries in a sudden drop of the loss whose step varies "
        "between seeds (500 steps gave 80% and 88% held-out accuracy on two seeds; 200 steps gave 0.5% on "
        f"one). Warm-start steps per seed: {warm_steps}. "
        f"Model: the built-in tiny Llama (hidden {demo.get('hidden_size', 128)}, {demo.get('num_layers', 4)} "
        "layers), float32, one thread per run.", "",
        "One warm start per seed, saved and shared by every arm of that seed (`model.path` at it, "
        "`warm_start.steps=0`), so the arms of a seed start from the same weights and differ only in their "
        f"overrides. Held-out set: {data['eval_size']} prompts never trained on, sampled at temperature 1, "
        "evaluated every few steps (about ±3.5 points of sampling noise per evaluation at these accuracies). "
        f"Held-out accuracy after the warm start: {spread([b['eval/accuracy'] for b in before], 100)}% "
        f"(seeds {before_seeds}).", "",
        "Budget: the GRPO and PPO arms sample the same number of responses (the small-batch PPO arm a quarter "
        "per step for four times the steps), so the same tokens up to response lengths; the SPO arms' step "
        "counts are chosen so that their sampled tokens, continuations and tree branches included, come close "
        "to GRPO's. The table below gives what each arm actually used: sampled tokens are the budget, tokens "
        "in the updates those that went through the training forward and backward (all of a batch's response "
        "tokens, also for the arms whose loss keeps a fraction of them). No arm was tuned: the "
        "GRPO, PPO and SPO settings are the demo configs' (with a constant learning rate), the Clip-Cov / "
        "KL-Cov ratios the paper's, the entropy bonus coefficient one round value (0.01).", "",
        "Reading the tables: accuracy is the held-out accuracy at the last evaluation, mean ± standard "
        "deviation over seeds, then each seed's value. An arm differs from its question's baseline \"beyond "
        "the seed spread\" only when the seeds' ranges do not overlap; with 3 seeds that is a coarse test, "
        "and \"within the seed spread\" means this study cannot tell the arms apart.", "",
        "## Budget per arm", "",
        "| arm | config | RL steps | sampled responses | sampled tokens (k) | tokens in the updates (k) | "
        "RL step time (s) | process wall time (s) | process CPU time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, cs in curves.items():
        lines.append(f"| {arm} | {arm_config(plan, arm)} | {cs[0]['steps'] if cs else 'n/a'} | "
                     f"{spread([c['responses'] for c in cs], digits=0)} | "
                     f"{spread([c['tokens'][-1] for c in cs], 1e-3)} | {spread([c['trained'] for c in cs], 1e-3)} | "
                     f"{spread([c['step_seconds'] for c in cs], digits=0)} | {spread([c['wall_seconds'] for c in cs], digits=0)} | "
                     f"{spread([c['cpu_seconds'] for c in cs], digits=0)} |")
    cpu = sum(c["cpu_seconds"] for cs in curves.values() for c in cs)
    lines += ["", f"Times are from a machine shared with other jobs: they compare arms only roughly. The CPU time "
              f"of the finished arm runs adds up to {cpu / 60:.0f} CPU-minutes (the warm starts not included), what "
              "they would take on one free core.", ""]

    for number, q in enumerate(plan["questions"], start=1):
        image = images / f"study_q{number}.png"
        plot_question(q, curves, image, with_time=q.get("x") == "tokens")
        lines += [f"## {number}. {q['title']}", "",
                  f"| arm | n | held-out accuracy (%) | per seed | against {q['baseline']} | final entropy (nats) "
                  f"| against {q['baseline']} | RL step time (s) |", "|---|---|---|---|---|---|---|---|"]
        for arm in q["arms"]:
            base = q["baseline"]
            vs_acc = "baseline" if arm == base else verdict(final[arm], final[base])
            vs_h = "baseline" if arm == base else verdict(entropy[arm], entropy[base], 1, "nats", 3)
            lines.append(f"| {arm} | {len(curves[arm])} | {spread(final[arm], 100)} | "
                         f"{', '.join(f'{100 * v:.1f}' for v in final[arm])} | {vs_acc} | "
                         f"{spread(entropy[arm], digits=3)} | {vs_h} | "
                         f"{spread([c['step_seconds'] for c in curves[arm]], digits=0)} |")
        same = [arm for arm in q["arms"] if arm != q["baseline"] and final[arm] == final[q["baseline"]]
                and entropy[arm] == entropy[q["baseline"]]]
        lines += ["", summary_line(q, final, entropy)]
        if same:
            lines.append(f"{', '.join(same)}: the same held-out accuracy and final entropy as {q['baseline']} on every "
                         f"seed, to the last digit; in these runs the arm changed nothing.")
        lines += [*([q["note"]] if q.get("note") else []), "", f"![{q['title']}]({Path('images') / image.name})", ""]
        if q.get("entropy_law"):
            law_image = images / f"study_q{number}_entropy_law.png"
            plot_entropy_law(q, curves, law_image)
            lines += ["Entropy law R = -a exp(H) + b per seed (training reward and mean token entropy of every "
                      "step; `fusedrl.engine.plots.fit_entropy_law`, which declines a fit where it means nothing), "
                      "mean ± std over the seeds with a fit. The early fit uses the first third of the steps; its "
                      f"prediction at the run's final entropy (mean of the last {TAIL_STEPS} steps) is compared "
                      f"with the final training reward (mean of the last {TAIL_STEPS} steps).", "",
                      "| arm | fits | a | b | ceiling b - a | R^2 | early fits | early ceiling | early prediction "
                      "- final reward | final reward |", "|---|---|---|---|---|---|---|---|---|---|"]
            for arm in q["arms"]:
                lines.append(f"| {arm} | " + " | ".join(law_cells([law_row(c) for c in curves[arm]])) + " |")
            lines += ["", f"![entropy law]({Path('images') / law_image.name})", ""]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(lines) + "\n")
