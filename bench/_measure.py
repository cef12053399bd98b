"""Timing and peak memory for the selection and peer benchmark modules.

`measure` times a call with pytest-benchmark (synchronising the GPU after each call, so the time is
the kernels' and not the launch's) and records what the report needs in `benchmark.extra_info`.
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def measure(benchmark, fn, *, rounds: int | None = None, **info):
    """Time fn over `rounds` calls (default 5 on a GPU, 3 on a CPU) and record `info` (op, impl, shape,
    mode, bytes or flops) and, on a GPU, the peak memory of one call beyond what was allocated before
    it. Returns fn's result (from the last timed call)."""
    rounds = rounds or (5 if DEVICE == "cuda" else 3)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated() - before
    benchmark.extra_info.update(info)
    return benchmark.pedantic(_synchronised(fn), rounds=rounds, warmup_rounds=1)


def _synchronised(fn):
    if DEVICE != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call
