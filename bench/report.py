"""Turn pytest-benchmark's JSON (`--benchmark-json`) into the markdown table of bench/results/.

Each benchmark row is described by its `extra_info`, which the bench modules fill:

- `op`, `impl`, `shape`, `mode`: what ran (`mode` is "fwd" or "fwd+bwd");
- `bytes`: the bytes the op must move at the least (inputs read once, outputs written once);
  `flops`: the floating-point operations it must do. Either may be absent;
- `peak_memory_bytes`: the peak memory of one call, beyond its inputs.

Where a row names these otherwise, they are read from what it has: `bytes_moved` (bench/_runner.py's
run_case), the op from the test's name, `impl` from the `impl` or `path` parameter, `mode` from a
boolean `backward` parameter ("fwd_bwd" reads as "fwd+bwd"), the shape from `N`, `H`, `V` and `dtype`,
the FLOPs or bytes back from a recorded `tflops` or `gbps` rate (at the row's `time_ms`, else its mean
time), the peak from `peak_extra_mib`.

The device's ceilings (`copy_gbps`, a measured copy bandwidth; `matmul_tflops`, a measured large
matmul) come from `machine_info["fusedrl"]` if given, else from the rows that run_case rated against
the session's measurement. A row with FLOPs is rated against the matmul ceiling, one with only bytes
against the copy ceiling, so "fraction" says how close each op gets to what this device can do.
`machine_info["fusedrl"]` (bench/device_info.py) also names the device, driver, torch and triton.

Usage: python bench/report.py results.json [more.json ...] [-o results.md] [--device-info device.json]
       [--json-output merged.json] [--note TEXT]
Several JSON files (one per bench module) make one table. --device-info: what bench/device_info.py
wrote, placed under machine_info["fusedrl"]; --json-output: all of it in one pytest-benchmark JSON.
"""

from __future__ import annotations

import argparse
import json
import re
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


def normalise(bench: dict) -> dict:
    """The entry's extra_info in this module's terms (op, impl, shape, mode, bytes, flops, peak)."""
    info = dict(bench.get("extra_info") or {})
    params = bench.get("params") or {}
    for key in ("op", "impl", "shape", "mode"):
        if info.get(key) is None and params.get(key) is not None:
            info[key] = params[key]
    if info.get("op") is None:
        info["op"] = bench["name"].split("[")[0].removeprefix("test_")
    if info.get("impl") is None and params.get("path") is not None:
        info["impl"] = params["path"]
    if info.get("mode") is None and isinstance(params.get("backward"), bool):
        info["mode"] = "fwd+bwd" if params["backward"] else "fwd"
    if info.get("shape") is None and info.get("N") is not None:
        dims = " ".join(f"{k}={info[k]}" for k in ("N", "H", "V") if info.get(k) is not None)
        info["shape"] = f"{dims} {info['dtype']}" if info.get("dtype") else dims
    if info.get("mode") == "fwd_bwd":
        info["mode"] = "fwd+bwd"
    if info.get("bytes") is None and info.get("bytes_moved") is not None:
        info["bytes"] = info["bytes_moved"]
    seconds = info["time_ms"] / 1e3 if info.get("time_ms") else bench["stats"].get("mean")
    if info.get("flops") is None and info.get("tflops") and seconds:
        info["flops"] = info["tflops"] * 1e12 * seconds
    if info.get("bytes") is None and info.get("gbps") and seconds:
        info["bytes"] = info["gbps"] * 1e9 * seconds
    if info.get("peak_memory_bytes") is None and info.get("peak_extra_mib") is not None:
        info["peak_memory_bytes"] = info["peak_extra_mib"] * 2**20
    return info


