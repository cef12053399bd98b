"""Shared benchmark setup: the device, its ceilings (measured once per session), a summary table.

    pytest bench/ --benchmark-only                      # CPU: reduced shapes, about a minute
    pytest bench/ --benchmark-only --bench-results=bench/results/h100.md   # also write the table

bench/ is outside the test suite's testpaths, so a plain `pytest` never collects it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench._runner import RESULTS, measure_ceilings

COLUMNS = [
    ("op", "{}"),
    ("impl", "{}"),
    ("mode", "{}"),
    ("shape", "{}"),
    ("time_ms", "{:.3f}"),
    ("achieved_gbps", "{:.1f}"),
    ("fraction_of_copy_bandwidth", "{:.0%}"),
    ("peak_memory_bytes", "{}"),
]


def pytest_addoption(parser):
    parser.addoption("--bench-results", default=None, help="write the summary table (markdown) to this path")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


@pytest.fixture(scope="session")
def ceilings(device):
    return measure_ceilings(device)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _table() -> list[str]:
    header = "| " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    for row in RESULTS:
        cells = []
        for name, fmt in COLUMNS:
            value = row.get(name)
            if value is None:
                cells.append("")
            elif name == "peak_memory_bytes":
                cells.append(_format_bytes(value))
            else:
                cells.append(fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def pytest_terminal_summary(terminalreporter, config):
    if not RESULTS:
        return
    device = RESULTS[0]["device"]
    terminalreporter.section(f"fusedrl benchmarks on {device}")
    for line in _table():
        terminalreporter.write_line(line)
    path = config.getoption("--bench-results")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"# Benchmarks on {device}\n\n" + "\n".join(_table()) + "\n")
