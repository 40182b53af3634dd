"""Sliding-window attention (semantics.md piece 5), in XLA.

Each chunk of C queries needs only the C + w - 1 keys ending at its last query's
position, so the keys are cut with one dynamic slice per chunk and memory stays
O(TQ * (C + w)).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info, token_segments
from ._common import einsum, finite_part, map_query_chunks, mark_bad, masked_softmax_stats, normalise

CHUNK = 128


@kernel_registry.register("sliding_window_attention", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(3, 4))
def sliding_window_attention(query, key, value, window_size, softmax_scale, cu_seqlens):
    """o_swa [B, TQ, HQ, Dv] in query's dtype; keys j with p - w < j <= p in the query's
    sequence, p its key position."""
    batch, seq_len, hq, _ = query.shape
    num_keys, h = key.shape[1], key.shape[2]
    info = token_info(cu_seqlens, seq_len, 16, num_keys)  # the block size plays no part here
    w = min(window_size, num_keys)  # a window past TK sees the same keys as one of TK
    chunk = min(CHUNK, seq_len)
    span = chunk + w - 1
    # Padding lets every chunk slice the keys [k0 - (w - 1), k0 + chunk) in bounds, k0 the key
    # index of its first query (a chunk may start at any query: packed, at its sequence's).
    kp = jnp.pad(key.astype(jnp.float32), ((0, 0), (w - 1, chunk), (0, 0), (0, 0)))
    vp = jnp.pad(value.astype(jnp.float32), ((0, 0), (w - 1, chunk), (0, 0), (0, 0)))
    # (float32 before the chunk loop, so that the key/value cotangents of all chunks
    # accumulate in float32.)

    def body(q, kq, bos, seq, inside):
        c = q.shape[1]
        start = kq[0]  # key index of the chunk's first query; the slice begins w - 1 before it
        j = start - (w - 1) + jnp.arange(span, dtype=jnp.int32)  # key index
        kc = lax.dynamic_slice_in_dim(kp, start, span, axis=1)
        vc = lax.dynamic_slice_in_dim(vp, start, span, axis=1)
        if cu_seqlens is not None:
            # A chunk holds one sequence (map_query_chunks): its keys outside it are 0 and
            # take no gradient, whatever the other sequences' values and cotangents hold.
            own = ((j >= bos[0]) & (j < bos[0] + seq[0]) & inside[0])[None, :, None, None]
            kc, vc = jnp.where(own, kc, 0.0), jnp.where(own, vc, 0.0)
        kc, k_bad = finite_part(kc)
        vc, v_bad = finite_part(vc)
        ok = (j[None, :] <= kq[:, None]) & (j[None, :] > kq[:, None] - w) & (j[None, :] >= bos[:, None])
        ok &= inside[:, None]
        qg = q.astype(jnp.float32).reshape(batch, c, h, hq // h, -1)
        s = einsum("bchgd,bjhd->bchgj", qg, kc) * softmax_scale
        p, denom, lse, has = masked_softmax_stats(s, ok[None, :, None, None, :])
        o = normalise(einsum("bchgj,bjhd->bchgd", p, vc), denom, has)
        o, _ = mark_bad(o, lse, has, ok, k_bad | v_bad)
        return o.reshape(batch, c, hq, -1)

    bounds = None if cu_seqlens is None else token_segments(cu_seqlens, seq_len)[0]
    o = map_query_chunks(body, chunk, (query,), (info.key, info.bos, info.seq_len, info.inside), seq_len, bounds)
    return o.astype(query.dtype)