def _number(x: float) -> str:
    """One decimal, or three significant digits below 1 (CPU runs of GPU-sized ideas are slow)."""
    return f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def _natural(text: str) -> list:
    """Sort key that orders N=65536 before N=16777217."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def _text(value) -> str:
    return "-" if value is None else str(value)


def row(bench: dict, limits: dict) -> dict:
    """One table row from one pytest-benchmark entry; times are medians (robust to a slow first call)."""
    info = normalise(bench)
    seconds = bench["stats"]["median"]
    rate, fraction = "-", "-"
    if info.get("flops"):
        tflops = info["flops"] / seconds / 1e12
        rate = f"{_number(tflops)} TFLOP/s"
        if limits.get("matmul_tflops"):
            fraction = f"{tflops / limits['matmul_tflops']:.0%}"
    elif info.get("bytes"):
        gbps = info["bytes"] / seconds / 1e9
        rate = f"{_number(gbps)} GB/s"
        if limits.get("copy_gbps"):
            fraction = f"{gbps / limits['copy_gbps']:.0%}"
    return {
        "op": _text(info.get("op")),
        "impl": _text(info.get("impl")),
        "shape": _text(info.get("shape")),
        "mode": _text(info.get("mode")),
        "time": format_time(seconds),
        "GB/s or TFLOP/s": rate,
        "fraction of ceiling": fraction,
        "peak memory": format_bytes(info.get("peak_memory_bytes")),
    }


def ceilings(data: dict) -> dict:
    """copy_gbps and matmul_tflops: as given in machine_info["fusedrl"], else as the rows were rated."""
    given = data.get("machine_info", {}).get("fusedrl", {})
    found = {key: given[key] for key in ("copy_gbps", "matmul_tflops") if given.get(key)}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info") or {}
        if "copy_gbps" not in found and info.get("achieved_gbps") and info.get("fraction_of_copy_bandwidth"):
            found["copy_gbps"] = info["achieved_gbps"] / info["fraction_of_copy_bandwidth"]
        if "matmul_tflops" not in found and info.get("tflops") and info.get("fraction_of_matmul"):
            found["matmul_tflops"] = info["tflops"] / info["fraction_of_matmul"]
    return found


def table(data: dict) -> str:
    """The markdown table, rows sorted by op, shape, mode, then time (fastest first)."""
    limits = ceilings(data)
    benches = sorted(
        data.get("benchmarks", []),
        key=lambda b: (*(_natural(_text(normalise(b).get(k))) for k in ("op", "shape", "mode")), b["stats"]["median"]),
    )
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for bench in benches:
        cells = row(bench, limits)
        lines.append("| " + " | ".join(cells[c] for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def merge(runs: list[dict]) -> dict:
    """One run from several: the first one's machine and commit, every run's benchmarks."""
    data = dict(runs[0])
    data["benchmarks"] = [bench for run in runs for bench in run.get("benchmarks", [])]
    return data


def header(data: dict, notes: list[str] = ()) -> str:
    info = data.get("machine_info", {})
    ours = info.get("fusedrl", {})
    devices = [b["extra_info"]["device"] for b in data.get("benchmarks", []) if (b.get("extra_info") or {}).get("device")]
    device = ours.get("device") or (devices[0] if devices else None) or info.get("cpu", {}).get("brand_raw")
    limits = ceilings(data)
    lines = [f"# fusedrl benchmarks: {device or 'unknown device'}", ""]
    facts = [
        ("date", data.get("datetime")),
        ("driver", ours.get("driver")),
        ("torch", ours.get("torch")),
        ("triton", ours.get("triton")),
        ("python", info.get("python_version")),
        ("commit", (data.get("commit_info") or {}).get("id")),
        ("copy ceiling", f"{_number(limits['copy_gbps'])} GB/s" if limits.get("copy_gbps") else None),
        ("matmul ceiling", f"{_number(limits['matmul_tflops'])} TFLOP/s" if limits.get("matmul_tflops") else None),
    ]
    lines += [f"- {name}: {value}" for name, value in facts if value]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Times are medians; rates use the bytes and FLOPs the op must move and do.", "", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_paths", type=Path, nargs="+", help="pytest-benchmark --benchmark-json outputs")
    parser.add_argument("-o", "--output", type=Path, help="markdown file to write (default: stdout)")
    parser.add_argument("--device-info", type=Path, help="bench/device_info.py's JSON: device and ceilings")
    parser.add_argument("--json-output", type=Path, help="write the input JSON with the device info merged in")
    parser.add_argument("--note", action="append", default=[], help="a line for the header (repeatable)")
    args = parser.parse_args(argv)
    data = merge([json.loads(path.read_text()) for path in args.json_paths])
    if args.device_info:
        data.setdefault("machine_info", {})["fusedrl"] = json.loads(args.device_info.read_text())
    if args.json_output:
        args.json_output.write_text(json.dumps(data, indent=1) + "\n")
    text = header(data, args.note) + table(data)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
