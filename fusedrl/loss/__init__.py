"""fusedrl.loss: the policy loss, a library layer over the kernels.

- LossOptions      (options.py): every option of the loss, its default and its check, declared once
- FusedPolicyLoss  (policy_loss.py): PPO / GRPO / DAPO and their relatives on fused lp and H, with the
                   batch-wide token selections
- Selection        (selection.py): the batch-wide masks of a whole batch, cut into micro-batches
- objectives.py: the importance weights and the terms beyond the PPO clip (GSPO, CISPO, SAPO, VESPO)

It imports only fusedrl.kernels; the engine and the integrations import it. Names are resolved
lazily, so that reading a config (which embeds LossOptions) does not import torch.
"""

import importlib

_EXPORTS = {
    "LossOptions": "fusedrl.loss.options",
    "OptionError": "fusedrl.loss.options",
    "FusedPolicyLoss": "fusedrl.loss.policy_loss",
    "EXTREME_METRICS": "fusedrl.loss.policy_loss",
    "metrics_to_floats": "fusedrl.loss.policy_loss",
    "Selection": "fusedrl.loss.selection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusedrl.loss' has no attribute {name!r}")


def __dir__():
    return __all__
