"""Per-token and per-sequence metadata for packed (varlen) batches and for queries that
are a suffix of the keys.

A packed batch has B == 1 and `cu_seqlens` [N+1] (FlashAttention convention), or a pair
(cu_q, cu_k) when the queries are fewer than the keys: sequence i's queries are then the
last cu_q[i+1] - cu_q[i] positions of its cu_k[i+1] - cu_k[i] keys. Without cu_seqlens,
query i of TQ stands at position TK - TQ + i of the TK keys. Every implementation needs
the same facts: where a query's sequence starts on the key axis, the query's position in
it, and where the sequence's compressed blocks start in the packed `k_cmp`. They are
computed here once, in jnp, so they work under `jit` with traced `cu_seqlens` and serve
the XLA code and the Triton launchers alike.

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
    """Per-query facts, each [TQ] (int32; `inside`, `after` bool). Positions and starts are
    on the key axis (for TQ == TK and one cu_seqlens the two axes are the same)."""

    pos: jax.Array  # position of the query inside its sequence (key positions)
    bos: jax.Array  # index on the key axis of its sequence's first key
    seq_len: jax.Array  # number of keys of its sequence
    boc: jax.Array  # row of its sequence's first compressed block in packed k_cmp
    inside: jax.Array  # the query belongs to a sequence (False outside [cu[0], cu[-1]))
    key: jax.Array  # index on the key axis of the query's own position: bos + pos
    after: jax.Array  # the query lies after every sequence (an outside query that is not before)


def key_cu(cu_seqlens):
    """The cu_seqlens of the key axis: cu_k of a pair, the array itself otherwise."""
    return cu_seqlens[1] if isinstance(cu_seqlens, tuple) else cu_seqlens


def query_cu(cu_seqlens):
    """The cu_seqlens of the query axis: cu_q of a pair, the array itself otherwise."""
    return cu_seqlens[0] if isinstance(cu_seqlens, tuple) else cu_seqlens


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


def sequence_info(cu_seqlens, seq_len: int, block_size: int) -> SeqInfo:
    """Facts per sequence of the key axis (seq_len = TK; cu: the array, or cu_k of a pair);
    without cu_seqlens a single sequence of length TK."""
    if cu_seqlens is None:
        one = lambda x: jnp.full((1,), x, jnp.int32)
        return SeqInfo(one(0), one(seq_len), one(0), one(cdiv(seq_len, block_size)))
    cu = sanitize_cu_seqlens(key_cu(cu_seqlens), seq_len)
    bos = cu[:-1]
    lens = cu[1:] - bos
    nblk = (lens + block_size - 1) // block_size
    boc = jnp.cumsum(nblk) - nblk
    return SeqInfo(bos, lens, boc.astype(jnp.int32), nblk.astype(jnp.int32))


def token_info(cu_seqlens, seq_len: int, block_size: int, num_keys: int | None = None) -> TokenInfo:
    """Facts per query of the query axis (shared by all batch rows when cu_seqlens is None).

    num_keys: TK (None: TK = TQ = seq_len). cu_seqlens: None, one array (TQ == TK), or a
    pair (cu_q, cu_k). A query outside every sequence gets the facts of the nearest
    sequence (pos 0 before the first, past the end after the last) and inside = False;
    implementations mask it. So does a query of a sequence with more queries than keys
    (a malformed pair under jit): its position would be negative.
    """
    tk = seq_len if num_keys is None else num_keys
    t = jnp.arange(seq_len, dtype=jnp.int32)
    if cu_seqlens is None:
        zeros = jnp.zeros_like(t)
        pos = t + (tk - seq_len)
        no = jnp.zeros((seq_len,), bool)
        return TokenInfo(pos, zeros, jnp.full_like(t, tk), zeros, ~no, pos, no)
    cu_q = sanitize_cu_seqlens(query_cu(cu_seqlens), seq_len)
    cu_k = sanitize_cu_seqlens(key_cu(cu_seqlens), tk)
    seqs = sequence_info(cu_k, tk, block_size)
    n = seqs.bos.shape[0]
    # side="right" puts a query at a boundary into the sequence that starts there, and
    # skips empty sequences (whose start equals the next one's).
    sid = jnp.clip(jnp.searchsorted(cu_q[1:], t, side="right"), 0, n - 1)
    len_q = cu_q[sid + 1] - cu_q[sid]
    pos = seqs.seq_len[sid] - len_q + (t - cu_q[sid])
    inside = (t >= cu_q[0]) & (t < cu_q[-1]) & (pos >= 0)
    pos = jnp.maximum(pos, 0)
    bos = seqs.bos[sid]
    return TokenInfo(pos, bos, seqs.seq_len[sid], seqs.boc[sid], inside, bos + pos, t >= cu_q[-1])


class KeySide(NamedTuple):
    """Per-key facts for mapping keys to the queries that see them, each int32 [TK]."""

    first: jax.Array  # key index of the first query position of the key's sequence
    end: jax.Array  # key index one past the key's sequence
    off: jax.Array  # key index - query index, for the queries of the key's sequence
    inside: jax.Array  # bool: the key belongs to a sequence
    q_start: jax.Array  # query index of the key's sequence's first query


def key_side(cu_seqlens, num_queries: int, num_keys: int) -> KeySide:
    """Which queries can see key j: those of its sequence, from key position `first` on;
    a query at key index p has query index p - off."""
    j = jnp.arange(num_keys, dtype=jnp.int32)
    if cu_seqlens is None:
        full = lambda x: jnp.full((num_keys,), x, jnp.int32)  # noqa: E731
        return KeySide(full(num_keys - num_queries), full(num_keys), full(num_keys - num_queries),
                       jnp.ones((num_keys,), bool), full(0))
    cu_q = sanitize_cu_seqlens(query_cu(cu_seqlens), num_queries)
    cu_k = sanitize_cu_seqlens(key_cu(cu_seqlens), num_keys)
    n = cu_k.shape[0] - 1
    sid = jnp.clip(jnp.searchsorted(cu_k[1:], j, side="right"), 0, n - 1)
    len_q = cu_q[sid + 1] - cu_q[sid]
    first = cu_k[sid + 1] - len_q
    return KeySide(first, cu_k[sid + 1], cu_k[sid + 1] - cu_q[sid + 1], (j >= cu_k[0]) & (j < cu_k[-1]), cu_q[sid])


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


def token_segments(cu_seqlens, seq_len: int) -> tuple[jax.Array, jax.Array]:
    """The query axis cut into [0, cu[0]), the N sequences, [cu[-1], T) (cu: the array, or
    cu_q of a pair): bounds int32 [N + 3] and whether each of the N + 2 segments is a
    sequence (bool [N + 2])."""
    cu = sanitize_cu_seqlens(query_cu(cu_seqlens), seq_len)
    bounds = jnp.concatenate([jnp.zeros((1,), jnp.int32), cu, jnp.full((1,), seq_len, jnp.int32)])
    n = cu.shape[0] - 1
    live = jnp.arange(n + 2) - 1
    return bounds, (live >= 0) & (live < n)
