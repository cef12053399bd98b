"""Plain-PyTorch versions of every fusedrl op.

These are the "torch" backends (used on CPU and wherever Triton is unavailable) and the baselines the
benchmarks compare against. They stream over row chunks with a bounded chunk budget, so that their
peak extra memory does not grow with the number of rows; none of them allocates an fp32 [N, V]
tensor. The tests' oracle is separate: a naive float64 computation in the tests themselves.
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------
# linear_logprobs_and_entropy: lp and H from hidden states and the output embedding
# ---------------------------------------------------------------------------------------------------

# Chunk budget: a step handles at most LINEAR_CHUNK_COLS vocabulary columns of at most
# LINEAR_CHUNK_ELEMENTS // LINEAR_CHUNK_COLS tokens, so each fp32 temporary of a step holds at most
# LINEAR_CHUNK_ELEMENTS values (16 MiB; a step keeps a handful alive), whatever N is. Vocabulary chunks
# of 8192 keep the token chunk at 512 rows, large enough for efficient matmuls.
LINEAR_CHUNK_ELEMENTS = 1 << 22
LINEAR_CHUNK_COLS = 8192


def _linear_chunks(n_rows: int, vocab_size: int) -> tuple[int, int]:
    cols = max(1, min(vocab_size, LINEAR_CHUNK_COLS))
    return max(1, min(n_rows, LINEAR_CHUNK_ELEMENTS // cols)), cols


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with products of the given (possibly 16-bit) values summed and returned in fp32."""
    if a.is_cuda and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _linear_logit_chunk(hidden, weight, bias, inv_temperature):
    z = _mm_fp32(hidden, weight.t())
    if bias is not None:
        z += bias.float()
    return z.mul_(inv_temperature)


def _linear_forward(hidden, weight, bias, targets, inv_temperature, ignore_index):
    """lp, H and lse, [N] fp32, by an online reduction over vocabulary chunks (see the Triton kernel)."""
    n_rows, vocab_size = hidden.shape[0], weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size)
    lse = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(lse)
    target_logit = torch.zeros_like(lse)
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        y = targets[r0:r1]
        m = torch.full((r1 - r0,), float("-inf"), device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            z = _linear_logit_chunk(hidden[r0:r1], weight[c0:c1], None if bias is None else bias[c0:c1],
                                    inv_temperature)
            m_new = torch.maximum(m, z.amax(1))
            m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)  # rows of -inf so far stay finite
            alpha = torch.exp(m - m_safe)
            shift = torch.where(m == float("-inf"), 0.0, m - m_safe)
            here = ((y >= c0) & (y < c1)).nonzero().squeeze(1)
            target_logit[r0 + here] = z[here, y[here] - c0]
            zc = z.sub_(m_safe[:, None])
            e = torch.exp(zc)
            t = alpha * (t + shift * s) + torch.where(e > 0, e * zc, 0.0).sum(1)  # p = 0 adds 0, not 0 * -inf
            s = alpha * s + e.sum(1)
            m = m_new
        top = torch.where(m == float("-inf"), 0.0, m)
        lse[r0:r1] = top + torch.log(s)
        entropy[r0:r1] = torch.log(s) - t / s
    valid = targets != ignore_index
    return torch.where(valid, target_logit - lse, 0.0), torch.where(valid, entropy, 0.0), lse


def _linear_backward(hidden, weight, bias, targets, lse, entropy, grad_lp, grad_entropy, ctx_options, needs):
    """Recomputes each logit chunk and accumulates all three gradients in fp32."""
    inv_temperature, ignore_index = ctx_options
    n_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    rows, cols = _linear_chunks(n_rows, vocab_size)
    valid = targets != ignore_index
    grad_lp = torch.where(valid, grad_lp.float(), 0.0)  # ignored rows contribute nothing
    grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
    need_h, need_w, need_b = needs
    grad_hidden = torch.empty_like(hidden) if need_h else None
    dw = torch.zeros(vocab_size, hidden_size, dtype=torch.float32, device=hidden.device) if need_w else None
    db = torch.zeros(vocab_size, dtype=torch.float32, device=hidden.device) if need_b else None
    for r0 in range(0, n_rows, rows):
        r1 = min(n_rows, r0 + rows)
        h, y = hidden[r0:r1], targets[r0:r1]
        g_lp, g_ent = grad_lp[r0:r1, None], grad_entropy[r0:r1, None]
        lse_c, ent_c = lse[r0:r1, None], entropy[r0:r1, None]
        dh = torch.zeros(r1 - r0, hidden_size, dtype=torch.float32, device=hidden.device) if need_h else None
        for c0 in range(0, vocab_size, cols):
            c1 = min(vocab_size, c0 + cols)
            w = weight[c0:c1]
            z = _linear_logit_chunk(h, w, None if bias is None else bias[c0:c1], inv_temperature)
            p = torch.exp(z - lse_c)
            ent_term = torch.where(p > 0, p * (z - lse_c + ent_c), 0.0)
            dz = -(g_lp * p + g_ent * ent_term)
            here = ((y >= c0) & (y < c1)).nonzero().squeeze(1)
            dz[here, y[here] - c0] += g_lp[here, 0]
            dz.mul_(inv_temperature)
            if need_b:
                db[c0:c1] += dz.sum(0)
            dz_low = dz.to(hidden.dtype)  # the gradient matmuls run in the input dtype, summed in fp32
            if need_h:
                dh += _mm_fp32(dz_low, w)
            if need_w:
                dw[c0:c1] += _mm_fp32(dz_low.t(), h)
        if need_h:
            grad_hidden[r0:r1] = dh
    return (
        grad_hidden,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


class _LinearLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ignore_index):
        logprobs, entropy, lse = _linear_forward(hidden, weight, bias, targets, inv_temperature, ignore_index)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.chunk_options = (inv_temperature, ignore_index)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        grads = _linear_backward(hidden, weight, bias, targets, lse, entropy, grad_lp, grad_entropy,
                                 ctx.chunk_options, needs)
        return (*grads, None, None, None)


def linear_logprobs_and_entropy(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100):
    """The "torch" backend of fusedrl.kernels.linear_logprobs_and_entropy (which validates the inputs).

    Chunks over tokens and vocabulary (LINEAR_CHUNK_ELEMENTS / LINEAR_CHUNK_COLS) with an online
    log-sum-exp, and a custom backward that recomputes each logit chunk: the largest temporary does not
    depend on N and no tensor of N * V elements is ever allocated (beyond the budget itself). Gradient
    matmuls run in the input dtype with fp32 sums; the weight gradient accumulates in fp32.
    """
    leading = hidden.shape[:-1]
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1).to(torch.int64)
    logprobs, entropy = _LinearLogprobsEntropy.apply(
        hidden_2d, weight, bias, targets_1d, 1.0 / float(temperature), int(ignore_index)
    )
    return logprobs.view(leading), entropy.view(leading)
