"""Decoding with a KV cache: `NSACache`, `init_nsa_cache`, `nsa_decode` (docs/decode.md).

A decode step appends the new tokens' keys and values to the cache and runs NSA for the
new queries over everything cached so far. It never reads the whole cache: the compressed
keys/values of complete blocks are kept in the cache and extended when a block completes
(the mean of its l keys, computed once), top-k scores the cached compressed keys, and the
selected blocks and the window are gathered from the cache. All buffers have a fixed
size, so a jitted step compiles once for every context length; each batch row has its
own length, so rows of different lengths decode together.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from . import _validate as V
from ._nsa import clamp_counts, topk_slots
from ._api import PlatformArg
from ._registry import kernel_registry
from ._varlen import cdiv


class NSACache(NamedTuple):
    """The KV cache of one NSA layer: a pytree of fixed-size buffers.

    key [B, L, H, Dk], value [B, L, H, Dv]: the cached tokens of each row (positions
    [0, lengths[b]) are filled); key_cmp [B, L/l, H, Dk], value_cmp [B, L/l, H, Dv]: the
    mean of each complete block of l cached keys/values (rows of incomplete blocks are
    unused); lengths int32 [B]: tokens cached per row. L (the capacity) is a multiple of the
    block size l = L / (L/l).
    """

    key: Float[Array, "B L H Dk"]
    value: Float[Array, "B L H Dv"]
    key_cmp: Float[Array, "B NB H Dk"]
    value_cmp: Float[Array, "B NB H Dv"]
    lengths: Int[Array, " B"]

    @property
    def capacity(self) -> int:
        return self.key.shape[1]

    @property
    def block_size(self) -> int:
        return self.key.shape[1] // self.key_cmp.shape[1]


def init_nsa_cache(batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None,
                   *, block_size: int = 64, dtype=jnp.float32) -> NSACache:
    """An empty cache for `batch_size` rows of up to `max_length` tokens (rounded up to a
    multiple of `block_size`), `num_kv_heads` KV heads of dims head_dim / v_head_dim
    (default head_dim), stored in `dtype`."""
    for name, val in (("batch_size", batch_size), ("max_length", max_length), ("num_kv_heads", num_kv_heads),
                      ("head_dim", head_dim)):
        V._require_int(name, val, minimum=1)
    v_head_dim = head_dim if v_head_dim is None else V._require_int("v_head_dim", v_head_dim, minimum=1)
    block_size = V.check_block_size(block_size)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    blocks = cdiv(max_length, block_size)
    cap = blocks * block_size
    return NSACache(
        key=jnp.zeros((batch_size, cap, num_kv_heads, head_dim), dtype),
        value=jnp.zeros((batch_size, cap, num_kv_heads, v_head_dim), dtype),
        key_cmp=jnp.zeros((batch_size, blocks, num_kv_heads, head_dim), dtype),
        value_cmp=jnp.zeros((batch_size, blocks, num_kv_heads, v_head_dim), dtype),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def append_to_cache(cache: NSACache, key, value, num_new):
    """(cache with the new tokens stored, start, taken) where start [B] is each row's
    length before and taken [B] how many of its new tokens fit: row b stores its first
    num_new[b] tokens at [start, start + taken), taken = min(num_new, L - start); the
    complete blocks among them get their means. Reads only the new tokens and the blocks
    they complete."""
    batch, tn = key.shape[:2]
    cap, l = cache.capacity, cache.block_size
    start = jnp.clip(cache.lengths.astype(jnp.int32), 0, cap)
    taken = jnp.clip(num_new, 0, cap - start)
    i = jnp.arange(tn, dtype=jnp.int32)
    pos = start[:, None] + i
    dest = jnp.where(i[None, :] < taken[:, None], pos, cap)  # cap: out of range, dropped
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    k = cache.key.at[rows, dest].set(key.astype(cache.key.dtype), mode="drop")
    v = cache.value.at[rows, dest].set(value.astype(cache.value.dtype), mode="drop")
    end = start + taken
    # Blocks that complete here: c from start // l while (c + 1) * l <= end; at most
    # tn // l + 1 of them (fewer when start is not block-aligned).
    nb = tn // l + 1
    c = start[:, None] // l + jnp.arange(nb, dtype=jnp.int32)  # [B, nb]
    done = (c + 1) * l <= end[:, None]
    tok = jnp.clip(c[..., None] * l + jnp.arange(l, dtype=jnp.int32), 0, cap - 1).reshape(batch, nb * l)

    def block_means(x):  # as ejnsa.mean_pooling: the float32 mean of l tokens, in x's dtype
        g = jnp.take_along_axis(x, tok[:, :, None, None], axis=1).reshape(batch, nb, l, *x.shape[2:])
        return (g.astype(jnp.float32).sum(axis=2) / jnp.float32(l)).astype(x.dtype)

    slot = jnp.where(done, c, cache.key_cmp.shape[1])  # past the end: dropped
    kc = cache.key_cmp.at[rows, slot].set(block_means(k), mode="drop")
    vc = cache.value_cmp.at[rows, slot].set(block_means(v), mode="drop")
    return NSACache(k, v, kc, vc, end), start, taken


def nsa_decode(
    cache: NSACache,
    query: Float[Array, "B TN HQ Dk"],
    key: Float[Array, "B TN H Dk"],
    value: Float[Array, "B TN H Dv"],
    g_cmp: Float[Array, "B TN HQ"] | None = None,
    g_slc: Float[Array, "B TN HQ"] | None = None,
    g_swa: Float[Array, "B TN HQ"] | None = None,
    *,
    block_counts: int | Int[Array, "B TN H"] = 16,
    block_size: int = 64,
    window_size: int = 0,
    softmax_scale: float | None = None,
    num_new: Int[Array, " B"] | None = None,
    platform: PlatformArg = None,
) -> tuple[Float[Array, "B TN HQ Dv"], NSACache]:
    """One decode (or chunked-prefill) step: append TN new tokens per row, attend them.

    Row b's new tokens stand at positions cache.lengths[b] + [0, TN). The output is what
    `native_sparse_attention` gives those rows when called on the row's whole sequence so
    far (the same arguments: gates, block_counts, block_size, window_size, softmax_scale).
    num_new (int32 [B], default TN everywhere): row b takes only its first num_new[b] new
    tokens; the rest are padding (output 0, not stored), so rows of different lengths can
    be prefilled together. A token that does not fit the cache's capacity is not stored and
    outputs NaN. Returns (o [B, TN, HQ, Dv] in query's dtype, the updated cache).
    """
    if not isinstance(cache, NSACache):
        raise TypeError(f"cache must be an ejnsa.NSACache (from ejnsa.init_nsa_cache), got {type(cache).__name__}")
    V.check_attention_inputs(query, key, value)
    if query.shape[1] != key.shape[1]:
        raise ValueError(f"query and key must hold the same new tokens (TN), got query {query.shape}, key {key.shape}")
    batch, tn, hq, _ = query.shape
    for name, buf, d in (("key", cache.key, key.shape[3]), ("value", cache.value, value.shape[3])):
        if buf.ndim != 4 or buf.shape[0] != batch or buf.shape[2] != key.shape[2] or buf.shape[3] != d:
            raise ValueError(f"cache.{name} {tuple(buf.shape)} does not fit the new {name} {tuple(key.shape[:3]) + (d,)}: "
                             f"want [B, L, H, D] = {[batch, 'L', key.shape[2], d]}")
    block_size = V.check_block_size(block_size)
    if cache.key_cmp.shape[1] * block_size != cache.capacity or cache.capacity % block_size:
        raise ValueError(f"the cache was made for block_size={cache.block_size} (capacity {cache.capacity}, "
                         f"{cache.key_cmp.shape[1]} blocks), got block_size={block_size}")
    for name, buf, src in (("key_cmp", cache.key_cmp, cache.key), ("value_cmp", cache.value_cmp, cache.value)):
        if tuple(buf.shape) != (batch, cache.key_cmp.shape[1]) + tuple(src.shape[2:]):
            raise ValueError(f"cache.{name} must have shape {[batch, cache.key_cmp.shape[1], *src.shape[2:]]}, "
                             f"got {tuple(buf.shape)}")
    if cache.lengths.shape != (batch,) or not jnp.issubdtype(cache.lengths.dtype, jnp.integer):
        raise ValueError(f"cache.lengths must be an integer array [B] = [{batch}], got {cache.lengths.dtype} "
                         f"{tuple(cache.lengths.shape)}")
    g_cmp = V.check_gate("g_cmp", g_cmp, query)
    g_slc = V.check_gate("g_slc", g_slc, query)
    g_swa = V.check_gate("g_swa", g_swa, query)
    window_size = V.check_window_gate(window_size, g_swa)
    block_counts = V.check_block_counts(block_counts, query, key)
    scale = V.check_softmax_scale(softmax_scale, query.shape[-1])
    if num_new is None:
        num_new = jnp.full((batch,), tn, jnp.int32)
    else:
        V._require_int_array("num_new", num_new)
        if tuple(num_new.shape) != (batch,):
            raise ValueError(f"num_new must be an integer array [B] = [{batch}], got shape {tuple(num_new.shape)}")
        num_new = jnp.clip(jnp.asarray(num_new, jnp.int32), 0, tn)

    cache, start, taken = append_to_cache(cache, key, value, num_new)
    slots = topk_slots(block_counts, cache.capacity, block_size)
    counts = None if isinstance(block_counts, numbers.Integral) else clamp_counts(block_counts, slots)
    o = kernel_registry.call("nsa_decode", query, cache.key, cache.value, cache.key_cmp, cache.value_cmp, g_cmp, g_slc,
                             g_swa, start, taken, counts, slots, block_size, window_size, scale, platform=platform)
    # Tokens asked for that the cache could not hold: NaN, never a silent 0.
    lost = jnp.arange(tn, dtype=jnp.int32)[None, :] >= taken[:, None]
    lost &= jnp.arange(tn, dtype=jnp.int32)[None, :] < num_new[:, None]
    o = jnp.where(lost[:, :, None, None], jnp.nan, o)
    return o, cache


__all__ = ["NSACache", "append_to_cache", "init_nsa_cache", "nsa_decode"]
