"""Triton launches under `jit` with sharded inputs, and inside `shard_map`.

A Triton kernel reaches XLA as a custom call that XLA's partitioner knows nothing about:
left alone, it gathers every input onto every device and runs the whole kernel there.
`partitioned` wraps a launcher (a function of whole arrays that builds its metadata and
launches its kernels) in `jax.experimental.custom_partitioning`, with a rule that says
which dimensions may stay sharded:

- the batch dimension ("b") of every array, split the same way everywhere;
- the head dimensions, query heads ("q", HQ) and key/value heads ("h", H) split by the
  same factor, so that each device keeps whole groups of G = HQ / H query heads with the
  KV head they read (query head hq reads KV head hq // G, so contiguous splits match);
- nothing else: sequence and head-dim dimensions, and metadata such as cu_seqlens, are
  replicated (gathered if they arrive sharded), because the kernels need them whole.

Each device then runs the same launcher on its shard, with no collective. A batch or
head sharding that does not divide the dimension (H = 4 over 8 devices) is gathered too.
On one device, and inside `shard_map` (every axis manual), custom_partitioning inlines
the launcher: the program is the one without this wrapper.

`match_vma` gives a launcher's outputs the varying-manual-axes type of its inputs: inside
`shard_map` with `check_vma=True`, kernel calls (which JAX cannot see through) come back
typed as invariant, and a `custom_vjp` whose backward returns such a type for a varying
argument is refused.
"""

from __future__ import annotations

import functools
import string

import jax
import jax.numpy as jnp
from jax._src.core import eval_jaxpr
from jax.experimental.custom_partitioning import ArrayMapping, SdyShardingRule, custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from ._call import interpreter_enabled
from ._host import DispatcherSlot, dispatching, keep_dispatcher
from ._vmap import BATCHED, VARLEN, vmappable

BATCH, QUERY_HEADS, KV_HEADS = "b", "q", "h"


def launcher(fn, in_layouts, out_layouts):
    """`partitioned` and `vmappable` at once: how every Triton op of ejnsa wraps the
    launchers inside its custom_vjp. Arguments with a layout (all start with the batch
    dimension) are batch rows under `vmap`; those without (cu_seqlens) run the mapped
    entries one by one."""
    kinds = "".join(VARLEN if lay is None else BATCHED for lay in in_layouts)
    out_kinds = BATCHED * (1 if isinstance(out_layouts, str) else len(out_layouts))
    call = vmappable(partitioned(fn, in_layouts, out_layouts), kinds, out_kinds)
    # (custom_vmap drops the varying-manual-axes types of its outputs: cast after it too)
    return lambda *args: match_vma(call(*args), *args)


def partitioned(fn, in_layouts, out_layouts):
    """fn(*args) -> output or tuple of outputs, partitioned as the module docstring says.

    in_layouts: one entry per positional argument: a string with one letter per dimension
    ("b" batch, "q" query heads, "h" KV heads, "." any other, e.g. "b.q." for a query
    [B, T, HQ, D]), or None for an argument kept whole (cu_seqlens: None, an array or a
    pair). out_layouts: one string, or a tuple of strings, one per output.
    """
    single = isinstance(out_layouts, str)
    outs = (out_layouts,) if single else tuple(out_layouts)

    def call(*args):
        if len(args) != len(in_layouts):
            raise ValueError(f"expected {len(in_layouts)} arguments, got {len(args)}")
        leaves, tree = jax.tree.flatten(args)
        layouts = []
        for a, lay in zip(args, in_layouts):
            for leaf in jax.tree.leaves(a):
                layouts.append(_check_layout(lay, leaf.ndim) if lay is not None else "." * leaf.ndim)
        layouts = tuple(layouts)

        def flat(*xs):
            out = fn(*jax.tree.unflatten(tree, xs))
            return (out,) if single else tuple(out)

        slot = None
        if interpreter_enabled() and leaves:  # host callbacks inside the body: see ejnsa.triton._host
            slot = DispatcherSlot()
            leaves[0] = keep_dispatcher(leaves[0], slot)
        # custom_partitioning refuses a body with array constants (jnp.array([...]) in the
        # metadata code): the whole-array body takes them as replicated arguments instead.
        # Each device's body is traced again on its shard, and makes its own.
        closed = jax.make_jaxpr(flat)(*leaves)
        consts = [jnp.asarray(c) for c in closed.consts]
        n = len(consts)

        def whole(*xs):
            return tuple(eval_jaxpr(closed.jaxpr, xs[:n], *xs[n:]))

        def shard(*xs):
            return flat(*xs[n:])

        all_layouts = tuple("." * c.ndim for c in consts) + layouts
        cp = custom_partitioning(whole)
        cp.def_partition(
            partition=functools.partial(_partition, shard, slot, all_layouts, outs),
            infer_sharding_from_operands=functools.partial(_infer, all_layouts, outs),
            sharding_rule=functools.partial(_rule, all_layouts, outs),
        )
        out = cp(*consts, *leaves)
        return out[0] if single else out

    return call


