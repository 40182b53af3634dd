"""Host callbacks for Triton's interpreter that also run inside partitioned operations.

The interpreter runs kernels on the host, in a callback. `jax.pure_callback` registers its
Python function with the module being lowered, and the compiled executable calls it by its
index in that module's list. `custom_partitioning` (ejnsa.triton._shard) lowers the body of
a partitioned operation, at compile time, into a module of its own and keeps only its code:
a callback registered there is lost, and the executable would call whatever the outer
module holds at that index (a crash, on 8 CPU host devices).

So an interpreted launch (`host_call`) binds a primitive of its own, which names the launch
by an id. Outside partitioned bodies it lowers to `jax.pure_callback`. Inside them (when
`dispatching(index)` was active while the body was traced) it lowers to the same FFI
callback JAX emits, but with the index of a dispatcher that `keep_dispatcher` registered
in the outer module, and the launch id as an extra operand. This matters only for the
interpreter: real kernels (jax_triton) are custom calls with no host side.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable

import jax
import numpy as np
from jax._src import core, dispatch, ffi
from jax._src.interpreters import mlir

# launch id -> the host function of one interpreted launch (host arrays -> output arrays).
# Entries live as long as the process: an executable may run a launch at any later time.
_launches: dict[int, Callable] = {}
_ids = itertools.count()
_ids_lock = threading.Lock()

# The dispatcher's index in the outer executable, while a partitioned body is traced.
_dispatch_index: contextvars.ContextVar[int | None] = contextvars.ContextVar("ejnsa_dispatch_index", default=None)


def host_call(fn: Callable, structs: tuple[jax.ShapeDtypeStruct, ...], *arrays) -> tuple[jax.Array, ...]:
    """fn(host arrays) -> tuple of NumPy arrays matching `structs`, run on the host."""
    with _ids_lock:
        key = next(_ids)
    _launches[key] = fn
    return tuple(_host_call_p.bind(*arrays, key=key, structs=tuple(structs), index=_dispatch_index.get()))


@contextlib.contextmanager
def dispatching(index: int | None):
    """Launches traced inside reach the host through the dispatcher at `index`."""
    token = _dispatch_index.set(index)
    try:
        yield
    finally:
        _dispatch_index.reset(token)


@dataclasses.dataclass(eq=False)
class DispatcherSlot:
    """Where `keep_dispatcher` wrote the dispatcher's index (None until lowered)."""

    index: int | None = None


def keep_dispatcher(x: jax.Array, slot: DispatcherSlot) -> jax.Array:
    """x unchanged; lowering it registers the dispatcher with the module being lowered and
    records its index in `slot`. Pass the result on to the partitioned operation, so that
    it is not pruned."""
    return _keep_p.bind(x, slot=slot)


def _dispatch(key, *arrays):
    """The dispatcher: runs launch `key` on the host arrays."""
    return tuple(_launches[int(key)](arrays))


def _host(key: int, *arrays):
    return tuple(_launches[key](arrays))


# ------------------------------------------------------------------ the primitives

_host_call_p = core.Primitive("ejnsa_interpreted_launch")
_host_call_p.multiple_results = True
_host_call_p.def_impl(functools.partial(dispatch.apply_primitive, _host_call_p))
_host_call_p.def_abstract_eval(lambda *avals, key, structs, index: [core.ShapedArray(s.shape, s.dtype) for s in structs])


def _lower_host_call(ctx, *args, key, structs, index):
    if index is None:
        def callback(*xs):
            return tuple(jax.pure_callback(functools.partial(_host, key), structs, *xs))
        return mlir.lower_fun(callback, multiple_results=True)(ctx, *args)
    platform = ctx.module_context.platforms[0]
    target = "xla_ffi_python_gpu_callback" if platform in ("cuda", "rocm") else "xla_ffi_python_cpu_callback"
    key_aval = core.ShapedArray((), np.int32)
    ctx = dataclasses.replace(ctx, avals_in=[key_aval, *ctx.avals_in])
    rule = ffi.build_ffi_lowering_function(target, has_side_effect=False)
    return rule(ctx, mlir.ir_constant(np.int32(key)), *args, index=np.uint64(index)).results


mlir.register_lowering(_host_call_p, _lower_host_call)

_keep_p = core.Primitive("ejnsa_keep_dispatcher")
_keep_p.def_impl(lambda x, slot: x)
_keep_p.def_abstract_eval(lambda aval, slot: aval)


def _lower_keep(ctx, x, *, slot):
    ctx.module_context.add_host_callback(_dispatch)
    slot.index = len(ctx.module_context.host_callbacks) - 1
    return [x]


mlir.register_lowering(_keep_p, _lower_keep)
