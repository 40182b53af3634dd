"""Public functions: validate -> kernel_registry.call (which picks the implementation).

Queries may be a suffix of the keys: query [B, TQ, ...] with TQ <= TK, query i standing at
position TK - TQ + i of the keys (packed: `cu_seqlens=(cu_q, cu_k)`, each sequence's
queries the last positions of its keys). The functions that see only compressed keys
(`nsa_compression`, `nsa_topk`) take the key length TK as `key_length`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from . import _validate as V
from ._context import context_parallel_nsa
from ._nsa import clamp_counts, topk_slots
from ._registry import Platform, kernel_registry
from ._varlen import key_cu, num_compressed_rows

PlatformArg = Platform | str | None
# One array [N+1] (TQ == TK), or a pair (cu_q, cu_k).
CuSeqlens = Int[Array, "N+1"] | tuple[Int[Array, "N+1"], Int[Array, "N+1"]]


def native_sparse_attention(
    query: Float[Array, "B TQ HQ Dk"],
    key: Float[Array, "B TK H Dk"],
    value: Float[Array, "B TK H Dv"],
    g_cmp: Float[Array, "B TQ HQ"] | None = None,
    g_slc: Float[Array, "B TQ HQ"] | None = None,
    g_swa: Float[Array, "B TQ HQ"] | None = None,
    block_indices: Int[Array, "B TQ H S"] | None = None,
    block_counts: int | Int[Array, "B TQ H"] = 16,
    block_size: int = 64,
    window_size: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens: CuSeqlens | None = None,
    platform: PlatformArg = None,
    context_axis: str | None = None,
    context_layout: str = "contiguous",
) -> Float[Array, "B TQ HQ Dv"]:
    """Native Sparse Attention: gated sum of compressed, selected and sliding-window attention.

    query [B, TQ, HQ, Dk], key [B, TK, H, Dk], value [B, TK, H, Dv] (HQ a multiple of H;
    query head hq reads KV head hq // (HQ/H); TQ <= TK, query i at key position TK - TQ + i);
    gates [B, TQ, HQ]. With block_indices None the selected blocks are chosen by top-k over
    the compressed branch (block_counts = S blocks per token, no gradient through the
    choice); otherwise block_indices [B, TQ, H, S] are used as given. window_size > 0 adds
    the sliding-window branch and requires g_swa. cu_seqlens [N+1] packs N sequences along
    T (B must be 1; TQ == TK), or (cu_q, cu_k) packs queries and keys apart.

    Returns o [B, TQ, HQ, Dv] in query's dtype, the last TQ rows of the call with every
    position as a query:
    (g_slc * o_slc or o_slc) + g_cmp * o_cmp (if g_cmp) + g_swa * o_swa (if window_size > 0).

    context_axis: inside `jax.shard_map` with T split over this mesh axis, every argument
    is the shard's block of T (cu_seqlens: the global array, the same on every shard) and
    the result is the shard's rows of the NSA over the whole sequence (docs/sharding.md).
    context_layout: "contiguous" (shard i holds the i-th chunk of T) or "balanced" (shard i
    holds chunks i and 2n-1-i of 2n; `ejnsa.context_reorder`).
    """
    V.check_attention_inputs(query, key, value)
    g_cmp = V.check_gate("g_cmp", g_cmp, query)
    g_slc = V.check_gate("g_slc", g_slc, query)
    g_swa = V.check_gate("g_swa", g_swa, query)
    block_size = V.check_block_size(block_size)
    window_size = V.check_window_gate(window_size, g_swa)
    block_counts = V.check_block_counts(block_counts, query, key)
    if block_indices is not None:
        block_indices = V.check_block_indices(block_indices, query, key)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0], query.shape[1], key.shape[1])
    if context_axis is not None:
        V.check_context(context_axis, context_layout, query, key, cu_seqlens)
        return context_parallel_nsa(query, key, value, g_cmp, g_slc, g_swa, block_indices, block_counts, block_size,
                                    window_size, scale, cu_seqlens, platform, context_axis, context_layout)
    return kernel_registry.call("native_sparse_attention", query, key, value, g_cmp, g_slc, g_swa, block_indices,
                                block_counts, block_size, window_size, scale, cu_seqlens, platform=platform)


def apply_native_sparse_attention(
    query: Float[Array, "B TQ HQ Dk"],
    key: Float[Array, "B TK H Dk"],
    value: Float[Array, "B TK H Dv"],
    block_indices: Int[Array, "B TQ H S"],
    block_counts: int | Int[Array, "B TQ H"] = 16,
    block_size: int = 64,
    softmax_scale: float | None = None,
    cu_seqlens: CuSeqlens | None = None,
    platform: PlatformArg = None,
) -> Float[Array, "B TQ HQ Dv"]:
    """Selected attention over given blocks -> o_slc [B, TQ, HQ, Dv].

    Query t (at key position p) attends to keys j <= p of the blocks block_indices[t, h, :n]
    (n = all S when block_counts is an int, else block_counts[t, h]); entries < 0 or past
    the query are ignored, an entry listed twice is attended twice, no attended key gives 0.
    """
    V.check_attention_inputs(query, key, value)
    block_indices = V.check_block_indices(block_indices, query, key)
    block_counts = V.check_block_counts(block_counts, query, key)
    block_size = V.check_block_size(block_size)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0], query.shape[1], key.shape[1])
    counts = clamp_counts(block_counts, block_indices.shape[-1])
    return kernel_registry.call("apply_native_sparse_attention", query, key, value, block_indices, counts, block_size,
                                scale, cu_seqlens, platform=platform)


def mean_pooling(
    x: Float[Array, "B TK H D"], block_size: int, cu_seqlens: CuSeqlens | None = None
) -> Float[Array, "B TC H D"]:
    """Means of consecutive blocks of block_size keys -> [B, TC, H, D].

    TC = ceil(TK / l); with cu_seqlens (N sequences; of a pair (cu_q, cu_k) the keys' cu_k)
    the blocks of all sequences are packed in order into a static TC = min(TK, TK // l + N)
    rows, the rows past the real count zero.
    """
    V.check_pooling_input(x)
    block_size = V.check_block_size(block_size)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, x.shape[0])
    return kernel_registry.call("mean_pooling", x, block_size, key_cu(cu_seqlens))


def _min_rows(num_keys: int, block_size: int, cu_seqlens) -> int:
    return num_compressed_rows(num_keys, block_size, None if cu_seqlens is None else key_cu(cu_seqlens).shape[0] - 1)


def nsa_compression(
    query: Float[Array, "B TQ HQ Dk"],
    k_cmp: Float[Array, "B TC H Dk"],
    v_cmp: Float[Array, "B TC H Dv"],
    block_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: CuSeqlens | None = None,
    platform: PlatformArg = None,
    key_length: int | None = None,
) -> tuple[Float[Array, "B TQ HQ Dv"], Float[Array, "B TQ HQ"]]:
    """Attention over complete past compressed blocks -> (o_cmp [B, TQ, HQ, Dv], lse_cmp [B, TQ, HQ] f32).

    A query at key position p sees block c iff (c+1)*l - 1 <= p; one that sees none gets
    o = 0, lse = -inf. key_length: the number TK of keys k_cmp was pooled from (the queries
    are the last TQ of them); None means TK = TQ. k_cmp cannot tell it: ceil(TK / l) rows
    fit many TK.
    """
    V.check_query(query)
    block_size = V.check_block_size(block_size)
    num_keys = V.check_key_length(key_length, query)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0], query.shape[1], num_keys)
    V.check_compressed(k_cmp, v_cmp, query, _min_rows(num_keys, block_size, cu_seqlens))
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    return kernel_registry.call("nsa_compression", query, k_cmp, v_cmp, block_size, scale, cu_seqlens, num_keys,
                                platform=platform)


def nsa_topk(
    query: Float[Array, "B TQ HQ Dk"],
    k_cmp: Float[Array, "B TC H Dk"],
    block_counts: int | Int[Array, "B TQ H"],
    block_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: CuSeqlens | None = None,
    platform: PlatformArg = None,
    key_length: int | None = None,
) -> Int[Array, "B TQ H S"]:
    """Top-S blocks per query and KV head -> int32 [B, TQ, H, S], -1 padded.

    Scores are the compressed softmax probabilities averaged over the KV head's query
    heads; blocks {0, p//l, p//l - 1} (p the query's key position) are forced (score 1.0);
    ties go to the smaller index; indices come in descending score order. With an array
    block_counts, S is ceil(TK / l) and each query keeps its first block_counts[t, h]
    slots. key_length: TK, as for `nsa_compression` (None: TK = TQ).
    """
    V.check_query(query)
    block_size = V.check_block_size(block_size)
    num_keys = V.check_key_length(key_length, query)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0], query.shape[1], num_keys)
    V.check_compressed(k_cmp, None, query, _min_rows(num_keys, block_size, cu_seqlens))
    counts = V.check_block_counts(block_counts, query, k_cmp)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    slots = topk_slots(counts, num_keys, block_size)
    idx = kernel_registry.call("nsa_topk", query, k_cmp, None, slots, block_size, scale, cu_seqlens, num_keys,
                               platform=platform)
    counts = clamp_counts(counts, slots)
    if counts is not None:
        idx = jnp.where(jnp.arange(slots) < counts[..., None], idx, -1)
    return idx


def sliding_window_attention(
    query: Float[Array, "B TQ HQ Dk"],
    key: Float[Array, "B TK H Dk"],
    value: Float[Array, "B TK H Dv"],
    window_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: CuSeqlens | None = None,
    platform: PlatformArg = None,
) -> Float[Array, "B TQ HQ Dv"]:
    """Causal attention over the last window_size keys (p - w < j <= p, p the query's key
    position) -> o_swa [B, TQ, HQ, Dv]."""
    V.check_attention_inputs(query, key, value)
    window_size = V.check_window_size(window_size)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1 for sliding_window_attention, got {window_size}")
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0], query.shape[1], key.shape[1])
    return kernel_registry.call("sliding_window_attention", query, key, value, window_size, scale, cu_seqlens,
                                platform=platform)
