"""Context parallelism: `native_sparse_attention(..., context_axis=...)` inside `shard_map`.

The sequence axis T is split over the mesh axis `context_axis` (n shards); shard i holds
the queries, keys, values and gates of its positions. NSA needs, for its local queries,
keys from everywhere before them (compressed blocks, selected blocks, the window across the
chunk boundary), so every shard all-gathers K and V along the axis (cheap with GQA: H key
heads) and then runs the ordinary NSA with its queries as a suffix of a prefix of the
gathered keys, which is exactly what packed pairs `cu_seqlens=(cu_q, cu_k)` express
(docs/semantics.md, "Queries as a suffix of the keys"): the queries at global positions
[a, a + TQ) are the last TQ positions of the keys [0, a + TQ), and the keys after them
belong to no sequence. Top-k then runs over the global compressed keys. The backward is
autodiff's: the transpose of the all-gather is a reduce-scatter, which returns dK and dV
to the shards that own those keys.

Layouts (`context_layout`):
- "contiguous": shard i holds the chunk [i * T/n, (i + 1) * T/n).
- "balanced": the sequence is cut into 2n chunks and shard i holds chunks i and 2n-1-i
  (MaxText's load-balanced reordering; `context_reorder` puts a global array in that
  order and `context_restore` undoes it). The compressed branch and top-k cost grows with
  the position, so the last contiguous shard does most of the work; the balanced layout
  gives every shard one early and one late chunk.

Batches (B > 1, no cu_seqlens) are packed along T into one row of 2B sequences (each batch
row's queries with their keys, then a sequence without queries holding the row's later
keys), so that one call serves every row. Packed sequences (`cu_seqlens`, the global
[N+1] array, the same on every shard, B == 1) become pairs in the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from ._registry import kernel_registry
from ._varlen import sanitize_cu_seqlens

LAYOUTS = ("contiguous", "balanced")


def axis_size(context_axis) -> int:
    """The number of shards of `context_axis`; a ValueError outside a shard_map that binds it."""
    try:
        return lax.axis_size(context_axis)
    except NameError as e:
        raise ValueError(
            f"context_axis={context_axis!r} must name a mesh axis of the enclosing jax.shard_map, over which T is "
            f"split (it is not bound here: call native_sparse_attention inside jax.shard_map, or pass "
            f"context_axis=None)"
        ) from e


def global_indices(t_local: int, context_axis, layout: str) -> jax.Array:
    """int32 [t_local]: the global index along T of each of this shard's tokens."""
    n, i = axis_size(context_axis), lax.axis_index(context_axis)
    t = jnp.arange(t_local, dtype=jnp.int32)
    if layout == "balanced":
        half = t_local // 2
        return jnp.where(t < half, i * half + t, (2 * n - 1 - i) * half + t - half).astype(jnp.int32)
    return (i * t_local + t).astype(jnp.int32)


