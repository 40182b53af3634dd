"""Public functions: validate -> resolve the platform -> call the registered implementation."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from . import _validate as V
from ._nsa import clamp_counts, topk_slots
from ._registry import Platform, kernel_registry
from ._varlen import num_compressed_rows

PlatformArg = Platform | str | None


def native_sparse_attention(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B T H Dk"],
    value: Float[Array, "B T H Dv"],
    g_cmp: Float[Array, "B T HQ"] | None = None,
    g_slc: Float[Array, "B T HQ"] | None = None,
    g_swa: Float[Array, "B T HQ"] | None = None,
    block_indices: Int[Array, "B T H S"] | None = None,
    block_counts: int | Int[Array, "B T H"] = 16,
    block_size: int = 64,
    window_size: int = 0,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, "N+1"] | None = None,
    platform: PlatformArg = None,
) -> Float[Array, "B T HQ Dv"]:
    """Native Sparse Attention: gated sum of compressed, selected and sliding-window attention.

    query [B, T, HQ, Dk], key [B, T, H, Dk], value [B, T, H, Dv] (HQ a multiple of H; query
    head hq reads KV head hq // (HQ/H)); gates [B, T, HQ]. With block_indices None the
    selected blocks are chosen by top-k over the compressed branch (block_counts = S
    blocks per token, no gradient through the choice); otherwise block_indices
    [B, T, H, S] are used as given. window_size > 0 adds the sliding-window branch and
    requires g_swa. cu_seqlens [N+1] packs N sequences along T (B must be 1).

    Returns o [B, T, HQ, Dv] in query's dtype:
    (g_slc * o_slc or o_slc) + g_cmp * o_cmp (if g_cmp) + g_swa * o_swa (if window_size > 0).
    """
    V.check_attention_inputs(query, key, value)
    g_cmp = V.check_gate("g_cmp", g_cmp, query)
    g_slc = V.check_gate("g_slc", g_slc, query)
    g_swa = V.check_gate("g_swa", g_swa, query)
    block_size = V.check_block_size(block_size)
    window_size = V.check_window_size(window_size)
    if window_size > 0 and g_swa is None:
        raise ValueError(f"window_size={window_size} > 0 needs the gate g_swa [B, T, HQ], got g_swa=None")
    if window_size == 0 and g_swa is not None:
        raise ValueError("g_swa was given but window_size is 0; pass window_size > 0 to use the sliding-window branch")
    block_counts = V.check_block_counts(block_counts, query, key)
    if block_indices is not None:
        block_indices = V.check_block_indices(block_indices, query, key)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0])
    return kernel_registry.call("native_sparse_attention", query, key, value, g_cmp, g_slc, g_swa, block_indices,
                                block_counts, block_size, window_size, scale, cu_seqlens, platform=platform)


def apply_native_sparse_attention(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B T H Dk"],
    value: Float[Array, "B T H Dv"],
    block_indices: Int[Array, "B T H S"],
    block_counts: int | Int[Array, "B T H"] = 16,
    block_size: int = 64,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, "N+1"] | None = None,
    platform: PlatformArg = None,
) -> Float[Array, "B T HQ Dv"]:
    """Selected attention over given blocks -> o_slc [B, T, HQ, Dv].

    Token t attends to keys j <= t of the blocks block_indices[t, h, :n] (n = all S when
    block_counts is an int, else block_counts[t, h]); entries < 0 or past the token are
    ignored, an entry listed twice is attended twice, no attended key gives 0.
    """
    V.check_attention_inputs(query, key, value)
    block_indices = V.check_block_indices(block_indices, query, key)
    block_counts = V.check_block_counts(block_counts, query, key)
    block_size = V.check_block_size(block_size)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0])
    counts = clamp_counts(block_counts, block_indices.shape[-1])
    return kernel_registry.call("apply_native_sparse_attention", query, key, value, block_indices, counts, block_size,
                                scale, cu_seqlens, platform=platform)


def mean_pooling(
    x: Float[Array, "B T H D"], block_size: int, cu_seqlens: Int[Array, "N+1"] | None = None
) -> Float[Array, "B TC H D"]:
    """Means of consecutive blocks of block_size tokens -> [B, TC, H, D].

    TC = ceil(T / l); with cu_seqlens (N sequences) the blocks of all sequences are packed
    in order into a static TC = min(T, T // l + N) rows, the rows past the real count zero.
    """
    V.check_pooling_input(x)
    block_size = V.check_block_size(block_size)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, x.shape[0])
    return kernel_registry.call("mean_pooling", x, block_size, cu_seqlens)


def _min_rows(query, block_size: int, cu_seqlens) -> int:
    return num_compressed_rows(query.shape[1], block_size, None if cu_seqlens is None else cu_seqlens.shape[0] - 1)


def nsa_compression(
    query: Float[Array, "B T HQ Dk"],
    k_cmp: Float[Array, "B TC H Dk"],
    v_cmp: Float[Array, "B TC H Dv"],
    block_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, "N+1"] | None = None,
    platform: PlatformArg = None,
) -> tuple[Float[Array, "B T HQ Dv"], Float[Array, "B T HQ"]]:
    """Attention over complete past compressed blocks -> (o_cmp [B, T, HQ, Dv], lse_cmp [B, T, HQ] f32).

    Token t sees block c iff (c+1)*l - 1 <= t; a token that sees none gets o = 0, lse = -inf.
    """
    V.check_query(query)
    block_size = V.check_block_size(block_size)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0])
    V.check_compressed(k_cmp, v_cmp, query, _min_rows(query, block_size, cu_seqlens))
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    return kernel_registry.call("nsa_compression", query, k_cmp, v_cmp, block_size, scale, cu_seqlens, platform=platform)


def nsa_topk(
    query: Float[Array, "B T HQ Dk"],
    k_cmp: Float[Array, "B TC H Dk"],
    block_counts: int | Int[Array, "B T H"],
    block_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, "N+1"] | None = None,
    platform: PlatformArg = None,
) -> Int[Array, "B T H S"]:
    """Top-S blocks per token and KV head -> int32 [B, T, H, S], -1 padded.

    Scores are the compressed softmax probabilities averaged over the KV head's query
    heads; blocks {0, t//l, t//l - 1} are forced (score 1.0); ties go to the smaller
    index; indices come in descending score order. With an array block_counts, S is
    ceil(T / l) and each token keeps its first block_counts[t, h] slots.
    """
    V.check_query(query)
    block_size = V.check_block_size(block_size)
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0])
    V.check_compressed(k_cmp, None, query, _min_rows(query, block_size, cu_seqlens))
    counts = V.check_block_counts(block_counts, query, k_cmp)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    slots = topk_slots(counts, query.shape[1], block_size)
    idx = kernel_registry.call("nsa_topk", query, k_cmp, None, slots, block_size, scale, cu_seqlens, platform=platform)
    counts = clamp_counts(counts, slots)
    if counts is not None:
        idx = jnp.where(jnp.arange(slots) < counts[..., None], idx, -1)
    return idx


def sliding_window_attention(
    query: Float[Array, "B T HQ Dk"],
    key: Float[Array, "B T H Dk"],
    value: Float[Array, "B T H Dv"],
    window_size: int,
    softmax_scale: float | None = None,
    cu_seqlens: Int[Array, "N+1"] | None = None,
    platform: PlatformArg = None,
) -> Float[Array, "B T HQ Dv"]:
    """Causal attention over the last window_size keys (t - w < j <= t) -> o_swa [B, T, HQ, Dv]."""
    V.check_attention_inputs(query, key, value)
    window_size = V.check_window_size(window_size)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1 for sliding_window_attention, got {window_size}")
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    cu_seqlens = V.check_cu_seqlens(cu_seqlens, query.shape[0])
    return kernel_registry.call("sliding_window_attention", query, key, value, window_size, scale, cu_seqlens,
                                platform=platform)
