"""Input checks shared by every op. Each raises ValueError naming the argument and what was
expected, and runs before any kernel launch: a bad id or shape must never reach a kernel, where it
would read out of bounds or silently produce a number."""

from __future__ import annotations

import contextlib
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_temperature(temperature) -> float:
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def check_fraction(name: str, value) -> float:
    """A fraction in (0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    return v


def check_targets(targets: torch.Tensor, leading_shape: torch.Size, vocab_size: int, ignore_index: int) -> None:
    """Integer targets of the leading shape with ids in [0, vocab_size) or equal to ignore_index.

    The range check reads the targets once (one small device sync), which is the price of never
    launching a kernel on an out-of-range id.
    """
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"targets must be an integer tensor, got dtype {str(targets.dtype).replace('torch.', '')}")
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(f"targets must have shape {tuple(leading_shape)} (the leading shape), got {tuple(targets.shape)}")
    if targets.numel() == 0:
        return
    valid = targets != ignore_index
    bad = valid & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = targets[bad].flatten()[0].item()
        raise ValueError(
            f"targets must be in [0, {vocab_size}) or equal to ignore_index={ignore_index}; found {first}"
        )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """One device for all the tensors given, and not "meta" (shapes without data: no value to compute)."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")
    for name, device in devices.items():
        if device.type == "meta":
            raise ValueError(f"{name} is on the meta device (a shape without data): move it to a real device first")


def device_guard(t: torch.Tensor):
    """Launch on t's GPU, not the current one: Triton launches on the current device, and a process may
    hold tensors on another one (several GPUs, a model placed on cuda:1) without switching to it."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
