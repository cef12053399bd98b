"""Import hook for verl: `VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl_plugin` makes every verl
process (driver and Ray workers) import this module, which registers fusedrl's policy losses, wraps
verl's `ppo_loss` and routes verl's fused-kernel forward to fusedrl's op. See fusedrl.integrations.verl.
"""

from fusedrl.integrations.verl import install

install()
