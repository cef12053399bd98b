"""Checkpoints that resume a run exactly, written so that a crash never leaves one that looks usable.

output_dir/checkpoint-<step>/ holds the policy and tokenizer (save_pretrained, safetensors), the frozen
reference when it is a copy of the initial policy (reference/), a loop's own parts (PPO: the critic),
and trainer_state.pt: optimizer, scheduler, the python / numpy / torch (and CUDA) RNG states, the
prompt sampler's position, the step, and the loop's own small state. Restoring all of them makes a
resumed CPU run repeat the metrics of the uninterrupted run exactly.

A checkpoint is written into a hidden temporary directory, which gets a completion marker
(complete.json: every file's size) once all of it is flushed to disk, and only then is renamed to
checkpoint-<step>; a run killed during a save leaves at most that temporary directory. `latest`
takes the newest complete checkpoint, skipping (with a warning) any that lacks its marker or whose
files do not have the recorded sizes; a checkpoint named explicitly must be complete.

Under torchrun (engine/distributed.py) the models and optimizers go to shards/ instead, written with
torch.distributed.checkpoint (each rank its own shards; resumable on the same number of ranks) into
the same temporary directory, sealed by rank 0 once every rank has written; trainer_state.pt holds
the rest, each rank's RNG states go to rng-<rank>.pt, and the last checkpoint also holds the final
policy as a transformers directory, gathered once.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fusedrl.engine.errors import UsageError

STATE_FILE = "trainer_state.pt"
MARKER = "complete.json"
SHARDS_DIR = "shards"


def save_checkpoint(directory: Path, *, model, tokenizer, reference, optimizer, scheduler, sampler,
                    step: int, extra: dict, parts: Callable[[Path], None] | None = None) -> Path:
    """Writes checkpoint `directory` atomically; `parts(path)` adds a loop's own files before the marker."""
    partial = _partial_dir(directory, clear=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    if reference is not None:
        reference.save_pretrained(partial / "reference", safe_serialization=True)
        tokenizer.save_pretrained(partial / "reference")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "rng": rng_state(), "extra": extra}, partial / STATE_FILE)
    if parts is not None:
        parts(partial)
    _seal(partial, directory, step)
    return directory


def _partial_dir(directory: Path, clear: bool) -> Path:
    """The hidden temporary directory a checkpoint is written into (cleared of a killed save's leftovers)."""
    partial = directory.with_name(f".{directory.name}.partial")
    if clear:
        for leftover in (partial, directory.with_name(f".{directory.name}.replaced")):
            shutil.rmtree(leftover, ignore_errors=True)
        partial.mkdir(parents=True)
    return partial


