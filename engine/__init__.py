"""fusedrl.engine: the training loops (GRPO, PPO, SPO) and what they need: config, data, rollout,
rewards, advantages, the fused policy loss, logging and checkpoints."""
