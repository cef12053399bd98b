"""fusedrl: fused log-prob and entropy kernels, entropy-aware policy losses, and a lean RL engine.

The public surface is small and imported lazily, so that `import fusedrl` does not pull in
transformers or the engine for users who only want the kernels.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "logprobs_and_entropy": "fusedrl.kernels",
    "linear_logprobs_and_entropy": "fusedrl.kernels",
    "top_entropy_mask": "fusedrl.kernels",
    "probability_mask": "fusedrl.kernels",
    "covariance_mask": "fusedrl.kernels",
    "FusedPolicyLoss": "fusedrl.loss",
    "LossOptions": "fusedrl.loss",
    "Selection": "fusedrl.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'fusedrl' has no attribute {name!r}")
