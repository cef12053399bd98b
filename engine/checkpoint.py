"""Checkpoints that resume a run exactly.

output_dir/checkpoint-<step>/ holds the policy and tokenizer (save_pretrained, safetensors), the frozen
reference when it is a copy of the initial policy (reference/), and trainer_state.pt: optimizer,
scheduler, the python / numpy / torch (and CUDA) RNG states, the prompt sampler's position, the step,
and the loop's own small state. Restoring all of them makes a resumed CPU run repeat the metrics of
the uninterrupted run exactly.

Under torchrun (engine/distributed.py) the models and optimizers go to shards/ instead, written with
torch.distributed.checkpoint (each rank its own shards; resumable on the same number of ranks),
trainer_state.pt holds the rest, each rank's RNG states go to rng-<rank>.pt, and the last checkpoint
also holds the final policy as a transformers directory, gathered once.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from fusedrl.engine.errors import UsageError

STATE_FILE = "trainer_state.pt"
SHARDS_DIR = "shards"


def save_checkpoint(directory: Path, *, model, tokenizer, reference, optimizer, scheduler, sampler,
                    step: int, extra: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if reference is not None:
        reference.save_pretrained(directory / "reference", safe_serialization=True)
        tokenizer.save_pretrained(directory / "reference")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "rng": rng_state(), "extra": extra}, directory / STATE_FILE)
    return directory


def save_sharded_checkpoint(directory: Path, world, parts: dict, *, tokenizer, scheduler, sampler, step: int,
                            extra: dict, export=None, export_dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint of a torchrun run: parts {name: (model, optimizer or None)} as DCP shards; `export`
    (a causal LM) also as a transformers directory in `directory`, in `export_dtype`."""
    from fusedrl.engine import distributed

    directory.mkdir(parents=True, exist_ok=True)
    distributed.save_sharded(directory / SHARDS_DIR, parts)
    full = distributed.full_state_dict(export) if export is not None else None
    torch.save(rng_state(), directory / f"rng-{world.rank}.pt")
    if world.main:
        if export is not None:
            # In the model's dtype, and a tied output embedding once (the gathered dict names it twice).
            first = {}
            for name, param in export.named_parameters(remove_duplicate=False):
                first.setdefault(id(param), name)
            tied = {name for name, param in export.named_parameters(remove_duplicate=False)} - set(first.values())
            full = {name: tensor.to(export_dtype) if tensor.is_floating_point() else tensor
                    for name, tensor in full.items() if name not in tied}
            export.save_pretrained(directory, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(directory)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                    "extra": extra}, directory / STATE_FILE)
    world.barrier()  # a checkpoint is complete before any rank goes on (and may be killed)
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


def load_state(directory: Path, world=None) -> dict:
    """trainer_state.pt (with this rank's RNG states under torchrun), every tensor on the CPU:
    optimizer.load_state_dict moves each state to its parameter's device, and a checkpoint written on a
    GPU then also loads where there is none."""
    # The numpy RNG key is stored as a tensor so that the whole file loads with weights_only=True.
    state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if world is not None and world.sharded:
        rng = directory / f"rng-{world.rank}.pt"
        if not rng.is_file():
            raise UsageError(f"run.resume {str(directory)!r}: no {rng.name}; a sharded checkpoint resumes on "
                             f"the number of ranks that wrote it")
        state["rng"] = torch.load(rng, map_location="cpu", weights_only=True)
    return state


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
