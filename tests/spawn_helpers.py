"""Run functions on several gloo processes (CPU), each rank on its own part of a batch.

`run_ranks(world_size, jobs)` spawns the processes once; every job is (fn, per_rank_args, kwargs)
with fn a module-level function taking `process_group=` and per_rank_args[r] what rank r passes
positionally; a `generator_seed` kwarg becomes a freshly seeded torch.Generator on every rank. The
caller compares rank r's result with the single-process result on the concatenated batch. Lives in
tests/ (on sys.path through tests/conftest.py) so that tests/kernels and tests/engine share it.
"""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, jobs, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = []
        for fn, per_rank_args, kwargs in jobs:
            kwargs = dict(kwargs)
            if "generator_seed" in kwargs:
                kwargs["generator"] = torch.Generator().manual_seed(kwargs.pop("generator_seed"))
            results.append(fn(*per_rank_args[rank], **kwargs, process_group=dist.group.WORLD))
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(world_size: int, jobs) -> list[list[torch.Tensor]]:
    """results[j][r]: job j's output on rank r."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(world_size, _free_port(), jobs, out_dir), nprocs=world_size, join=True)
        per_rank = [torch.load(os.path.join(out_dir, f"{r}.pt")) for r in range(world_size)]
    return [[per_rank[r][j] for r in range(world_size)] for j in range(len(jobs))]
