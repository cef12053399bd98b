"""AdamW that keeps fp32 master weights for 16-bit parameters (model.dtype bfloat16).

A bf16 weight has 8 significant bits: between 2^-6 and 2^-5 (a typical 0.02) its neighbours are
2^-13 = 1.2e-4 apart, so an AdamW step of lr ~ 1e-6 (RL's usual rate; Adam's steps are about lr in
size) rounds back to the same weight, and so does the decoupled weight decay: a bf16 model stepped in
place does not learn. The remedy of mixed-precision training (Micikevicius et al. 2018): the optimizer
steps an fp32 copy of each 16-bit parameter with its gradient in fp32, and writes the rounded copy
back into the model, whose forward and backward stay in 16 bits. fp32 parameters are stepped as they
are. The copies are part of the state dict, so that a resumed run continues from them rather than
from the rounded weights.

Gradients accumulate in fp32 too: a loop over micro-batches calls `accumulate()` after each backward,
which adds the 16-bit gradients into the copies' fp32 gradients and frees them (bf16's 8 bits would
drop the small addends of a long accumulation: at 64 micro-batches each new one is added to a sum
64 times its size). `clip_gradients` then clips those fp32 gradients. The cost is 4 bytes per 16-bit
parameter for the copy and 4 for its fp32 gradient (the 2-byte 16-bit gradient lives only between a
backward and the next `accumulate`).
"""

from __future__ import annotations

import math

import torch

from fusedrl.engine.errors import RunError


SCHEDULES = ("constant", "linear", "cosine")


def decay(progress: float, kind: str) -> float:
    """Learning-rate factor after warmup at `progress` in [0, 1] of the remaining updates: constant,
    linear or cosine decay to 0 at the last one."""
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over `params` (one group), stepping fp32 copies of the 16-bit ones."""

    def __init__(self, params, **kwargs):
        params = list(params)
        self._pairs = [(p, p.detach().float()) for p in params if p.dtype != torch.float32]
        masters = {id(p): m for p, m in self._pairs}
        super().__init__([masters.get(id(p), p) for p in params], **kwargs)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Adds the 16-bit parameters' gradients into their fp32 copies' gradients and frees them."""
        for p, master in self._pairs:
            if p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad)
            p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("closure is not supported: compute the loss and its backward before step()")
        self.accumulate()
        super().step()
        for p, master in self._pairs:
            p.copy_(master)
            # The step uses the summed gradient up: a model.zero_grad() (which cannot see the copies)
            # then leaves nothing behind, as it would for fp32 parameters.
            master.grad = None
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, _ in self._pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        super().zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": [master for _, master in self._pairs]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        super().load_state_dict(state_dict)
        if saved is None:  # written without them: the masters stay the model's (rounded) weights
            return
        if len(saved) != len(self._pairs):
            raise ValueError(f"state_dict holds {len(saved)} master weights; this optimizer has {len(self._pairs)}")
        for (p, master), value in zip(self._pairs, saved):
            master.copy_(value)
            p.copy_(master)



def make_optimizer(params, *, sharded: bool, **adamw) -> torch.optim.Optimizer:
    """The loops' AdamW: MasterWeightAdamW in one process; plain AdamW over FSDP2's parameters, whose fp32
    shards already are the master weights (MixedPrecisionPolicy computes in 16 bits from them, and
    reduce-scatters the gradients into fp32 shards)."""
    return torch.optim.AdamW(params, **adamw) if sharded else MasterWeightAdamW(params, **adamw)


def accumulate_gradients(optimizer: torch.optim.Optimizer) -> None:
    """After each micro-batch's backward: MasterWeightAdamW sums 16-bit gradients into fp32; any other
    optimizer (over fp32 parameters, such as the tests' SGD) keeps accumulating in `.grad` as usual."""
    if isinstance(optimizer, MasterWeightAdamW):
        optimizer.accumulate()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the gradients the optimizer will step (fp32 ones for
    MasterWeightAdamW's 16-bit parameters, all ranks' shards under FSDP2); returns the total norm
    before clipping."""
    accumulate_gradients(optimizer)
    norm = torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_norm)
    # Over FSDP2's sharded gradients the norm is a DTensor; its full value is the global norm.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class StepGuard:
    """Steps the optimizer only on a finite gradient: one NaN or inf step would corrupt every weight
    (and AdamW's moments) for good. A skipped step is counted; `limit` skipped in a row stop the run
    with a RunError, since a run that keeps producing them has diverged. The check reads the gradient
    norm on the host: one sync per optimizer step."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def step(self, optimizer: torch.optim.Optimizer, max_norm: float) -> tuple[torch.Tensor, bool]:
        """Clips to max_norm (0: no clipping) and steps unless the norm is not finite; returns
        (the norm before clipping, whether the optimizer stepped). The caller zeroes the gradients."""
        if max_norm > 0:
            norm = clip_gradients(optimizer, max_norm)
        else:
            accumulate_gradients(optimizer)
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the global norm
        if bool(torch.isfinite(norm)):
            optimizer.step()
            self.in_a_row = 0
            return norm, True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RunError(f"{self.in_a_row} optimizer steps in a row had a non-finite gradient (norm {float(norm)}) "
                           f"and were skipped (optim.max_skipped_steps={self.limit}): the run has diverged; "
                           f"try a lower optim.lr or resume from an earlier checkpoint")
        return norm, False
