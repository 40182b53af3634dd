"""`jax.vmap` over Triton launches: the mapped axis becomes more batch rows.

jax_triton cannot batch a kernel call, and `triton_call` refuses to. Every Triton operation
of ejnsa already takes a leading batch axis B, so under `vmap` with N mapped entries the
launches here run once on N * B batch rows instead: the same kernels, one launch, no loop.
The wrapped functions are the forward and backward launchers *inside* each op's
`jax.custom_vjp`: vmap of a custom_vjp function batches its forward and backward rules,
which land here; they are never differentiated themselves, so any mix of `vmap`, `grad`
and `jit` works.

Packed sequences (`cu_seqlens`, B == 1) cannot become batch rows, so when `cu_seqlens` is
given the mapped entries run one after another (`lax.map`): correct, not fast.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

# Kinds of positional arguments and outputs:
#   "b": an array (or None) whose leading axis is the batch axis B;
#   "s": an array without a batch axis, one per call (a tiling choice): shared by all rows;
#   "v": packed-sequence metadata (cu_seqlens) or None; given, the entries run one by one.
BATCHED, SHARED, VARLEN = "b", "s", "v"


def vmappable(fn, arg_kinds: str, out_kinds: str):
    """fn(*args) -> tuple of outputs (or one output when out_kinds has one letter), made
    batchable by `jax.vmap` as the module docstring says."""
    if set(arg_kinds) - {BATCHED, SHARED, VARLEN} or set(out_kinds) - {BATCHED, SHARED}:
        raise ValueError(f"unknown kinds in {arg_kinds!r} / {out_kinds!r}")
    single = len(out_kinds) == 1

    @custom_vmap
    def call(*args):
        return fn(*args)

    @call.def_vmap
    def rule(axis_size, in_batched, *args):
        if len(args) != len(arg_kinds):
            raise ValueError(f"expected {len(arg_kinds)} arguments, got {len(args)}")
        varlen = any(k == VARLEN and a is not None for a, k in zip(args, arg_kinds))
        shared_mapped = any(k == SHARED and _any(b) for b, k in zip(in_batched, arg_kinds))
        if varlen or shared_mapped:
            return _mapped(call, axis_size, in_batched, args, single)
        folded = [_fold(a, b, axis_size) if k == BATCHED else a for a, b, k in zip(args, in_batched, arg_kinds)]
        out = call(*folded)
        outs = (out,) if single else out
        outs = tuple(jax.tree.map(lambda x: _unfold(x, axis_size), o) if k == BATCHED else o
                     for o, k in zip(outs, out_kinds))
        flags = tuple(jax.tree.map(lambda _: k == BATCHED, o) for o, k in zip(outs, out_kinds))
        return (outs[0], flags[0]) if single else (outs, flags)

    return call


def _any(batched) -> bool:
    return any(jax.tree.leaves(batched))


def _fold(arg, batched, n: int):
    """[N, B, ...] (or unmapped [B, ...], broadcast) -> [N * B, ...]."""
    def one(x, b):
        x = x if b else jnp.broadcast_to(x, (n,) + x.shape)
        return x.reshape((n * x.shape[1],) + x.shape[2:])
    return jax.tree.map(one, arg, batched)


def _unfold(x, n: int):
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])


def _mapped(call, n: int, in_batched, args, single: bool):
    """The mapped entries one after another; every output is mapped."""
    def take(i):
        def one(x, b):
            return x[i] if b else x
        return [jax.tree.map(one, a, b) for a, b in zip(args, in_batched)]

    out = lax.map(lambda i: call(*take(i)), jnp.arange(n))
    flags = jax.tree.map(lambda _: True, out)
    return out, flags
