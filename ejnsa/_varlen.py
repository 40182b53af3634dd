"""Per-token and per-sequence metadata for packed (varlen) batches.

A packed batch has B == 1 and `cu_seqlens` [N+1] (FlashAttention convention). Every
implementation needs the same facts about it: where a token's sequence starts, the
token's position inside it, and where the sequence's compressed blocks start in the
packed `k_cmp`. They are computed here once, in jnp, so they work under `jit` with
traced `cu_seqlens` and serve the XLA code and the Triton launchers alike.

Malformed `cu_seqlens` cannot be detected under `jit`. Every implementation reads it as
`sanitize_cu_seqlens` makes it: clipped into [cu[0], cu[-1]] (themselves clipped into
[0, T]) and made non-decreasing. Tokens outside [cu[0], cu[-1]) then belong to no
sequence (`TokenInfo.inside` is False): they attend nothing, and nothing attends them.
So a malformed value gives well-defined numbers on every platform, and never an
out-of-bounds access (docs/semantics.md, "Bad values").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_compressed_rows(seq_len: int, block_size: int, num_seqs: int | None) -> int:
    """Static number of rows of `mean_pooling`'s output.

    Without cu_seqlens: ceil(T / l). With N packed sequences the true count,
    sum_i ceil(len_i / l), depends on values, so the static shape is its upper bound
    min(T, T // l + N) (each sequence adds at most one partial block) and the rows past
    the true count are zero.
    """
    if num_seqs is None:
        return cdiv(seq_len, block_size)
    return max(1, min(seq_len, seq_len // block_size + num_seqs))


class TokenInfo(NamedTuple):
    """Per-token facts, each [T] (int32; `inside` bool)."""

    pos: jax.Array  # position of the token inside its sequence
    bos: jax.Array  # index (in the packed T axis) of its sequence's first token
    seq_len: jax.Array  # length of its sequence
    boc: jax.Array  # row of its sequence's first compressed block in packed k_cmp
    inside: jax.Array  # the token belongs to a sequence (False outside [cu[0], cu[-1]))


class SeqInfo(NamedTuple):
    """Per-sequence facts, each int32 [N]."""

    bos: jax.Array
    seq_len: jax.Array
    boc: jax.Array  # first compressed row
    num_blocks: jax.Array  # ceil(len / l)


def sanitize_cu_seqlens(cu_seqlens: jax.Array, seq_len: int) -> jax.Array:
    """cu_seqlens as every implementation reads it: int32, its ends clipped into [0, T]
    (the last one to at least the first), every entry clipped between them, and running
    maxima taken so that it never decreases. A valid cu_seqlens comes back unchanged."""
    cu = cu_seqlens.astype(jnp.int32)
    lo = jnp.clip(cu[0], 0, seq_len)
    hi = jnp.clip(cu[-1], lo, seq_len)
    return jax.lax.cummax(jnp.clip(cu, lo, hi), axis=0)


def sequence_info(cu_seqlens: jax.Array | None, seq_len: int, block_size: int) -> SeqInfo:
    """Facts per sequence; without cu_seqlens a single sequence of length T."""
    if cu_seqlens is None:
        one = lambda x: jnp.full((1,), x, jnp.int32)
        return SeqInfo(one(0), one(seq_len), one(0), one(cdiv(seq_len, block_size)))
    cu = sanitize_cu_seqlens(cu_seqlens, seq_len)
    bos = cu[:-1]
    lens = cu[1:] - bos
    nblk = (lens + block_size - 1) // block_size
    boc = jnp.cumsum(nblk) - nblk
    return SeqInfo(bos, lens, boc.astype(jnp.int32), nblk.astype(jnp.int32))


def token_info(cu_seqlens: jax.Array | None, seq_len: int, block_size: int) -> TokenInfo:
    """Facts per token of the T axis (shared by all batch rows when cu_seqlens is None).

    A token outside every sequence gets the facts of the nearest sequence (pos 0 before
    the first, past the end after the last) and inside = False; implementations mask it.
    """
    t = jnp.arange(seq_len, dtype=jnp.int32)
    if cu_seqlens is None:
        zeros = jnp.zeros_like(t)
        return TokenInfo(t, zeros, jnp.full_like(t, seq_len), zeros, jnp.ones((seq_len,), bool))
    cu = sanitize_cu_seqlens(cu_seqlens, seq_len)
    seqs = sequence_info(cu, seq_len, block_size)
    n = seqs.bos.shape[0]
    # side="right" puts a token at a boundary into the sequence that starts there, and
    # skips empty sequences (whose start equals the next one's).
    sid = jnp.searchsorted(cu[1:], t, side="right")
    sid = jnp.clip(sid, 0, n - 1)
    bos = seqs.bos[sid]
    inside = (t >= cu[0]) & (t < cu[-1])
    return TokenInfo(jnp.maximum(t - bos, 0), bos, seqs.seq_len[sid], seqs.boc[sid], inside)


def segment_tiles(bounds: jax.Array, length: int, tile: int) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """Tiles of at most `tile` consecutive indices of [0, length) that never straddle a
    boundary of the segments [bounds[i], bounds[i + 1]) (bounds non-decreasing, from 0 to
    `length`): (first index [NT], length [NT], segment [NT], NT).

    The count sum_i ceil(len_i / tile) depends on values; NT = ceil(length / tile) + the
    number of segments bounds it statically, and the tiles past the true count have length 0.
    """
    starts = bounds[:-1]
    lens = bounds[1:] - starts
    nseg = starts.shape[0]
    num_tiles = cdiv(length, tile) + nseg
    per = (lens + tile - 1) // tile
    ends = jnp.cumsum(per)
    i = jnp.arange(num_tiles, dtype=jnp.int32)
    sid = jnp.clip(jnp.searchsorted(ends, i, side="right"), 0, nseg - 1).astype(jnp.int32)
    j = i - (ends[sid] - per[sid])  # tile within its segment
    first = starts[sid] + j * tile
    n = jnp.where(i < ends[-1], jnp.clip(lens[sid] - j * tile, 0, tile), 0)
    return first.astype(jnp.int32), n.astype(jnp.int32), sid, num_tiles


def token_segments(cu_seqlens: jax.Array, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """The T axis cut into [0, cu[0]), the N sequences, [cu[-1], T): bounds int32 [N + 3]
    and whether each of the N + 2 segments is a sequence (bool [N + 2])."""
    cu = sanitize_cu_seqlens(cu_seqlens, seq_len)
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), cu, jnp.full((1,), seq_len, jnp.int32)])
    n = cu.shape[0] - 1
    live = jnp.arange(n + 2) - 1
    return bounds, (live >= 0) & (live < n)
