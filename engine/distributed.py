"""Data-parallel training under torchrun: the process group, FSDP2 sharding, lockstep, DCP checkpoints.

`fusedrl train` started by torchrun (WORLD_SIZE, RANK, LOCAL_RANK in the environment) joins one process
group (NCCL on GPUs, gloo on the CPU) and shards every trained or frozen model with FSDP2
(`fully_shard`): each decoder layer is a unit and the whole model is the root unit (embedding, final
norm, output embedding). Parameters are fp32 shards; forward and backward compute in model.dtype
(MixedPrecisionPolicy) and gradients are reduce-scattered in fp32 as sums, because the update gives
every rank's loss its share of the global mini-batch (engine/update.py): the ranks' losses add up to
the one-process loss. Without torchrun `init` returns a World of one rank with no group, and nothing
here communicates: the loops run the same code either way.

Three rules keep the ranks in step:
- FSDP all-gathers a unit's parameters in each forward and reduce-scatters its gradients in each
  backward, so every rank runs the same number of forward passes in a pass over a batch
  (`World.lockstep` pads a rank's micro-batches with idle ones).
- Generation runs a data-dependent number of forward passes per rank; it runs `gathered`: every unit
  is unsharded once and stays so, and the forwards then communicate nothing.
- The output embedding is read by the fused loss right after the root's forward: FSDP2 keeps the root
  unit unsharded between its forward and its backward, so the loss sees the full weight and its
  gradient reaches the shards through the root's reduce-scatter (tied embeddings included: one
  parameter, one gradient). Logits are never built.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    """This process's place among the ranks; World() is the single-process run."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None  # the torch.distributed group; None without torchrun
    mesh: object = None  # the FSDP device mesh
    owns_group: bool = False  # init created the group (a caller that made it destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def share(self, count: int) -> range:
        """This rank's contiguous part of `count` items in rank order (the first count % size ranks get one
        more): concatenated over the ranks, the parts are the items in order."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[int]) -> list[int]:
        return [int(v) for v in self._reduce(values, dist.ReduceOp.MAX)]

    def _reduce(self, values, op) -> list:
        if not self.sharded:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def gather(self, obj) -> list:
        """[rank 0's obj, rank 1's obj, ...] on every rank (small Python objects: metrics, rewards)."""
        if not self.sharded:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def lockstep(self, micro: list) -> list:
        """`micro` padded with None to the longest rank's count: each None is an idle pass that keeps
        FSDP's collectives in step (a rank may hold fewer micro-batches, or none, of a mini-batch)."""
        return micro + [None] * (self.max([len(micro)])[0] - len(micro))

    def barrier(self) -> None:
        if self.sharded:
            dist.barrier(group=self.group)


