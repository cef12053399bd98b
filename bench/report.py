"""Turn pytest-benchmark's JSON (`--benchmark-json`) into the markdown table of bench/results/.

Each benchmark row is described by its `extra_info`, which the bench modules fill:

- `op`, `impl`, `shape`, `mode`: what ran (`mode` is "fwd" or "fwd+bwd"); where one is missing the
  test's parameters (`params`) are read instead.
- `bytes`: the bytes the op must move at the least (inputs read once, outputs written once);
  `flops`: the floating-point operations it must do. Either may be absent.
- `peak_memory_bytes`: the peak memory of one call, beyond its inputs.

The device's ceilings come from `machine_info["fusedrl"]` (`copy_gbps`: a measured device-to-device
copy bandwidth; `matmul_tflops`: a measured large matmul), with `device`, `driver`, `torch` and
`triton` for the header. A row with FLOPs is rated against the matmul ceiling, one with only bytes
against the copy ceiling, so "fraction" says how close each op gets to what this device can do.

Usage: python bench/report.py results.json [-o results.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("op", "impl", "shape", "mode", "time", "GB/s or TFLOP/s", "fraction of ceiling", "peak memory")


def format_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _field(bench: dict, key: str) -> str:
    value = bench.get("extra_info", {}).get(key)
    if value is None:
        value = (bench.get("params") or {}).get(key)
    return "-" if value is None else str(value)


def row(bench: dict, ceilings: dict) -> dict:
    """One table row from one pytest-benchmark entry; times are medians (robust to a slow first call)."""
    info = bench.get("extra_info", {})
    seconds = bench["stats"]["median"]
    rate, fraction = "-", "-"
    if info.get("flops"):
        tflops = info["flops"] / seconds / 1e12
        rate = f"{tflops:.1f} TFLOP/s"
        if ceilings.get("matmul_tflops"):
            fraction = f"{tflops / ceilings['matmul_tflops']:.0%}"
    elif info.get("bytes"):
        gbps = info["bytes"] / seconds / 1e9
        rate = f"{gbps:.1f} GB/s"
        if ceilings.get("copy_gbps"):
            fraction = f"{gbps / ceilings['copy_gbps']:.0%}"
    return {
        "op": _field(bench, "op"),
        "impl": _field(bench, "impl"),
        "shape": _field(bench, "shape"),
        "mode": _field(bench, "mode"),
        "time": format_time(seconds),
        "GB/s or TFLOP/s": rate,
        "fraction of ceiling": fraction,
        "peak memory": format_bytes(info.get("peak_memory_bytes")),
    }


def table(data: dict) -> str:
    """The markdown table, rows sorted by op, shape, mode, then time (fastest first)."""
    ceilings = data.get("machine_info", {}).get("fusedrl", {})
    benches = sorted(
        data.get("benchmarks", []),
        key=lambda b: (_field(b, "op"), _field(b, "shape"), _field(b, "mode"), b["stats"]["median"]),
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for bench in benches:
        cells = row(bench, ceilings)
        lines.append("| " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def header(data: dict) -> str:
    info = data.get("machine_info", {})
    ours = info.get("fusedrl", {})
    device = ours.get("device") or info.get("cpu", {}).get("brand_raw") or "unknown device"
    lines = [f"# fusedrl benchmarks: {device}", ""]
    facts = [
        ("date", data.get("datetime")),
        ("driver", ours.get("driver")),
        ("torch", ours.get("torch")),
        ("triton", ours.get("triton")),
        ("python", info.get("python_version")),
        ("commit", (data.get("commit_info") or {}).get("id")),
        ("copy ceiling", f"{ours['copy_gbps']:.1f} GB/s" if ours.get("copy_gbps") else None),
        ("matmul ceiling", f"{ours['matmul_tflops']:.1f} TFLOP/s" if ours.get("matmul_tflops") else None),
    ]
    lines += [f"- {name}: {value}" for name, value in facts if value]
    lines += ["", "Times are medians; rates use the bytes and FLOPs the op must move and do.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("-o", "--output", type=Path, help="markdown file to write (default: stdout)")
    args = parser.parse_args(argv)
    data = json.loads(args.json_path.read_text())
    text = header(data) + table(data)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
