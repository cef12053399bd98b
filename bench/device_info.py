"""The device a benchmark run is on, and its two measured ceilings, as JSON for bench/report.py.

- copy_gbps: device-to-device copy of a 1 GiB tensor (bytes read + bytes written, per second), the
  best of several repetitions: the bandwidth a memory-bound kernel such as lp + H can hope for.
- matmul_tflops: a bf16 8192 x 8192 x 8192 matmul, the best of several: the ceiling for the
  fused-linear op, which is a matmul with a reduction on top.

Both are measured rather than taken from a data sheet, because clocks, memory and power limits differ
between boards of one name. Without CUDA only the versions are written.

Usage: python bench/device_info.py OUTPUT.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import torch


def _best_seconds(fn, repeats: int = 10) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times)


def copy_gbps() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_seconds(lambda: dst.copy_(src)) / 1e9


def matmul_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / _best_seconds(lambda: a @ b) / 1e12


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip().splitlines()[0]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def device_info() -> dict:
    import triton

    info = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return {**info, "device": _cpu_name()}
    return {**info, "device": torch.cuda.get_device_name(), "driver": _driver(),
            "copy_gbps": copy_gbps(), "matmul_tflops": matmul_tflops()}


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(device_info(), f, indent=1)