def init(device: torch.device) -> World:
    """The World of this process: under torchrun, joins the process group (NCCL on CUDA, gloo on the
    CPU) with device cuda:LOCAL_RANK; otherwise the single-process World on `device`."""
    if "WORLD_SIZE" not in os.environ:
        return World(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    size = dist.get_world_size()
    return World(rank=dist.get_rank(), size=size, device=device, group=dist.group.WORLD,
                 mesh=init_device_mesh(device.type, (size,)), owns_group=owns)


def close(world: World) -> None:
    if world.owns_group:
        dist.destroy_process_group()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model: modules of the classes its `_no_split_modules` names
    (LlamaDecoderLayer, Qwen2DecoderLayer, ...), the unit transformers' own FSDP wrapping uses."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(model: nn.Module, world: World, compute_dtype: torch.dtype, cpu_offload: bool = False) -> nn.Module:
    """FSDP2 in place: each decoder layer a unit, `model` the root; fp32 shards, compute in
    `compute_dtype`, fp32 gradient sums. A causal LM gets `fusedrl_hidden`, its backbone's forward run
    under the root's hooks (engine/model.py calls it, never the logits-building forward)."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard, register_fsdp_forward_method)

    model.to(dtype=torch.float32)
    options = dict(mesh=world.mesh, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
                   mp_policy=MixedPrecisionPolicy(param_dtype=None if compute_dtype == torch.float32 else compute_dtype,
                                                  reduce_dtype=torch.float32))
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    if hasattr(model, "get_output_embeddings"):
        model.fusedrl_hidden = types.MethodType(backbone_hidden, model)
        register_fsdp_forward_method(model, "fusedrl_hidden")
        # The packed forward's backbone call (engine/model.py packed_hidden), under the root's hooks too.
        model.fusedrl_backbone = types.MethodType(backbone_forward, model)
        register_fsdp_forward_method(model, "fusedrl_backbone")
    if hasattr(model, "packed_forward"):  # the critic's values of a packed row, under the root's hooks too
        register_fsdp_forward_method(model, "packed_forward")
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            # Sums, not FSDP's default mean: the update already weights each rank's loss by its share of
            # the global batch. gloo has no pre-multiplied sum, hence the forced plain SUM.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
    return model


def backbone_hidden(model, input_ids, attention_mask, position_ids):
    """Final hidden states [B, L, H] of a causal LM's backbone (after the last norm)."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=False).last_hidden_state


def backbone_forward(model, **kwargs) -> torch.Tensor:
    """Final hidden states of a causal LM's backbone called with `kwargs` (a packed row's)."""
    return getattr(model, model.base_model_prefix)(**kwargs).last_hidden_state


def _units(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module):
    """Every FSDP unit of `model` unsharded for the block and kept so after each forward: generation's
    forwards then communicate nothing, and ranks may run different numbers of them (each rank holds
    the full parameters in model.dtype meanwhile, as a colocated inference engine would). A no-op for
    an unsharded model."""
    units = _units(model)
    for unit in units:
        unit.unshard()
    inner = [u for u in units if u is not model]
    for unit in inner:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in inner:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def full_parameters(model: nn.Module, dtype: torch.dtype, device: torch.device):
    """(name, full parameter in `dtype` on `device`) for each parameter name of `model`'s state dict, in
    module order (decoder layer by decoder layer; a tied parameter under each of its names). An FSDP2
    parameter is gathered from its shards only when the consumer asks for it, after its shard is cast
    (a bf16 run gathers bf16), and anew for each name: a consumer that drops each tensor once used holds
    one parameter at a time, never the model. Unsharded parameters come as they are (cast if needed)."""
    from torch.distributed.tensor import DTensor

    for name, param in model.named_parameters(remove_duplicate=False):
        param = param.detach().to(device, dtype)  # a CPU-offloaded shard moves to the device first
        yield name, param.full_tensor() if isinstance(param, DTensor) else param


def full_state_dict(model: nn.Module) -> dict:
    """The full (unsharded) state dict on the CPU, gathered once; on the main rank only (others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _sharded_state(models: dict[str, tuple[nn.Module, object]]) -> dict:
    """Each (model, optimizer or None)'s sharded state by name, the optimizer's under "<name>.optimizer"."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    state = {}
    for name, (model, optimizer) in models.items():
        if optimizer is None:
            state[name] = get_model_state_dict(model)
        else:
            state[name], state[f"{name}.optimizer"] = get_state_dict(model, optimizer)
    return state


def save_sharded(directory: Path, models: dict[str, tuple[nn.Module, object]]) -> None:
    """torch.distributed.checkpoint of each (model, optimizer or None) by name: every rank writes its shards."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(models), checkpoint_id=str(directory))


def load_sharded(directory: Path, models: dict[str, tuple[nn.Module, object]]) -> None:
    """Loads what save_sharded wrote into the same models and optimizers (same number of ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _sharded_state(models)
    dcp.load(state, checkpoint_id=str(directory))
    for name, (model, optimizer) in models.items():
        if optimizer is None:
            set_model_state_dict(model, state[name])
        else:
            set_state_dict(model, optimizer, model_state_dict=state[name],
                           optim_state_dict=state[f"{name}.optimizer"])
