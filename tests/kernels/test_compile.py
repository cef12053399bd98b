"""Every Triton kernel compiles for sm_80 and sm_90 at its production configurations, without spills.

A kernel joins this check by adding its module to MODULES; the module lists its configurations in
`COMPILE_SPECS` (see fusedrl.kernels._compile_check). Runs on CPU: triton.compile needs no GPU.
"""

import pytest

from fusedrl.kernels._compile_check import check_module_in_subprocess

MODULES = [
    "fusedrl.kernels.logprobs_entropy",
    "fusedrl.kernels.linear_logprobs_entropy",
]


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_without_spills(module):
    report = check_module_in_subprocess(module)
    assert report, f"{module} lists no COMPILE_SPECS"
    errors = [r for r in report if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(f"{r['name']} sm_{r['arch']}: {r['error']}" for r in errors)
    spills = [r for r in report if r["local"] != 0 or r["stack"] != 0]
    assert not spills, "kernels using local memory (spills):\n" + "\n".join(map(str, spills))
    for row in report:
        print(row)
