"""Checkpoints that resume a run exactly.

output_dir/checkpoint-<step>/ holds the policy and tokenizer (save_pretrained, safetensors), the frozen
reference when it is a copy of the initial policy (reference/), and trainer_state.pt: optimizer,
scheduler, the python / numpy / torch (and CUDA) RNG states, the prompt order's position, the step,
and the loop's own small state. Restoring all of them makes a resumed CPU run repeat the metrics of
the uninterrupted run exactly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from fusedrl.engine.errors import UsageError

STATE_FILE = "trainer_state.pt"


def save_checkpoint(directory: Path, *, model, tokenizer, reference, optimizer, scheduler, prompt_order,
                    step: int, extra: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if reference is not None:
        reference.save_pretrained(directory / "reference", safe_serialization=True)
        tokenizer.save_pretrained(directory / "reference")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "prompt_order": prompt_order.state_dict(), "rng": rng_state(), "extra": extra}, directory / STATE_FILE)
    return directory


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """The checkpoint directory named by run.resume: a path, or "latest" in output_dir."""
    if spec == "latest":
        found = sorted((p for p in output_dir.glob("checkpoint-*") if _step_of(p) is not None),
                       key=_step_of)
        if not found:
            raise UsageError(f"run.resume 'latest': no checkpoint-<step> directory in {str(output_dir)!r}")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"run.resume {spec!r}: not a checkpoint directory (no {STATE_FILE})")
    return path


def load_state(directory: Path) -> dict:
    """trainer_state.pt, every tensor on the CPU: optimizer.load_state_dict moves each state to its
    parameter's device, and a checkpoint written on a GPU then also loads where there is none."""
    # The numpy RNG key is stored as a tensor so that the whole file loads with weights_only=True.
    return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss}}
    # Only a process that uses CUDA has CUDA RNG state worth keeping; asking for it would initialise CUDA
    # (a context on the GPU) in a CPU run on a GPU machine.
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        # One state per GPU of the machine that saved it; a machine with fewer GPUs restores its own.
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None
