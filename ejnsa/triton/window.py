"""Sliding-window attention (semantics.md piece 5) in Triton: the band kernels of
ejnsa.triton.band over the window's intervals.

A query at key position p sees the keys max(bos, p - w + 1) .. p of its own sequence;
seen from the key side, key j is seen by the queries at positions j .. min(j + w - 1,
eos - 1). Both ends never decrease with the query (or the key), which is all the band
kernels need; queries that are a suffix of the keys are just other intervals.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import key_cu, key_side, sanitize_cu_seqlens, token_info, token_segments
from .band import BandConfigs, Intervals, band_attention, clip_intervals


@dataclasses.dataclass(frozen=True)
class WindowIntervals:
    """The window's band for `band_attention`: query t (key position p, key index kq) sees
    the keys max(bos, kq - w + 1) .. kq of its sequence; key j is seen by the queries at key
    indices j .. min(j + w - 1, eos - 1) from the sequence's first query on (query index =
    key index - the sequence's offset, `_varlen.key_side`)."""

    window_size: int

    def __call__(self, cu_seqlens, num_queries: int, num_keys: int) -> Intervals:
        info = token_info(cu_seqlens, num_queries, 16, num_keys)  # the block size plays no part here
        w = min(self.window_size, num_keys)  # a window past TK sees the same keys as one of TK
        klo, khi = jnp.maximum(info.bos, info.key - w + 1), info.key + 1
        ks = key_side(cu_seqlens, num_queries, num_keys)
        j = jnp.arange(num_keys, dtype=jnp.int32)
        qf = jnp.maximum(j, ks.first) - ks.off
        ql = jnp.where(ks.inside, jnp.minimum(j + w - 1, ks.end - 1) - ks.off, qf - 1)
        bounds = None
        if cu_seqlens is not None:
            # A query outside every sequence sees no key: an empty interval at its
            # sequence's start (at the keys' end after the last), so that both ends never
            # decrease with t.
            end = sanitize_cu_seqlens(key_cu(cu_seqlens), num_keys)[-1]
            khi = jnp.where(info.inside, khi, jnp.where(info.after, end, info.bos))
            klo = jnp.where(info.inside, klo, khi)
            bounds = token_segments(key_cu(cu_seqlens), num_keys)[0]
        return clip_intervals(Intervals(klo, khi, qf, ql, bounds), num_queries, num_keys)


def sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs: BandConfigs):
    """`sliding_window_attention` with explicit tiles (tests, tuning)."""
    o, _ = band_attention(WindowIntervals(int(window_size)), float(softmax_scale), configs, query, key, value, cu_seqlens)
    return o


@kernel_registry.register("sliding_window_attention", Platform.TRITON, Backend.GPU)
def sliding_window_attention(query, key, value, window_size, softmax_scale, cu_seqlens):
    """o_swa [B, TQ, HQ, Dv] in query's dtype: keys j with max(bos, p - w + 1) <= j <= p, p the
    query's key position.

    query [B, TQ, HQ, Dk], key [B, TK, H, Dk], value [B, TK, H, Dv]; cu_seqlens None, int32
    [N + 1] or a pair (cu_q, cu_k) (B == 1). Differentiable in query, key and value.
    """
    configs = BandConfigs.default(query.shape[-1], value.shape[-1], query.dtype)
    return sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs)
