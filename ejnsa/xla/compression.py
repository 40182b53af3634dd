"""Compressed attention (semantics.md piece 2) and its block scores, in XLA.

Token t (position p in its sequence) sees its sequence's compressed block c iff
(c+1)*l - 1 <= p: the block is complete and in the past. With packed sequences the
blocks live in one packed k_cmp, so token t sees the global rows
[boc_t, boc_t + (p+1)//l).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info, token_segments
from ._common import einsum, finite_part, map_query_chunks, mark_bad, masked_softmax_stats, normalise

# Queries per chunk; the per-chunk score tile is [B, chunk, HQ, TC].
CHUNK = 256


def visible_rows(pos: jax.Array, boc: jax.Array, inside: jax.Array, num_rows: int, block_size: int) -> jax.Array:
    """[C, TC] mask of the packed compressed rows each token sees (none outside every sequence)."""
    j = jnp.arange(num_rows, dtype=jnp.int32)[None, :]
    lo = boc[:, None]
    return (j >= lo) & (j < lo + (pos[:, None] + 1) // block_size) & inside[:, None]


def grouped(q, kv_heads: int):
    """q [B, C, HQ, D] -> float32 [B, C, H, G, D]: query head hq reads KV head hq // G."""
    batch, chunk, hq, d = q.shape
    return q.astype(jnp.float32).reshape(batch, chunk, kv_heads, hq // kv_heads, d)


def compression_scores(qg, k_cmp, softmax_scale):
    """Scaled scores [B, C, H, G, TC] of a grouped query chunk qg [B, C, H, G, Dk]."""
    return einsum("bchgd,bjhd->bchgj", qg, k_cmp.astype(jnp.float32)) * softmax_scale


@kernel_registry.register("nsa_compression", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(3, 4, 6))
def nsa_compression(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, num_keys=None):
    """(o_cmp [B, TQ, HQ, Dv] in query's dtype, lse_cmp [B, TQ, HQ] float32); num_keys = TK (None: TQ)."""
    batch, seq_len, hq, _ = query.shape
    info = token_info(cu_seqlens, seq_len, block_size, num_keys)
    # float32 before the chunk loop, so that k_cmp/v_cmp cotangents accumulate in float32;
    # their finite parts, with the rows that hold a NaN or Inf marked (docs/semantics.md).
    k32, k_bad = finite_part(k_cmp.astype(jnp.float32))
    v32, v_bad = finite_part(v_cmp.astype(jnp.float32))
    h = k_cmp.shape[2]

    def body(q, pos, boc, seq, inside):
        kc, vc = k32, v32
        if cu_seqlens is not None:
            # A chunk holds one sequence (map_query_chunks): the rows of the others are 0
            # and take no gradient, whatever their values and cotangents hold.
            r = jnp.arange(kc.shape[1], dtype=jnp.int32)
            own = ((r >= boc[0]) & (r < boc[0] + (seq[0] + block_size - 1) // block_size) & inside[0])
            kc = jnp.where(own[None, :, None, None], kc, 0.0)
            vc = jnp.where(own[None, :, None, None], vc, 0.0)
        qg = grouped(q, h)
        s = compression_scores(qg, kc, softmax_scale)
        vis = visible_rows(pos, boc, inside, k32.shape[1], block_size)
        p, denom, lse, has = masked_softmax_stats(s, vis[None, :, None, None, :])
        o = normalise(einsum("bchgj,bjhd->bchgd", p, vc), denom, has)
        o, lse = mark_bad(o, lse, has, vis, k_bad | v_bad)
        return o.reshape(batch, q.shape[1], hq, -1), lse.reshape(batch, q.shape[1], hq)

    bounds = None if cu_seqlens is None else token_segments(cu_seqlens, seq_len)[0]
    o, lse = map_query_chunks(body, CHUNK, (query,), (info.pos, info.boc, info.seq_len, info.inside), seq_len, bounds)
    return o.astype(query.dtype), lse
