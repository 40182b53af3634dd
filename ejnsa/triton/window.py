"""Sliding-window attention (semantics.md piece 5) in Triton: the band kernels of
ejnsa.triton.band over the window's intervals.

Token t sees the keys max(bos_t, t - w + 1) .. t of its own sequence; seen from the key
side, key j is seen by the tokens j .. min(j + w - 1, eos_j - 1). Both ends never
decrease with t (or j), which is all the band kernels need.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .._registry import Backend, Platform, kernel_registry
from .._varlen import token_info, token_segments
from .band import BandConfigs, Intervals, band_attention, clip_intervals


@dataclasses.dataclass(frozen=True)
class WindowIntervals:
    """The window's band for `band_attention`."""

    window_size: int

    def __call__(self, cu_seqlens, seq_len: int, num_keys: int) -> Intervals:
        info = token_info(cu_seqlens, seq_len, 16)  # the block size plays no part here
        w = min(self.window_size, seq_len)  # a window past T sees the same keys as one of T
        t = jnp.arange(seq_len, dtype=jnp.int32)
        eos = info.bos + info.seq_len
        klo, khi = jnp.maximum(info.bos, t - w + 1), t + 1
        qf, ql = t, jnp.minimum(t + w - 1, eos - 1)
        bounds = None
        if cu_seqlens is not None:
            # A token outside every sequence sees no key and no token sees it: empty
            # intervals that keep both ends non-decreasing ([t, t) before the sequences'
            # first start as well as after their end, as a token there has no keys).
            khi = jnp.where(info.inside, khi, jnp.where(t < info.bos, 0, t))
            klo = jnp.where(info.inside, klo, khi)
            ql = jnp.where(info.inside, ql, t - 1)
            bounds = token_segments(cu_seqlens, seq_len)[0]
        return clip_intervals(Intervals(klo, khi, qf, ql, bounds), seq_len, num_keys)


def sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs: BandConfigs):
    """`sliding_window_attention` with explicit tiles (tests, tuning)."""
    o, _ = band_attention(WindowIntervals(int(window_size)), float(softmax_scale), configs, query, key, value, cu_seqlens)
    return o


@kernel_registry.register("sliding_window_attention", Platform.TRITON, Backend.GPU)
def sliding_window_attention(query, key, value, window_size, softmax_scale, cu_seqlens):
    """o_swa [B, T, HQ, Dv] in query's dtype: keys j with max(bos, t - w + 1) <= j <= t.

    query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv]; cu_seqlens None or
    int32 [N + 1] (B == 1). Differentiable in query, key and value.
    """
    configs = BandConfigs.default(query.shape[-1], value.shape[-1], query.dtype)
    return sliding_window_attention_with(query, key, value, window_size, softmax_scale, cu_seqlens, configs)
