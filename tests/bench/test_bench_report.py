"""bench/report.py: the markdown table from a small pytest-benchmark JSON whose numbers were worked by
hand (2e9 bytes in 10 ms is 200 GB/s, half of a 400 GB/s copy ceiling; 1e12 FLOPs in 2.5 ms is
400 TFLOP/s, half of an 800 TFLOP/s matmul ceiling)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = Path(__file__).parent / "data" / "benchmark-sample.json"


@pytest.fixture(scope="module")
def report():
    # bench/ is a directory of scripts and benchmark modules, not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("fusedrl_bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sample():
    return json.loads(SAMPLE.read_text())


def _rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_rows_hand_worked(report, sample):
    rows = _rows(report.table(sample))
    assert rows[0] == list(report.COLUMNS)
    assert rows[1] == ["---"] * len(report.COLUMNS)
    body = rows[2:]
    assert body == [
        # sorted by op, shape, mode, then fastest first
        ["linear_logprobs_and_entropy", "triton", "N=8192 H=4096 V=131072 bf16", "fwd", "2.50 ms",
         "400.0 TFLOP/s", "50%", "-"],
        # named otherwise: op from the test name, impl from `path`, mode from `backward`, the shape from
        # N, H, V, dtype; 300 TFLOP/s at the 5 ms mean is 1.5e12 FLOPs, 375 TFLOP/s at the 4 ms median
        ["linear_logprobs_entropy", "fused", "N=8192 H=4096 V=131072 bfloat16", "fwd+bwd", "4.00 ms",
         "375.0 TFLOP/s", "47%", "512.00 MiB"],
        ["logprobs_and_entropy", "triton", "N=8192 V=151936 bf16", "fwd", "5.00 ms", "400.0 GB/s", "100%",
         "1.00 MiB"],
        ["logprobs_and_entropy", "torch", "N=8192 V=151936 bf16", "fwd", "10.00 ms", "200.0 GB/s", "50%",
         "3.00 GiB"],
        # no extra_info: op, impl and shape come from the test's parameters; no rate without bytes
        ["top_entropy_mask", "torch.quantile", "N=1048576", "-", "12.5 us", "-", "-", "-"],
        # sizes in numeric order, not string order
        ["top_entropy_mask", "torch.quantile", "N=16777216", "-", "500.00 ms", "-", "-", "-"],
    ]


def test_fraction_needs_a_ceiling(report, sample):
    del sample["machine_info"]["fusedrl"]["copy_gbps"]
    cells = report.row(sample["benchmarks"][0], sample["machine_info"]["fusedrl"])
    assert cells["GB/s or TFLOP/s"] == "200.0 GB/s"
    assert cells["fraction of ceiling"] == "-"


@pytest.mark.parametrize(
    ("seconds", "text"), [(2.5, "2.50 s"), (0.0421, "42.10 ms"), (0.000333, "333.0 us")]
)
def test_format_time(report, seconds, text):
    assert report.format_time(seconds) == text


@pytest.mark.parametrize(
    ("n", "text"), [(None, "-"), (512, "512 B"), (1536, "1.50 KiB"), (5 * 2**20, "5.00 MiB"), (2**31, "2.00 GiB")]
)
def test_format_bytes(report, n, text):
    assert report.format_bytes(n) == text


def test_main_writes_header_and_table(report, tmp_path):
    out = tmp_path / "result.md"
    assert report.main([str(SAMPLE), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# fusedrl benchmarks: Test GPU 80GB\n")
    for fact in ("- driver: 555.42", "- torch: 2.13.0", "- triton: 3.9.0", "- commit: abc123",
                 "- copy ceiling: 400.0 GB/s", "- matmul ceiling: 800.0 TFLOP/s"):
        assert fact in text
    assert text.endswith(report.table(json.loads(SAMPLE.read_text())))


def test_device_info_and_notes_merged(report, tmp_path):
    data = json.loads(SAMPLE.read_text())
    del data["machine_info"]["fusedrl"]
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(data))
    device = tmp_path / "device.json"
    device.write_text(json.dumps({"device": "Other GPU", "driver": "560.1", "copy_gbps": 800.0}))
    out, merged = tmp_path / "out.md", tmp_path / "merged.json"
    report.main([str(bare), "-o", str(out), "--device-info", str(device), "--json-output", str(merged),
                 "--note", "tests: 12 passed"])
    text = out.read_text()
    assert text.startswith("# fusedrl benchmarks: Other GPU\n")
    assert "- driver: 560.1\n" in text and "- tests: 12 passed\n" in text
    # the 200 GB/s row is now a quarter of the 800 GB/s ceiling; no matmul ceiling, no TFLOP/s fraction
    assert "| 10.00 ms | 200.0 GB/s | 25% |" in text
    assert "| 2.50 ms | 400.0 TFLOP/s | - |" in text
    assert json.loads(merged.read_text())["machine_info"]["fusedrl"]["device"] == "Other GPU"


def test_several_runs_make_one_table(report, tmp_path):
    data = json.loads(SAMPLE.read_text())
    first, second = dict(data), dict(data)
    first["benchmarks"], second["benchmarks"] = data["benchmarks"][:3], data["benchmarks"][3:]
    paths = []
    for i, run in enumerate((first, second)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "out.md"
    report.main([str(p) for p in paths] + ["-o", str(out)])
    assert out.read_text() == report.header(data) + report.table(data)


def test_small_rates_keep_three_digits(report, sample):
    bench = dict(sample["benchmarks"][0], stats={"median": 100.0})  # 2e9 bytes in 100 s: 0.02 GB/s
    assert report.row(bench, {})["GB/s or TFLOP/s"] == "0.02 GB/s"


def test_run_case_rows_carry_their_own_ceilings(report):
    """Rows from bench/_runner.py's run_case: bytes_moved, "fwd_bwd", and the session's ceilings in
    the fractions it recorded (20 GB/s at 25% is an 80 GB/s copy ceiling; 2 TFLOP/s at 50%, 4)."""
    data = {"benchmarks": [
        {"name": "test_logprobs_entropy[eager-fwd_bwd-N256-V32000]", "params": {"impl": "eager", "mode": "fwd_bwd"},
         "extra_info": {"op": "logprobs_and_entropy", "impl": "eager", "mode": "fwd_bwd",
                        "shape": "N=256 V=32000 bfloat16", "device": "cpu (2 threads)", "bytes_moved": 200_000_000,
                        "time_ms": 10.0, "achieved_gbps": 20.0, "fraction_of_copy_bandwidth": 0.25,
                        "peak_memory_bytes": 2048},
         "stats": {"median": 0.01, "mean": 0.012}},
        {"name": "test_linear[x]", "params": {},
         "extra_info": {"op": "linear", "impl": "x", "mode": "fwd", "shape": "N=1", "device": "cpu (2 threads)",
                        "bytes_moved": 1000, "time_ms": 4.0, "tflops": 2.0, "fraction_of_matmul": 0.5},
         "stats": {"median": 0.004, "mean": 0.005}},
    ]}
    assert report.ceilings(data) == {"copy_gbps": 80.0, "matmul_tflops": 4.0}
    assert _rows(report.table(data))[2:] == [
        ["linear", "x", "N=1", "fwd", "4.00 ms", "2.0 TFLOP/s", "50%", "-"],
        ["logprobs_and_entropy", "eager", "N=256 V=32000 bfloat16", "fwd+bwd", "10.00 ms", "20.0 GB/s", "25%",
         "2.00 KiB"],
    ]
    text = report.header(data)
    assert text.startswith("# fusedrl benchmarks: cpu (2 threads)\n")
    assert "- copy ceiling: 80.0 GB/s\n" in text and "- matmul ceiling: 4.0 TFLOP/s\n" in text