def match_vma(outputs, *inputs):
    """outputs (a pytree), each made varying over every manual axis any input varies
    over (a no-op outside shard_map)."""
    want = frozenset().union(*(_vma(x) for x in jax.tree.leaves(inputs)))
    if not want:
        return outputs

    def cast(x):
        missing = tuple(sorted(want - _vma(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, outputs)


def _vma(x) -> frozenset:
    """The manual axes x varies over (`aval.mat.varying` since jax 0.10, `aval.vma` before)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _check_layout(layout: str, ndim: int) -> str:
    if len(layout) != ndim or set(layout) - {BATCH, QUERY_HEADS, KV_HEADS, "."}:
        raise ValueError(f"layout {layout!r} does not describe an array of rank {ndim}")
    return layout


# ------------------------------------------------------------------ the rule (Shardy)


def _rule(in_layouts, out_layouts, mesh, value_types, result_types):
    """Factors: "b" shared by every batch dimension, "q" by the query-head dimensions and
    "h" by the KV-head ones; every other dimension has a factor of its own that must stay
    replicated. The two head factors are left unlinked (a compound (h, g) would let Shardy
    propagate a query-head sharding that H does not divide as sub-axes, which no
    PartitionSpec expresses): the partition callback makes them agree."""
    names = iter(f"{a}{b}" for a in string.ascii_lowercase for b in string.ascii_lowercase)
    replicated = []  # in the order the factors first appear, as Shardy requires

    def mapping(layout):
        dims = []
        for c in layout:
            if c in (BATCH, QUERY_HEADS, KV_HEADS):
                dims.append(c)
            else:
                name = "r" + next(names)
                replicated.append(name)
                dims.append(name)
        return ArrayMapping(*dims)

    operands = tuple(mapping(lay) for lay in in_layouts)
    results = tuple(mapping(lay) for lay in out_layouts)
    return SdyShardingRule(operands, results, need_replication_factors=tuple(replicated))


# ------------------------------------------------------------- the partition callback


def _spec_axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _axes_size(mesh, axes) -> int:
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return size


def _choose(mesh, layouts, arg_shapes):
    """(batch axes, head axes) the call keeps: those of the first array that is sharded on
    such a dimension, where they divide every array's dimension; () otherwise."""
    found = {BATCH: None, KV_HEADS: None}
    for lay, a in zip(layouts, arg_shapes):
        spec = getattr(a.sharding, "spec", None)
        if spec is None:
            continue
        spec = tuple(spec) + (None,) * (len(lay) - len(spec))
        for c, entry in zip(lay, spec):
            kind = KV_HEADS if c in (QUERY_HEADS, KV_HEADS) else c
            if kind in found and found[kind] is None and entry is not None:
                found[kind] = _spec_axes(entry)
    batch, heads = found[BATCH] or (), found[KV_HEADS] or ()
    if set(batch) & set(heads):
        heads = ()

    def divides(axes, letters):
        n = _axes_size(mesh, axes)
        return all(a.shape[i] % n == 0 for lay, a in zip(layouts, arg_shapes) for i, c in enumerate(lay) if c in letters)

    if not divides(batch, BATCH):
        batch = ()
    if not divides(heads, QUERY_HEADS + KV_HEADS):
        heads = ()
    return batch, heads


def _sharding(mesh, layout, batch, heads):
    def entry(c):
        axes = batch if c == BATCH else heads if c in (QUERY_HEADS, KV_HEADS) else ()
        return None if not axes else axes[0] if len(axes) == 1 else axes
    return NamedSharding(mesh, PartitionSpec(*(entry(c) for c in layout)))


def _infer(in_layouts, out_layouts, mesh, arg_shapes, result_shape):
    batch, heads = _choose(mesh, in_layouts, arg_shapes)
    return tuple(_sharding(mesh, lay, batch, heads) for lay in out_layouts)


def _partition(fn, slot, in_layouts, out_layouts, mesh, arg_shapes, result_shape):
    batch, heads = _choose(mesh, in_layouts, arg_shapes)
    args = tuple(_sharding(mesh, lay, batch, heads) for lay in in_layouts)
    outs = tuple(_sharding(mesh, lay, batch, heads) for lay in out_layouts)
    if slot is None:
        return mesh, fn, outs, args

    def body(*xs):  # interpreted launches call the host through the outer module's dispatcher
        with dispatching(slot.index):
            return fn(*xs)

    return mesh, body, outs, args
