"""The machine a benchmark run is on, as JSON for bench/report.py: device name, driver, and the torch,
triton and CUDA versions. (The ceilings, copy bandwidth and matmul rate, are measured by the benchmark
session itself: bench/conftest.py.)

Usage: python bench/device_info.py OUTPUT.json
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import torch


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
    return {**info, "device": torch.cuda.get_device_name(), "driver": _driver()}


if __name__ == "__main__":
    with open(sys.argv[1], "w") as f:
        json.dump(device_info(), f, indent=1)
