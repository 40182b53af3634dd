"""Selected (block-sparse) attention (semantics.md piece 4), in XLA.

For each token the keys of its listed blocks are gathered ([S * l] keys per token and
KV head) and attended with a causal mask. A block listed twice is gathered twice, so
its keys count twice in the softmax, as the spec says.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info
from ._common import einsum, map_query_chunks, masked_softmax_stats, normalise

# Gathered keys per chunk and KV head: chunk * S * l is kept near this many.
GATHERED_KEYS = 1 << 16


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, T, H, D], idx [B, C, H, K] token indices -> [B, C, H, K, D]."""
    b, c, h, k = idx.shape
    xt = jnp.moveaxis(x, 2, 1)  # [B, H, T, D]
    it = jnp.moveaxis(idx, 2, 1).reshape(b, h, c * k)
    g = jax.vmap(jax.vmap(lambda xx, ii: jnp.take(xx, ii, axis=0)))(xt, it)  # [B, H, C*K, D]
    return jnp.moveaxis(g.reshape(b, h, c, k, -1), 1, 2)


@kernel_registry.register("apply_native_sparse_attention", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(5, 6))
def apply_native_sparse_attention(query, key, value, block_indices, block_counts, block_size, softmax_scale, cu_seqlens):
    """o_slc [B, TQ, HQ, Dv] in query's dtype (key [B, TK, H, Dk]).

    `block_counts` is None (use all S entries) or int [B, T, H].
    """
    batch, seq_len, hq, _ = query.shape
    num_keys, h = key.shape[1], key.shape[2]
    num_sel = block_indices.shape[-1]
    info = token_info(cu_seqlens, seq_len, block_size, num_keys)
    if block_counts is None:
        block_counts = jnp.full(block_indices.shape[:3], num_sel, jnp.int32)
    offs = jnp.arange(block_size, dtype=jnp.int32)
    # Cast before the chunk loop: the gradient of the gather is a scatter-add over every
    # token that selected a key, and it must accumulate in float32, not in bf16.
    key32, value32 = key.astype(jnp.float32), value.astype(jnp.float32)

    def body(q, idx, cnt, pos, bos, inside):
        c = q.shape[1]
        slot = jnp.arange(num_sel, dtype=jnp.int32)
        # A block starting after the token holds no visible key; testing that on the
        # index itself (not on idx * l) keeps huge out-of-range indices from overflowing.
        cur = (pos // block_size)[None, :, None, None]
        use = (idx >= 0) & (idx <= cur) & (slot < cnt[..., None]) & inside[None, :, None, None]  # [B, C, H, S]
        kpos = jnp.where(use, idx, 0)[..., None] * block_size + offs  # position in the sequence [B, C, H, S, l]
        ok = use[..., None] & (kpos <= pos[None, :, None, None, None])
        tok = jnp.clip(bos[None, :, None, None, None] + kpos, 0, num_keys - 1).reshape(batch, c, h, -1)
        ok = ok.reshape(batch, c, h, -1)
        # Keys are gathered per token, so a masked slot can be zeroed outright: it then
        # carries neither a NaN forward nor a gradient back (docs/semantics.md, "Bad values").
        kg = jnp.where(ok[..., None], gather_tokens(key32, tok), 0.0)  # [B, C, H, S*l, Dk]
        vg = jnp.where(ok[..., None], gather_tokens(value32, tok), 0.0)
        qg = q.astype(jnp.float32).reshape(batch, c, h, hq // h, -1)
        s = einsum("bchgd,bchjd->bchgj", qg, kg) * softmax_scale
        p, denom, _, has = masked_softmax_stats(s, ok[:, :, :, None, :])
        o = normalise(einsum("bchgj,bchjd->bchgd", p, vg), denom, has)
        # NaN for a row that attends a non-finite key or value, whatever the arithmetic
        # made of it (an Inf value would give Inf, an Inf key a score of -inf).
        kv_bad = ~jnp.all(jnp.isfinite(kg), -1) | ~jnp.all(jnp.isfinite(vg), -1)  # [B, C, H, S*l]
        o = jnp.where((has & jnp.any(kv_bad, -1)[..., None])[..., None], jnp.nan, o)
        return o.reshape(batch, c, hq, -1)

    chunk = max(1, GATHERED_KEYS // (num_sel * block_size))
    idx = block_indices.astype(jnp.int32)
    o = map_query_chunks(body, chunk, (query, idx, block_counts.astype(jnp.int32)), (info.pos, info.bos, info.inside),
                         seq_len)
    return o.astype(query.dtype)
