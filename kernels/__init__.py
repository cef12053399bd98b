"""fusedrl.kernels: one op per module.

The two ops over the vocabulary have a Triton backend and a plain-PyTorch backend:
- logprobs_and_entropy          (logprobs_entropy.py): lp and H from logits
- linear_logprobs_and_entropy   (linear_logprobs_entropy.py): lp and H from hidden states and the
                                output embedding, never materialising the logits
torch_backend.py holds their plain-PyTorch backends (streaming over chunks with a fixed memory budget:
the CPU backend and the benchmarks' baseline).

The selection ops read [tokens]-sized tensors only and are plain PyTorch (exact radix selection,
_select.py), with optional process groups for batch-wide statistics across ranks:
- top_entropy_mask              (top_entropy_mask.py): exact batch-wide top-rho entropy selection
- probability_mask              (probability_mask.py): SPO's low-probability token mask
- covariance_mask               (covariance_mask.py): Clip-Cov / KL-Cov token selection
"""

if __name__ != "fusedrl.kernels":
    # Imported as a bare `kernels` from the repository root: let Hugging Face's `kernels` (or nothing)
    # answer instead. The rest of this file then only binds names in a module nobody holds.
    from fusedrl._checkout import stand_aside

    stand_aside(__name__, __file__)

import importlib

_OPS = {
    "logprobs_and_entropy": "fusedrl.kernels.logprobs_entropy",
    "linear_logprobs_and_entropy": "fusedrl.kernels.linear_logprobs_entropy",
    "top_entropy_mask": "fusedrl.kernels.top_entropy_mask",
    "probability_mask": "fusedrl.kernels.probability_mask",
    "covariance_mask": "fusedrl.kernels.covariance_mask",
}

__all__ = sorted(_OPS)


# These three modules share their op's name: importing one (as its own tests do) would bind the
# module, not the function, to the package attribute and shadow the lazy lookup. They need only torch,
# so they are imported eagerly and the function wins.
from fusedrl.kernels.covariance_mask import covariance_mask  # noqa: E402
from fusedrl.kernels.probability_mask import probability_mask  # noqa: E402
from fusedrl.kernels.top_entropy_mask import top_entropy_mask  # noqa: E402


def __getattr__(name):
    if name in _OPS:
        return getattr(importlib.import_module(_OPS[name]), name)
    raise AttributeError(f"module 'fusedrl.kernels' has no attribute {name!r}")


def __dir__():
    return __all__