def context_reorder(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """A global array [.., T, ..] in the "balanced" layout: T cut into 2 * num_shards chunks,
    and shard i's part (the i-th of num_shards equal parts along `axis`) made of chunks i
    and 2 * num_shards - 1 - i. Shard the result along `axis` as usual."""
    n = _check_shards(x, num_shards, axis)
    chunks = jnp.split(x, 2 * n, axis=axis)
    return jnp.concatenate([c for i in range(n) for c in (chunks[i], chunks[2 * n - 1 - i])], axis=axis)


def context_restore(x: jax.Array, num_shards: int, axis: int = 1) -> jax.Array:
    """The inverse of `context_reorder`: the natural order of T from the "balanced" layout."""
    n = _check_shards(x, num_shards, axis)
    chunks = jnp.split(x, 2 * n, axis=axis)  # shard i's two chunks are 2i and 2i + 1 here
    first = [chunks[2 * i] for i in range(n)]
    second = [chunks[2 * i + 1] for i in reversed(range(n))]
    return jnp.concatenate(first + second, axis=axis)


def _check_shards(x, num_shards, axis) -> int:
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards must be an int >= 1, got {num_shards!r}")
    if x.shape[axis] % (2 * num_shards):
        raise ValueError(f"the balanced layout cuts T into 2 * num_shards = {2 * num_shards} equal chunks; "
                         f"T = {x.shape[axis]} (axis {axis}) is not a multiple of it")
    return num_shards


def context_parallel_nsa(query, key, value, g_cmp, g_slc, g_swa, block_indices, block_counts, block_size: int,
                         window_size: int, scale: float, cu_seqlens, platform, context_axis, layout: str):
    """The local rows of the NSA over the whole sequence, for this shard's chunk (see the
    module docstring). Arguments are validated local blocks [B, T/n, ...]."""
    n = axis_size(context_axis)
    i = lax.axis_index(context_axis)
    t_local = query.shape[1]
    gather = lambda x: lax.all_gather(x, context_axis, axis=1, tiled=True)  # noqa: E731
    k_all, v_all = gather(key), gather(value)  # [B, n * T/n, ...], shard order
    if layout == "balanced":
        k_all, v_all = context_restore(k_all, n), context_restore(v_all, n)
        half = t_local // 2
        parts = [(0, i * half), (half, (2 * n - 1 - i) * half)]  # (local start, global position)
        lengths = [half, half]
    else:
        parts, lengths = [(0, i * t_local)], [t_local]
    rows = (g_cmp, g_slc, g_swa, block_indices, block_counts if not isinstance(block_counts, int) else None)
    outs = []
    for (start, offset), length in zip(parts, lengths):
        sl = lambda x: None if x is None else lax.slice_in_dim(x, start, start + length, axis=1)  # noqa: E731
        gc, gs, gw, bi, bc = (sl(x) for x in rows)
        outs.append(_queries_at(sl(query), k_all, v_all, gc, gs, gw, bi, block_counts if bc is None else bc,
                                block_size, window_size, scale, cu_seqlens, platform, offset))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _queries_at(query, key, value, g_cmp, g_slc, g_swa, block_indices, block_counts, block_size, window_size, scale,
                cu_seqlens, platform, offset):
    """NSA of the queries at global positions [offset, offset + TQ) over all TK keys."""
    batch, tq = query.shape[:2]
    tk = key.shape[1]
    end = offset + tq
    if cu_seqlens is not None:  # B == 1: each sequence's queries in the window, its keys up to `end`
        cu = sanitize_cu_seqlens(cu_seqlens, tk)
        pair = (jnp.clip(cu, offset, end) - offset, jnp.minimum(cu, end))
        return kernel_registry.call("native_sparse_attention", query, key, value, g_cmp, g_slc, g_swa, block_indices,
                                    block_counts, block_size, window_size, scale, pair, platform=platform)
    # One packed row: batch row b is the sequence (its queries, its keys [0, end)), then a
    # sequence without queries that holds its keys [end, TK).
    b = jnp.arange(batch, dtype=jnp.int32)
    cu_q = jnp.stack([b * tq, (b + 1) * tq], axis=1).reshape(-1)
    cu_k = jnp.stack([b * tk, b * tk + end], axis=1).reshape(-1)
    cu_q = jnp.concatenate([cu_q, jnp.full((1,), batch * tq, jnp.int32)])
    cu_k = jnp.concatenate([cu_k, jnp.full((1,), batch * tk, jnp.int32)])
    pack = lambda x: None if x is None else x.reshape((1, -1) + x.shape[2:])  # noqa: E731
    counts = block_counts if isinstance(block_counts, int) else pack(block_counts)
    o = kernel_registry.call("native_sparse_attention", pack(query), pack(key), pack(value), pack(g_cmp),
                             pack(g_slc), pack(g_swa), pack(block_indices), counts, block_size, window_size, scale,
                             (cu_q, cu_k), platform=platform)
    return o.reshape((batch, tq) + o.shape[2:])
