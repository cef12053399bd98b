"""Ahead-of-time compilation check for every Triton kernel, runnable on a machine without a GPU.

Each kernel module lists its production configurations in a module-level `COMPILE_SPECS`. For each
spec and each target architecture, `triton.compile` builds PTX and a cubin, and the `cuobjdump`
bundled with Triton reports registers, stack and local memory. The check fails a kernel that
- does not compile;
- uses local memory or a stack frame (register spills);
- asks for more shared memory than one block may have on that architecture (the launch would fail
  with "out of resource: shared memory" on the first GPU that runs it);
- is declared a tensor-core kernel (`tensor_cores=True`) but whose PTX holds no tensor-core
  instruction for that architecture (wgmma on sm_90, mma.sync on sm_80): a tile shape or dtype change
  that silently falls back to FMA units costs an order of magnitude in matmul throughput.
CI runs it for sm_80 and sm_90 through tests/kernels/test_compile.py; by hand:

    python -m fusedrl.kernels._compile_check fusedrl.kernels.logprobs_entropy

It must run in a process without TRITON_INTERPRET (the interpreter replaces the compiler).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ARCHS = (80, 90)
# Most dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB,
# H100 / H200 227 KiB (CUDA C programming guide, compute capabilities table).
MAX_SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE_PTX = {80: "mma.sync.aligned", 90: "wgmma.mma_async"}


@dataclasses.dataclass(frozen=True)
class CompileSpec:
    """One kernel at one production configuration."""

    name: str  # shown in test ids, e.g. "fwd_bf16_block4096"
    fn: Any  # the @triton.jit function
    signature: dict[str, str]  # runtime arguments -> Triton type ("*bf16", "i64", "fp32", ...)
    constexprs: dict[str, Any]  # compile-time arguments at their production values
    num_warps: int = 4
    num_stages: int = 3
    # Arguments Triton's JIT would mark divisible by 16 at production shapes (pointers 16-byte aligned,
    # sizes and strides multiples of 16, e.g. H = 4096). The JIT specialises on these by itself at run
    # time; naming them here makes the check build the same vectorised, pipelined code.
    divisible_by_16: tuple[str, ...] = ()
    # The kernel's tl.dot must run on tensor cores (16-bit or TF32 operands); checked in the PTX.
    tensor_cores: bool = False


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else -1
    return usage


def compile_spec(spec: CompileSpec, arch: int) -> dict[str, Any]:
    """Compile one spec for sm_<arch>; returns its resource usage or the compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(spec.signature)
    attrs = {(names.index(arg),): [["tt.divisibility", 16]] for arg in spec.divisible_by_16}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    try:
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as exc:  # the whole point is to report any compile failure
        return {"name": spec.name, "arch": arch, "error": f"{type(exc).__name__}: {exc}"[:4000]}
    ptx = compiled.asm["ptx"]
    return {"name": spec.name, "arch": arch, **_resource_usage(compiled.asm["cubin"]),
            "dynamic_shared": int(compiled.metadata.shared),
            "tensor_core_ops": ptx.count(TENSOR_CORE_PTX[arch]) if arch in TENSOR_CORE_PTX else -1,
            "needs_tensor_cores": spec.tensor_cores}


def problems(row: dict[str, Any]) -> list[str]:
    """What is wrong with one compiled kernel (see the module docstring); empty when nothing is."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["local"] != 0 or row["stack"] != 0:
        found.append(f"spills: {row['local']} bytes of local memory, a {row['stack']}-byte stack")
    limit = MAX_SHARED_BYTES.get(row["arch"])
    if limit is not None and row["dynamic_shared"] > limit:
        found.append(f"needs {row['dynamic_shared']} bytes of shared memory, sm_{row['arch']} allows {limit}")
    if row["needs_tensor_cores"] and row["tensor_core_ops"] == 0:
        found.append(f"no {TENSOR_CORE_PTX[row['arch']]} in its PTX: tl.dot fell back to FMA units")
    return found


def check_module(module_name: str, archs=ARCHS) -> list[dict[str, Any]]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile check needs a process without TRITON_INTERPRET=1")
    module = importlib.import_module(module_name)
    return [compile_spec(spec, arch) for spec in module.COMPILE_SPECS for arch in archs]


def check_module_in_subprocess(module_name: str, archs=ARCHS) -> list[dict[str, Any]]:
    """Run check_module in a fresh interpreter-free process and return its report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fusedrl.kernels._compile_check", "--json", module_name, *map(str, archs)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"compile check of {module_name} crashed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    module_name, archs = args[0], tuple(int(a) for a in args[1:]) or ARCHS
    report = check_module(module_name, archs)
    if as_json:
        print(json.dumps(report))
    else:
        for row in report:
            print(row)
    bad = [r for r in report if problems(r)]
    return 1 if (bad and not as_json) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
