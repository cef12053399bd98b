"""Chooses the training loop named by run.algorithm."""

from __future__ import annotations

from fusedrl.engine.config import Config


def train(cfg: Config) -> dict:
    """Runs the configured algorithm to the end; returns its summary."""
    match cfg.run.algorithm:
        case "grpo":
            from fusedrl.engine import grpo

            return grpo.train(cfg)
        case "ppo":
            from fusedrl.engine import ppo

            return ppo.train(cfg)
        case "spo_chain" | "spo_tree":
            from fusedrl.engine import spo

            return spo.train(cfg)
    # load_config already refused every other name; this guards direct callers.
    raise ValueError(f"run.algorithm: {cfg.run.algorithm!r} is not one of grpo, ppo, spo_chain, spo_tree")
