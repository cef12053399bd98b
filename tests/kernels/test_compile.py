"""Every Triton kernel compiles for sm_80 and sm_90 at its production configurations, without spills,
within the architecture's shared memory, and on tensor cores where it multiplies matrices.

A kernel joins this check by adding its module to MODULES; the module lists its configurations in
`COMPILE_SPECS` (see fusedrl.kernels._compile_check). Runs on CPU: triton.compile needs no GPU.
"""

import pytest

from fusedrl.kernels._compile_check import check_module_in_subprocess, problems

MODULES = [
    "fusedrl.kernels.logprobs_entropy",
    "fusedrl.kernels.linear_logprobs_entropy",
]


@pytest.mark.parametrize("module", MODULES)
def test_kernels_compile_without_spills(module):
    report = check_module_in_subprocess(module)
    assert report, f"{module} lists no COMPILE_SPECS"
    for row in report:
        print(row)
    found = [f"{r['name']} sm_{r['arch']}: {p}" for r in report for p in problems(r)]
    assert not found, "\n".join(found)


def test_the_linear_kernels_are_held_to_tensor_cores():
    """The check is not vacuous: every 16-bit and TF32 spec of the fused-linear op must show tensor-core
    instructions, and only exact fp32 is exempt."""
    from fusedrl.kernels.linear_logprobs_entropy import COMPILE_SPECS

    exempt = sorted(s.name for s in COMPILE_SPECS if not s.tensor_cores)
    assert exempt == ["dlogits_fp32", "dlogits_kept_fp32", "forward_fp32", "forward_kept_fp32", "logits_fp32",
                      "matmul_acc_fp32", "matmul_acc_fp32_at"]


def _row(**changes):
    row = {"name": "k", "arch": 90, "reg": 128, "stack": 0, "shared": 0, "local": 0, "dynamic_shared": 98304,
           "tensor_core_ops": 4, "needs_tensor_cores": True}
    return {**row, **changes}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({}, None),
        ({"stack": 8}, "spills"),
        ({"local": 16}, "spills"),
        ({"dynamic_shared": 227 * 1024 + 1}, "shared memory"),
        ({"arch": 80, "dynamic_shared": 163 * 1024 + 1}, "shared memory"),
        ({"arch": 80, "dynamic_shared": 200 * 1024}, "shared memory"),
        ({"tensor_core_ops": 0}, "fell back to FMA"),
        ({"tensor_core_ops": 0, "needs_tensor_cores": False}, None),
        ({"error": "CompilationError: boom"}, "does not compile"),
    ],
)
def test_problems_names_each_defect(changes, expected):
    found = problems(_row(**changes))
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0], found
