"""A second device on a CPU-only machine, to catch code that mixes devices before a GPU ever runs it.

`fakegpu` is torch's PrivateUse1 backend set up as a Python backend: its tensors (OnDevice) wrap CPU
tensors, so every op computes real values and `.tolist()` / `.item()` work, while `.device` reports
`fakegpu:0`. Every op on them goes through `_dispatch`, which first enforces CUDA's device rules:

- all tensor arguments on one device, except that a 0-dim CPU tensor may join a pointwise op on the
  device (TensorIterator's CPU-scalar rule);
- a device tensor may be indexed (and index-assigned) with CPU indices, a CPU tensor never with device
  indices; index_put's values follow the CPU-scalar rule;
- tensors cross devices only through `.to` / `copy_`;
- a random op on the device may not draw from a CPU generator.

A violation raises DeviceMismatch where a CUDA run would fail. Code that branches on
`device.type == "cuda"` takes its non-CUDA branch here, and the fused ops take their torch backend
(`is_cuda` is false): those parts need GPU tests or a reading.

tests/conftest.py imports this module in CPU sessions before any test runs (the autograd engine sets
up its per-device queues at the process's first backward); tests reach it through the fake_gpu fixture.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_map

NAME = "fakegpu"
aten = torch.ops.aten


class DeviceMismatch(RuntimeError):
    pass


def _register() -> None:
    """PrivateUse1 as a Python backend named fakegpu, once per process (torch allows one renaming).

    It reports itself unavailable, so that what asks torch.accelerator which device to use (transformers)
    keeps to the CPU in the other tests of the same process; and it has RNG-state calls for
    torch.random.fork_rng() (which forks the current accelerator's), with nothing to fork: fakegpu's
    random ops draw from the CPU generator."""
    if torch._C._get_privateuse1_backend_name() == NAME:
        return
    from torch.utils import backend_registration as registration

    class Hooks(registration._DummyPrivateUse1Hook):
        def is_available(self) -> bool:
            return False

    class Module(registration._DummyBackendModule):
        def is_available(self) -> bool:
            return False

        def get_rng_state(self, device=None) -> torch.Tensor:
            return torch.empty(0, dtype=torch.uint8)

        def set_rng_state(self, state, device=None) -> None:
            pass

    registration._setup_privateuseone_for_python_backend(NAME, backend_module=Module(), hook=Hooks())


_register()
DEVICE = torch.device(NAME, 0)
dispatched = 0  # ops run on fakegpu tensors so far: lets a test show that it used the device at all
host_reads = 0  # copies from fakegpu to the host (.item(), .tolist(), .cpu(), ...): each one a GPU sync


class OnDevice(torch.Tensor):
    """A tensor on fakegpu: the metadata of its CPU payload `inner`, device fakegpu:0."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, inner.size(), strides=inner.stride(), storage_offset=inner.storage_offset(), dtype=inner.dtype,
            layout=inner.layout, device=DEVICE, requires_grad=inner.requires_grad,
        )  # fmt: skip

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self, *, tensor_contents=None):
        return f"OnDevice({self.inner!r})"

    # _dispatch wraps results itself; torch's default would also wrap the CPU results of .cpu().
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})

    def tolist(self):  # torch refuses tolist() on subclasses; a GPU tensor copies to the host
        global host_reads
        host_reads += 1
        return self.inner.tolist()

    def numpy(self, *, force=False):  # as for a CUDA tensor: only after .cpu()
        raise TypeError("can't convert fakegpu tensor to numpy: use Tensor.cpu() first")

    # Storage identity (save_pretrained finds tied weights by it) and pickling (torch.save of an
    # optimizer's state) are the payload's; a pickled tensor loads back onto fakegpu, as CUDA ones do.
    def untyped_storage(self):
        return self.inner.untyped_storage()

    # A traceable wrapper: nn.Module._apply (module.float(), .to(dtype)) then swaps whole tensors
    # instead of assigning .data, which would leave `inner` behind in the old dtype.
    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, ctx, outer_size, outer_stride):
        return OnDevice(inner_tensors["inner"])

    def __reduce_ex__(self, protocol):
        return _rebuild, (self.inner, self.requires_grad)


def _rebuild(inner: torch.Tensor, requires_grad: bool) -> OnDevice:
    return OnDevice(inner).requires_grad_(requires_grad)


