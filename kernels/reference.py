"""Plain-PyTorch versions of every fusedrl op.

These are the "torch" backends (used on CPU and wherever Triton is unavailable) and the baselines the
benchmarks compare against. They stream over row chunks with a bounded chunk budget, so that their
peak extra memory does not grow with the number of rows; none of them allocates an fp32 [N, V]
tensor. The tests' oracle is separate: a naive float64 computation in the tests themselves.
"""

from __future__ import annotations

import torch
