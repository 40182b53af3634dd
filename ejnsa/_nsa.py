"""The NSA pipeline: pooling -> compression -> top-k -> selection -> window -> gating.

One composition serves every platform: each piece runs through the kernel registry with
the platform the pipeline was built for (so a piece that platform cannot serve falls back
by the registry's policy), while mean pooling and the gated sum stay in XLA (cheap,
fusable, differentiated by JAX). `register_pipeline` registers the composition as the
platform's "native_sparse_attention".
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ._registry import Backend, Platform, kernel_registry
from ._varlen import cdiv, key_cu, token_info


def topk_slots(block_counts, num_keys: int, block_size: int) -> int:
    """Static number of top-k slots: S for an int; every possible block for an array.

    An array's counts are unknown at trace time, so top-k keeps ceil(TK / l) slots, enough
    for any count; slots past a token's count are ignored (or set to -1 by nsa_topk).
    """
    if isinstance(block_counts, int):
        return block_counts
    return cdiv(num_keys, block_size)


def clamp_counts(block_counts, num_slots: int):
    """None for an int (all S entries are used), else the array clamped to [0, S]."""
    if isinstance(block_counts, int):
        return None
    return jnp.clip(block_counts.astype(jnp.int32), 0, num_slots)


def native_sparse_attention_pipeline(
    query,
    key,
    value,
    g_cmp,
    g_slc,
    g_swa,
    block_indices,
    block_counts,
    block_size,
    window_size,
    softmax_scale,
    cu_seqlens,
    *,
    platform: Platform,
):
    """Validated arguments in, o [B, T, HQ, Dv] out (query's dtype)."""
    def piece(name, *args):
        return kernel_registry.call(name, *args, platform=platform)

    def pool(x):
        return kernel_registry.call("mean_pooling", x, block_size, key_cu(cu_seqlens))

    num_keys = key.shape[1]

    o_cmp = None
    if g_cmp is not None or block_indices is None:
        k_cmp = pool(key)
        lse = None
        if g_cmp is not None:
            v_cmp = pool(value)
            o_cmp, lse = piece("nsa_compression", query, k_cmp, v_cmp, block_size, softmax_scale, cu_seqlens, num_keys)
        if block_indices is None:
            # Selection is not differentiable (semantics.md piece 3): no gradient through the scores.
            slots = topk_slots(block_counts, num_keys, block_size)
            block_indices = piece(
                "nsa_topk",
                jax.lax.stop_gradient(query),
                jax.lax.stop_gradient(k_cmp),
                None if lse is None else jax.lax.stop_gradient(lse),
                slots,
                block_size,
                softmax_scale,
                cu_seqlens,
                num_keys,
            )

    counts = clamp_counts(block_counts, block_indices.shape[-1])
    o_slc = piece(
        "apply_native_sparse_attention", query, key, value, block_indices, counts, block_size, softmax_scale, cu_seqlens
    )

    def gated(o, g):
        return o.astype(jnp.float32) * g.astype(jnp.float32)[..., None]

    o = gated(o_slc, g_slc) if g_slc is not None else o_slc.astype(jnp.float32)
    if o_cmp is not None:
        o = o + gated(o_cmp, g_cmp)
    if window_size > 0:
        o_swa = piece("sliding_window_attention", query, key, value, window_size, softmax_scale, cu_seqlens)
        o = o + gated(o_swa, g_swa)
    if cu_seqlens is not None:
        # Tokens outside every sequence output 0 whatever their gates hold (a select: no
        # gradient reaches their gates either).
        inside = token_info(cu_seqlens, query.shape[1], block_size, num_keys).inside
        o = jnp.where(inside[None, :, None, None], o, 0.0)
    return o.astype(query.dtype)


def register_pipeline(platform: Platform, backend: Backend) -> None:
    fn = functools.partial(native_sparse_attention_pipeline, platform=platform)
    functools.update_wrapper(fn, native_sparse_attention_pipeline)
    kernel_registry.register("native_sparse_attention", platform, backend)(fn)
