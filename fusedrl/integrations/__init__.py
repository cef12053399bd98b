"""Drop-in use of fusedrl's fused loss inside other trainers.

- `fusedrl.integrations.trl`: `FusedGRPOTrainer`, a `trl.GRPOTrainer` whose loss runs through
  `FusedPolicyLoss` on the fused linear path (needs `trl`).
- `fusedrl.integrations.verl`: fusedrl's entropy-aware losses in verl's policy-loss registry and a
  model-forward patch returning per-token log-probs and entropy from the fused linear op.

Each module imports its trainer library on import and says clearly when it is missing; importing this
package alone imports neither.
"""