def _seal(partial: Path, directory: Path, step: int) -> None:
    """Flushes every file of `partial`, writes the completion marker, then renames it to `directory`."""
    replaced = directory.with_name(f".{directory.name}.replaced")
    files = sorted(p for p in partial.rglob("*") if p.is_file())
    for file in files:  # on disk before the marker says so: a power cut must not leave a marked torso
        _fsync(file)
    sizes = {str(f.relative_to(partial)): f.stat().st_size for f in files}
    (partial / MARKER).write_text(json.dumps({"step": step, "files": sizes}, indent=1))
    _fsync(partial / MARKER)
    if directory.exists():  # a resumed run saving a step again: the old one goes only once the new one is whole
        directory.rename(replaced)
    partial.rename(directory)
    _fsync(directory.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def remove_checkpoints(output_dir: Path) -> None:
    """Deletes every checkpoint of output_dir, complete or not (a fresh run with run.overwrite)."""
    for path in output_dir.glob("checkpoint-*"):
        shutil.rmtree(path)
    for path in output_dir.glob(".checkpoint-*"):  # temporary directories of interrupted saves
        shutil.rmtree(path)


@contextlib.contextmanager
def reading(directory: Path | None):
    """Any failure while loading from checkpoint `directory` (a model file damaged in a way its size
    does not show) becomes one UsageError line naming it; with None, errors pass unchanged."""
    if directory is None:
        yield
        return
    try:
        yield
    except Exception as e:
        raise UsageError(f"run.resume {str(directory)!r}: damaged checkpoint ({type(e).__name__}: "
                         f"{_first_line(e)})") from None


def remove_old_checkpoints(output_dir: Path, keep: int) -> None:
    """Deletes all but the `keep` newest complete checkpoints (keep = 0: deletes none)."""
    if keep > 0:
        for old in _complete_checkpoints(output_dir, warn=False)[:-keep]:
            shutil.rmtree(old)


def save_sharded_checkpoint(directory: Path, world, parts: dict, *, tokenizer, scheduler, sampler, step: int,
                            extra: dict, export=None, export_dtype: torch.dtype = torch.float32) -> Path:
    """A checkpoint of a torchrun run: parts {name: (model, optimizer or None)} as DCP shards; `export`
    (a causal LM) also as a transformers directory in `directory`, in `export_dtype`."""
    from fusedrl.engine import distributed

    # Every rank writes into rank 0's temporary directory; rank 0 seals it once all have written.
    partial = _partial_dir(directory, clear=world.main)
    world.barrier()
    distributed.save_sharded(partial / SHARDS_DIR, parts)
    full = distributed.full_state_dict(export) if export is not None else None
    torch.save(rng_state(), partial / f"rng-{world.rank}.pt")
    if world.main:
        if export is not None:
            # In the model's dtype, and a tied output embedding once (the gathered dict names it twice).
            first = {}
            for name, param in export.named_parameters(remove_duplicate=False):
                first.setdefault(id(param), name)
            tied = {name for name, param in export.named_parameters(remove_duplicate=False)} - set(first.values())
            full = {name: tensor.to(export_dtype) if tensor.is_floating_point() else tensor
                    for name, tensor in full.items() if name not in tied}
            export.save_pretrained(partial, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        torch.save({"step": step, "scheduler": scheduler.state_dict(), "sampler": sampler.state_dict(),
                    "extra": extra}, partial / STATE_FILE)
    world.barrier()  # every rank's shards and RNG states are written
    if world.main:
        _seal(partial, directory, step)
    world.barrier()  # a checkpoint is complete before any rank goes on (and may be killed)
    return directory


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """The checkpoint directory named by run.resume: a path, or "latest" in output_dir."""
    if spec == "latest":
        found = _complete_checkpoints(output_dir, warn=True)
        if not found:
            raise UsageError(f"run.resume 'latest': no checkpoint-<step> directory in {str(output_dir)!r} is complete")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file() and not (path / MARKER).is_file():
        raise UsageError(f"run.resume {spec!r}: not a checkpoint directory (no {STATE_FILE})")
    problem = _incomplete(path)
    if problem:
        raise UsageError(f"run.resume {spec!r}: damaged checkpoint ({problem})")
    return path


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """output_dir's complete checkpoint-<step> directories, oldest first (what run.resume=latest can take)."""
    return _complete_checkpoints(output_dir, warn=False)


def _complete_checkpoints(output_dir: Path, warn: bool) -> list[Path]:
    """output_dir's complete checkpoint-<step> directories, oldest first."""
    found = []
    for path in sorted((p for p in output_dir.glob("checkpoint-*") if _step_of(p) is not None), key=_step_of):
        problem = _incomplete(path)
        if problem is None:
            found.append(path)
        elif warn:
            warnings.warn(f"run.resume 'latest': skipping {str(path)!r}: {problem}", stacklevel=3)
    return found


def _incomplete(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None."""
    try:
        sizes = json.loads((path / MARKER).read_text())["files"]
    except FileNotFoundError:
        return f"no {MARKER}: its save did not finish"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MARKER} ({type(e).__name__})"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_state(directory: Path, world=None) -> dict:
    """trainer_state.pt (with this rank's RNG states under torchrun), every tensor on the CPU:
    optimizer.load_state_dict moves each state to its parameter's device, and a checkpoint written on a
    GPU then also loads where there is none."""
    state = _load(directory, STATE_FILE)
    if world is not None and world.sharded:
        rng = directory / f"rng-{world.rank}.pt"
        if not rng.is_file():
            raise UsageError(f"run.resume {str(directory)!r}: no {rng.name}; a sharded checkpoint resumes on "
                             f"the number of ranks that wrote it")
        state["rng"] = _load(directory, rng.name)
    return state


def _load(directory: Path, name: str):
    # The numpy RNG key is stored as a tensor so that the whole file loads with weights_only=True.
    try:
        return torch.load(directory / name, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises whatever the unpickler met: report it on one line
        raise UsageError(f"run.resume {str(directory)!r}: damaged checkpoint ({name}: "
                         f"{type(e).__name__}: {_first_line(e)})") from None


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


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None
