"""fusedrl.engine: the training loops (GRPO, PPO, SPO) and what they need: config, data, rollout,
rewards, advantages, the fused policy loss, logging and checkpoints."""

if __name__ != "fusedrl.engine":
    # Imported as a bare `engine` from the repository root: step aside for whatever else that name is.
    from fusedrl._checkout import stand_aside

    stand_aside(__name__, __file__)
