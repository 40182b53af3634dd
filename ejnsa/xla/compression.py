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
from .._varlen import token_info
from ._common import einsum, map_query_chunks, masked_softmax_stats, normalise

# Queries per chunk; the per-chunk score tile is [B, chunk, HQ, TC].
CHUNK = 256


def visible_rows(pos: jax.Array, boc: jax.Array, num_rows: int, block_size: int) -> jax.Array:
    """[C, TC] mask of the packed compressed rows each token sees."""
    j = jnp.arange(num_rows, dtype=jnp.int32)[None, :]
    lo = boc[:, None]
    return (j >= lo) & (j < lo + (pos[:, None] + 1) // block_size)


def compression_scores(q, k_cmp, pos, boc, block_size, softmax_scale):
    """Scaled scores [B, C, H, G, TC] of a query chunk and the visibility mask [C, TC]."""
    batch, chunk, hq, dk = q.shape
    h = k_cmp.shape[2]
    qg = q.astype(jnp.float32).reshape(batch, chunk, h, hq // h, dk)
    s = einsum("bchgd,bjhd->bchgj", qg, k_cmp.astype(jnp.float32)) * softmax_scale
    return s, visible_rows(pos, boc, k_cmp.shape[1], block_size)


@kernel_registry.register("nsa_compression", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(3, 4))
def nsa_compression(query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens):
    """(o_cmp [B, T, HQ, Dv] in query's dtype, lse_cmp [B, T, HQ] float32)."""
    batch, seq_len, hq, _ = query.shape
    info = token_info(cu_seqlens, seq_len, block_size)
    # float32 before the chunk loop, so that k_cmp/v_cmp cotangents accumulate in float32.
    k32, v32 = k_cmp.astype(jnp.float32), v_cmp.astype(jnp.float32)

    def body(q, pos, boc):
        s, vis = compression_scores(q, k32, pos, boc, block_size, softmax_scale)
        p, denom, lse = masked_softmax_stats(s, vis[None, :, None, None, :])
        o = einsum("bchgj,bjhd->bchgd", p, v32)
        o = normalise(o, denom)
        return o.reshape(batch, q.shape[1], hq, -1), lse.reshape(batch, q.shape[1], hq)

    o, lse = map_query_chunks(body, CHUNK, (query,), (info.pos, info.boc), seq_len)
    return o.astype(query.dtype), lse
