"""verl's plugin hook for fusedrl: importing this module runs `fusedrl.integrations.verl.install()`
(fusedrl's policy losses in verl's registry, verl's `ppo_loss` wrapped so that they see the entropy
and the data-parallel group, and the `fusedrl` fused-kernel backend).

verl imports it on `import verl` in every process through the `verl.plugins` entry point in fusedrl's
pyproject.toml; `VERL_USE_EXTERNAL_MODULES=fusedrl.integrations.verl_plugin` does the same where entry
points are switched off (`VERL_USE_EXTERNAL_PLUGINS=none`).
"""

from fusedrl.integrations.verl import install

install()
