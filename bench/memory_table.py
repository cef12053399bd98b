"""Peak memory of log-prob + entropy + gradients, per implementation, measured on a CPU.

Each implementation computes lp and H for N tokens over a vocabulary of V (fp32) and back-propagates
random upstream gradients through both, in a fresh subprocess, so that no allocation of one can hide
in the peak of another. Two measurements, each reported beyond the inputs' own bytes (the gradient of
the logits, or of the hidden states and weight, is part of what is reported: it is memory the step
needs):

- counted: the peak of live tensor bytes, from PyTorch's MemTracker (a TorchDispatchMode that follows
  every storage). Implementations made only of PyTorch ops are counted under FakeTensorMode, which
  runs their shapes without allocating, so a 28 GiB path can be counted on a 24 GiB machine; the others
  (fusedrl's ops validate target ids, which needs real data) are counted on a real run.
- peak RSS: the process's resident-set peak (getrusage ru_maxrss) minus its resident size just before
  the call, on a real run: what the operating system actually had to provide, allocator slack
  included. Only run where the counted peak (or, without one, runs at N / 8 and N / 4 extrapolated)
  says the process fits in --budget-gib; the table says so where it did not.

From hidden states the real runs use --linear-n tokens (256): a CPU needs about half an hour for one
forward + backward of the fused-linear op at N = 8192, H = 4096, V = 151936 (31 TFLOP before recompute).

Usage: python bench/memory_table.py [--n 8192] [--linear-n 256] [--vocab 151936] [--hidden 4096]
       [--only NAME-PART ...] [--output bench/results/memory-cpu.md]
Run the full sizes alone on the machine (up to --budget-gib, 16 GiB, per process).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

SMALL = 4  # the trial runs of an implementation that cannot be counted use N / SMALL and N / (2 SMALL) tokens


def _naive(logits, targets):
    """log_softmax, gather, entropy: what most RL code writes."""
    logp = logits.log_softmax(-1)
    return logp.gather(-1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


def _trl(logits, targets):
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    return selective_log_softmax(logits, targets), entropy_from_logits(logits)


def _fusedrl(logits, targets):
    from fusedrl.kernels import logprobs_and_entropy

    return logprobs_and_entropy(logits, targets, backend="torch")


def _naive_linear(hidden, weight, targets):
    return _naive(hidden @ weight.T, targets)


def _trl_linear(hidden, weight, targets):
    from trl.kernels import ChunkedLogProbFunction

    lp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0,
                                                   ("entropy",))
    return lp, entropy


def _fusedrl_linear(hidden, weight, targets):
    from fusedrl.kernels import linear_logprobs_and_entropy

    return linear_logprobs_and_entropy(hidden, weight, targets, backend="torch")


# name: (input kind, function, how its tensors are counted: under FakeTensorMode, on the real run, or not
# at all: compiled code allocates its buffers below the dispatcher, where MemTracker cannot see them)
IMPLS = {
    "PyTorch (log_softmax + gather + entropy)": ("logits", _naive, "fake"),
    "torch.compile of the same": ("logits", None, None),
    "TRL selective_log_softmax + entropy_from_logits": ("logits", _trl, "fake"),
    "fusedrl logprobs_and_entropy (torch backend)": ("logits", _fusedrl, "real"),
    "PyTorch from hidden states (matmul, then as above)": ("linear", _naive_linear, "fake"),
    "TRL ChunkedLogProbFunction (from hidden states)": ("linear", _trl_linear, "fake"),
    "fusedrl linear_logprobs_and_entropy (torch backend)": ("linear", _fusedrl_linear, "real"),
}


def _function(name: str):
    kind, fn, _ = IMPLS[name]
    if fn is None:  # compiled once per process, with N dynamic so the warm-up shape is reused
        fn = torch.compile(_naive, dynamic=True)
    return kind, fn


def _inputs(kind: str, n: int, vocab: int, hidden_size: int):
    targets = torch.randint(0, vocab, (n,))
    grads = (torch.randn(n), torch.randn(n))
    if kind == "logits":
        leaves = (torch.randn(n, vocab, requires_grad=True),)
    else:
        leaves = (torch.randn(n, hidden_size, requires_grad=True),
                  torch.randn(vocab, hidden_size).div_(hidden_size**0.5).requires_grad_())
    return leaves, targets, grads


def _step(fn, leaves, targets, grads) -> None:
    lp, entropy = fn(*leaves, targets)
    torch.autograd.backward([lp, entropy], list(grads))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _peak_total(tracker) -> int:
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(name: str, method: str, n: int, vocab: int, hidden_size: int) -> dict:
    """One measurement in this process; returns bytes beyond the inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    kind, fn = _function(name)
    if method == "fake":
        with FakeTensorMode():
            leaves, targets, grads = _inputs(kind, n, vocab, hidden_size)
            tracker = MemTracker()
            tracker.track_external(*leaves, targets, *grads)
            with tracker:
                _step(fn, leaves, targets, grads)
            return {"counted": _peak_total(tracker) - _nbytes(*leaves, targets, *grads)}
    # Warm up at a few tokens first: one-time costs (library initialisation, compilation) are not the op's.
    _step(fn, *_inputs(kind, 16, vocab, hidden_size))
    leaves, targets, grads = _inputs(kind, n, vocab, hidden_size)
    result = {}
    if method == "real+count":
        tracker = MemTracker()
        tracker.track_external(*leaves, targets, *grads)
        baseline = _resident()
        with tracker:
            _step(fn, leaves, targets, grads)
        result["counted"] = _peak_total(tracker) - _nbytes(*leaves, targets, *grads)
    else:
        baseline = _resident()
        _step(fn, leaves, targets, grads)
    result["rss"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)
    return result


