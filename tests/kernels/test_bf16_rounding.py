"""fp32 -> bf16 in a Triton kernel rounds to nearest even, as CUDA does, also under the interpreter
(whose own conversion truncates; tests/conftest.py patches it for every test). The kernels' bf16
gradients are held to this rule, so it is checked here on its own, bit for bit."""

import torch
import triton
import triton.language as tl


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n)
    tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=offs < n)


def test_fp32_to_bf16_rounds_to_nearest_even(device):
    one_ulp = 2.0**-7  # of bf16 in [1, 2)
    x = torch.tensor(
        [
            1 + 0.75 * one_ulp,  # truncation gives 1, rounding 1 + ulp
            -(1 + 0.75 * one_ulp),
            1 + 0.25 * one_ulp,  # both give 1
            1 + 0.5 * one_ulp,  # a tie: to even, 1
            1 + 1.5 * one_ulp,  # a tie: to even, 1 + 2 ulp
            2 - 0.25 * one_ulp,  # rounds up into the next binade: 2 (a carry into the exponent)
            3.0e38,  # large but finite in bf16 too
            1e-40,  # fp32 subnormal
            0.0,
            float("inf"),
        ],
        dtype=torch.float32,
        device=device,
    )
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _to_bf16_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    assert expected[0].item() == 1 + one_ulp  # the case truncation gets wrong
    assert torch.equal(y.view(torch.int16), expected.view(torch.int16)), (y, expected)
