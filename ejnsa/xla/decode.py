"""NSA of new tokens against a KV cache (docs/decode.md), in XLA: the decode step's attention.

The cache already holds the new tokens' keys (ejnsa._decode appends them first). Token i
of row b stands at position start[b] + i and is real when i < num_new[b]. It reads only
what NSA needs, never the whole cache:

- the compressed keys/values of the cache (every complete block; [B, L/l, H, D]);
- top-k over those same compressed scores (the rule of `nsa_topk`: forced first, current
  and previous blocks, stable order);
- the l keys of each of its S selected blocks, and its w window keys, gathered per token.

Rows are mapped with `jax.vmap`; within a row the new tokens go in chunks (`lax.map`), so
a prefill chunk of many tokens keeps memory O(chunk * (S * l + w + L / l)). The bad-value
rules are the full call's: a token that attends a non-finite key or value returns NaN,
a token that sees no compressed block gets o_cmp = 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from ._common import einsum, finite_part, map_query_chunks, mark_bad, masked_softmax_stats, normalise
from .compression import compression_scores, grouped, visible_rows
from .selection import gather_tokens
from .topk import _top_k, block_scores

# Gathered keys per chunk of new tokens and KV head (chunk * (S * l + w) is kept near this).
GATHERED_KEYS = 1 << 16


def _attend_gathered(qg, kg, vg, ok, scale):
    """Attention of qg [1, C, H, G, Dk] over per-token gathered keys kg [1, C, H, J, Dk] where
    ok [1, C, H, J]; masked keys are zeroed (no NaN crosses a mask), and a row that attends a
    non-finite key or value is NaN. Returns [1, C, H, G, Dv] float32."""
    kg = jnp.where(ok[..., None], kg, 0.0)
    vg = jnp.where(ok[..., None], vg, 0.0)
    s = einsum("bchgd,bchjd->bchgj", qg, kg) * scale
    p, denom, _, has = masked_softmax_stats(s, ok[:, :, :, None, :])
    o = normalise(einsum("bchgj,bchjd->bchgd", p, vg), denom, has)
    bad = ~jnp.all(jnp.isfinite(kg), -1) | ~jnp.all(jnp.isfinite(vg), -1)  # [1, C, H, J]
    return jnp.where((has & jnp.any(bad, -1)[..., None])[..., None], jnp.nan, o)


@kernel_registry.register("nsa_decode", Platform.XLA, Backend.ANY)
@functools.partial(jax.jit, static_argnums=(11, 12, 13, 14))
def nsa_decode(query, key, value, k_cmp, v_cmp, g_cmp, g_slc, g_swa, start, num_new, block_counts, num_slots,
               block_size, window_size, softmax_scale):
    """o [B, TN, HQ, Dv] in query's dtype for the TN new tokens of each row.

    key/value [B, L, H, D]: the cache (new tokens included); k_cmp/v_cmp [B, L/l, H, D] its
    complete blocks' means; start, num_new int32 [B]; block_counts None or int32 [B, TN, H]
    clamped to [0, num_slots]; num_slots the static number of top-k slots.
    """
    batch, tn, hq, _ = query.shape
    cap, h = key.shape[1], key.shape[2]
    rows = k_cmp.shape[1]
    w = min(window_size, cap)
    chunk = max(1, GATHERED_KEYS // (num_slots * block_size + max(w, 1)))
    counts = jnp.full((batch, tn, h), num_slots, jnp.int32) if block_counts is None else block_counts
    gates = tuple(jnp.zeros((batch, tn, hq), query.dtype) if g is None else g for g in (g_cmp, g_slc, g_swa))

    def row(q, k, v, kc, vc, gc, gs, gw, cnt, start, n):
        k32, v32 = k.astype(jnp.float32)[None], v.astype(jnp.float32)[None]
        kc_raw = kc[None]
        kc32, kc_bad = finite_part(kc.astype(jnp.float32)[None])
        vc32, vc_bad = finite_part(vc.astype(jnp.float32)[None])
        i = jnp.arange(tn, dtype=jnp.int32)
        pos = start + i
        real = i < n

        def body(q, gc, gs, gw, cnt, pos, real):
            c = q.shape[1]
            qg = grouped(q, h)  # [1, C, H, G, Dk]
            vis = visible_rows(pos, jnp.zeros_like(pos), real, rows, block_size)  # [C, NB]
            lse = None
            o = jnp.zeros((1, c, h, hq // h, v.shape[-1]), jnp.float32)
            # One score tile serves the compressed branch and top-k. With g_cmp the finite
            # part of the keys (a row that sees a non-finite block is NaN anyway, whatever it
            # selects); without, the raw keys, as nsa_topk scores them.
            s = compression_scores(qg, kc32 if g_cmp is not None else kc_raw, softmax_scale)
            if g_cmp is not None:
                p, denom, lse, has = masked_softmax_stats(s, vis[None, :, None, None, :])
                o_cmp = normalise(einsum("bchgj,bjhd->bchgd", p, vc32), denom, has)
                o_cmp, lse = mark_bad(o_cmp, lse, has, vis, kc_bad | vc_bad)
                o_cmp = o_cmp.astype(query.dtype).astype(jnp.float32)  # the branch's output dtype
                o = o + o_cmp * gc.reshape(1, c, h, -1, 1).astype(jnp.float32)

            score = block_scores(s, vis, lse, pos, jnp.zeros_like(pos), real, block_size)  # [1, C, H, NB]
            if rows < num_slots:
                score = jnp.pad(score, ((0, 0),) * 3 + ((0, num_slots - rows),), constant_values=-jnp.inf)
            val, idx = _top_k(score, num_slots)
            idx = jnp.where(val > -jnp.inf, idx, -1)  # [1, C, H, S]

            # Selected blocks: keys idx * l + [0, l) up to the token's own position.
            slot = jnp.arange(num_slots, dtype=jnp.int32)
            cur = (pos // block_size)[None, :, None, None]
            use = (idx >= 0) & (idx <= cur) & (slot < cnt[..., None]) & real[None, :, None, None]
            kpos = jnp.where(use, idx, 0)[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)
            ok = (use[..., None] & (kpos <= pos[None, :, None, None, None])).reshape(1, c, h, -1)
            tok = jnp.clip(kpos, 0, cap - 1).reshape(1, c, h, -1)
            o_slc = _attend_gathered(qg, gather_tokens(k32, tok), gather_tokens(v32, tok), ok, softmax_scale)
            o_slc = o_slc.astype(query.dtype).astype(jnp.float32)
            o = o + (o_slc * gs.reshape(1, c, h, -1, 1).astype(jnp.float32) if g_slc is not None else o_slc)

            if window_size > 0:  # keys p - w < j <= p
                j = pos[:, None] - (w - 1) + jnp.arange(w, dtype=jnp.int32)  # [C, w]
                okw = jnp.broadcast_to(((j >= 0) & real[:, None])[None, :, None, :], (1, c, h, w))
                tokw = jnp.broadcast_to(jnp.clip(j, 0, cap - 1)[None, :, None, :], (1, c, h, w))
                o_swa = _attend_gathered(qg, gather_tokens(k32, tokw), gather_tokens(v32, tokw), okw, softmax_scale)
                o = o + o_swa.astype(query.dtype).astype(jnp.float32) * gw.reshape(1, c, h, -1, 1).astype(jnp.float32)
            o = jnp.where(real[None, :, None, None, None], o, 0.0)  # padding tokens output 0
            return o.reshape(1, c, hq, -1)

        o = map_query_chunks(body, chunk, (q[None], gc[None], gs[None], gw[None], cnt[None]), (pos, real), tn)
        return o[0]

    o = jax.vmap(row)(query, key, value, k_cmp, v_cmp, *gates, counts, start, num_new)
    return o.astype(query.dtype)
