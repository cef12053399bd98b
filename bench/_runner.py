"""The shared benchmark runner: device ceilings, timing, bytes moved, peak memory.

Every benchmark module times a callable through `run_case`, which records per row (pytest-benchmark
extra_info, also collected in RESULTS for the terminal summary and --bench-results):

- time_ms: median wall time of one call (CUDA-synchronised on a GPU);
- bytes_moved: the bytes the op must move at minimum (the caller states them), and achieved_gbps =
  bytes_moved / time, with its fraction of the device's measured copy bandwidth;
- flops (optional) and its fraction of the measured matmul rate;
- peak_memory_bytes: on CUDA the allocator's peak above what was allocated before the call; on CPU
  the peak of bytes held by tensors the call allocated, tracked live at the dispatcher (RSS is
  useless there: glibc keeps freed blocks).

Ceilings are measured once per session (bench/conftest.py): copy bandwidth as 2 x bytes of a large
tensor copy per second (read + write), and a square matmul's FLOP/s (bf16 on CUDA, fp32 on CPU).

Before a row is timed, its module checks the answer with `check_against_float64` on some of its rows:
a fast wrong answer is not a result.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

RESULTS: list[dict] = []


@dataclasses.dataclass(frozen=True)
class Ceilings:
    device: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu (2 threads)"
    copy_gbps: float
    matmul_tflops: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def measure_ceilings(device: torch.device) -> Ceilings:
    """Copy bandwidth and matmul rate of the device, each the best of a few repeats."""
    on_gpu = device.type == "cuda"
    n_bytes = (2 if on_gpu else 0.125) * 2**30
    src = torch.empty(int(n_bytes) // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = _best_seconds(lambda: dst.copy_(src), device, repeats=10 if on_gpu else 3)
    del src, dst
    size, dtype = (8192, torch.bfloat16) if on_gpu else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    matmul_s = _best_seconds(lambda: a @ b, device, repeats=10 if on_gpu else 3)
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    return Ceilings(name, 2 * n_bytes / copy_s / 1e9, 2 * size**3 / matmul_s / 1e12)


def tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances of an implementation's lp / H against float64 on the same inputs: with
    bf16 inputs a path may round its logits to bf16 (2^-8 relative), else fp32 sums over up to 151936
    terms. Loose enough for any correct implementation, tight enough to catch a wrong sign, a missing
    temperature, a mean where a per-token value was due, or a different entropy."""
    return {"rtol": 8e-3, "atol": 2e-3} if dtype in (torch.bfloat16, torch.float16) else {"rtol": 1e-5, "atol": 1e-4}


def check_against_float64(lp, entropy, logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> None:
    """lp (and entropy, unless None) of `targets` under `logits` (any dtype; taken in float64)."""
    logp = logits.detach().double().log_softmax(-1)
    torch.testing.assert_close(lp.detach().double(), logp.gather(-1, targets[:, None]).squeeze(1), **tolerance(dtype))
    if entropy is not None:
        torch.testing.assert_close(entropy.detach().double(), -(logp.exp() * logp).sum(-1), **tolerance(dtype))


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of storages allocated inside the mode and still referenced by a live tensor."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [nbytes, live tensors referring to it]

    def _track(self, tensor: torch.Tensor, fresh: bool) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if fresh and key not in self._refs and storage.nbytes():
            self._refs[key] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        if key in self._refs:
            self._refs[key][1] += 1
            weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(func._schema.returns, outputs):
            if isinstance(value, torch.Tensor):
                self._track(value, fresh=ret.alias_info is None)
        return out


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak extra memory of one call of fn (its results are dropped afterwards)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    mode = _LiveTensorBytes()
    with mode:
        result = fn()
    del result
    return mode.peak


def run_case(
    benchmark,
    ceilings: Ceilings,
    fn: Callable[[], object],
    *,
    device: torch.device,
    bytes_moved: int,
    flops: int | None = None,
    rounds: int = 5,
    warmup_rounds: int = 1,
    **labels,
) -> None:
    """Time fn with pytest-benchmark and record the derived figures (see the module docstring).
    labels (op, impl, mode, shape, ...) go into extra_info and the summary table as given."""
    peak = peak_memory_bytes(fn, device)

    def call():
        fn()
        synchronize(device)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    info = {**labels, "device": ceilings.device, "bytes_moved": bytes_moved, "peak_memory_bytes": peak}
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable: the call ran once, untimed
        seconds = statistics.median(stats.stats.data)
        info["time_ms"] = seconds * 1e3
        info["achieved_gbps"] = bytes_moved / seconds / 1e9
        info["fraction_of_copy_bandwidth"] = info["achieved_gbps"] / ceilings.copy_gbps
        if flops is not None:
            info["tflops"] = flops / seconds / 1e12
            info["fraction_of_matmul"] = info["tflops"] / ceilings.matmul_tflops
    benchmark.extra_info.update(info)
    RESULTS.append(info)