torch.serialization.add_safe_globals([OnDevice, _rebuild])

_CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten._copy_from.default,
                 aten._copy_from_and_resize.default, aten.is_pinned.default, aten.is_same_size.default}
_INDEX = {aten.index.Tensor, aten._unsafe_index.Tensor}
_INDEX_PUT = {aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
              aten._unsafe_index_put.default}


def _device_of(t: torch.Tensor) -> str:
    return NAME if isinstance(t, OnDevice) else t.device.type


def _cpu_scalar(t: torch.Tensor) -> bool:
    return t.dim() == 0 and _device_of(t) == "cpu"


def _check(func, args, kwargs, target: str) -> None:
    """Raise DeviceMismatch where CUDA would refuse the call (see the module docstring)."""
    if func in _CROSS_DEVICE:
        return
    if func in _INDEX or func in _INDEX_PUT:
        where = _device_of(args[0])
        for index in (i for i in args[1] if i is not None):
            if _device_of(index) not in (where, "cpu"):
                raise DeviceMismatch(f"{func}: indices on {_device_of(index)} index a tensor on {where}")
        if func in _INDEX_PUT and _device_of(args[2]) != where and not _cpu_scalar(args[2]):
            raise DeviceMismatch(f"{func}: values on {_device_of(args[2])} written to a tensor on {where}")
        return
    flat, _ = tree_flatten((args, kwargs))
    pointwise = torch.Tag.pointwise in func.tags or func in (aten.masked_fill.Tensor, aten.masked_fill_.Tensor)
    devices = {_device_of(t) for t in flat if isinstance(t, torch.Tensor) and not (pointwise and _cpu_scalar(t))}
    if len(devices | {target}) > 1:
        raise DeviceMismatch(f"{func}: tensors on {sorted(devices | {target})}")
    for g in (g for g in flat if isinstance(g, torch.Generator)):
        if g.device.type != target:
            raise DeviceMismatch(f"{func}: a {g.device.type} generator draws for a {target} tensor")


def _is_device(d) -> bool:
    return d is not None and torch.device(d).type == NAME


def _dispatch(func, args, kwargs):
    global dispatched, host_reads
    flat, _ = tree_flatten((args, kwargs))
    target = NAME if any(isinstance(t, OnDevice) for t in flat) or _is_device(kwargs.get("device")) else "cpu"
    if func is aten._to_copy.default and kwargs.get("device") is not None:
        target = torch.device(kwargs["device"]).type
    if func is aten.copy_.default:
        target = _device_of(args[0])
    _check(func, args, kwargs, target)
    dispatched += target == NAME
    reads_device = func is aten._local_scalar_dense.default or (target == "cpu" and func in _CROSS_DEVICE)
    host_reads += reads_device and any(isinstance(t, OnDevice) for t in flat)

    def unwrap(x):
        if isinstance(x, OnDevice):
            return x.inner
        return torch.device("cpu") if isinstance(x, torch.device) and x.type == NAME else x

    out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
    # In-place and out= ops return their destination, the caller's own (wrapped) tensor.
    schema = func._schema
    written = [a for a, arg in zip(args, schema.arguments) if arg.alias_info is not None and arg.alias_info.is_write]
    written += [kwargs[a.name] for a in schema.arguments
                if a.kwarg_only and a.name in kwargs and a.alias_info is not None and a.alias_info.is_write]
    if written and all(r.alias_info is not None and r.alias_info.is_write for r in schema.returns):
        return written[0] if len(schema.returns) == 1 else tuple(written)
    if target != NAME:
        return out
    return tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) and not isinstance(x, OnDevice) else x, out)


# The ops that reach the fakegpu backend itself rather than OnDevice's __torch_dispatch__: factories
# called with device=fakegpu, and the allocation and copy that torch.tensor(data, device=...) makes in
# C++ with Python dispatch turned off.
_BACKEND_OPS = (aten.empty.memory_format, aten.empty_strided.default, aten.copy_.default,
                aten._copy_from.default, aten._copy_from_and_resize.default, aten._to_copy.default)
_LIBRARY = torch.library.Library("aten", "IMPL")
for _op in _BACKEND_OPS:
    _LIBRARY.impl(_op, lambda *args, _op=_op, **kwargs: _dispatch(_op, args, kwargs), "PrivateUse1")
