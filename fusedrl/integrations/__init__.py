"""Drop-in use of fusedrl's fused loss inside other trainers.

- `fusedrl.integrations.trl`: `FusedGRPOTrainer`, a `trl.GRPOTrainer` whose loss runs through
  `FusedPolicyLoss` on the fused linear path (needs `trl`).
- `fusedrl.integrations.verl`: verl's PPO, Clip-Cov and KL-Cov losses computed by `FusedPolicyLoss`
  with fusedrl's token masks set from verl's config, and a fused-kernel model forward (needs `verl`;
  installed into verl by the `verl.plugins` entry point).

Each module imports its trainer library on import and says clearly when it is missing; importing this
package alone imports neither.
"""