def _run_child(name: str, method: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--method", method, "--n", str(n),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, args) -> dict:
    kind, _, count = IMPLS[name]
    n = args.n if kind == "logits" else args.linear_n
    input_bytes = 4 * n * (args.vocab if kind == "logits" else args.hidden) + 16 * n
    input_bytes += 4 * args.vocab * args.hidden if kind == "linear" else 0
    if count == "fake":
        row = _run_child(name, "fake", n, args)
        expected = row.get("counted")
    else:  # trials at N / 8 and N / 4 tokens, extrapolated linearly, say whether the full run fits
        small, large = (_run_child(name, "real", max(1, n // k), args) for k in (2 * SMALL, SMALL))
        row = {"error": large["error"]} if "error" in large else {}
        expected = None
        if "rss" in small and "rss" in large:  # memory is affine in N: per-token part plus a fixed part
            per_token = max(0, large["rss"] - small["rss"]) / max(1, n // SMALL - n // (2 * SMALL))
            expected = large["rss"] + per_token * (n - n // SMALL)
    row.update(n=n, input_bytes=input_bytes)
    if expected is None:
        return row
    if input_bytes + expected > args.budget_gib * 2**30:
        row["skipped"] = f"not run: needs about {_gib(input_bytes + expected)}, over the {args.budget_gib:g} GiB budget"
        return row
    row.update(_run_child(name, "real+count" if count == "real" else "real", n, args))
    return row


def _gib(n) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(rows: dict, args) -> str:
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "a CPU")
    lines = [
        "# Peak memory of lp + H + gradients on a CPU, fp32",
        "",
        f"Measured by `python bench/memory_table.py` on {cpu} ({time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}), V = {args.vocab}; from hidden states H = {args.hidden}. Bytes beyond the "
        "inputs, gradients included. Counted: the peak of live tensor bytes (MemTracker; under "
        "FakeTensorMode where the implementation is plain PyTorch). Peak RSS: the process's resident "
        "peak minus its size just before the call.",
    ]
    for kind, title in (("logits", "From logits"), ("linear", "From hidden states")):
        names = [name for name in rows if IMPLS[name][0] == kind]
        if not names:
            continue
        tokens = sorted({rows[name]["n"] for name in names})
        lines += ["", f"## {title}, N = {', '.join(map(str, tokens))}", "",
                  "| implementation | inputs | counted peak | peak RSS |", "|---|---|---|---|"]
        for name in names:
            row = rows[name]
            counted = f"failed: {row['error']}" if "error" in row else _gib(row.get("counted"))
            rss = _gib(row["rss"]) if "rss" in row else row.get("skipped", "-")
            lines.append(f"| {name} | {_gib(row['input_bytes'])} | {counted} | {rss} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="tokens, from logits")
    parser.add_argument("--linear-n", type=int, default=256, help="tokens, from hidden states")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden size, from hidden states")
    parser.add_argument("--budget-gib", type=float, default=16.0, help="largest process a real run may need")
    parser.add_argument("--only", action="append", help="measure only implementations whose name has this")
    parser.add_argument("--output", type=Path, help="markdown file; its rows are also kept in a .json beside "
                        "it, so that a run with --only updates those rows and keeps the others")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=["fake", "real", "real+count"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if args.child:
        print(json.dumps(child(args.child, args.method, args.n, args.vocab, args.hidden)))
        return 0
    stored = args.output.with_suffix(".json") if args.output else None
    rows = json.loads(stored.read_text()) if stored and stored.exists() else {}
    for name in IMPLS:
        if not args.only or any(part in name for part in args.only):
            start = time.perf_counter()
            rows[name] = measure(name, args)
            print(f"{name}: {rows[name]} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = {name: rows[name] for name in IMPLS if name in rows}
    text = markdown(rows, args)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        stored.write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
